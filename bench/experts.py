"""Batched experts (`ExpertBank`: one matmul per layer for all K experts) against K separate MLPs
(`ExpertBank.as_modules()`), in PyTorch (inference, and a training step) and in onnxruntime.

    python -m mmoe.bench.experts [--batch 256] [--repeat 200]

Prints one row per expert shape with the time per call of each variant and the ratio
separate / batched (above 1: the batched bank is faster).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mmoe.model.network import ExpertBank

# (label, input dim, experts, hidden units): the paper's synthetic set-up, the demo config,
# and an EasyRec-sized model (17 fields x 16-d embeddings).
SHAPES: list[tuple[str, int, int, list[int]]] = [
    ("paper 8x[16]", 100, 8, [16]),
    ("demo 4x[64,32]", 53, 4, [64, 32]),
    ("easyrec 4x[256,192,128,64]", 273, 4, [256, 192, 128, 64]),
    ("wide 16x[64,32]", 128, 16, [64, 32]),
]


class SeparateExperts(nn.Module):
    """K independent MLPs, stacked to the bank's [K, B, H] output."""

    def __init__(self, experts: list[nn.Sequential]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([e(x) for e in self.experts])


def time_pair(a: Callable[[], object], b: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Seconds per call of `a` and of `b`: calls alternate, so load from other processes hits
    both alike, and the minimum over `repeat` calls estimates the cost without interference."""
    for _ in range(max(5, repeat // 10)):
        a()
        b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, out in ((a, times[0]), (b, times[1])):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return min(times[0]), min(times[1])


def train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        module(x).square().mean().backward()
        opt.step()

    return step


def onnx_session(module: nn.Module, x: torch.Tensor, path: Path) -> ort.InferenceSession:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(  # the exporter export/network.py uses
            module.eval(),
            (x,),
            str(path),
            input_names=["x"],
            output_names=["h"],
            dynamic_axes={"x": {0: "batch"}, "h": {0: "batch"}},
            dynamo=False,
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def measure(
    in_dim: int, experts: int, units: list[int], batch: int, repeat: int, tmp: Path
) -> dict[str, float]:
    torch.manual_seed(0)
    bank = ExpertBank(in_dim, experts, units).eval()
    separate = SeparateExperts(bank.as_modules()).eval()
    x = torch.randn(batch, in_dim)
    out: dict[str, float] = {}
    with torch.no_grad():
        np.testing.assert_allclose(bank(x).numpy(), separate(x).numpy(), rtol=1e-4, atol=1e-5)
        out["torch_batched"], out["torch_separate"] = time_pair(
            lambda: bank(x), lambda: separate(x), repeat
        )
    out["train_batched"], out["train_separate"] = time_pair(
        train_step(bank.train(), x), train_step(separate.train(), x), repeat
    )
    feeds = {"x": x.numpy()}
    s_bank = onnx_session(bank, x, tmp / "batched.onnx")
    s_sep = onnx_session(separate, x, tmp / "separate.onnx")
    out["ort_batched"], out["ort_separate"] = time_pair(
        lambda: s_bank.run(None, feeds), lambda: s_sep.run(None, feeds), repeat
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmoe.bench.experts", description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    print(f"batch {args.batch}, {args.threads} thread(s), best of {args.repeat} alternating calls")
    print("ratio = separate / batched (> 1: batched is faster)\n")
    header = f"{'experts':<28}{'torch inference':>27}{'torch train step':>27}{'onnxruntime':>27}"
    print(header)
    print(f"{'':<28}" + f"{'batched  separate  ratio':>27}" * 3)
    with tempfile.TemporaryDirectory() as tmp:
        for label, in_dim, k, units in SHAPES:
            r = measure(in_dim, k, units, args.batch, args.repeat, Path(tmp))
            cells = []
            for kind in ("torch", "train", "ort"):
                b, s = r[f"{kind}_batched"] * 1e6, r[f"{kind}_separate"] * 1e6
                cells.append(f"{b:8.0f}us {s:7.0f}us {s / b:5.2f}")
            print(f"{label:<28}" + "".join(f"{c:>27}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
