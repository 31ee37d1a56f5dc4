"""The config reference in docs/training.md, generated from the config models (model/config.py):
every key of every section, its type, default and description (the string under the field).

    python -m mmoe.model.config_reference            # rewrites the section of docs/training.md
    python -m mmoe.model.config_reference --check    # exit 1 if it is out of date

The sections are found by walking RunConfig's fields, so a new model or field appears without
being listed here; tests/model/test_config_reference.py fails while the file lags behind.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mmoe.model import config
from mmoe.model.config import RunConfig

BEGIN = "<!-- section:config-reference -->"
END = "<!-- /section:config-reference -->"
DOC = Path("docs/training.md")


def sections(
    model: type[BaseModel] = RunConfig, path: str = ""
) -> Iterator[tuple[str, type[BaseModel]]]:
    """(key path, model) of the model and of every model its fields hold, depth first, each
    model once (the first path that reaches it)."""
    seen: set[type] = set()

    def walk(model: type[BaseModel], path: str) -> Iterator[tuple[str, type[BaseModel]]]:
        if model in seen:
            return
        seen.add(model)
        yield path, model
        base = path.split(" (kind:")[0]  # a union member's kind titles its own section only
        for name, field in model.model_fields.items():
            sub = f"{base}.{name}" if base else name
            for inner, suffix in _models_in(field.annotation):
                yield from walk(inner, sub + suffix)

    yield from walk(model, path)


def _models_in(annotation: Any, suffix: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    """The models a field's type holds, with the key-path suffix that reaches each ("[]" for a
    list's items; " (kind: x)" for one member of a tagged union)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, suffix
    elif origin is typing.Annotated:
        yield from _models_in(args[0], suffix)
    elif origin is list:
        yield from _models_in(args[0], suffix + "[]")
    elif origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        tagged = len(members) > 1
        for member in members:
            kind = f" (kind: {_kind(member)})" if tagged else ""
            yield from _models_in(member, suffix + kind)


def _kind(model: Any) -> str:
    field = model.model_fields["kind"]
    return str(typing.get_args(field.annotation)[0])


def descriptions(model: type[BaseModel]) -> dict[str, str]:
    """Each field's description: the string under it in model/config.py (inherited fields from
    the class that declares them)."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        found |= _docstrings().get(cls.__name__, {})
    return found


_DOCSTRINGS: dict[str, dict[str, str]] = {}


def _docstrings() -> dict[str, dict[str, str]]:
    """Class name -> field -> the string literal right under the field, for model/config.py."""
    if not _DOCSTRINGS:
        tree = ast.parse(Path(inspect.getfile(config)).read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            docs = _DOCSTRINGS.setdefault(cls.name, {})
            for field, after in zip(cls.body, [*cls.body[1:], None], strict=True):
                if (
                    isinstance(field, ast.AnnAssign)
                    and isinstance(field.target, ast.Name)
                    and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                ):
                    docs[field.target.id] = inspect.cleandoc(after.value.value)
    return _DOCSTRINGS


def type_text(annotation: Any, constraints: Sequence[Any] = ()) -> str:
    """A field's type as the YAML file sees it, e.g. `list of int (>= 1)`, `mmoe | ple`;
    `constraints` are the field's (pydantic metadata), which apply to its value when not null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], [*args[1:], *constraints])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) > 1 and all(isinstance(m, type) for m in members):  # a tagged union
            kinds = [_kind(m) for m in members]
            text = f"feature (kind: {', '.join(kinds[:-1])} or {kinds[-1]})"
        else:
            text = " or ".join(type_text(m, constraints) for m in members)
        return text + " or null" if type(None) in args else text
    if origin is typing.Literal:
        text = " | ".join(str(a) for a in args)
    elif origin is list:
        text = f"list of {type_text(args[0])}"
    elif origin is dict:
        text = f"map of {type_text(args[0])} to {type_text(args[1])}"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        text = "mapping"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    bounds = _bounds(constraints, "items" if origin is list else "characters")
    if origin is list and bounds == "non-empty":
        return f"non-empty {text}"
    return f"{text} ({bounds})" if bounds else text


def _bounds(constraints: Sequence[Any], unit: str) -> str:
    """`>= 1, < 1`, `non-empty`, `an identifier`: what the constraints allow; `unit` counts a
    length (a list's items, a string's characters)."""
    parts = []
    for c in constraints:
        for m in c.metadata if isinstance(c, FieldInfo) else [c]:
            if isinstance(m, annotated_types.Ge):
                parts.append(f">= {m.ge}")
            elif isinstance(m, annotated_types.Gt):
                parts.append(f"> {m.gt}")
            elif isinstance(m, annotated_types.Le):
                parts.append(f"<= {m.le}")
            elif isinstance(m, annotated_types.Lt):
                parts.append(f"< {m.lt}")
            elif isinstance(m, annotated_types.MinLen):
                n = m.min_length
                parts.append("non-empty" if n == 1 else f"at least {n} {unit}")
            elif isinstance(m, annotated_types.MaxLen):
                n = m.max_length
                parts.append(f"at most {n} {unit.removesuffix('s') if n == 1 else unit}")
            elif getattr(m, "pattern", None):
                parts.append("an identifier")
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its defaults"
    return json.dumps(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference() -> str:
    """The section's text, markers included."""
    lines = [
        BEGIN,
        "<!-- Generated from model/config.py by `python -m mmoe.model.config_reference`: edit "
        "the descriptions there. -->",
    ]
    for path, model in sections():
        lines += ["", f"### `{path}`" if path else "### The file", ""]
        if model.__dict__.get("__doc__"):
            lines += [_cell(inspect.cleandoc(model.__doc__ or "")), ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        docs = descriptions(model)
        for name, field in model.model_fields.items():
            kind = _cell(type_text(field.annotation, list(field.metadata)))
            default = _cell(default_text(field))
            lines.append(f"| `{name}` | {kind} | {default} | {_cell(docs.get(name, ''))} |")
    return "\n".join([*lines, "", END])


def write(doc: Path = DOC) -> bool:
    """Rewrites the section in `doc`; whether it changed."""
    text = doc.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{doc}: no {BEGIN} ... {END} section to write")
    new = pattern.sub(lambda _: reference(), text)
    if new != text:
        doc.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmoe.model.config_reference", description=__doc__)
    p.add_argument("doc", nargs="?", type=Path, default=DOC, help="default: docs/training.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the section is out of date")
    args = p.parse_args(argv)
    if args.check:
        current = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), args.doc.read_text(), re.S)
        if current is None or current.group(0) != reference():
            print(f"{args.doc}: the config reference is out of date", file=sys.stderr)
            return 1
        return 0
    print(f"{args.doc}: {'rewritten' if write(args.doc) else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
