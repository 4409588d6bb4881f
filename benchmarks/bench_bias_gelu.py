"""bias_gelu: y = gelu(x + bias), BERT's intermediate activation (exact erf GELU), and its backward
(dx, dbias), over rows = batch x seq from 128 to 64k and the intermediate sizes of BERT-small/base/large.

    python benchmarks/bench_bias_gelu.py [--quick] [--dtype fp16,bf16] [--budget-s S] [--out DIR]

A new op's benchmark is a copy of this file with its own inputs, eager composition, reference,
bertkern callable, byte count and case list: everything else comes from benchmarks/harness.py.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `bertkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.harness import Case, OpSpec, grid  # noqa: E402  (sets TRITON_INTERPRET=1 without a GPU)

import bertkern  # noqa: E402
from bertkern import reference as _reference  # noqa: E402

ROWS = (128, 512, 2048, 8192, 16384, 32768, 65536)
INTERMEDIATE = (3072, 4096, 1536)  # BERT-base, -large, -small; in run order: a time budget cuts from the end
DTYPES = (torch.float16, torch.bfloat16)


def make_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    rows, n = case.shape["rows"], case.shape["intermediate"]
    x = torch.randn(rows, n, device=device).to(case.dtype)
    bias = (0.5 * torch.randn(n, device=device)).to(case.dtype)
    return {"x": x, "bias": bias}


def eager(x, bias, approximate="none"):
    """What a BERT implementation does today: an add kernel, then a GELU kernel."""
    return F.gelu(x + bias, approximate=approximate)


def reference(x, bias, approximate="none"):
    return _reference.bias_gelu(x, bias, approximate)


def kernel(backend: str):
    return functools.partial(bertkern.ops.bias_gelu, backend=backend)


def bytes_moved(case: Case) -> int:
    """fwd: read x and bias, write y. bwd: read dy, x and bias, write dx and dbias. fwd+bwd: both."""
    m, n = case.shape["rows"], case.shape["intermediate"]
    size = case.dtype.itemsize
    fwd = (2 * m * n + n) * size
    bwd = (3 * m * n + 2 * n) * size
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.direction]


def cases(quick: bool) -> list[Case]:
    rows, widths = ((2048, 32768), (3072,)) if quick else (ROWS, INTERMEDIATE)
    return grid("bias_gelu", ("fwd", "bwd"), DTYPES, [{"rows": r, "intermediate": n} for n in widths for r in rows])


def cpu_cases(quick: bool) -> list[Case]:
    """Odd sizes (masking) and a BERT-small row; both GELU forms."""
    shapes = [{"rows": 37, "intermediate": 200}] + ([] if quick else [{"rows": 64, "intermediate": 1536}])
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.float16, torch.bfloat16)
    options = ({"approximate": "none"}, {"approximate": "tanh"})
    return grid("bias_gelu", ("fwd", "bwd"), dtypes, shapes, options)


SPEC = OpSpec(
    name="bias_gelu",
    make_inputs=make_inputs,
    eager=eager,
    reference=reference,
    kernel=kernel,
    bytes_moved=bytes_moved,
    cases=cases,
    cpu_cases=cpu_cases,
    grad_inputs=("x", "bias"),
    output_names=("y",),
)

if __name__ == "__main__":
    from benchmarks import run

    sys.exit(run.main(["--ops", SPEC.name, *sys.argv[1:]]))
