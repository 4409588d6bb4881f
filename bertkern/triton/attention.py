"""Triton kernels for fused attention: out = dropout(softmax(q k^T * scale + mask)) v, forward and
backward, on padded [B, H, S, D] tensors or on packed variable-length tokens [total, H, D].

Forward (one program per BLOCK_M queries of one (batch, head)): the keys are streamed in BLOCK_N
tiles with an online softmax (running max m, running sum l, fp32 accumulator rescaled by
exp(m_old - m_new)); the S x S scores never reach memory. It writes out and the row statistics
(m, 1 / l) in fp32 that the backward uses to recompute the probabilities P = exp(s - m) / l. (Not
FlashAttention's single lse = m + log(l): exp(s - lse) loses the bits of lse's rounding at the
magnitude of the logits, e.g. 1e-3 relative for rows under an additive -10000 mask, where s - m is
computed exactly as in the forward.)

Backward (three launches, no atomics, deterministic):
  1. delta = rowsum(dO * O) per query row (= rowsum(dP * P), also under dropout);
  2. dK, dV: one program per BLOCK_N keys loops over every query tile, recomputing P;
  3. dQ: one program per BLOCK_M queries loops over every key tile.
dS = P * (dP - delta); dQ = scale * dS K, dK = scale * dS^T Q, dV = P_dropped^T dO.

Layout. q, k, v (and dO, and every output) are read and written through their own strides with unit
stride along D, so views of a packed QKV projection are used in place. D is padded to a power of two
(at least 16) in registers, with masked loads. Offsets are int64.

Masks (padded mode only): MASK_KIND 0 = none, 1 = bool (read as uint8), 2 = additive float kept where
value > finfo(mask dtype).min (-inf / finfo.min mask a key; -10000 stays additive). The mask is a 4-D
broadcast view of [B, H, S_q, S_k] (stride 0 over broadcast dims); MASK_ROWS=False (the [B,1,1,S_k]
padding mask) loads one key vector per tile instead of a [BLOCK_M, BLOCK_N] tile. A query row whose
keys are all masked gets out = 0, m = -inf, 1 / l = 0, and zero gradients.

Varlen mode: sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1] of the packed tensors and
attends only to itself; the statistics are [2, H, total] and delta [H, total].

Dropout: the Philox scheme of masked_softmax (bertkern.reference.dropout_keep_mask): element (query
row i, key j) of (b, h) uses row index (b * H + h) * ROW_STRIDE + i and column j, where ROW_STRIDE is
S_q (padded) or max_seqlen (varlen), i.e. exactly the rows of the [B, H, S_q, S_k] probabilities that
masked_softmax / the torch reference would drop. The forward and both backward kernels regenerate
the same bits from the seed tensor.

Numerics: fp32 accumulation; P and dS are cast to the input dtype for the tensor-core dots (as in
FlashAttention); fp32 inputs use IEEE fp32 dots (no TF32). Under TRITON_INTERPRET=1, bf16 dot operands
are upcast to fp32 (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bertkern import backend as _backend
from bertkern import reference
from bertkern.triton.masked_softmax import _dropout_keep

MAX_HEAD_DIM = 256
# Block sizes under the interpreter (tests lower them to exercise the tile loops and tails).
INTERPRET_BLOCKS = (64, 64)


@triton.jit
def _seq_bounds(CU, b, S_q, S_k, VARLEN: tl.constexpr):
    """(first token, query length, key length) of sequence b."""
    if VARLEN:
        tok0 = tl.load(CU + b).to(tl.int64)
        n = (tl.load(CU + b + 1).to(tl.int64) - tok0).to(tl.int32)
        return tok0, n, n
    else:
        return b.to(tl.int64) * 0, S_q, S_k


@triton.jit
def _logits(
    q, k, offs_m, offs_n, Lq, Lk, MASK, m_base, sm_q, sm_k, scale,
    MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, MASK_ROWS: tl.constexpr, PREC: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] logits q k^T * scale + mask in fp32, -inf where masked or out of range.
    q [BLOCK_M, BLOCK_D], k [BLOCK_N, BLOCK_D]. (Natural units, as eager rounds them: folding log2(e)
    into the scale would add a rounding at the magnitude of an additive -10000 mask.)"""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    valid = (offs_n < Lk)[None, :]
    if MASK_KIND != 0:
        if MASK_ROWS:
            mv = tl.load(MASK + m_base + offs_m[:, None].to(tl.int64) * sm_q + offs_n[None, :].to(tl.int64) * sm_k,
                         mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :], other=0)
        else:
            mv = tl.load(MASK + m_base + offs_n.to(tl.int64) * sm_k, mask=offs_n < Lk, other=0)[None, :]
        if MASK_KIND == 1:
            valid = valid & (mv != 0)
        else:
            valid = valid & (mv > MASK_MIN)
            s = s + tl.where(valid, mv, 0.0).to(tl.float32)
    return tl.where(valid, s, -float("inf"))


@triton.jit
def _fwd_kernel(
    Q, K, V, O, STATS, MASK, SEED, CU,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
    sm_b, sm_h, sm_q, sm_k, st_b, st_h, plane,
    H, S_q, S_k, D, ROW_STRIDE, scale, keep_scale, thresh,
    MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    tok0, Lq, Lk = _seq_bounds(CU, b, S_q, S_k, VARLEN)
    if pid_m * BLOCK_M >= Lq:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    q_ptr = Q + b64 * sq_b + h64 * sq_h + tok0 * sq_s
    k_ptr = K + b64 * sk_b + h64 * sk_h + tok0 * sk_s
    v_ptr = V + b64 * sv_b + h64 * sv_h + tok0 * sv_s
    m_base = b64 * sm_b + h64 * sm_h
    q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    rows = (b64 * H + h64) * ROW_STRIDE + offs_m
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Lk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _logits(q, k, offs_m, offs_n, Lq, Lk, MASK, m_base, sm_q, sm_k, scale,
                     MASK_KIND, MASK_MIN, MASK_ROWS, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no key yet: exp(-inf) = 0
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(SEED, rows, start_n, thresh, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    live = l_i > 0.0
    inv = tl.where(live, keep_scale / tl.where(live, l_i, 1.0), 0.0)
    out = acc * inv[:, None]
    o_ptr = O + b64 * so_b + h64 * so_h + tok0 * so_s
    tl.store(o_ptr + offs_m[:, None].to(tl.int64) * so_s + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    stat = STATS + b64 * st_b + h64 * st_h + tok0 + offs_m
    tl.store(stat, m_i, mask=m_ok)  # -inf for a fully masked row
    tl.store(stat + plane, tl.where(live, 1.0 / tl.where(live, l_i, 1.0), 0.0), mask=m_ok)


@triton.jit
def _load_stats(STATS, offs, plane, ok):
    """(row max, 1 / row sum) of the forward; +inf and 0 for rows out of range or fully masked, so
    that exp(s - max) / sum is 0 there (and never inf * 0)."""
    row_max = tl.load(STATS + offs, mask=ok, other=float("inf"))
    row_max = tl.where(row_max == -float("inf"), float("inf"), row_max)
    inv_l = tl.load(STATS + plane + offs, mask=ok, other=0.0)
    return row_max, inv_l


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, CU, so_b, so_h, so_s, sdo_b, sdo_h, sdo_s, st_b, st_h, H, S_q, D,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, laid out like one plane of the statistics."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    tok0, Lq, _ = _seq_bounds(CU, b, S_q, S_q, VARLEN)
    if pid_m * BLOCK_M >= Lq:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b64 * so_b + h64 * so_h + (tok0 + offs_m[:, None]) * so_s + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b64 * sdo_b + h64 * sdo_h + (tok0 + offs_m[:, None]) * sdo_s + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * st_b + h64 * st_h + tok0 + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV, MASK, SEED, CU,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
    sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s,
    sm_b, sm_h, sm_q, sm_k, st_b, st_h, plane,
    H, S_q, S_k, D, ROW_STRIDE, scale, keep_scale, thresh,
    MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    tok0, Lq, Lk = _seq_bounds(CU, b, S_q, S_k, VARLEN)
    if pid_n * BLOCK_N >= Lk:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < Lk
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * sk_b + h64 * sk_h + (tok0 + offs_n[:, None]) * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * sv_b + h64 * sv_h + (tok0 + offs_n[:, None]) * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptr = Q + b64 * sq_b + h64 * sq_h + tok0 * sq_s
    do_ptr = DO + b64 * sdo_b + h64 * sdo_h + tok0 * sdo_s
    stat = b64 * st_b + h64 * st_h + tok0
    m_base = b64 * sm_b + h64 * sm_h
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < Lq
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_ptr + offs_m[:, None].to(tl.int64) * sdo_s + offs_d[None, :], mask=qd_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        row_max, inv_l = _load_stats(STATS, stat + offs_m, plane, m_ok)
        delta = tl.load(DELTA + stat + offs_m, mask=m_ok, other=0.0)
        s = _logits(q, k, offs_m, offs_n, Lq, Lk, MASK, m_base, sm_q, sm_k, scale,
                     MASK_KIND, MASK_MIN, MASK_ROWS, PREC)
        p = tl.exp(s - row_max[:, None]) * inv_l[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _dropout_keep(SEED, (b64 * H + h64) * ROW_STRIDE + offs_m, pid_n * BLOCK_N, thresh, BLOCK_M, BLOCK_N)
            pd = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            pd = p
        dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PREC)
    dk = dk * scale
    tl.store(DK + b64 * sdk_b + h64 * sdk_h + (tok0 + offs_n[:, None]) * sdk_s + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * sdv_b + h64 * sdv_h + (tok0 + offs_n[:, None]) * sdv_s + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, STATS, DELTA, DQ, MASK, SEED, CU,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s, sdq_b, sdq_h, sdq_s,
    sm_b, sm_h, sm_q, sm_k, st_b, st_h, plane,
    H, S_q, S_k, D, ROW_STRIDE, scale, keep_scale, thresh,
    MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    tok0, Lq, Lk = _seq_bounds(CU, b, S_q, S_k, VARLEN)
    if pid_m * BLOCK_M >= Lq:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * sq_b + h64 * sq_h + (tok0 + offs_m[:, None]) * sq_s + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b64 * sdo_b + h64 * sdo_h + (tok0 + offs_m[:, None]) * sdo_s + offs_d[None, :], mask=qd_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat = b64 * st_b + h64 * st_h + tok0
    row_max, inv_l = _load_stats(STATS, stat + offs_m, plane, m_ok)
    delta = tl.load(DELTA + stat + offs_m, mask=m_ok, other=0.0)
    k_ptr = K + b64 * sk_b + h64 * sk_h + tok0 * sk_s
    v_ptr = V + b64 * sv_b + h64 * sv_h + tok0 * sv_s
    m_base = b64 * sm_b + h64 * sm_h
    rows = (b64 * H + h64) * ROW_STRIDE + offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _logits(q, k, offs_m, offs_n, Lq, Lk, MASK, m_base, sm_q, sm_k, scale,
                     MASK_KIND, MASK_MIN, MASK_ROWS, PREC)
        p = tl.exp(s - row_max[:, None]) * inv_l[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _dropout_keep(SEED, rows, start_n, thresh, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    dq = dq * scale
    tl.store(DQ + b64 * sdq_b + h64 * sdq_h + (tok0 + offs_m[:, None]) * sdq_s + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------- launch helpers
def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def fwd_config(D: int, max_seq: int, itemsize: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward.

    Chosen without a GPU, by compiling for sm_90 on the CPU (`python -m bertkern.triton.attention`
    prints shared memory, registers and spills) and keeping, per head-dim block, the largest tiles
    that fit the H100's shared memory without register spills for every mask kind and dropout.
    Not yet timed on hardware."""
    if _backend.triton_interpreted():
        return INTERPRET_BLOCKS[0], INTERPRET_BLOCKS[1], 4, 1
    bd = _block_d(D)
    if itemsize >= 4:  # fp32 (IEEE dots, no tensor cores): small tiles
        return 32, 64 if bd <= 64 else 32, 4, 2
    if bd <= 64:
        return (64, 64, 4, 3) if max_seq <= 64 else (128, 64, 8, 3)
    if bd <= 128:
        return 128, 32, 8, 3
    return 64, 32, 8, 2  # 4 warps spill with dropout at D = 256


def bwd_config(D: int, max_seq: int, itemsize: int = 2) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel, the same of the dQ kernel),
    chosen like fwd_config."""
    if _backend.triton_interpreted():
        cfg = (INTERPRET_BLOCKS[0], INTERPRET_BLOCKS[1], 4, 1)
        return cfg, cfg
    bd = _block_d(D)
    if itemsize >= 4:
        return (32, 64, 8, 1), ((32, 64, 8, 2) if bd <= 64 else (32, 32, 8, 2))
    if bd <= 64:
        dkdv, dq = (64, 64, 8, 2), (64, 64, 8, 2)
    elif bd <= 128:
        dkdv, dq = (32, 64, 8, 2), (64, 32, 8, 2)
    else:
        dkdv, dq = (32, 64, 8, 2), (64, 32, 8, 2)
    return dkdv, dq


def _dot_args(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PREC): upcast bf16 dot operands under the interpreter; IEEE fp32 dots for fp32."""
    return dtype == torch.bfloat16 and _backend.triton_interpreted(), "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    """(kind, mask_min, tensor, strides, varies over queries) of a 4-D broadcast mask view."""
    if mask is None:
        return 0, 0.0, like, (0, 0, 0, 0), False
    rows = mask.stride(2) != 0 and mask.shape[2] > 1
    if mask.dtype == torch.bool:
        return 1, 0.0, mask.view(torch.uint8), mask.stride(), rows
    return 2, float(torch.finfo(mask.dtype).min), mask, mask.stride(), rows


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, like: torch.Tensor):
    if dropout_p <= 0.0:
        return like, 1.0, 0
    if seed is None:
        raise ValueError("bertkern.ops.attention: dropout_p > 0 needs a seed tensor")
    # p == 1: threshold 2**31 does not fit the int32 compare, but keep_scale is 0 so everything is 0.
    return seed, reference.dropout_scale(dropout_p), min(reference.dropout_threshold(dropout_p), 2**31 - 1)


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides: [B, H, S, D] padded, [total, H, D] packed (batch stride unused)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_forward(q, k, v, out, stats, st_strides, mask, seed, cu, B, H, S_q, S_k, row_stride, scale, dropout_p,
                    varlen):
    D = q.shape[-1]
    kind, mask_min, m_arg, m_strides, m_rows = _mask_args(mask, q)
    seed_t, keep_scale, thresh = _dropout_args(dropout_p, seed, q)
    dot_f32, prec = _dot_args(q.dtype)
    block_m, block_n, warps, stages = fwd_config(D, S_q, q.element_size())
    grid = (triton.cdiv(S_q, block_m), B * H)
    _fwd_kernel[grid](
        q, k, v, out, stats, m_arg, seed_t, cu if cu is not None else q,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *m_strides, *st_strides, stats.stride(0),
        H, S_q, S_k, D, row_stride, scale, keep_scale, thresh,
        MASK_KIND=kind, MASK_MIN=mask_min, MASK_ROWS=m_rows, DROPOUT=dropout_p > 0.0, VARLEN=varlen,
        DOT_F32=dot_f32, PREC=prec, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        num_warps=warps, num_stages=stages,
    )


def _launch_backward(grad, q, k, v, out, stats, st_strides, dq, dk, dv, mask, seed, cu, B, H, S_q, S_k, row_stride,
                     scale, dropout_p, varlen):
    D = q.shape[-1]
    kind, mask_min, m_arg, m_strides, m_rows = _mask_args(mask, q)
    seed_t, keep_scale, thresh = _dropout_args(dropout_p, seed, q)
    dot_f32, prec = _dot_args(q.dtype)
    (m1, n1, w1, st1), (m2, n2, w2, st2) = bwd_config(D, S_q, q.element_size())
    bd = _block_d(D)
    delta = torch.empty(stats.shape[1:], dtype=torch.float32, device=q.device)
    cu_arg = cu if cu is not None else q
    _bwd_delta_kernel[(triton.cdiv(S_q, 64), B * H)](
        out, grad, delta, cu_arg, *_strides3(out, varlen), *_strides3(grad, varlen), *st_strides, H, S_q, D,
        VARLEN=varlen, BLOCK_M=64, BLOCK_D=bd, num_warps=4,
    )
    common = dict(
        MASK_KIND=kind, MASK_MIN=mask_min, MASK_ROWS=m_rows, DROPOUT=dropout_p > 0.0, VARLEN=varlen,
        DOT_F32=dot_f32, PREC=prec, BLOCK_D=bd,
    )
    tail = (H, S_q, S_k, D, row_stride, scale, keep_scale, thresh)
    qkv_strides = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(grad, varlen))
    _bwd_dkdv_kernel[(triton.cdiv(S_k, n1), B * H)](
        q, k, v, grad, stats, delta, dk, dv, m_arg, seed_t, cu_arg,
        *qkv_strides, *_strides3(dk, varlen), *_strides3(dv, varlen), *m_strides, *st_strides, stats.stride(0),
        *tail, BLOCK_M=m1, BLOCK_N=n1, num_warps=w1, num_stages=st1, **common,
    )
    _bwd_dq_kernel[(triton.cdiv(S_q, m2), B * H)](
        q, k, v, grad, stats, delta, dq, m_arg, seed_t, cu_arg,
        *qkv_strides, *_strides3(dq, varlen), *m_strides, *st_strides, stats.stride(0), *tail,
        BLOCK_M=m2, BLOCK_N=n2, num_warps=w2, num_stages=st2, **common,
    )


def _bshd_like(B: int, S: int, H: int, D: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised [B, H, S, D] tensor laid out as [B, S, H, D] (so [B, S, H * D] is a view)."""
    return torch.empty((B, S, H, D), dtype=dtype or like.dtype, device=like.device).transpose(1, 2)


# ---------------------------------------------------------------- entry points (called by bertkern.ops.attention)
def forward(q, k, v, mask, scale: float, dropout_p: float, seed):
    """(out, stats) for q [B, H, S_q, D], k / v [B, H, S_k, D] (unit stride along D) and a mask that
    is None or a 4-D broadcast view of [B, H, S_q, S_k]. out is [B, H, S_q, D] in [B, S_q, H, D]
    memory; stats is [2, B, H, S_q] fp32: the row max of the logits and 1 / the row sum of exp."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    out = _bshd_like(B, S_q, H, D, q)
    stats = torch.empty((2, B, H, S_q), dtype=torch.float32, device=q.device)
    _launch_forward(q, k, v, out, stats, (H * S_q, S_q), mask, seed, None, B, H, S_q, S_k, S_q, scale, dropout_p,
                    False)
    return out, stats


def backward(grad, q, k, v, mask, out, stats, scale: float, dropout_p: float, seed):
    """(dq, dk, dv), each [B, H, S, D] in [B, S, H, D] memory."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    dq = _bshd_like(B, S_q, H, D, q)
    dk = _bshd_like(B, S_k, H, D, q)
    dv = _bshd_like(B, S_k, H, D, q)
    _launch_backward(grad, q, k, v, out, stats, (H * S_q, S_q), dq, dk, dv, mask, seed, None, B, H, S_q, S_k, S_q,
                     scale, dropout_p, False)
    return dq, dk, dv


def varlen_forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, dropout_p: float, seed):
    """(out [total, H, D] contiguous, stats [2, H, total] fp32) for packed q / k / v [total, H, D]."""
    total, H, D = q.shape
    B = cu_seqlens.numel() - 1
    out = torch.empty((total, H, D), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, H, total), dtype=torch.float32, device=q.device)
    if total and B and max_seqlen:
        _launch_forward(q, k, v, out, stats, (0, total), None, seed, cu_seqlens, B, H, max_seqlen, max_seqlen,
                        max_seqlen, scale, dropout_p, True)
    return out, stats


def varlen_backward(grad, q, k, v, cu_seqlens, max_seqlen: int, out, stats, scale: float, dropout_p: float, seed):
    total, H, D = q.shape
    B = cu_seqlens.numel() - 1
    dq = torch.empty((total, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if total and B and max_seqlen:
        _launch_backward(grad, q, k, v, out, stats, (0, total), dq, dk, dv, None, seed, cu_seqlens, B, H, max_seqlen,
                         max_seqlen, max_seqlen, scale, dropout_p, True)
    return dq, dk, dv


# ---------------------------------------------------------------- compile check without a GPU
def compile_report(capability: int = 90, dtypes=("fp16", "bf16", "fp32"), head_dims=(32, 64, 80, 128, 256),
                   variants=None) -> list[dict]:
    """Compile the forward and both backward kernels with the launch configs above for
    sm_<capability> on the host (no GPU needed; Triton's bundled ptxas) and report shared memory,
    registers and spill (stack) bytes per (dtype, D, mask kind / dropout / varlen variant). Run with
    TRITON_INTERPRET unset: `python -m bertkern.triton.attention`."""
    from bertkern.triton.compile_check import compile_kernel

    ptr = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
    rows = []
    for dt in dtypes:
        itemsize = 4 if dt == "fp32" else 2
        for D in head_dims:
            bd = _block_d(D)
            fwd = fwd_config(D, 512, itemsize)
            dkdv, dq = bwd_config(D, 512, itemsize)
            for variant, (kind, mask_rows, dropout, varlen) in {
                "padding mask": (1, False, False, False), "padding mask + dropout": (1, False, True, False),
                "[B,H,S,S] float mask": (2, True, False, False), "varlen": (0, False, False, True),
            }.items():
                if variants is not None and variant not in variants:
                    continue
                for fn, (bm, bn, warps, stages) in ((_fwd_kernel, fwd), (_bwd_dkdv_kernel, dkdv), (_bwd_dq_kernel, dq)):
                    consts = dict(MASK_KIND=kind, MASK_MIN=-3.0e38 if kind == 2 else 0.0, MASK_ROWS=mask_rows,
                                  DROPOUT=dropout, VARLEN=varlen, DOT_F32=False,
                                  PREC="ieee" if dt == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
                    # every other argument (sizes, strides, thresh) is an i32
                    sig = {**dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"), ptr[dt]),
                           "STATS": "*fp32", "DELTA": "*fp32", "MASK": "*fp32" if kind == 2 else "*u8",
                           "SEED": "*i64", "CU": "*i32", "scale": "fp32", "keep_scale": "fp32"}
                    res = compile_kernel(fn, sig, consts, warps, stages, capability)
                    if "error" in res:  # one line in the table
                        res["error"] = res["error"].splitlines()[0][:300]
                    rows.append({"dtype": dt, "D": D, "variant": variant, "kernel": fn.fn.__name__.strip("_"),
                                 "config": (bm, bn, warps, stages), **res})
    return rows


if __name__ == "__main__":
    if _backend.triton_interpreted():
        raise SystemExit("unset TRITON_INTERPRET: the compile check compiles real GPU kernels")
    for r in compile_report():
        res = r.get("error") or (f"shared {r['shared']:>6}  regs {r.get('registers', '?'):>3}  "
                                 f"stack {r.get('stack', '?')}")
        print(f"{r['dtype']} D={r['D']:<3} {r['variant']:<24} {r['kernel']:<15} {str(r['config']):<18} {res}")
