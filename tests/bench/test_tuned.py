"""The hand-tuned peer (bench/tuned.py) scores the benchmark's bodies as the service does:
otherwise the comparison would be between different work."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from mmoe.bench.models import BenchModel
from mmoe.bench.payloads import flatten
from mmoe.bench.run import _bodies
from mmoe.bench.server import ServerProc
from tests.server import ServerProcess


@pytest.mark.slow
def test_the_tuned_peer_answers_the_services_scores(
    tiny_run: Path, tiny_onnx: Path, tiny_data: Path, tmp_path: Path
) -> None:
    spec = BenchModel("tiny", tiny_run, tiny_onnx, tiny_data, ("user_id", "age_level"))
    bodies = _bodies(spec, [1, 64], count=3)
    sent = [*bodies[1], *bodies[64], *(flatten(b) for b in bodies[64])]
    # tags given as one separated string, nulls, integers: the rules the peer must apply too
    sent.append(
        b'{"context": {"user_id": 7}, "candidates": {"category": ["c1", 3, "c2"],'
        b' "item_id": ["i1", null, 5], "price": [1.5, null, 3],'
        b' "tag_brand_list": ["b1|b2", null, ["b3", "", "b4", 9, "b5", "b6"]]}}'
    )
    with (
        ServerProc.tuned(tiny_onnx, 2, log_path=tmp_path / "tuned.log") as tuned,
        ServerProcess(tiny_onnx, log_path=tmp_path / "service.log") as service,
    ):
        for body in sent:
            want = httpx.post(service.url + "/predict", content=body).json()
            assert "n" in want, want
            got = httpx.post(f"http://127.0.0.1:{tuned.port}/predict", content=body).json()
            assert got["n"] == want["n"]
            assert set(got["scores"]) == set(want["scores"])
            for task, scores in want["scores"].items():
                np.testing.assert_allclose(got["scores"][task], scores, rtol=1e-5, atol=1e-6)
