"""Triton kernels for bias_gelu: y = gelu(x + bias), and its backward (dx, dbias).

Inputs are 2-D [M, N] with unit stride along N (bertkern.backend.as_rows); math is fp32
(fp64 for fp64 inputs), cast on store. dbias is reduced in fp32: each program sums its rows into
one partial row, and column_sum sums the few partial rows (deterministic, no atomics).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from bertkern._utils import acc_dtype, num_sms
from bertkern.triton.column_sum import column_sum

# The GELU constants are written as literals inside the jit functions: a compiled kernel cannot read
# module-level Python floats (Triton raises NameError; its interpreter alone accepts them).
#   0.7071067811865476 = 1 / sqrt(2), 0.3989422804014327 = 1 / sqrt(2 pi),
#   0.7978845608028654 = sqrt(2 / pi), 0.044715 = the tanh approximation's cubic coefficient.


@triton.jit
def _gelu(h, TANH: tl.constexpr):
    if TANH:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u)
        return h * tl.sigmoid(2.0 * 0.7978845608028654 * (h + 0.044715 * h * h * h))
    else:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h, TANH: tl.constexpr):
    if TANH:
        z = 2.0 * 0.7978845608028654 * (h + 0.044715 * h * h * h)
        s = tl.sigmoid(z)
        # sigmoid(-z), not 1 - s: the complement keeps its precision where s rounds to 1
        return s + h * 2.0 * s * tl.sigmoid(-z) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
    else:
        return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def _bias_gelu_fwd_kernel(
    X, B, Y, M, N, stride_x, stride_y,
    HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
    acc = tl.float64 if x.dtype == tl.float64 else tl.float32
    h = x.to(acc)
    if HAS_BIAS:
        h += tl.load(B + cols, mask=cols < N, other=0.0).to(acc)[None, :]
    y = _gelu(h, TANH)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, X, B, DX, DB_PARTIAL, M, N, stride_dy, stride_x, stride_dx, rows_per_program,
    HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_start = pid_m.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    x_dtype = X.dtype.element_ty
    acc = tl.float64 if x_dtype == tl.float64 else tl.float32
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(acc)
    db = tl.zeros([BLOCK_N], dtype=acc)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        m = (rows[:, None] < row_end) & col_ok[None, :]
        h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(acc)
        if HAS_BIAS:
            h += b[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(acc)
        dh = dy * _gelu_grad(h, TANH)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dh.to(x_dtype), mask=m)
        if HAS_BIAS:
            db += tl.sum(tl.where(m, dh, 0.0), axis=0)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid_m * N + cols, db, mask=col_ok)


def _tiles(N: int) -> tuple[int, int]:
    # ~4096 elements per program: 16-byte vectors per thread with 4 warps, and whole BERT rows
    # (384..4096) in one or a few column tiles.
    block_n = min(triton.next_power_of_2(N), 1024)
    return max(1, 4096 // block_n), block_n


def forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m, block_n = _tiles(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _bias_gelu_fwd_kernel[grid](
        x, bias if bias is not None else x, y, M, N, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return y


def backward(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m, block_n = _tiles(N)
    col_tiles = triton.cdiv(N, block_n)
    # Enough row-programs to fill the GPU a few times over; each keeps one fp32 partial row of dbias.
    row_programs = max(1, min(triton.cdiv(M, block_m), 4 * num_sms(x.device, interpreted=4) // col_tiles))
    rows_per_program = triton.cdiv(triton.cdiv(M, row_programs), block_m) * block_m
    row_programs = triton.cdiv(M, rows_per_program)
    partial = None if bias is None else torch.empty((1, row_programs, N), dtype=acc_dtype(x.dtype), device=x.device)
    _bias_gelu_bwd_kernel[(row_programs, col_tiles)](
        dy, x, bias if bias is not None else x, dx, partial[0] if partial is not None else dx,
        M, N, dy.stride(0), x.stride(0), dx.stride(0), rows_per_program,
        HAS_BIAS=bias is not None, TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
    )
    dbias = column_sum(partial, bias.dtype)[0] if bias is not None else None
    return dx, dbias


# ---------------------------------------------------------------- compile cases (bertkern.triton.compile_check)
def compile_launch(op, direction, dt, params, meta):
    """The call that makes this op's launches on meta tensors (`meta(shape, dtype)`), for the compile
    test and the SASS report."""
    M, N = 4096, params["N"]
    x, b = meta((M, N), dt), (meta((N,), dt) if params.get("bias", True) else None)
    if direction == "fwd":
        return functools.partial(forward, x, b, params["approximate"])
    return functools.partial(backward, meta((M, N), dt), x, b, params["approximate"])


def compile_cases() -> list[tuple]:
    """(capability, op, direction, dtype, params) that tests/test_triton_compile.py compiles: BERT's
    4096 tokens, 4x hidden intermediate (3072; 1536 and 4096 for MiniLM and BERT-large), both GELUs."""
    c = [(90, "bias_gelu", d, dt, dict(N=3072, approximate=a))
         for dt in ("fp16", "bf16", "fp32") for d in ("fwd", "bwd") for a in ("none", "tanh")]
    c += [(90, "bias_gelu", d, "fp16", dict(N=n, approximate="none")) for d in ("fwd", "bwd") for n in (1536, 4096)]
    return c + [(90, "bias_gelu", "fwd", "fp16", dict(N=3072, approximate="none", bias=False))]
