"""masked_softmax: y = dropout(softmax(scores * scale + mask)) over the keys, BERT's attention
probabilities, and its backward d scores, over [B, 12 heads, S, S] scores for S = 64..1024 with B
chosen so that rows = B x 12 x S >= 64k (and the 32 x 12 x 512 x 512 case of DESIGN.md's floors).

    python benchmarks/bench_softmax.py [--quick] [--dtype fp16,bf16] [--budget-s S] [--out DIR]

Inputs are what HF BERT (eager attention) has at this point: fp16/bf16 scores and an additive
[B, 1, 1, S] mask in the same dtype (0 for real tokens, finfo.min for padding), scale 1/sqrt(64).
Providers: eager (scores * scale + mask, torch.softmax, then dropout), compile (torch.compile of
that), triton, cuda. Dropout is random, and the harness checks every provider against a float64
reference before timing it, so with dropout_p > 0 every provider uses the same mask:
- the bertkern backends call the custom op with a fixed seed tensor (an input); each call still
  draws a seed from torch's generator first, as bertkern.ops.masked_softmax does, so that work is timed;
- eager and compile get that mask precomputed as a bool input (`keep`) and apply it with one
  torch.where: they read one byte per element instead of generating random numbers, a head start
  over F.dropout (which generates the mask and writes it out as well).
Bytes moved: fwd reads scores and the mask and writes y; bwd reads dy and the saved softmax and
writes d scores (the bertkern kernels also write the pre-dropout softmax in the forward when
dropout_p > 0: the backward reads it; that write is not counted).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `bertkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import Case, OpSpec, grid  # noqa: E402  (sets TRITON_INTERPRET=1 without a GPU)

import bertkern  # noqa: E402,F401  (registers torch.ops.bertkern.masked_softmax)
from bertkern import reference as _reference  # noqa: E402

HEADS = 12
SEQS = (128, 512, 256, 384, 64, 1024)  # run order: a time budget cuts from the end
MIN_ROWS = 65536
DTYPES = (torch.float16, torch.bfloat16)
SCALE = 1.0 / math.sqrt(64)  # BERT-base head size
SEED = 0x5EED


def batch_for(seq: int) -> int:
    return math.ceil(MIN_ROWS / (HEADS * seq))


def make_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    b, h, s = case.shape["batch"], case.shape["heads"], case.shape["seq"]
    scores = (4.0 * torch.randn(b, h, s, s, device=device)).to(case.dtype)  # q.k of unit-variance heads
    lengths = torch.randint(max(1, s // 2), s + 1, (b,), device=device)  # padded batch, >= 1 real token
    real = torch.arange(s, device=device)[None, :] < lengths[:, None]
    mask = torch.where(real, 0.0, torch.finfo(case.dtype).min).to(case.dtype)[:, None, None, :]
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)
    p = case.options.get("dropout_p", 0.0)
    keep = (_reference.dropout_keep_mask(seed, scores.shape, p) if p > 0.0
            else torch.ones((), dtype=torch.bool, device=device))
    return {"scores": scores, "mask": mask, "keep": keep, "seed": seed}


def eager(scores, mask, keep, seed, dropout_p=0.0):
    """HF BertSelfAttention (eager): a scale, an add, a softmax, a dropout (here: a given mask)."""
    probs = torch.softmax(scores * SCALE + mask, dim=-1)
    if dropout_p > 0.0:
        probs = torch.where(keep, probs * (1.0 / (1.0 - dropout_p)), 0.0)
    return probs


def reference(scores, mask, keep, seed, dropout_p=0.0):
    return _reference.masked_softmax(scores, mask, SCALE, dropout_p, seed=seed if dropout_p > 0.0 else None)


def kernel(backend: str):
    op = torch.ops.bertkern.masked_softmax

    def fn(scores, mask, keep, seed, dropout_p=0.0):
        if dropout_p > 0.0:  # the seed draw of bertkern.ops.masked_softmax, timed; `seed` is used
            torch.randint(0, 2**62, (1,), dtype=torch.int64, device=scores.device)
        return op(scores, mask, SCALE, dropout_p, seed if dropout_p > 0.0 else None, backend)[0]

    return fn


def bytes_moved(case: Case) -> int:
    b, h, s = case.shape["batch"], case.shape["heads"], case.shape["seq"]
    size = case.dtype.itemsize
    n = b * h * s * s
    fwd = (2 * n + b * s) * size
    bwd = 3 * n * size
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.direction]


def _shape(seq: int, batch: int | None = None) -> dict[str, int]:
    return {"batch": batch or batch_for(seq), "heads": HEADS, "seq": seq}


def cases(quick: bool) -> list[Case]:
    if quick:
        return grid("softmax", ("fwd", "bwd"), (torch.float16,), [_shape(128), _shape(512)],
                     ({"dropout_p": 0.0}, {"dropout_p": 0.1}))
    shapes = [_shape(s) for s in SEQS] + [_shape(512, 32)]
    return grid("softmax", ("fwd", "bwd"), DTYPES, shapes, ({"dropout_p": 0.0}, {"dropout_p": 0.1}))


def cpu_cases(quick: bool) -> list[Case]:
    """Odd lengths (tails, unaligned rows), with and without dropout."""
    shapes = [{"batch": 2, "heads": 3, "seq": 77}] + ([] if quick else [{"batch": 1, "heads": 2, "seq": 129}])
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.float16, torch.bfloat16)
    return grid("softmax", ("fwd", "bwd"), dtypes, shapes, ({"dropout_p": 0.0}, {"dropout_p": 0.1}))


SPEC = OpSpec(
    name="softmax",  # = the file name (benchmarks/bench_softmax.py) so that --ops softmax finds it
    make_inputs=make_inputs,
    eager=eager,
    reference=reference,
    kernel=kernel,
    bytes_moved=bytes_moved,
    cases=cases,
    cpu_cases=cpu_cases,
    grad_inputs=("scores",),
    output_names=("y",),
    x_key="seq",
)

if __name__ == "__main__":
    from benchmarks import run

    sys.exit(run.main(["--ops", SPEC.name, *sys.argv[1:]]))
