"""The request decoder in-process: errors in the row form name the row and the feature
(`instances[3].price`), as the columnar form names the column and the row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from mmoe.contract.metadata import read_metadata
from mmoe.service.errors import PayloadError
from mmoe.service.payload import RequestDecoder


@pytest.fixture(scope="module")
def decoder(tiny_onnx: Path) -> RequestDecoder:
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    return RequestDecoder(read_metadata(session.get_modelmeta().custom_metadata_map), 64)


def rows(bad: dict[str, Any]) -> bytes:
    good = {"user_id": "u1", "category": "c1", "price": 3.5}
    return json.dumps({"instances": [good, good, good, good | bad, good]}).encode()


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        ({"price": 1e300}, "instances[3].price", "outside the float32 range"),
        ({"category": None}, "instances[3].category", "no default and is required"),
        ({"price": "cheap"}, "instances[3].price", "Expected `float | null`"),
    ],
)
def test_row_form_errors_name_the_row_then_the_feature(
    decoder: RequestDecoder, bad: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(PayloadError) as err:
        decoder.decode(rows(bad))
    assert err.value.field == field
    assert reason.replace("`", "") in err.value.reason


def test_columnar_errors_name_the_column_then_the_row(decoder: RequestDecoder) -> None:
    body = {"candidates": {"category": ["c1", "c2"], "price": [1.0, 1e300]}}
    with pytest.raises(PayloadError) as err:
        decoder.decode(json.dumps({"context": {"user_id": "u"}} | body).encode())
    assert err.value.field == "candidates.price[1]"
