"""add_layer_norm: y = layer_norm(dropout(x + x_bias) + residual), BERT's "output" block after each
attention and feed-forward projection (x_bias = the projection's bias), and its backward (dx,
dresidual, dweight, dbias, dx_bias), over rows = batch x seq from 128 to 64k and hidden sizes
384..4096.

    python benchmarks/bench_layer_norm.py [--quick] [--dtype fp16,bf16] [--budget-s S] [--out DIR]

Providers: eager (x + x_bias, F.dropout, + residual, F.layer_norm), compile (torch.compile of that),
triton, cuda. The harness checks every provider against a float64 reference before timing it, and a
dropout mask is random, so:
- the main cases have dropout_p = 0 (inference, or training with hidden dropout off); F.dropout with
  p = 0 returns its input, so eager is 2 kernels here (add + add, then layer_norm);
- the dropout_p = 0.1 cases (training) are forward only, with x = x_bias = 0: dropout(0) = 0 for any
  mask, so every provider's output is checkable while each still draws its mask and does all its
  work (the kernels do not look at the values). Their backward (dx depends on the mask) is not gated
  here; tests/test_layer_norm.py checks it against the mask the forward used.
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
HIDDEN = (768, 1024, 384, 4096)  # BERT-base, -large, -small/MiniLM, and a wide row; a time budget cuts from the end
DTYPES = (torch.float16, torch.bfloat16)
EPS = 1e-12  # BERT's layer_norm_eps


def make_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    rows, n = case.shape["rows"], case.shape["hidden"]
    dt = case.dtype
    x = torch.randn(rows, n, device=device).to(dt)
    x_bias = (0.5 * torch.randn(n, device=device)).to(dt)
    if case.options.get("dropout_p", 0.0) > 0.0:  # see the module docstring
        x, x_bias = torch.zeros_like(x), torch.zeros_like(x_bias)
    return {
        "x": x,
        "residual": torch.randn(rows, n, device=device).to(dt),
        "weight": (1.0 + 0.1 * torch.randn(n, device=device)).to(dt),
        "bias": (0.1 * torch.randn(n, device=device)).to(dt),
        "x_bias": x_bias,
    }


def eager(x, residual, weight, bias, x_bias, dropout_p=0.0):
    """What a BERT implementation does today (HF BertSelfOutput / BertOutput after the dense layer)."""
    h = F.dropout(x + x_bias, dropout_p, training=True) + residual
    return F.layer_norm(h, h.shape[-1:], weight, bias, EPS)


def reference(x, residual, weight, bias, x_bias, dropout_p=0.0):
    return _reference.add_layer_norm(x, residual, weight, bias, EPS, x_bias, dropout_p)


def kernel(backend: str):
    op = functools.partial(bertkern.ops.add_layer_norm, backend=backend)

    def fn(x, residual, weight, bias, x_bias, dropout_p=0.0):
        return op(x, residual, weight, bias, EPS, x_bias=x_bias, dropout_p=dropout_p)

    return fn


def bytes_moved(case: Case) -> int:
    """fwd: read x and residual (+ x_bias, weight, bias), write y. bwd: read dy and the saved pre-norm
    sum (+ weight), write d(sum) (= dresidual = dx without dropout; dx too with it) and dweight, dbias,
    dx_bias. fwd+bwd: both, plus the pre-norm sum the forward writes for the backward. The fp32 row
    statistics (8 bytes a row) are the kernels' own overhead and are not counted."""
    m, n = case.shape["rows"], case.shape["hidden"]
    size = case.dtype.itemsize
    drop = case.options.get("dropout_p", 0.0) > 0.0
    fwd = (3 * m * n + 3 * n) * size
    bwd = ((3 + drop) * m * n + 4 * n) * size
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + m * n * size + bwd}[case.direction]


def cases(quick: bool) -> list[Case]:
    rows, widths = ((2048, 32768), (768,)) if quick else (ROWS, HIDDEN)
    shapes = [{"rows": r, "hidden": n} for n in widths for r in rows]
    directions = ("fwd", "bwd") if quick else ("fwd", "bwd", "fwd+bwd")
    main = grid("layer_norm", directions, DTYPES, shapes, ({"dropout_p": 0.0},))
    dropout = grid("layer_norm", ("fwd",), DTYPES, shapes, ({"dropout_p": 0.1},))
    return main + dropout


def cpu_cases(quick: bool) -> list[Case]:
    """Odd sizes (masking), a BERT-base row, and the dropout path."""
    shapes = [{"rows": 37, "hidden": 200}] + ([] if quick else [{"rows": 16, "hidden": 768}])
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.float16, torch.bfloat16)
    main = grid("layer_norm", ("fwd", "bwd"), dtypes, shapes, ({"dropout_p": 0.0},))
    dropout = grid("layer_norm", ("fwd",), dtypes[:1], shapes[:1], ({"dropout_p": 0.1},))
    return main + dropout


SPEC = OpSpec(
    name="layer_norm",
    make_inputs=make_inputs,
    eager=eager,
    reference=reference,
    kernel=kernel,
    bytes_moved=bytes_moved,
    cases=cases,
    cpu_cases=cpu_cases,
    grad_inputs=("x", "residual", "weight", "bias", "x_bias"),
    output_names=("y",),
)

if __name__ == "__main__":
    from benchmarks import run

    sys.exit(run.main(["--ops", SPEC.name, *sys.argv[1:]]))
