"""The /predict bodies the documentation shows (README.md, docs/*.md) are scored by a real server
(with an item table, for the bodies that send item ids alone), and where one example is shown
as columns and as rows, both forms score the same."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.docs import ROOT, documents
from tests.server import ServerProcess

CURL_BODY = re.compile(r"curl [^\n]*?/predict[^\n]*?-d '(\{.*?\})'", re.S)


def _bodies(doc: Path) -> list[dict[str, Any]]:
    return [orjson.loads(body) for body in CURL_BODY.findall(doc.read_text())]


def _ids_only(body: dict[str, Any]) -> bool:
    """A body whose candidates are item ids alone (their features come from the item table)."""
    return set(body.get("candidates", {})) == {"item_id"}


SHOWN = {str(doc.relative_to(ROOT)): _bodies(doc) for doc in documents() if _bodies(doc)}
# These show one example in both forms: the same three candidates of one user.
BOTH_FORMS = ("README.md", "docs/api.md")


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # The examples are for the demo model; the tiny one lacks a feature or two, which it drops.
    # Its item table holds the items the examples name.
    tmp = tmp_path_factory.mktemp("docs-server")
    items = {
        "item_id": ["i1", "i2", "i3"],
        "category": ["c1", "c2", "c1"],
        "price": [1.0, 2.0, 3.0],
    }
    pq.write_table(pa.table(items), tmp / "items.parquet")
    env = {"MMOE_UNKNOWN_FEATURES": "ignore", "MMOE_ITEMS": str(tmp / "items.parquet")}
    with ServerProcess(tiny_onnx, env, log_path=tmp / "server.log") as s:
        yield s


def test_the_readme_and_the_api_doc_show_both_forms() -> None:
    for doc in BOTH_FORMS:
        forms = {key for body in SHOWN.get(doc, []) for key in body}
        assert {"candidates", "instances"} <= forms, f"{doc} shows {sorted(forms)}"


@pytest.mark.parametrize("doc", sorted(SHOWN))
def test_shown_bodies_are_scored_and_both_forms_agree(server: ServerProcess, doc: str) -> None:
    scores = []
    for body in SHOWN[doc]:
        r = httpx.post(f"{server.url}/predict", json=body, timeout=30)
        assert r.status_code == 200, f"{doc}: {r.text}"
        if not _ids_only(body):
            scores.append(r.json()["scores"])
    if doc not in BOTH_FORMS:
        return
    for other in scores[1:]:
        for task, values in scores[0].items():
            assert other[task] == pytest.approx(values, rel=1e-6), f"{doc}: {task}"
