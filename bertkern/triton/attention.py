"""Triton kernels for fused attention: out = dropout(softmax(q k^T * scale + mask)) v, forward and
backward, on padded [B, H, S, D] tensors or on packed variable-length tokens [total, H, D].

Forward (one program per BLOCK_M queries of one (batch, head)): the keys are streamed in BLOCK_N
tiles with an online softmax (running max m, running sum l, fp32 accumulator rescaled by
2^(m_old - m_new)); the S x S scores never reach memory. It writes out and the row statistics
(m, 1 / l) in fp32 that the backward uses to recompute the probabilities P = 2^(s - m) / l. (Not
FlashAttention's single lse = m + log(l): 2^(s - lse) loses the bits of lse's rounding at the
magnitude of the logits, e.g. 1e-3 relative for rows under an additive -10000 mask, where s - m is
computed exactly as in the forward.)

Units: for fp16 / bf16 inputs the row max m in the statistics is in log2 units and each probability
is one FFMA into one MUFU.EX2 (ex2.approx.ftz): 2^(s * unit - m), where s is the raw q k^T (unit =
scale * log2 e) or, with an additive mask, s = q k^T * scale + mask in one FFMA (unit = log2 e: the
mask is read in its own dtype, compared there and never multiplied by itself). fp32 inputs keep
natural units (see _exp_logit).

Loops: every key (query) loop runs its full tiles without bounds masks and peels the last, partial
tile (BOUNDS=True); D masks only when D is not a power of two (EVEN_D); no -inf guards without a
mask. The grid is one axis (tile x batch x head, _program), so B * H is not limited to 65535.

Backward. dS = P * (dP - delta); dQ = scale * dS K, dK = scale * dS^T Q, dV = P_dropped^T dO.
  1. delta = rowsum(dO * O) per query row (= rowsum(dP * P), also under dropout);
  2. dK, dV: one program per BLOCK_N keys loops over every query tile, recomputing P^T = 2^(k q^T - m)
     in the transposed frame, so P^T and dS^T feed dV += P^T dO and dK += dS^T Q as they are; by
     default (_bwd_kernel, FlashAttention-2's five GEMM-sized passes) it also adds each step's dS k
     into a zeroed fp32 dQ accumulator with relaxed atomics, and one torch.mul casts it (times
     scale) into dq;
  3. only under torch.use_deterministic_algorithms(True): dQ by a kernel of its own, one program per
     BLOCK_M queries looping over every key tile and recomputing S and dP (seven GEMM-sized passes,
     no atomics, bit-reproducible), with _bwd_dkdv_kernel (the same code without the dQ dot) for 2.
The atomic path is the default because it saves two of the seven GEMM passes (static model, sm_90
fp16 D = 64, 512 keys: 922 issue cycles per 64 x 128 tile for all three gradients against 768 + 568
for the dK/dV and dQ kernels); its fp32 additions land in a run-dependent order, so dQ may differ in
the last bits from run to run.

Configs: fixed tables per (head dim, sequence bucket, dtype, dropout, GPU arch) in fwd_config /
bwd_config, chosen with the static SASS model (benchmarks/sass_report.py), no runtime autotune.

Layout. q, k, v (and dO, and every output) are read and written through their own strides with unit
stride along D, so views of a packed QKV projection are used in place. D is padded to a power of two
(at least 16) in registers, with masked loads. Offsets are int64.

Masks (padded mode only): MASK_KIND 0 = none, 1 = bool (read as uint8), 2 = additive float kept where
value > finfo(mask dtype).min (-inf / finfo.min mask a key; -10000 stays additive). The mask is a 4-D
broadcast view of [B, H, S_q, S_k] (stride 0 over broadcast dims); MASK_ROWS=False (the [B,1,1,S_k]
padding mask) loads one key vector per tile instead of a [BLOCK_M, BLOCK_N] tile. A query row whose
keys are all masked gets out = 0, m = -inf, 1 / l = 0, and zero gradients.

Varlen mode: sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1] of the packed tensors and
attends only to itself; the statistics are [2, H, total] and delta [H, total]. A sequence longer than
max_seqlen (the grid's size) gets NaN in every row of its output and gradients, never uninitialised
memory (bertkern.ops.attention_varlen raises before that where the check costs no device sync).

Dropout: the Philox scheme of bertkern.triton.dropout (bertkern.reference.dropout_keep_mask): element (query
row i, key j) of (b, h) uses row index (b * H + h) * ROW_STRIDE + i and column j, where ROW_STRIDE is
S_q (padded) or max_seqlen (varlen), i.e. exactly the rows of the [B, H, S_q, S_k] probabilities that
masked_softmax / the torch reference would drop. The forward and both backward kernels regenerate
the same bits from the seed tensor.

Numerics: fp32 accumulation; P and dS are cast to the input dtype for the tensor-core dots (as in
FlashAttention); fp32 inputs use IEEE fp32 dots (no TF32). Under TRITON_INTERPRET=1, bf16 dot operands
are upcast to fp32 (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bertkern import backend as _backend
from bertkern._utils import dropout_args
from bertkern.triton.dropout import dropout_keep

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634  # the kernels compute in log2 units: 2^(x log2 e) = e^x
# Block sizes under the interpreter (tests lower them to exercise the tile loops and tails).
INTERPRET_BLOCKS = (64, 64)
# Compute capability the config tables pick for when set (bertkern.triton.compile_check sets it while
# it records the launches it compiles for a given GPU); None: the tensor's device.
TARGET_CAPABILITY: int | None = None


@triton.jit
def _program(H, L, BLOCK: tl.constexpr):
    """(tile, batch, head) of this program. The grid is one axis of tiles x B x H, tile fastest (the
    programs of one head run together and share its K / V in L2); axis 0 takes up to 2^31 - 1
    programs, where grid axes 1 and 2 stop at 65535 (B * H > 65535 must launch too)."""
    n_tiles = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    bh = pid // n_tiles
    return pid - bh * n_tiles, bh // H, bh % H


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
def _open(CU, H, L, S_q, S_k, D, VARLEN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """What the forward, dK/dV and dQ kernels open with: (tile of BLOCK over L, batch and head as int64,
    first token, query and key lengths of the sequence, offs_d, d_ok)."""
    tile, b, h = _program(H, L, BLOCK)
    tok0, Lq, Lk = _seq_bounds(CU, b, S_q, S_k, VARLEN)
    offs_d = tl.arange(0, BLOCK_D)
    return tile, b.to(tl.int64), h.to(tl.int64), tok0, Lq, Lk, offs_d, offs_d < D


@triton.jit
def _fill_nan(PTR, s_s, first, step, L, offs_r, offs_d, D):
    """NaN into rows first, first + step, ... < L of a [rows, D] tensor (row stride s_s): what a
    varlen sequence longer than max_seqlen gets instead of uninitialised memory (the grid, sized by
    max_seqlen, would leave its tail unwritten)."""
    for r0 in range(first, L, step):
        r = r0 + offs_r
        nan = tl.full([offs_r.shape[0], offs_d.shape[0]], float("nan"), tl.float32)
        tl.store(PTR + r[:, None].to(tl.int64) * s_s + offs_d[None, :], nan.to(PTR.dtype.element_ty),
                 mask=(r < L)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x in fp32. FAST (compiled): one MUFU.EX2 with denormals flushed (ex2.approx.ftz), where
    tl.math.exp2 adds a range check and two predicated multiplies per element. A flushed 2^-126 is
    0 next to the row max's 1."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.math.exp2(x)


@triton.jit
def _exp_logit(x, FOLD: tl.constexpr, FAST: tl.constexpr):
    """e^x of logits x (minus the row max) kept in log2 units (FOLD: scale * log2(e) folded into the
    one multiply of q k^T) or, for fp32 inputs, in natural units: folding rounds each logit at its
    own magnitude (~1e-5 absolute at |logit| ~ 100), finer than fp16 / bf16 inputs are, but coarser
    than an fp32 eager softmax, which rounds only s - max."""
    if FOLD:
        return _exp2(x, FAST)
    elif FAST:
        return _exp2(x * 1.4426950408889634, FAST)
    else:
        return tl.exp(x)


@triton.jit
def _load_rows(ptrs, r_ok, d_ok, BOUNDS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, BLOCK_D] tile: bounds masks only where needed (the last tile; D < BLOCK_D)."""
    if BOUNDS:
        return tl.load(ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _mask_tile(mptrs, ok, MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, MASKED: tl.constexpr):
    """(valid, additive term in natural units) of a mask tile (or key vector) at mptrs, loaded under ok
    (broadcast like it) when MASKED. Loaded once in the mask's dtype, which the comparison keeps (two
    fp16 / bf16 per instruction); the term is converted to fp32 once, for the FFMA of _scores."""
    if MASKED:
        mv = tl.load(mptrs, mask=ok, other=0)
    else:
        mv = tl.load(mptrs)
    if MASK_KIND == 1:
        return mv != 0, 0.0
    else:
        # -inf / finfo.min mask the key; NaN compares false too. The term is dropped by where() there.
        return mv > MASK_MIN, mv.to(tl.float32)


@triton.jit
def _scores(s, add, qk_scale, scale, MASK_KIND: tl.constexpr, FOLD: tl.constexpr):
    """The logits of s = q k^T (or k q^T) in the units _exp_scores takes. FOLD (half inputs): without an
    additive mask s stays raw (the max of q k^T times qk_scale > 0 is the max of the logits, so each
    logit's scale and shift are one FFMA inside the exponent); with one, s * scale + mask in natural
    units, one FFMA (log2(e) then rides in the exponent's FFMA: no multiply of the mask of its own).
    fp32 inputs: natural units."""
    if MASK_KIND == 2:
        return s * scale + add
    elif FOLD:
        return s
    else:
        return s * qk_scale


@triton.jit
def _unit(qk_scale, MASK_KIND: tl.constexpr):
    """log2 units per unit of a FOLD _scores tile: qk_scale = scale * log2(e) for raw q k^T, log2(e)
    for natural logits."""
    if MASK_KIND == 2:
        return 1.4426950408889634
    else:
        return qk_scale


@triton.jit
def _exp_scores(s, shift, unit, FOLD: tl.constexpr, FAST: tl.constexpr):
    """e^(logit - max) of a _scores tile, shift = the max in the statistics' units (log2 units for
    FOLD): one FFMA and one MUFU.EX2 per logit."""
    if FOLD:
        return _exp2(s * unit - shift, FAST)
    else:
        return _exp_logit(s - shift, FOLD, FAST)


@triton.jit
def _logits_tile(
    q, k_ptrs, v_ptrs, mptrs, start_n, offs_n0, d_ok, Lk, sk_s, sv_s, sm_k, qk_scale, scale,
    BOUNDS: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr,
    MASK_ROWS: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, FOLD: tl.constexpr,
):
    """(k, v, s, valid) of the key tile at start_n: s = _scores of q k^T, valid = not masked and not past
    Lk (k = 0 there gives s = 0, and 2^(0 - max) can overflow: inf * 0 = NaN in dQ); _probs applies it.
    Rows past the end read the last mask row (clamped by the caller), so only keys are bounded."""
    n64 = tl.cast(start_n, tl.int64)
    n_ok = (start_n + offs_n0) < Lk
    k = _load_rows(k_ptrs + n64 * sk_s, n_ok, d_ok, BOUNDS, EVEN_D)
    v = _load_rows(v_ptrs + n64 * sv_s, n_ok, d_ok, BOUNDS, EVEN_D)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    valid = n_ok[None, :]
    add = 0.0
    if MASK_KIND != 0:
        if MASK_ROWS:
            valid, add = _mask_tile(mptrs + n64 * sm_k, n_ok[None, :], MASK_KIND, MASK_MIN, BOUNDS)
        else:
            valid, add = _mask_tile(mptrs + n64 * sm_k, n_ok, MASK_KIND, MASK_MIN, BOUNDS)
            valid = valid[None, :]
            if MASK_KIND == 2:
                add = add[None, :]
        if BOUNDS:
            valid = valid & n_ok[None, :]
    return k, v, _scores(s, add, qk_scale, scale, MASK_KIND, FOLD), valid


@triton.jit
def _probs(s, valid, shift, inv_l, unit, MASK_KIND: tl.constexpr, MASKED: tl.constexpr, FOLD: tl.constexpr,
           FAST: tl.constexpr):
    """P = e^(logit - max) * inv_l of a _scores tile (shift, inv_l broadcast like it), 0 where not valid
    (MASKED). An additive mask selects after the exponent: selecting s first lets the compiler split
    the constant log2(e) multiply off the shift's FFMA (it moves the multiply into the select)."""
    if MASKED and MASK_KIND != 2:
        s = tl.where(valid, s, -float("inf"))
    p = _exp_scores(s, shift, unit, FOLD, FAST)
    if MASKED and MASK_KIND == 2:
        p = tl.where(valid, p, 0.0)
    return p * inv_l


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, mptrs, start_n, offs_n0, d_ok, Lk, sk_s, sv_s, sm_k,
    qk_scale, scale, SEED, rows, thresh,
    BOUNDS: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr,
    MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    FAST_EXP: tl.constexpr, FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of the online softmax; m in log2 units (FOLD), p = 2^(s * unit - m)."""
    k, v, s, valid = _logits_tile(q, k_ptrs, v_ptrs, mptrs, start_n, offs_n0, d_ok, Lk, sk_s, sv_s, sm_k, qk_scale,
                                  scale, BOUNDS, EVEN_D, MASK_KIND, MASK_MIN, MASK_ROWS, DOT_F32, PREC, FOLD)
    if MASK_KIND != 0 or BOUNDS:  # -inf where masked: the row max needs it, so select s
        s = tl.where(valid, s, -float("inf"))
    unit = _unit(qk_scale, MASK_KIND)
    if FOLD:  # unit > 0: the max of s, times unit, is the max of the logits
        m_new = tl.maximum(m_i, tl.max(s, 1) * unit)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASK_KIND != 0:  # a row with no key yet has m = -inf: shift by 0 (2^-inf = 0, never NaN)
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    else:  # without a mask every row has a finite key in every tile it sees
        shift = m_new
    if FOLD:  # _exp_scores written out: through it the op order costs sm_80 1-3 instructions here
        p = _exp2(s * unit - shift[:, None], FAST_EXP)
    else:
        p = _exp_logit(s - shift[:, None], FOLD, FAST_EXP)
    alpha = _exp_logit(m_i - shift, FOLD, FAST_EXP)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = dropout_keep(SEED, rows, start_n, thresh, BLOCK_M, BLOCK_N)
        p = tl.where(keep, p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q, K, V, O, STATS, MASK, SEED, CU,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
    sm_b, sm_h, sm_q, sm_k, st_b, st_h, plane,
    H, S_q, S_k, D, ROW_STRIDE, qk_scale, scale, keep_scale, thresh,
    MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, FAST_EXP: tl.constexpr, FOLD: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, b64, h64, tok0, Lq, Lk, offs_d, d_ok = _open(CU, H, S_q, S_q, S_k, D, VARLEN, BLOCK_M, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    o_ptr = O + b64 * so_b + h64 * so_h + tok0 * so_s
    stat = STATS + b64 * st_b + h64 * st_h + tok0
    if VARLEN:
        if Lq > ROW_STRIDE:  # max_seqlen too small for this sequence: all of it NaN
            _fill_nan(o_ptr, so_s, pid_m * BLOCK_M, tl.cdiv(S_q, BLOCK_M) * BLOCK_M, Lq, tl.arange(0, BLOCK_M),
                      offs_d, D)
            for r0 in range(pid_m * BLOCK_M, Lq, tl.cdiv(S_q, BLOCK_M) * BLOCK_M):
                r = r0 + tl.arange(0, BLOCK_M)
                tl.store(stat + r, tl.full([BLOCK_M], float("nan"), tl.float32), mask=r < Lq)
                tl.store(stat + plane + r, tl.full([BLOCK_M], float("nan"), tl.float32), mask=r < Lq)
            return
    if pid_m * BLOCK_M >= Lq:
        return
    m_ok = offs_m < Lq
    q_ptr = Q + b64 * sq_b + h64 * sq_h + tok0 * sq_s
    q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_ptrs = K + b64 * sk_b + h64 * sk_h + tok0 * sk_s + offs_n0[:, None].to(tl.int64) * sk_s + offs_d[None, :]
    v_ptrs = V + b64 * sv_b + h64 * sv_h + tok0 * sv_s + offs_n0[:, None].to(tl.int64) * sv_s + offs_d[None, :]
    # mask pointers at key 0; rows past the end read the last row (their results are not stored)
    m_base = MASK + b64 * sm_b + h64 * sm_h
    if MASK_ROWS:
        mptrs = m_base + tl.minimum(offs_m, Lq - 1)[:, None].to(tl.int64) * sm_q + offs_n0[None, :] * sm_k
    else:
        mptrs = m_base + offs_n0 * sm_k
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    rows = (b64 * H + h64) * ROW_STRIDE + offs_m
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full tiles: no bounds masks
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, mptrs, start_n, offs_n0, d_ok, Lk, sk_s, sv_s,
                                  sm_k, qk_scale, scale, SEED, rows, thresh, False, EVEN_D, MASK_KIND, MASK_MIN,
                                  MASK_ROWS, DROPOUT, DOT_F32, PREC, FAST_EXP, FOLD, BLOCK_M, BLOCK_N)
    if n_full < Lk:  # the last, partial tile
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, mptrs, n_full, offs_n0, d_ok, Lk, sk_s, sv_s,
                                  sm_k, qk_scale, scale, SEED, rows, thresh, True, EVEN_D, MASK_KIND, MASK_MIN,
                                  MASK_ROWS, DROPOUT, DOT_F32, PREC, FAST_EXP, FOLD, BLOCK_M, BLOCK_N)
    live = l_i > 0.0
    inv = tl.where(live, 1.0 / tl.where(live, l_i, 1.0), 0.0)
    out = acc * (inv * keep_scale)[:, None]
    tl.store(o_ptr + offs_m[:, None].to(tl.int64) * so_s + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(stat + offs_m, m_i, mask=m_ok)  # log2 units; -inf for a fully masked row
    tl.store(stat + plane + offs_m, inv, mask=m_ok)


@triton.jit
def _load_stats(STATS, DELTA, offs, plane, ok, BOUNDS: tl.constexpr):
    """(row max in log2 units, 1 / row sum, delta) of the forward; +inf, 0, 0 for rows out of range
    (read only with BOUNDS: a masked load's +inf costs a select per row) or fully masked, so that
    2^(s - max) / sum is 0 there (and never inf * 0)."""
    if BOUNDS:
        row_max = tl.load(STATS + offs, mask=ok, other=float("inf"))
        inv_l = tl.load(STATS + plane + offs, mask=ok, other=0.0)
        delta = tl.load(DELTA + offs, mask=ok, other=0.0)
    else:
        row_max = tl.load(STATS + offs)
        inv_l = tl.load(STATS + plane + offs)
        delta = tl.load(DELTA + offs)
    row_max = tl.where(row_max == -float("inf"), float("inf"), row_max)
    return row_max, inv_l, delta


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, CU, so_b, so_h, so_s, sdo_b, sdo_h, sdo_s, st_b, st_h, H, S_q, D,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, laid out like one plane of the statistics."""
    pid_m, b, h = _program(H, S_q, BLOCK_M)
    tok0, Lq, _ = _seq_bounds(CU, b, S_q, S_q, VARLEN)
    if pid_m * BLOCK_M >= Lq:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b64 * so_b + h64 * so_h + (tok0 + offs_m[:, None]) * so_s + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b64 * sdo_b + h64 * sdo_h + (tok0 + offs_m[:, None]) * sdo_s + offs_d[None, :],
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * st_b + h64 * st_h + tok0 + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, kvalid, kadd, q_ptrs, do_ptrs, dq_ptrs, mptrs, start_m, offs_m0, d_ok, Lq, sq_s, sdo_s, sdq_s,
    sm_q, STATS, DELTA, stat, plane, qk_scale, scale, keep_scale, SEED, row0, col0, thresh,
    BOUNDS: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr,
    MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    FAST_EXP: tl.constexpr, FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    """One query tile of dK / dV, in the transposed frame ([keys, queries]): s^T = k q^T, so that
    P^T and dS^T feed their dots as they are (no transpose through shared memory). kvalid, kadd
    ([keys, 1]): the key vector's mask (not MASK_ROWS). ATOMIC_DQ: also adds this key block's
    dS k (unscaled) to the fp32 dQ accumulator at dq_ptrs."""
    m64 = tl.cast(start_m, tl.int64)
    offs_m = start_m + offs_m0
    m_ok = offs_m < Lq
    q = _load_rows(q_ptrs + m64 * sq_s, m_ok, d_ok, BOUNDS, EVEN_D)
    do = _load_rows(do_ptrs + m64 * sdo_s, m_ok, d_ok, BOUNDS, EVEN_D)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # rows past the end: max +inf, so their P is 0 (their q and dO are 0 too)
    row_max, inv_l, delta = _load_stats(STATS, DELTA, stat + offs_m, plane, m_ok, BOUNDS)
    if FOLD:  # half inputs: s^T = k q^T directly (its rounding may differ from the forward's q k^T by an
        # ulp of the logit, far below what fp16 / bf16 inputs resolve)
        st = tl.dot(k, tl.trans(q), input_precision=PREC)
    else:  # fp32: the forward's q k^T, transposed, so that P is the forward's to the bit
        st = tl.trans(tl.dot(q, tl.trans(k), input_precision=PREC))
    valid, add = kvalid, kadd  # a key vector: loaded once by the caller
    if MASK_ROWS:
        valid, add = _mask_tile(mptrs + m64 * sm_q, m_ok[None, :], MASK_KIND, MASK_MIN, BOUNDS)
    pt = _probs(_scores(st, add, qk_scale, scale, MASK_KIND, FOLD), valid, row_max[None, :], inv_l[None, :],
                _unit(qk_scale, MASK_KIND), MASK_KIND, MASK_KIND != 0, FOLD, FAST_EXP)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    if DROPOUT:
        keep = tl.trans(dropout_keep(SEED, row0 + offs_m, col0, thresh, BLOCK_M, BLOCK_N))
        pdt = tl.where(keep, pt * keep_scale, 0.0)
        dpt = tl.where(keep, dpt * keep_scale, 0.0)
    else:
        pdt = pt
    dv = tl.dot(pdt.to(do.dtype), do, dv, input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC)
    if ATOMIC_DQ:  # relaxed: the adds commute, nothing reads the accumulator before the kernel ends
        dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PREC)
        dq_ptrs += m64 * sdq_s
        if BOUNDS:
            tl.atomic_add(dq_ptrs, dq, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
        elif EVEN_D:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, mask=d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _load_kv(k_ptr, v_ptr, ok, DOT_F32: tl.constexpr):
    """The dK / dV program's own [BLOCK_N, BLOCK_D] k and v tiles."""
    k = tl.load(k_ptr, mask=ok, other=0.0)
    v = tl.load(v_ptr, mask=ok, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV, DQ, MASK, SEED, CU,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
    sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s, sdq_b, sdq_h, sdq_s,
    sm_b, sm_h, sm_q, sm_k, st_b, st_h, plane,
    H, S_q, S_k, D, ROW_STRIDE, qk_scale, scale, keep_scale, thresh,
    MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, FAST_EXP: tl.constexpr, FOLD: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RELOAD_KV: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dK, dV of BLOCK_N keys; with ATOMIC_DQ (the five-GEMM backward) also dQ += dS k into DQ, the
    zeroed fp32 accumulator (unscaled; the caller casts it to dq times scale)."""
    pid_n, b64, h64, tok0, Lq, Lk, offs_d, d_ok = _open(CU, H, S_k, S_q, S_k, D, VARLEN, BLOCK_N, BLOCK_D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    dk_ptr = DK + b64 * sdk_b + h64 * sdk_h + tok0 * sdk_s
    dv_ptr = DV + b64 * sdv_b + h64 * sdv_h + tok0 * sdv_s
    if VARLEN:
        if Lk > ROW_STRIDE:  # max_seqlen too small for this sequence: all of it NaN
            step = tl.cdiv(S_k, BLOCK_N) * BLOCK_N
            _fill_nan(dk_ptr, sdk_s, pid_n * BLOCK_N, step, Lk, tl.arange(0, BLOCK_N), offs_d, D)
            _fill_nan(dv_ptr, sdv_s, pid_n * BLOCK_N, step, Lk, tl.arange(0, BLOCK_N), offs_d, D)
            if ATOMIC_DQ:  # (Lq == Lk: these programs cover dQ's rows too)
                _fill_nan(DQ + b64 * sdq_b + h64 * sdq_h + tok0 * sdq_s, sdq_s, pid_n * BLOCK_N, step, Lq,
                          tl.arange(0, BLOCK_N), offs_d, D)
            return
    if pid_n * BLOCK_N >= Lk:
        return
    n_ok = offs_n < Lk
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k_ptr = K + b64 * sk_b + h64 * sk_h + (tok0 + offs_n[:, None]) * sk_s + offs_d[None, :]
    v_ptr = V + b64 * sv_b + h64 * sv_h + (tok0 + offs_n[:, None]) * sv_s + offs_d[None, :]
    if not RELOAD_KV:
        k, v = _load_kv(k_ptr, v_ptr, kv_mask, DOT_F32)
    q_ptrs = Q + b64 * sq_b + h64 * sq_h + tok0 * sq_s + offs_m0[:, None].to(tl.int64) * sq_s + offs_d[None, :]
    do_ptrs = DO + b64 * sdo_b + h64 * sdo_h + tok0 * sdo_s + offs_m0[:, None].to(tl.int64) * sdo_s + offs_d[None, :]
    dq_ptrs = DQ + b64 * sdq_b + h64 * sdq_h + tok0 * sdq_s + offs_m0[:, None].to(tl.int64) * sdq_s + offs_d[None, :]
    stat = b64 * st_b + h64 * st_h + tok0
    m_base = MASK + b64 * sm_b + h64 * sm_h
    # keys past the end read the last key's mask (their dK / dV rows are not stored)
    key = tl.minimum(offs_n, Lk - 1).to(tl.int64)
    kvalid = n_ok[:, None]
    kadd = 0.0
    mptrs = m_base
    if MASK_KIND != 0:
        if MASK_ROWS:  # [keys, queries] tile at query 0
            mptrs = m_base + key[:, None] * sm_k + offs_m0[None, :].to(tl.int64) * sm_q
        else:  # a padding mask depends on the key only: once per program
            kvalid, kadd = _mask_tile(m_base + key * sm_k, n_ok, MASK_KIND, MASK_MIN, False)
            kvalid = kvalid[:, None]
            if MASK_KIND == 2:
                kadd = kadd[:, None]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row0 = (b64 * H + h64) * ROW_STRIDE
    m_full = (Lq // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        if RELOAD_KV:
            k, v = _load_kv(k_ptr, v_ptr, kv_mask, DOT_F32)
        dk, dv = _dkdv_step(dk, dv, k, v, kvalid, kadd, q_ptrs, do_ptrs, dq_ptrs, mptrs, start_m, offs_m0, d_ok,
                            Lq, sq_s, sdo_s, sdq_s, sm_q, STATS, DELTA, stat, plane, qk_scale, scale, keep_scale, SEED,
                            row0, pid_n * BLOCK_N, thresh, False, EVEN_D, MASK_KIND, MASK_MIN, MASK_ROWS, DROPOUT,
                            DOT_F32, PREC, FAST_EXP, FOLD, BLOCK_M, BLOCK_N, ATOMIC_DQ)
    if m_full < Lq:
        if RELOAD_KV:
            k, v = _load_kv(k_ptr, v_ptr, kv_mask, DOT_F32)
        dk, dv = _dkdv_step(dk, dv, k, v, kvalid, kadd, q_ptrs, do_ptrs, dq_ptrs, mptrs, m_full, offs_m0, d_ok,
                            Lq, sq_s, sdo_s, sdq_s, sm_q, STATS, DELTA, stat, plane, qk_scale, scale, keep_scale, SEED,
                            row0, pid_n * BLOCK_N, thresh, True, EVEN_D, MASK_KIND, MASK_MIN, MASK_ROWS, DROPOUT,
                            DOT_F32, PREC, FAST_EXP, FOLD, BLOCK_M, BLOCK_N, ATOMIC_DQ)
    dk = dk * scale
    tl.store(dk_ptr + offs_n[:, None].to(tl.int64) * sdk_s + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + offs_n[:, None].to(tl.int64) * sdv_s + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


# The five-GEMM backward: _bwd_dkdv_kernel's code launched with ATOMIC_DQ=True, under a name of its own
# so that the compile test and the SASS report (its GEMM count) tell the two launches apart.
_bwd_kernel = triton.jit(_bwd_dkdv_kernel.fn)


@triton.jit
def _dq_step(
    dq, q, do, row_max, inv_l, delta, k_ptrs, v_ptrs, mptrs, start_n, offs_n0, d_ok, Lk, sk_s, sv_s, sm_k,
    qk_scale, scale, keep_scale, SEED, rows, thresh,
    BOUNDS: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr,
    MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    FAST_EXP: tl.constexpr, FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of dQ."""
    k, v, s, valid = _logits_tile(q, k_ptrs, v_ptrs, mptrs, start_n, offs_n0, d_ok, Lk, sk_s, sv_s, sm_k, qk_scale,
                                  scale, BOUNDS, EVEN_D, MASK_KIND, MASK_MIN, MASK_ROWS, DOT_F32, PREC, FOLD)
    p = _probs(s, valid, row_max[:, None], inv_l[:, None], _unit(qk_scale, MASK_KIND), MASK_KIND,
               MASK_KIND != 0 or BOUNDS, FOLD, FAST_EXP)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if DROPOUT:
        keep = dropout_keep(SEED, rows, start_n, thresh, BLOCK_M, BLOCK_N)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


# Opens like _fwd_kernel and _bwd_dkdv_kernel (same parameters, _open, NaN fill, then _fwd_kernel's key
# and mask pointers): each Triton kernel spells out its own parameters, and a helper for the pointers
# would take twenty of them. dQ is a kernel of its own so that neither pass needs atomics.
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, STATS, DELTA, DQ, MASK, SEED, CU,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s, sdq_b, sdq_h, sdq_s,
    sm_b, sm_h, sm_q, sm_k, st_b, st_h, plane,
    H, S_q, S_k, D, ROW_STRIDE, qk_scale, scale, keep_scale, thresh,
    MASK_KIND: tl.constexpr, MASK_MIN: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, FAST_EXP: tl.constexpr, FOLD: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, b64, h64, tok0, Lq, Lk, offs_d, d_ok = _open(CU, H, S_q, S_q, S_k, D, VARLEN, BLOCK_M, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    dq_ptr = DQ + b64 * sdq_b + h64 * sdq_h + tok0 * sdq_s
    if VARLEN:
        if Lq > ROW_STRIDE:  # max_seqlen too small for this sequence: all of it NaN
            _fill_nan(dq_ptr, sdq_s, pid_m * BLOCK_M, tl.cdiv(S_q, BLOCK_M) * BLOCK_M, Lq, tl.arange(0, BLOCK_M),
                      offs_d, D)
            return
    if pid_m * BLOCK_M >= Lq:
        return
    m_ok = offs_m < Lq
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * sq_b + h64 * sq_h + (tok0 + offs_m[:, None]) * sq_s + offs_d[None, :],
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b64 * sdo_b + h64 * sdo_h + (tok0 + offs_m[:, None]) * sdo_s + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat = b64 * st_b + h64 * st_h + tok0
    row_max, inv_l, delta = _load_stats(STATS, DELTA, stat + offs_m, plane, m_ok, True)
    k_ptrs = K + b64 * sk_b + h64 * sk_h + tok0 * sk_s + offs_n0[:, None].to(tl.int64) * sk_s + offs_d[None, :]
    v_ptrs = V + b64 * sv_b + h64 * sv_h + tok0 * sv_s + offs_n0[:, None].to(tl.int64) * sv_s + offs_d[None, :]
    m_base = MASK + b64 * sm_b + h64 * sm_h
    if MASK_ROWS:
        mptrs = m_base + tl.minimum(offs_m, Lq - 1)[:, None].to(tl.int64) * sm_q + offs_n0[None, :] * sm_k
    else:
        mptrs = m_base + offs_n0 * sm_k
    rows = (b64 * H + h64) * ROW_STRIDE + offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, row_max, inv_l, delta, k_ptrs, v_ptrs, mptrs, start_n, offs_n0, d_ok, Lk, sk_s, sv_s,
                      sm_k, qk_scale, scale, keep_scale, SEED, rows, thresh, False, EVEN_D, MASK_KIND, MASK_MIN,
                      MASK_ROWS, DROPOUT, DOT_F32, PREC, FAST_EXP, FOLD, BLOCK_M, BLOCK_N)
    if n_full < Lk:
        dq = _dq_step(dq, q, do, row_max, inv_l, delta, k_ptrs, v_ptrs, mptrs, n_full, offs_n0, d_ok, Lk, sk_s, sv_s,
                      sm_k, qk_scale, scale, keep_scale, SEED, rows, thresh, True, EVEN_D, MASK_KIND, MASK_MIN,
                      MASK_ROWS, DROPOUT, DOT_F32, PREC, FAST_EXP, FOLD, BLOCK_M, BLOCK_N)
    dq = dq * scale
    tl.store(dq_ptr + offs_m[:, None].to(tl.int64) * sdq_s + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------- launch helpers
def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _capability(device: torch.device) -> int:
    """The target GPU's compute capability (major * 10 + minor) for the config tables;
    TARGET_CAPABILITY when set (compile checks on a host without a GPU pick configs per target)."""
    if TARGET_CAPABILITY is not None:
        return TARGET_CAPABILITY
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 90


def fwd_config(D: int, max_seq: int, itemsize: int = 2, mask_kind: int = 0, mask_rows: bool = False,
               dropout: bool = False, capability: int = 90) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward: a fixed table, no runtime autotune.

    Chosen without a GPU from the static model (benchmarks/sass_report.py: per loop iteration, issue
    cycles against tensor-core and MUFU cycles; registers, spills, CTAs/SM), keeping per (head-dim
    block, sequence bucket, dtype, dropout, arch) the tiles with the lowest issue ratio that compile
    without spills for every mask form on sm_80 and sm_90. A table, not triton.autotune: there is no
    GPU to tune on, autotune's first-call timings get in the way of CUDA graph capture and
    torch.compile, and the compile test enumerates every entry. Not yet timed on hardware.
    sm_90, D = 64, S = 512 (static model, issue / max(tensor, MUFU)): 128 x 128 tiles, 8 warps, give
    0.88 without a mask, 1.15 with a padding mask, 1.39 with a [B,H,S,S] mask (128 x 64, measured
    before the mask's FFMA fold: 1.11 / 1.37 / 1.74; 4 warps at 128 x 128 spill). Dropout's Philox needs the
    registers of the wider tile."""
    if _backend.triton_interpreted():
        return INTERPRET_BLOCKS[0], INTERPRET_BLOCKS[1], 4, 1
    bd = _block_d(D)
    if itemsize >= 4:  # fp32 (IEEE dots, no tensor cores): small tiles
        return 32, 64 if bd <= 64 else 32, 4, 2
    if bd <= 64:
        if max_seq <= 64:  # short sequences: more, smaller programs
            return 64, 64, 4, 3
        if capability >= 90 and not dropout:
            return 128, 128, 8, 3
        if capability < 90 and dropout:  # 128 x 64 spills 16 B there (bf16)
            return 128, 32, 8, 3
        return 128, 64, 8, 3
    if bd <= 128:  # sm_80 with dropout: 128 x 32 spills 16 B
        return (128, 16, 8, 3) if capability < 90 and dropout else (128, 32, 8, 3)
    return 64, 32, 8, 2  # 4 warps spill with dropout at D = 256


def bwd_config(D: int, max_seq: int, itemsize: int = 2, mask_kind: int = 0, mask_rows: bool = False,
               dropout: bool = False, capability: int = 90, atomic_dq: bool = False):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages, RELOAD_KV) of the dK/dV kernel, or of the five-GEMM
    kernel with atomic_dq; (BLOCK_M, BLOCK_N, num_warps, num_stages) of the dQ kernel of the
    deterministic backward), chosen like fwd_config.

    RELOAD_KV: the program reloads its k, v tiles (L1 / L2 hits) every query step instead of holding
    them in registers across the loop, where mma.sync's operand layout replicates them over the warps
    (the spills at D = 128 on sm_80 and D = 256: 255 registers at 32 x 32 tiles; with it 64 x 32 fits).

    sm_90, D = 64 (static model, issue / max(tensor, MUFU) per loop iteration): the five-GEMM kernel
    over 128 keys x 64-query steps, 0.72 no mask, 0.76 padding mask, 1.10 [B,H,S,S]; dropout at 64 x 64
    with k, v reloaded. The deterministic pair: dK/dV over the same tiles (0.75 / 0.80 / 1.25; 64 x 64
    with dropout, which spills at 128 keys), dQ over 128 queries x 64-key steps (0.74 / 0.91 / 1.08).
    The five-GEMM kernel's dQ dot and atomics take registers the dK/dV kernel's tiles do not have on
    sm_80 (32 x 32 there, reloaded; at D = 64 4 warps and one stage, as two stages spill 8 B in varlen;
    8 warps at D = 128; 64 x 32 spills even without a mask; sm_80 D = 64 per 64 x 32 keys x queries:
    ~640 cycles without a mask, ~770 with a [B,H,S,S] one, against 896 for dK/dV + dQ), at D = 80 / 128
    with dropout or a [B,H,S,S] mask (32 x 32, reloaded) and at D = 256 (64 x 16). The deterministic
    sm_80 kernels take 64 x 32 tiles, 4 warps, at D = 64 (64 x 64 spills there with a [B,H,S,S] mask or
    dropout)."""
    if _backend.triton_interpreted():
        cfg = (INTERPRET_BLOCKS[0], INTERPRET_BLOCKS[1], 4, 1)
        return (*cfg, False), cfg
    bd = _block_d(D)
    if itemsize >= 4:
        return (32, 64, 8, 1, False), ((32, 64, 8, 2) if bd <= 64 else (32, 32, 8, 2))
    sm90 = capability >= 90
    if bd <= 64:
        if sm90:  # 128 keys spill with dropout, and at D = 32 with a [B,H,S,S] mask
            narrow = dropout or (mask_rows and bd < 64)
            return ((64, 64, 8, 2, atomic_dq and dropout) if narrow else (64, 128, 8, 2, False)), (128, 64, 8, 2)
        return ((32, 32, 4, 1, True) if atomic_dq else (64, 32, 4, 2, False)), (64, 32, 4, 2)
    if bd <= 128:
        if sm90:
            return ((32, 32, 8, 2, True) if atomic_dq and (dropout or mask_rows) else (32, 64, 8, 2, False)), \
                (64, 32, 8, 2)
        return ((32, 32, 8, 2, True) if atomic_dq else (64, 32, 8, 2, True)), (32, 32, 8, 2)
    return ((64, 16, 8, 2, True) if atomic_dq else (64, 32, 8, 2, True)), (64, 32, 8, 2)


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


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides: [B, H, S, D] padded, [total, H, D] packed (batch stride unused)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _kernel_flags(q: torch.Tensor, D: int, scale: float) -> dict:
    """Constexprs shared by the kernels: exp via ex2.approx.ftz when compiled, log2 units for half
    inputs, no D masks when D is a power of two (>= 16)."""
    dot_f32, prec = _dot_args(q.dtype)
    return dict(DOT_F32=dot_f32, PREC=prec, FAST_EXP=not _backend.triton_interpreted(), FOLD=_fold(q.dtype, scale),
                EVEN_D=D == _block_d(D), BLOCK_D=_block_d(D))


def _fold(dtype: torch.dtype, scale: float) -> bool:
    """Logits in log2 units (scale * log2(e) in one multiply) for fp16 / bf16; natural units for fp32
    (see _exp_logit), and for a scale <= 0 (the kernels take the max of q k^T before scaling)."""
    return dtype != torch.float32 and scale > 0


@dataclass(frozen=True, slots=True)
class _Call:
    """What the kernels of one attention call share besides their tensors: the sizes (padded
    [B, H, S, D]; or packed tokens with cu_seqlens, S_q = S_k = max_seqlen), the strides of the
    stats' (batch, head) dims, and the op's scale and dropout_p. S_q is also the dropout rows (and
    stats) per (b, h), as the kernels' ROW_STRIDE."""

    B: int
    H: int
    S_q: int
    S_k: int
    stats_strides: tuple[int, int]
    scale: float
    dropout_p: float
    cu_seqlens: torch.Tensor | None = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    def sizes(self, q: torch.Tensor) -> tuple:
        """The kernels' size and scale arguments: H, S_q, S_k, D, ROW_STRIDE, qk_scale, scale."""
        qk_scale = self.scale * LOG2E if _fold(q.dtype, self.scale) else self.scale
        return self.H, self.S_q, self.S_k, q.shape[-1], self.S_q, qk_scale, self.scale


def _launch_forward(q, k, v, out, stats, mask, seed, c: _Call):
    D, varlen = q.shape[-1], c.varlen
    kind, mask_min, m_arg, m_strides, m_rows = _mask_args(mask, q)
    seed_t, keep_scale, thresh = dropout_args("attention", c.dropout_p, seed, q)
    block_m, block_n, warps, stages = fwd_config(D, c.S_q, q.element_size(), kind, m_rows, c.dropout_p > 0.0,
                                                 _capability(q.device))
    grid = (triton.cdiv(c.S_q, block_m) * c.B * c.H,)  # one axis: see _program
    _fwd_kernel[grid](
        q, k, v, out, stats, m_arg, seed_t, c.cu_seqlens if varlen else q,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *m_strides, *c.stats_strides, stats.stride(0), *c.sizes(q), keep_scale, thresh,
        MASK_KIND=kind, MASK_MIN=mask_min, MASK_ROWS=m_rows, DROPOUT=c.dropout_p > 0.0, VARLEN=varlen,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **_kernel_flags(q, D, c.scale),
    )


def _launch_backward(grad, q, k, v, out, stats, dq, dk, dv, mask, seed, c: _Call):
    D, varlen = q.shape[-1], c.varlen
    kind, mask_min, m_arg, m_strides, m_rows = _mask_args(mask, q)
    seed_t, keep_scale, thresh = dropout_args("attention", c.dropout_p, seed, q)
    cap = _capability(q.device)
    atomic = not torch.are_deterministic_algorithms_enabled()
    (m1, n1, w1, st1, reload_kv), (m2, n2, w2, st2) = bwd_config(D, c.S_q, q.element_size(), kind, m_rows,
                                                                 c.dropout_p > 0.0, cap, atomic)
    flags = _kernel_flags(q, D, c.scale)
    delta = torch.empty(stats.shape[1:], dtype=torch.float32, device=q.device)
    cu_arg = c.cu_seqlens if varlen else q
    _bwd_delta_kernel[(triton.cdiv(c.S_q, 64) * c.B * c.H,)](
        out, grad, delta, cu_arg, *_strides3(out, varlen), *_strides3(grad, varlen), *c.stats_strides, c.H, c.S_q, D,
        VARLEN=varlen, BLOCK_M=64, BLOCK_D=flags["BLOCK_D"], num_warps=4,
    )
    common = dict(MASK_KIND=kind, MASK_MIN=mask_min, MASK_ROWS=m_rows, DROPOUT=c.dropout_p > 0.0, VARLEN=varlen,
                  **flags)
    tail = (*c.sizes(q), keep_scale, thresh)
    qkv_strides = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(grad, varlen))
    dq_acc = torch.zeros_like(dq, dtype=torch.float32) if atomic else dk  # (dk: an unused placeholder)
    (_bwd_kernel if atomic else _bwd_dkdv_kernel)[(triton.cdiv(c.S_k, n1) * c.B * c.H,)](
        q, k, v, grad, stats, delta, dk, dv, dq_acc, m_arg, seed_t, cu_arg,
        *qkv_strides, *_strides3(dk, varlen), *_strides3(dv, varlen), *_strides3(dq_acc, varlen), *m_strides,
        *c.stats_strides, stats.stride(0), *tail, BLOCK_M=m1, BLOCK_N=n1, num_warps=w1, num_stages=st1,
        RELOAD_KV=reload_kv, ATOMIC_DQ=atomic, **common,
    )
    if atomic:
        torch.mul(dq_acc, c.scale, out=dq)  # the one cast into dq's dtype (and the scale of dQ = scale dS K)
        return
    _bwd_dq_kernel[(triton.cdiv(c.S_q, m2) * c.B * c.H,)](
        q, k, v, grad, stats, delta, dq, m_arg, seed_t, cu_arg,
        *qkv_strides, *_strides3(dq, varlen), *m_strides, *c.stats_strides, stats.stride(0), *tail,
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
    _launch_forward(q, k, v, out, stats, mask, seed, _Call(B, H, S_q, S_k, (H * S_q, S_q), scale, dropout_p))
    return out, stats


def backward(grad, q, k, v, mask, out, stats, scale: float, dropout_p: float, seed):
    """(dq, dk, dv), each [B, H, S, D] in [B, S, H, D] memory."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    dq = _bshd_like(B, S_q, H, D, q)
    dk = _bshd_like(B, S_k, H, D, q)
    dv = _bshd_like(B, S_k, H, D, q)
    _launch_backward(grad, q, k, v, out, stats, dq, dk, dv, mask, seed,
                     _Call(B, H, S_q, S_k, (H * S_q, S_q), scale, dropout_p))
    return dq, dk, dv


def varlen_forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, dropout_p: float, seed):
    """(out [total, H, D] contiguous, stats [2, H, total] fp32) for packed q / k / v [total, H, D]."""
    total, H, D = q.shape
    B = cu_seqlens.numel() - 1
    out = torch.empty((total, H, D), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, H, total), dtype=torch.float32, device=q.device)
    if total and B and max_seqlen:
        _launch_forward(q, k, v, out, stats, None, seed,
                        _Call(B, H, max_seqlen, max_seqlen, (0, total), scale, dropout_p, cu_seqlens))
    return out, stats


def varlen_backward(grad, q, k, v, cu_seqlens, max_seqlen: int, out, stats, scale: float, dropout_p: float, seed):
    total, H, D = q.shape
    B = cu_seqlens.numel() - 1
    dq = torch.empty((total, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if total and B and max_seqlen:
        _launch_backward(grad, q, k, v, out, stats, dq, dk, dv, None, seed,
                         _Call(B, H, max_seqlen, max_seqlen, (0, total), scale, dropout_p, cu_seqlens))
    return dq, dk, dv


# ---------------------------------------------------------------- compile cases (bertkern.triton.compile_check)
def _backwards(deterministic, fn, *args):
    """fn(*args) as launched by default (the five-GEMM backward) unless deterministic is True, and in
    deterministic mode (dQ by its own kernel) unless it is False: None compiles both."""
    if deterministic is not True:
        fn(*args)
    if deterministic is False:
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        fn(*args)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def compile_launch(op, direction, dt, params, meta):
    """The call that makes this op's launches on meta tensors (`meta(shape, dtype)`), for the compile
    test and the SASS report; a backward compiles both paths unless params["deterministic"] picks one."""
    B, H, S, D, v = 8, 12, params["S"], params["D"], params["variant"]
    backwards = functools.partial(_backwards, params.get("deterministic"))
    p = 0.1 if "dropout" in v else 0.0
    s = meta((1,), "int64") if p else None
    if v.startswith("varlen"):
        t, cu = meta((B * S, H, D), dt), meta((B + 1,), "int32")
        if direction == "fwd":
            return functools.partial(varlen_forward, t, t, t, cu, S, 0.125, p, s)
        stats = meta((2, H, B * S), "float32")
        return functools.partial(backwards, varlen_backward, t, t, t, t, cu, S, t, stats, 0.125, p, s)
    mask = {
        "none": None,
        "bool_padding": meta((B, 1, 1, S), "bool").expand(B, H, S, S),
        "additive_padding_dropout": meta((B, 1, 1, S), dt).expand(B, H, S, S),
        "float_BHSS": meta((B, H, S, S), dt),
    }[v]
    t = meta((B, H, S, D), dt)
    if direction == "fwd":
        return functools.partial(forward, t, t, t, mask, 0.125, p, s)
    stats = meta((2, B, H, S), "float32")
    return functools.partial(backwards, backward, t, t, t, t, mask, t, stats, 0.125, p, s)


COMPILE_VARIANTS = ("none", "bool_padding", "additive_padding_dropout", "float_BHSS", "varlen_dropout")


def compile_cases() -> list[tuple]:
    """(capability, op, direction, dtype, params) that tests/test_triton_compile.py compiles: 512 (and
    64) keys, head dims 32 / 64 / 80 / 128 (and 256, the largest supported), every mask form."""
    c = []
    # fp16 every variant; bf16 (the same tiles) the heaviest ones
    for dt, variants in (("fp16", COMPILE_VARIANTS), ("bf16", COMPILE_VARIANTS[2:])):
        for D in (32, 64, 80, 128):
            c += [(90, "attention", d, dt, dict(D=D, S=512, variant=v)) for d in ("fwd", "bwd") for v in variants]
    c += [(90, "attention", "fwd", "fp16", dict(D=D, S=64, variant="bool_padding")) for D in (32, 64)]
    c += [(90, "attention", d, dt, dict(D=D, S=512, variant="additive_padding_dropout")) for d in ("fwd", "bwd")
          for dt, D in (("fp32", 64), ("fp32", 128), ("fp16", 256))]
    # A100: 163 KiB of shared memory, no TMA / wgmma (other lowering paths, other config table
    # entries): every mask form, dropout and varlen, fp16 at D = 64 and 128, bf16 the heaviest ones
    c += [(80, "attention", d, "fp16", dict(D=D, S=512, variant=v)) for d in ("fwd", "bwd") for D in (64, 128)
          for v in COMPILE_VARIANTS]
    # varlen without dropout too: its sm_80 backward at D 64 spilled in a config the dropout one did not
    c += [(80, "attention", d, "fp16", dict(D=D, S=512, variant="varlen")) for d in ("fwd", "bwd") for D in (64, 128)]
    c += [(80, "attention", d, "bf16", dict(D=64, S=512, variant=v)) for d in ("fwd", "bwd")
          for v in COMPILE_VARIANTS[2:]]
    c += [(80, "attention", d, "fp32", dict(D=128, S=512, variant="float_BHSS")) for d in ("fwd", "bwd")]
    # A backward compiles both paths (the default five-GEMM kernel; the deterministic dK/dV + dQ pair)
    # for fp16 at D = 64 / 128 / 256, every mask form; elsewhere (bf16 and fp32, the same tiles; D = 32
    # and 80, the tiles of 64 and 128) the default one only.
    for cap, op, d, dt, params in c:
        if d == "bwd" and (dt != "fp16" or params["D"] in (32, 80)):
            params["deterministic"] = False
    return c
