"""The metadata's versioning (format_version first; newer minors' additive fields accepted, a
newer major refused with "upgrade the server") and the golden-row comparison."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from mmoe.contract.metadata import (
    FORMAT_VERSION,
    METADATA_KEY,
    GoldenRows,
    MetadataError,
    NewerFormatError,
    parse_format,
    read_metadata,
)


def metadata(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format_version": f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}",
        "name": "m",
        "version": "1",
        "features": [{"name": "price", "kind": "numeric", "dtype": "float32", "default": 0.0}],
        "tasks": [{"name": "ctr", "kind": "binary", "output": "probs_ctr"}],
    }
    meta.update(changes)
    return meta


def read(meta: dict[str, Any]) -> Any:
    return read_metadata({METADATA_KEY: json.dumps(meta)})


def test_a_newer_major_is_refused_before_anything_else_is_read() -> None:
    # Fields this reader does not know and a shape it would reject: the version speaks first.
    newer = metadata(format_version="2.0", features="a different layout", brand_new={"x": 1})
    with pytest.raises(NewerFormatError) as err:
        read(newer)
    assert str(err.value) == (
        "written by a newer exporter (format 2.0); this server reads "
        f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}; upgrade the server"
    )


def test_a_newer_minor_adds_optional_fields_this_reader_ignores() -> None:
    major, minor = FORMAT_VERSION
    meta = metadata(format_version=f"{major}.{minor + 1}", drift_reference={"price": 0.1})
    meta["features"][0]["observed_range"] = [0, 10]
    meta["tasks"][0]["calibration"] = "none"
    read_back = read(meta)
    assert read_back.features[0].name == "price" and read_back.tasks[0].output == "probs_ctr"


def test_an_unknown_field_at_this_readers_own_version_is_malformed() -> None:
    meta = metadata()
    meta["features"][0]["colour"] = "red"
    with pytest.raises(MetadataError, match=r"unknown field features\[0\]\.colour"):
        read(meta)
    with pytest.raises(MetadataError, match="unknown field extra_top"):
        read(metadata(extra_top=1))


def test_files_of_format_1_0_still_load() -> None:
    legacy = metadata(format_version=1)  # what exporters before 1.1 wrote
    assert read(legacy).golden is None
    assert parse_format(1) == (1, 0) and parse_format("1.1") == (1, 1)
    assert read(metadata()).format_version == f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"


@pytest.mark.parametrize("version", ["one", "1.x", 1.5, None, True])
def test_an_unreadable_format_version_is_malformed(version: object) -> None:
    with pytest.raises(MetadataError, match="format_version") as err:
        read(metadata(format_version=version))
    assert not isinstance(err.value, NewerFormatError)


def golden() -> GoldenRows:
    return GoldenRows(
        rows=[{"price": 1.0}, {"price": None}],
        outputs={"probs_ctr": [0.25, 0.5], "probs_k": [[0.1, 0.9], [0.5, 0.5]]},
        allowed={"probs_ctr": [1e-5, 1e-5], "probs_k": [[1e-5, 1e-5], [1e-5, 1e-5]]},
    )


def test_golden_mismatches_name_the_output_row_and_difference() -> None:
    g = golden()
    same = {"probs_ctr": np.array([0.250004, 0.5]), "probs_k": np.array([[0.1, 0.9], [0.5, 0.5]])}
    assert g.mismatches(same) == []
    off = {"probs_ctr": np.array([0.25, 0.52]), "probs_k": np.array([[0.1, 0.9], [0.5, np.nan]])}
    found = g.mismatches(off)
    assert [(m.output, m.row, m.index) for m in found] == [
        ("probs_ctr", 1, ()),
        ("probs_k", 1, (1,)),
    ]
    assert str(found[0]) == (
        "probs_ctr of golden row 1 is 0.52 where the exported model gave 0.5 "
        "(difference 0.02 > allowed 1e-05)"
    )
    with pytest.raises(ValueError, match="no output 'probs_k'"):
        g.mismatches({"probs_ctr": same["probs_ctr"]})
    with pytest.raises(ValueError, match="shape"):
        g.mismatches({"probs_ctr": np.zeros(3), "probs_k": same["probs_k"]})
