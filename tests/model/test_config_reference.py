"""docs/training.md's config reference is generated from the config models (model/config.py):
it is up to date, and it has every field of every model, each with a type, a default and a
description."""

from __future__ import annotations

import inspect
import re

from pydantic import BaseModel

from mmoe.model import config
from mmoe.model.config_reference import main, reference, sections
from tests.docs import ROOT, section

DOC = ROOT / "docs" / "training.md"


def test_the_reference_in_docs_training_is_up_to_date() -> None:
    assert main([str(DOC), "--check"]) == 0, (
        "docs/training.md's config reference is out of date: run "
        "`python -m mmoe.model.config_reference`"
    )


def test_the_reference_reaches_every_config_model() -> None:
    public = {
        cls
        for name, cls in inspect.getmembers(config, inspect.isclass)
        if issubclass(cls, BaseModel)
        and cls.__module__ == config.__name__
        and not name.startswith("_")
    }
    reached = {model for _, model in sections()}
    assert public <= reached, f"not reachable from RunConfig: {public - reached}"


def test_every_field_has_a_row_with_a_type_a_default_and_a_description() -> None:
    _, text = section("config-reference")
    tables = re.split(r"^### ", text, flags=re.M)[1:]
    by_heading = {t.splitlines()[0]: t for t in tables}
    for path, model in sections():
        heading = f"`{path}`" if path else "The file"
        assert heading in by_heading, f"no section {heading}"
        rows = {
            m.group(1): m.groups()[1:]
            for m in re.finditer(
                r"^\| `(\w+)` \| (.+?) \| (.+?) \| (.*) \|$", by_heading[heading], re.M
            )
        }
        for name in model.model_fields:
            assert name in rows, f"{heading}: no row for {name}"
            kind, default, description = rows[name]
            assert kind and default, f"{heading}.{name}"
            assert description.strip(), f"{heading}.{name} has no description in model/config.py"


def test_the_generated_text_is_what_the_doc_holds() -> None:
    _, text = section("config-reference")
    assert reference().split("\n", 1)[1].rsplit("\n", 1)[0] + "\n" == text
