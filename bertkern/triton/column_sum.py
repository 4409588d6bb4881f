"""column_sum: the column sums of a backward's partial rows (dbias, dweight, ...), cast to the output dtype.

A backward kernel leaves one fp32 partial row per program and per sum; here one launch sums up to
three such [parts, N] buffers, in a fixed order (deterministic, no atomics). torch's sum and cast
take two launches per sum: add_layer_norm's backward went from 7 launches to 2, bias_gelu's from 3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 32 columns: 128-byte fp32 row segments. 128 partial rows a load, 32 values a thread: a GPU holds
# ~1 MB of loads in flight across a BERT-sized sum's ~70 programs, whose few loop trips are latency-bound.
BLOCK_P, BLOCK_N = 128, 32


@triton.jit
def _column_sum_kernel(PART, OUT0, OUT1, OUT2, parts, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT<k>[n] = sum over r of PART[k, r, n]; program (column tile, k)."""
    k = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    base = PART + k.to(tl.int64) * parts * N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=PART.dtype.element_ty)
    for start in range(0, parts, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        m = (rows[:, None] < parts) & col_ok[None, :]
        acc += tl.load(base + rows[:, None].to(tl.int64) * N + cols[None, :], mask=m, other=0.0)
    total = tl.sum(acc, axis=0)
    if k == 0:
        tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=col_ok)
    elif k == 1:
        tl.store(OUT1 + cols, total.to(OUT1.dtype.element_ty), mask=col_ok)
    else:
        tl.store(OUT2 + cols, total.to(OUT2.dtype.element_ty), mask=col_ok)


def column_sum(parts: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """[parts[k].sum(0).to(dtype) for k] of a contiguous [count <= 3, rows, N] buffer, in one launch
    (none for count 0)."""
    count, rows, N = parts.shape
    assert count <= 3 and parts.is_contiguous(), (tuple(parts.shape), parts.stride())
    outs = [torch.empty(N, dtype=dtype, device=parts.device) for _ in range(count)]
    if count == 0:
        return outs
    _column_sum_kernel[(triton.cdiv(N, BLOCK_N), count)](
        parts, *(outs + outs[:1] * (3 - count)), rows, N, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )
    return outs
