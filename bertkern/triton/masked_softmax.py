"""Triton kernels for masked_softmax: y = dropout(softmax(x * scale + mask)) over the last dim, and
its backward dx = scale * p * (dp - sum(dp * p)), dp = dropout's backward of dy.

Layout. The forward reads scores as a 4-D [B, H, Q, N] view through its strides (unit stride along N)
and the mask through its own 4-D *broadcast* strides (0 where a mask dim is broadcast), so a
[B, 1, 1, N] or expanded mask is never materialised. Outputs are contiguous [rows, N], rows = B*H*Q.
Math is fp32 (fp64 for fp64 scores); outputs are cast on store.

Masks: MASK_KIND 0 = none, 1 = bool (loaded as uint8, nonzero = keep), 2 = additive float in any
float dtype, kept where mask > finfo(mask.dtype).min (compared in the mask's own dtype, so -inf and
finfo.min mask the key, -10000 stays a soft additive value). Masked keys are set to -inf with where(),
so NaN/inf in masked scores or in the mask never leak. A row with every key masked gives zeros.

Dropout is counter-based Philox on the [rows, N] view (bertkern.triton.dropout, the scheme of
bertkern.reference.dropout_keep_mask): the backward regenerates the forward's mask exactly, and every
backend draws the same one.

Programs: rows up to MAX_BLOCK_N keys are held whole in registers, ROWS_PER_PROGRAM rows per program
(about 2048 elements, so a 512-key row gets one warp); longer rows loop over CHUNK-wide tiles: an
online max/sum pass, then a normalising pass (the backward: a sum(dp * p) pass, then a write pass).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from bertkern import backend as _backend
from bertkern._utils import dropout_args
from bertkern.triton.dropout import dropout_keep

# Rows longer than this loop over CHUNK-wide tiles (tests lower both to exercise the loop on CPU).
MAX_BLOCK_N = 8192
CHUNK = 2048


@triton.jit
def _logits(X, MASK, x_row, m_row, cols, ok, scale, sm_k, MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr):
    """x * scale + mask for a [ROWS, BLOCK_N] tile in fp32 (fp64), -inf where masked or out of range."""
    x = tl.load(X + x_row[:, None] + cols[None, :], mask=ok, other=0.0)
    acc = tl.float64 if x.dtype == tl.float64 else tl.float32
    z = x.to(acc) * scale
    keep = ok
    if MASK_KIND != 0:
        m = tl.load(MASK + m_row[:, None] + cols[None, :].to(tl.int64) * sm_k, mask=ok, other=0)
        if MASK_KIND == 1:
            keep = keep & (m != 0)
        else:
            keep = keep & (m > MASK_MIN)
            z = z + tl.where(keep, m, 0.0).to(acc)  # (masked values may not fit acc: finfo(fp64).min)
    return tl.where(keep, z, -float("inf"))


@triton.jit
def _row_offsets(rows, H, Q, sx_b, sx_h, sx_q, sm_b, sm_h, sm_q, ROWS64: tl.constexpr):
    """(scores offset, mask offset) of rows = (b * H + h) * Q + q, in int64. The division is int32
    unless there are 2^31 rows or more (ROWS64): an int64 / or % is a software routine of ~80
    instructions on NVIDIA GPUs, an int32 one a few."""
    if not ROWS64:
        rows = rows.to(tl.int32)
    q = rows % Q
    bh = rows // Q
    h = bh % H
    b = (bh // H).to(tl.int64)
    h = h.to(tl.int64)
    q = q.to(tl.int64)
    return b * sx_b + h * sx_h + q * sx_q, b * sm_b + h * sm_h + q * sm_q


@triton.jit
def _fwd_kernel(
    X, MASK, SEED, Y, P,
    R, N, H, Q, sx_b, sx_h, sx_q, sm_b, sm_h, sm_q, sm_k,
    scale, keep_scale, thresh,
    MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, DROPOUT: tl.constexpr, ROWS64: tl.constexpr,
    LOOP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if not LOOP:  # the whole row in one tile
        cols = tl.arange(0, BLOCK_N)
        ok = (rows < R)[:, None] & (cols < N)[None, :]
        x_row, m_row = _row_offsets(rows, H, Q, sx_b, sx_h, sx_q, sm_b, sm_h, sm_q, ROWS64)
        z = _logits(X, MASK, x_row, m_row, cols, ok, scale, sm_k, MASK_KIND, MASK_MIN)
        mx = tl.max(z, 1)
        dead = mx == -float("inf")  # every key masked: the row is 0
        e = tl.exp(z - tl.where(dead, 0.0, mx)[:, None])
        den = tl.sum(e, 1)
        p = e * tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, den))[:, None]
        _store_probs(Y, P, SEED, p, rows, cols, 0, ok, N, keep_scale, thresh, DROPOUT, ROWS, BLOCK_N)
    else:
        row_ok = rows < R
        x_row, m_row = _row_offsets(rows, H, Q, sx_b, sx_h, sx_q, sm_b, sm_h, sm_q, ROWS64)
        acc = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
        mx = tl.full([ROWS], -float("inf"), acc)
        den = tl.zeros([ROWS], acc)
        for start in range(0, N, BLOCK_N):  # online max and sum
            cols = start + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < N)[None, :]
            z = _logits(X, MASK, x_row, m_row, cols, ok, scale, sm_k, MASK_KIND, MASK_MIN)
            new_mx = tl.maximum(mx, tl.max(z, 1))
            new_dead = new_mx == -float("inf")
            shift = tl.where(new_dead, 0.0, new_mx)
            den = den * tl.where(new_dead, 1.0, tl.exp(mx - shift)) + tl.sum(tl.exp(z - shift[:, None]), 1)
            mx = new_mx
        dead = mx == -float("inf")
        shift = tl.where(dead, 0.0, mx)
        inv = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, den))
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < N)[None, :]
            z = _logits(X, MASK, x_row, m_row, cols, ok, scale, sm_k, MASK_KIND, MASK_MIN)
            p = tl.exp(z - shift[:, None]) * inv[:, None]
            _store_probs(Y, P, SEED, p, rows, cols, start, ok, N, keep_scale, thresh, DROPOUT, ROWS, BLOCK_N)


@triton.jit
def _store_probs(Y, P, SEED, p, rows, cols, start, ok, N, keep_scale, thresh, DROPOUT: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a tile of y = dropout(p), and p itself (what the backward needs) with dropout."""
    out = rows[:, None] * N + cols[None, :]
    if DROPOUT:
        tl.store(P + out, p.to(P.dtype.element_ty), mask=ok)
        keep = dropout_keep(SEED, rows, start, thresh, ROWS, BLOCK_N)
        p = tl.where(keep, p * keep_scale, 0.0)
    tl.store(Y + out, p.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _p_dp(G, P, SEED, rows, cols, start, ok, s_g, s_p, keep_scale, thresh, DROPOUT: tl.constexpr,
          ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(p, dp) of a tile in fp32 (fp64): the probabilities and dropout's backward of the gradient."""
    p = tl.load(P + rows[:, None] * s_p + cols[None, :], mask=ok, other=0.0)
    acc = tl.float64 if p.dtype == tl.float64 else tl.float32
    p = p.to(acc)
    dp = tl.load(G + rows[:, None] * s_g + cols[None, :], mask=ok, other=0.0).to(acc)
    if DROPOUT:
        keep = dropout_keep(SEED, rows, start, thresh, ROWS, BLOCK_N)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return p, dp


@triton.jit
def _bwd_kernel(
    G, P, SEED, DX, R, N, s_g, s_p, scale, keep_scale, thresh,
    DROPOUT: tl.constexpr, LOOP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if not LOOP:  # the whole row in one tile
        cols = tl.arange(0, BLOCK_N)
        ok = (rows < R)[:, None] & (cols < N)[None, :]
        p, dp = _p_dp(G, P, SEED, rows, cols, 0, ok, s_g, s_p, keep_scale, thresh, DROPOUT, ROWS, BLOCK_N)
        dot = tl.sum(dp * p, 1)
        dx = scale * p * (dp - dot[:, None])
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
    else:
        row_ok = rows < R
        acc = tl.float64 if P.dtype.element_ty == tl.float64 else tl.float32
        dot = tl.zeros([ROWS], acc)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < N)[None, :]
            p, dp = _p_dp(G, P, SEED, rows, cols, start, ok, s_g, s_p, keep_scale, thresh, DROPOUT, ROWS, BLOCK_N)
            dot += tl.sum(dp * p, 1)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < N)[None, :]
            p, dp = _p_dp(G, P, SEED, rows, cols, start, ok, s_g, s_p, keep_scale, thresh, DROPOUT, ROWS, BLOCK_N)
            dx = scale * p * (dp - dot[:, None])
            tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)


def _config(N: int, rows: int) -> tuple[bool, int, int, int]:
    """(looped, ROWS, BLOCK_N, num_warps). ~2048 elements a program on a GPU (a 512-key row gets one
    warp, shorter rows share one); many more under the interpreter, where programs run one by one."""
    block_n = max(16, triton.next_power_of_2(N))
    looped = block_n > MAX_BLOCK_N
    if looped:
        block_n = CHUNK
    target = 32768 if _backend.triton_interpreted() else 2048
    rows_per_program = max(1, min(target // block_n, triton.next_power_of_2(rows)))
    num_warps = 4 if block_n * rows_per_program <= 2048 else min(16, block_n * rows_per_program // 256)
    return looped, rows_per_program, block_n, num_warps


def forward(
    scores: torch.Tensor, mask: torch.Tensor | None, scale: float, dropout_p: float, seed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, probs) for 4-D scores [B, H, Q, N] (unit stride along N) and a mask that is None or a
    4-D view of scores' shape (broadcast dims with stride 0). y is [rows, N] contiguous; probs (the
    softmax before dropout, which the backward needs) likewise when dropout_p > 0, else empty."""
    B, H, Q, N = scores.shape
    R = B * H * Q
    dropout = dropout_p > 0.0
    y = torch.empty((R, N), dtype=scores.dtype, device=scores.device)
    probs = torch.empty((R, N) if dropout else (0,), dtype=scores.dtype, device=scores.device)
    seed_t, keep_scale, thresh = dropout_args("masked_softmax", dropout_p, seed, y)
    if mask is None:
        kind, mask_min, m_arg, m_strides = 0, 0.0, scores, (0, 0, 0, 0)
    elif mask.dtype == torch.bool:
        kind, mask_min, m_arg, m_strides = 1, 0.0, mask.view(torch.uint8), mask.stride()
    else:
        kind, mask_min, m_arg, m_strides = 2, float(torch.finfo(mask.dtype).min), mask, mask.stride()
    looped, rows_pp, block_n, num_warps = _config(N, R)
    _fwd_kernel[(triton.cdiv(R, rows_pp),)](
        scores, m_arg, seed_t, y, probs if dropout else y,
        R, N, H, Q, *scores.stride()[:3], *m_strides,
        scale, keep_scale, thresh,
        MASK_KIND=kind, MASK_MIN=mask_min, DROPOUT=dropout, ROWS64=R + rows_pp >= 2**31, LOOP=looped,
        ROWS=rows_pp, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, probs


def backward(
    grad: torch.Tensor, probs: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None
) -> torch.Tensor:
    """dx [rows, N] (contiguous) from 2-D grad and probs with unit stride along N."""
    R, N = probs.shape
    dx = torch.empty((R, N), dtype=probs.dtype, device=probs.device)
    dropout = dropout_p > 0.0
    seed_t, keep_scale, thresh = dropout_args("masked_softmax", dropout_p, seed, dx)
    looped, rows_pp, block_n, num_warps = _config(N, R)
    _bwd_kernel[(triton.cdiv(R, rows_pp),)](
        grad, probs, seed_t, dx, R, N, grad.stride(0), probs.stride(0), scale, keep_scale, thresh,
        DROPOUT=dropout, LOOP=looped, ROWS=rows_pp, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx


# ---------------------------------------------------------------- compile cases (bertkern.triton.compile_check)
def compile_launch(op, direction, dt, params, meta):
    """The call that makes this op's launches on meta tensors (`meta(shape, dtype)`), for the compile
    test and the SASS report."""
    B, H, N, p = 8, 12, params["N"], params["dropout_p"]
    Q = min(N, 512)  # queries: only the row count depends on it
    seed = meta((1,), "int64") if p else None
    if direction == "bwd":
        g = meta((B * H * Q, N), dt)
        return functools.partial(backward, g, g, 0.125, p, seed)
    mask = meta((B, 1, 1, N), "bool" if params["mask"] == "bool" else dt).expand(B, H, Q, N)
    return functools.partial(forward, meta((B, H, Q, N), dt), mask, 0.125, p, seed)


def compile_cases() -> list[tuple]:
    """(capability, op, direction, dtype, params) that tests/test_triton_compile.py compiles: rows of 128
    / 512 / 2048 / 8192 (the widest held whole) / 16384 (looped) keys, a bool mask or an additive one
    with dropout."""
    c = []
    for dt in ("fp16", "bf16", "fp32"):
        for n in ((128, 512, 2048, 8192, 16384) if dt != "fp32" else (512, 16384)):
            for mask, p in (("bool", 0.0), ("additive", 0.1)):
                c += [(90, "masked_softmax", d, dt, dict(N=n, mask=mask, dropout_p=p)) for d in ("fwd", "bwd")]
    return c + [(80, "masked_softmax", d, "fp16", dict(N=512, mask="additive", dropout_p=0.1)) for d in ("fwd", "bwd")]
