"""masked_softmax: y = dropout(softmax(scores * scale + mask)), BERT's attention probabilities (HF eager
attention's inputs), and its backward, over [B, 12, S, S] for S = 64..1024 (B x 12 x S >= 64k rows).

With dropout every provider must use the same mask to be gated against float64: the bertkern backends get
a fixed seed (still drawing one per call, as bertkern.ops does, so that work is timed); eager and compile
get the mask as a bool input `keep` (one byte read per element: a head start over F.dropout).
"""
import math

import torch

from benchmarks.ops import CPU_DTYPES, Case, OpSpec, grid

import bertkern  # noqa: F401  (registers torch.ops.bertkern.masked_softmax)
from bertkern import reference

SEQS = (128, 512, 256, 384, 64, 1024)  # a time budget cuts from the end
SCALE = 1.0 / math.sqrt(64)  # BERT-base head size
SEED = 0x5EED
DROPOUT = ({"dropout_p": 0.0}, {"dropout_p": 0.1})


def make_inputs(case: Case, device):
    b, h, s = case.shape["batch"], case.shape["heads"], case.shape["seq"]
    scores = (4.0 * torch.randn(b, h, s, s, device=device)).to(case.dtype)  # q.k of unit-variance heads
    real = torch.arange(s, device=device)[None, :] < torch.randint(max(1, s // 2), s + 1, (b, 1), device=device)
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)
    p = case.options.get("dropout_p", 0.0)
    mask = torch.where(real, 0.0, torch.finfo(case.dtype).min).to(case.dtype)[:, None, None, :]
    keep = torch.ones((), dtype=torch.bool, device=device)
    if p > 0.0:
        keep = reference.dropout_keep_mask(seed, scores.shape, p)
    return {"scores": scores, "mask": mask, "keep": keep, "seed": seed}


def eager(scores, mask, keep, seed, dropout_p=0.0):
    """HF BertSelfAttention (eager): a scale, an add, a softmax, a dropout (here: the given mask)."""
    probs = torch.softmax(scores * SCALE + mask, dim=-1)
    return torch.where(keep, probs * (1.0 / (1.0 - dropout_p)), 0.0) if dropout_p > 0.0 else probs


def ref(scores, mask, keep, seed, dropout_p=0.0):
    return reference.masked_softmax(scores, mask, SCALE, dropout_p, seed=seed if dropout_p > 0.0 else None)


def kernel(backend: str, case: Case, device):
    def fn(scores, mask, keep, seed, dropout_p=0.0):
        if dropout_p > 0.0:  # the seed draw of bertkern.ops.masked_softmax, timed; `seed` is used
            torch.randint(0, 2**62, (1,), dtype=torch.int64, device=scores.device)
        seed_or_none = seed if dropout_p > 0.0 else None
        return torch.ops.bertkern.masked_softmax(scores, mask, SCALE, dropout_p, seed_or_none, backend)[0]

    return fn


def bytes_moved(case: Case) -> int:
    b, h, s = case.shape["batch"], case.shape["heads"], case.shape["seq"]
    fwd, bwd = (2 * b * h * s * s + b * s) * case.dtype.itemsize, 3 * b * h * s * s * case.dtype.itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.direction]


def shape(seq: int, batch: int | None = None):
    return {"batch": batch or math.ceil(65536 / (12 * seq)), "heads": 12, "seq": seq}


def cases(quick: bool):
    bert = [shape(128, 32), shape(512, 32)]  # BERT batches first (a time budget cuts from the end)
    if quick:
        return grid(("fwd", "bwd"), (torch.float16,), bert, DROPOUT)
    return grid(("fwd", "bwd"), (torch.float16, torch.bfloat16), bert + [shape(s) for s in SEQS], DROPOUT)


def cpu_cases(quick: bool):
    """Odd lengths (tails, unaligned rows), with and without dropout."""
    shapes = [{"batch": 2, "heads": 3, "seq": 77}] + ([] if quick else [{"batch": 1, "heads": 2, "seq": 129}])
    return grid(("fwd", "bwd"), CPU_DTYPES[quick], shapes, DROPOUT)


MASKED_SOFTMAX = OpSpec("masked_softmax", make_inputs, eager, bytes_moved, cases, cpu_cases, ref, kernel,
                        grad_inputs=("scores",), x_key="seq")
