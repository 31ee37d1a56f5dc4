"""The names of a model's outputs (EasyRec's naming), spelled here only.

Per task: `probs_<task>` (binary: the probability [N]; multiclass: [N, classes]) and
`logits_<task>`, or `y_<task>` alone (regression); an ESMM task's product is `probs_<product>`.
Export names the graph's outputs by them and lists them in the metadata (`TaskInfo.output`,
`TaskInfo.logits`), which is what a server reads; evaluation and the bench's peers score by them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The outputs callers get as scores (probabilities and regression values), not logits.
SCORE_PREFIXES = ("probs_", "y_")


@dataclass(frozen=True)
class OutputNames:
    """The names one task's outputs are exported under."""

    score: str  # probs_<task> (binary, multiclass) or y_<task> (regression)
    logits: str | None  # logits_<task>; None for regression
    product: str | None = None  # probs_<product> of an ESMM task (`multiply`)


def output_names(task: str, kind: str, product: str | None = None) -> OutputNames:
    """The outputs of task `task` of kind `kind` (binary, multiclass, regression), and of its
    ESMM product `product` if it has one."""
    if kind == "regression":
        return OutputNames(f"y_{task}", None)
    return OutputNames(f"probs_{task}", f"logits_{task}", f"probs_{product}" if product else None)


def is_score(output: str) -> bool:
    """Whether an output is a score callers see (a probability or a regression value)."""
    return output.startswith(SCORE_PREFIXES)
