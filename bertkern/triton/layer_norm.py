"""Triton kernels for add_layer_norm and embedding_layer_norm, forward and backward.

add_layer_norm: y = layer_norm(h), h = dropout(x + x_bias) + residual over the last dim of 2-D
[M, N] views with unit stride along N (bertkern.backend.as_rows). Math is fp32 (fp64 for fp64
inputs), cast on store; statistics are two-pass over the row held in registers, of the pre-norm sum
rounded to the input dtype (what the backward reads back and eager normalizes). Rows up to
MAX_BLOCK_N wide are one tile (several rows per program when they are narrow); wider rows loop over
column chunks, merging per-chunk (mean, M2) pairs (Chan et al.) and re-reading the inputs to normalize.

Dropout is counter-based Philox on the [M, N] view (bertkern.triton.dropout, the scheme of
bertkern.reference.dropout_keep_mask): the seed is read from a device tensor, so no host sync, and the
backward pass regenerates the mask rather than storing it.

Backward: dh = rstd * (g - xhat * mean(g * xhat) - mean(g)), g = dy * weight, plus the gradient of the
returned pre-norm sum; dx = dh * keep / (1 - p). The column sums (dweight, dbias, dx_bias) are reduced
in fp32: each program owns one partial row per sum, and one column_sum launch sums the few partial
rows of all three (deterministic, no atomics).

Every function here follows the bertkern::add_layer_norm(_backward) convention: outputs that are not
computed are returned as empty tensors.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from bertkern import reference
from bertkern._utils import NormArgs, NormGradArgs, acc_dtype, empty, num_sms
from bertkern.triton.column_sum import column_sum
from bertkern.triton.dropout import dropout_keep

# Widest row kept in registers as one tile (16 warps x 32 lanes x 32 fp32 values); wider rows loop
# over LOOP_BLOCK_N-wide chunks. Module attributes so tests can shrink them to reach the loop path.
MAX_BLOCK_N = 16384
LOOP_BLOCK_N = 4096
# Elements per program for narrow rows: 4 warps x 32 lanes x 32 values; 768-wide rows go 4 per program.
ROW_TILE_ELEMS = 4096


# ---------------------------------------------------------------- shared pieces
@triton.jit
def _prenorm_tile(X, R, XB, SEED, rows, cols, col0, m, N, stride_x, stride_r, thresh, scale,
                  HAS_RES: tl.constexpr, HAS_XBIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """h = dropout(x + x_bias) + residual for one tile, rounded to x's dtype (_norm_store) and held in
    the accumulation dtype; 0 outside m."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
    acc = tl.float64 if x.dtype == tl.float64 else tl.float32
    h = x.to(acc)
    if HAS_XBIAS:
        h += tl.load(XB + cols, mask=cols < N, other=0.0).to(acc)[None, :]
    if HAS_DROPOUT:
        keep = dropout_keep(SEED, rows, col0, thresh, BLOCK_M, BLOCK_N)
        h = tl.where(keep, h * scale, 0.0)
    if HAS_RES:
        h += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=m, other=0.0).to(acc)
    return h.to(x.dtype).to(acc)


@triton.jit
def _rsqrt(v):
    # IEEE-rounded sqrt (tl.sqrt is approximate in fp32; sqrt_rn has no fp64 form).
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return 1.0 / tl.sqrt_rn(v)


@triton.jit
def _affine(xhat, W, B, cols, N, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    y = xhat
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(xhat.dtype)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(xhat.dtype)[None, :]
    return y


@triton.jit
def _norm_store(h, m, rows, row_ok, cols, N, eps, W, B, Y, P, MEAN, RSTD, stride_y, stride_p,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_PRENORM: tl.constexpr):
    """Normalize whole rows held in h (zeros outside m), store y, the pre-norm sum and the stats.

    h must already be rounded to the stored dtype: the backward reads the stored sum back with these
    statistics, and statistics of the unrounded sum leave the rounding error in its xhat, times rstd
    (1 / sqrt(eps) at N = 1)."""
    if STORE_PRENORM:
        tl.store(P + rows[:, None] * stride_p + cols[None, :], h.to(P.dtype.element_ty), mask=m)
    mean = tl.sum(h, axis=1) / N
    d = tl.where(m, h - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / N
    rstd = _rsqrt(var + eps)
    y = _affine(d * rstd[:, None], W, B, cols, N, HAS_W, HAS_B)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


# ---------------------------------------------------------------- add_layer_norm forward
@triton.jit
def _add_ln_fwd_kernel(
    X, R, XB, W, B, SEED, Y, P, MEAN, RSTD,
    M, N, stride_x, stride_r, stride_y, stride_p, eps, thresh, scale,
    HAS_RES: tl.constexpr, HAS_XBIAS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_PRENORM: tl.constexpr, LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    acc = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    if not LOOP:
        cols = tl.arange(0, BLOCK_N)
        m = row_ok[:, None] & (cols < N)[None, :]
        h = _prenorm_tile(X, R, XB, SEED, rows, cols, 0, m, N, stride_x, stride_r, thresh, scale,
                          HAS_RES, HAS_XBIAS, HAS_DROPOUT, BLOCK_M, BLOCK_N)
        _norm_store(h, m, rows, row_ok, cols, N, eps, W, B, Y, P, MEAN, RSTD, stride_y, stride_p,
                    HAS_W, HAS_B, STORE_PRENORM)
    else:
        # Pass 1: exact two-pass statistics per chunk, merged across chunks (Chan et al.).
        mean = tl.zeros([BLOCK_M], dtype=acc)
        m2 = tl.zeros([BLOCK_M], dtype=acc)
        for col0 in range(0, N, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            m = row_ok[:, None] & (cols < N)[None, :]
            h = _prenorm_tile(X, R, XB, SEED, rows, cols, col0, m, N, stride_x, stride_r, thresh, scale,
                              HAS_RES, HAS_XBIAS, HAS_DROPOUT, BLOCK_M, BLOCK_N)
            if STORE_PRENORM:
                tl.store(P + rows[:, None] * stride_p + cols[None, :], h.to(P.dtype.element_ty), mask=m)
            n_prev = tl.cast(col0, acc)
            n_chunk = tl.cast(tl.minimum(N - col0, BLOCK_N), acc)
            n_tot = n_prev + n_chunk
            c_mean = tl.sum(h, axis=1) / n_chunk
            d = tl.where(m, h - c_mean[:, None], 0.0)
            delta = c_mean - mean
            mean += delta * (n_chunk / n_tot)
            m2 += tl.sum(d * d, axis=1) + delta * delta * (n_prev * n_chunk / n_tot)
        rstd = _rsqrt(m2 / N + eps)
        # Pass 2: rebuild h from the inputs (the pre-norm copy is stored only when asked for) and normalize.
        for col0 in range(0, N, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            m = row_ok[:, None] & (cols < N)[None, :]
            h = _prenorm_tile(X, R, XB, SEED, rows, cols, col0, m, N, stride_x, stride_r, thresh, scale,
                              HAS_RES, HAS_XBIAS, HAS_DROPOUT, BLOCK_M, BLOCK_N)
            y = _affine((h - mean[:, None]) * rstd[:, None], W, B, cols, N, HAS_W, HAS_B)
            tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


# ---------------------------------------------------------------- add_layer_norm backward
@triton.jit
def _xhat_dy(H, DY, rows, cols, m, mean, rstd, stride_h, stride_dy):
    """(xhat, dy) of one tile in the statistics' dtype; xhat = (h - mean) * rstd, 0 outside m."""
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(mean.dtype)
    xhat = tl.where(m, (h - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(mean.dtype)
    return xhat, dy


@triton.jit
def _chunk(H, DY, W, rows, col0, M, N, mean, rstd, stride_h, stride_dy, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """One column chunk of a looped row: (cols, col_ok, m, xhat, dy, g = dy * weight)."""
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    m = (rows < M)[:, None] & col_ok[None, :]
    xhat, dy = _xhat_dy(H, DY, rows, cols, m, mean, rstd, stride_h, stride_dy)
    g = dy
    if HAS_W:
        g = dy * tl.load(W + cols, mask=col_ok, other=0.0).to(dy.dtype)[None, :]
    return cols, col_ok, m, xhat, dy, g


@triton.jit
def _dh_dx(g, xhat, c1, c2, rstd, DP, DH, DX, SEED, rows, cols, col0, m, stride_dp, stride_dh, stride_dx, thresh,
           scale, HAS_DP: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store dh = (g - xhat * c1 - c2) * rstd (+ the pre-norm sum's own gradient) and, with dropout,
    dx = dh * keep * scale; return dx (dh itself without dropout). c1, c2: the row means of g * xhat, g."""
    dh = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_DP:
        dh += tl.load(DP + rows[:, None] * stride_dp + cols[None, :], mask=m, other=0.0).to(dh.dtype)
    tl.store(DH + rows[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=m)
    if HAS_DROPOUT:
        keep = dropout_keep(SEED, rows, col0, thresh, BLOCK_M, BLOCK_N)
        dx = tl.where(keep & m, dh * scale, 0.0)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
    else:
        dx = dh
    return dx


@triton.jit
def _add_ln_bwd_kernel(
    DY, DP, H, MEAN, RSTD, W, SEED, DH, DX, DW_PART, DB_PART, DXB_PART,
    M, N, stride_dy, stride_dp, stride_h, stride_dh, stride_dx, rows_per_program, thresh, scale,
    HAS_DP: tl.constexpr, HAS_W: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DXB: tl.constexpr, LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    acc = tl.float64 if H.dtype.element_ty == tl.float64 else tl.float32
    part = pid.to(tl.int64) * N
    if not LOOP:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(acc)
        dw = tl.zeros([BLOCK_N], dtype=acc)
        db = tl.zeros([BLOCK_N], dtype=acc)
        dxb = tl.zeros([BLOCK_N], dtype=acc)
        for start in range(row_start, row_end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            m = row_ok[:, None] & col_ok[None, :]
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0).to(acc)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(acc)
            xhat, dy = _xhat_dy(H, DY, rows, cols, m, mean, rstd, stride_h, stride_dy)
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = _dh_dx(g, xhat, c1, c2, rstd, DP, DH, DX, SEED, rows, cols, 0, m, stride_dp, stride_dh, stride_dx,
                        thresh, scale, HAS_DP, HAS_DROPOUT, BLOCK_M, BLOCK_N)
            if NEED_DW:
                dw += tl.sum(dy * xhat, axis=0)
            if NEED_DB:
                db += tl.sum(dy, axis=0)
            if NEED_DXB:
                dxb += tl.sum(tl.where(m, dx, 0.0), axis=0)
        if NEED_DW:
            tl.store(DW_PART + part + cols, dw, mask=col_ok)
        if NEED_DB:
            tl.store(DB_PART + part + cols, db, mask=col_ok)
        if NEED_DXB:
            tl.store(DXB_PART + part + cols, dxb, mask=col_ok)
    else:
        # One row at a time (BLOCK_M == 1), two sweeps over its column chunks. The column partials
        # live in this program's own rows of the partial buffers (its first row stores, the rest add).
        for row in range(row_start, row_end):
            rows = row + tl.arange(0, BLOCK_M)
            mean = tl.load(MEAN + rows).to(acc)
            rstd = tl.load(RSTD + rows).to(acc)
            c1 = tl.zeros([BLOCK_M], dtype=acc)
            c2 = tl.zeros([BLOCK_M], dtype=acc)
            for col0 in range(0, N, BLOCK_N):
                cols, col_ok, m, xhat, dy, g = _chunk(H, DY, W, rows, col0, M, N, mean, rstd, stride_h, stride_dy,
                                                      HAS_W, BLOCK_N)
                c1 += tl.sum(g * xhat, axis=1)
                c2 += tl.sum(g, axis=1)
            c1 = c1 / N
            c2 = c2 / N
            for col0 in range(0, N, BLOCK_N):
                cols, col_ok, m, xhat, dy, g = _chunk(H, DY, W, rows, col0, M, N, mean, rstd, stride_h, stride_dy,
                                                      HAS_W, BLOCK_N)
                dx = _dh_dx(g, xhat, c1, c2, rstd, DP, DH, DX, SEED, rows, cols, col0, m, stride_dp, stride_dh,
                            stride_dx, thresh, scale, HAS_DP, HAS_DROPOUT, BLOCK_M, BLOCK_N)
                prev = col_ok & (row > row_start)  # partials to add to (none before the first row)
                if NEED_DW:
                    p = DW_PART + part + cols
                    tl.store(p, tl.load(p, mask=prev, other=0.0) + tl.sum(dy * xhat, axis=0), mask=col_ok)
                if NEED_DB:
                    p = DB_PART + part + cols
                    tl.store(p, tl.load(p, mask=prev, other=0.0) + tl.sum(dy, axis=0), mask=col_ok)
                if NEED_DXB:
                    p = DXB_PART + part + cols
                    tl.store(p, tl.load(p, mask=prev, other=0.0) + tl.sum(tl.where(m, dx, 0.0), axis=0), mask=col_ok)


# ---------------------------------------------------------------- embedding_layer_norm forward
# Its parameters end like _add_ln_fwd_kernel's (flags, tiles): each Triton kernel spells out its own.
@triton.jit
def _emb_ln_fwd_kernel(
    IDS, PIDS, TIDS, WORD, POS, TYPE, W, B, Y, P, MEAN, RSTD,
    M, N, S, s_ids_b, s_ids_s, s_pids_b, s_pids_s, s_tids_b, s_tids_s,
    rows_word, rows_pos, rows_type, stride_word, stride_pos, stride_type, stride_y, stride_p, eps,
    HAS_POS: tl.constexpr, HAS_PIDS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_TIDS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_PRENORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows are tokens of a [M // S, S] id grid (strided index views; stride 0 for broadcast ids)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    b = rows // S
    s = rows % S
    cols = tl.arange(0, BLOCK_N)
    m = row_ok[:, None] & (cols < N)[None, :]
    acc = tl.float64 if WORD.dtype.element_ty == tl.float64 else tl.float32
    # A row with an id outside its table reads nothing and comes out NaN (as the CUDA kernel): the
    # op checks ids only on CPU (a check on a GPU would cost a host sync).
    ids = tl.load(IDS + b * s_ids_b + s * s_ids_s, mask=row_ok, other=0).to(tl.int64)
    id_ok = ids.to(tl.uint64) < rows_word  # negative ids wrap: out of range too
    if HAS_TYPE:  # HF order: word + type, then + position
        if HAS_TIDS:
            tids = tl.load(TIDS + b * s_tids_b + s * s_tids_s, mask=row_ok, other=0).to(tl.int64)
            id_ok &= tids.to(tl.uint64) < rows_type
        else:
            tids = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_POS:
        if HAS_PIDS:
            pids = tl.load(PIDS + b * s_pids_b + s * s_pids_s, mask=row_ok, other=0).to(tl.int64)
            id_ok &= pids.to(tl.uint64) < rows_pos
        else:
            pids = s
    # the ids of a bad row are clamped in place (reads stay in bounds), then h is NaN'ed per row
    h = tl.load(WORD + tl.where(id_ok, ids, 0)[:, None] * stride_word + cols[None, :], mask=m, other=0.0).to(acc)
    if HAS_TYPE:
        h += tl.load(TYPE + tl.where(id_ok, tids, 0)[:, None] * stride_type + cols[None, :], mask=m, other=0.0).to(acc)
    if HAS_POS:
        h += tl.load(POS + tl.where(id_ok, pids, 0)[:, None] * stride_pos + cols[None, :], mask=m, other=0.0).to(acc)
    h += tl.where(id_ok, 0.0, float("nan"))[:, None]
    h = h.to(WORD.dtype.element_ty).to(acc)  # rounded as stored (_norm_store)
    _norm_store(h, m, rows, row_ok, cols, N, eps, W, B, Y, P, MEAN, RSTD, stride_y, stride_p,
                HAS_W, HAS_B, STORE_PRENORM)


# ---------------------------------------------------------------- launch helpers
def _tiles(N: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, num_warps, loop) for rows N wide."""
    block_n = max(8, triton.next_power_of_2(N))  # >= 8: one Philox call covers 8 columns
    if block_n > MAX_BLOCK_N:
        block_n = LOOP_BLOCK_N
        return 1, block_n, min(16, max(4, block_n // 512)), True
    block_m = max(1, min(256, ROW_TILE_ELEMS // block_n))
    # 32 fp32 values per thread: 4 warps for <= 4096 elements, up to 16 warps for 16384-wide rows.
    num_warps = min(16, max(4, block_m * block_n // 1024))
    return block_m, block_n, num_warps, False


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold, keep scale), passed even without dropout (2**16 at p == 1 keeps nothing)."""
    return reference.dropout_threshold(dropout_p), reference.dropout_scale(dropout_p)


def _forward_outputs(like: torch.Tensor, M: int, N: int, store_prenorm: bool):
    """The forwards' outputs, uninitialised: (y [M, N], prenorm [M, N] or empty) in like's dtype, (mean,
    rstd) [M] in the accumulation dtype."""
    acc = acc_dtype(like.dtype)
    y = torch.empty((M, N), dtype=like.dtype, device=like.device)
    prenorm = torch.empty((M, N), dtype=like.dtype, device=like.device) if store_prenorm else empty(like)
    mean, rstd = (torch.empty((M,), dtype=acc, device=like.device) for _ in range(2))
    return y, prenorm, mean, rstd


def forward(x, residual, weight, bias, x_bias, seed, args: NormArgs):
    """(y, prenorm or empty, mean, rstd) of add_layer_norm on [M, N] row views x and residual (or
    None); weight, bias, x_bias [N] or None; seed an int64 device tensor (one element) when
    args.dropout_p > 0, else None."""
    M, N = x.shape
    store_prenorm = args.store_prenorm
    y, prenorm, mean, rstd = _forward_outputs(x, M, N, store_prenorm)
    if M == 0:
        return y, prenorm, mean, rstd
    has_dropout = seed is not None and args.dropout_p > 0.0
    thresh, scale = _dropout_args(args.dropout_p)
    block_m, block_n, num_warps, loop = _tiles(N)
    r = residual if residual is not None else x
    _add_ln_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, r, x if x_bias is None else x_bias, x if weight is None else weight, x if bias is None else bias,
        seed if has_dropout else x, y, prenorm if store_prenorm else y, mean, rstd,
        M, N, x.stride(0), r.stride(0), y.stride(0), N, args.eps, thresh, scale,
        HAS_RES=residual is not None, HAS_XBIAS=x_bias is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_DROPOUT=has_dropout, STORE_PRENORM=store_prenorm, LOOP=loop,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, prenorm, mean, rstd


def backward(dy, dprenorm, h, mean, rstd, weight, seed, args: NormGradArgs):
    """(dh, dx or empty, dweight, dbias, dx_bias) of add_layer_norm on [M, N] row views dy, dprenorm
    (or None) and h; mean, rstd [M]; weight [N] or None.

    h is the pre-norm sum; dh its gradient (= d residual); dx = dh * keep / (1 - p) is computed only
    with dropout (seed given). The column sums come back in h's dtype, empty unless asked for.
    """
    M, N = h.shape
    acc = acc_dtype(h.dtype)
    has_dropout = seed is not None and args.dropout_p > 0.0
    needs = (args.need_dweight, args.need_dbias, args.need_dx_bias)
    dh = torch.empty((M, N), dtype=h.dtype, device=h.device)
    dx = torch.empty((M, N), dtype=h.dtype, device=h.device) if has_dropout else empty(h)
    if M == 0:
        sums = [torch.zeros(N, dtype=h.dtype, device=h.device) if need else empty(h) for need in needs]
        return (dh, dx, *sums)
    block_m, block_n, num_warps, loop = _tiles(N)
    if not loop:
        # One row per iteration: the column-sum accumulators (up to 3 fp32 per column held) and the
        # row tiles stay small, so 4 warps hold a 768- or 1024-wide row in ~16 values per thread and
        # several programs share an SM (4 rows x 8 warps took 166 registers: 1 CTA/SM). Wider rows
        # get a warp per 512 columns, or 4096-wide bf16 rows spill (tests/test_triton_compile.py).
        block_m, num_warps = 1, min(16, max(4, block_n // 512))
    # Enough programs to fill the GPU a few times over; each keeps one fp32 partial row per column sum.
    programs = min(triton.cdiv(M, block_m), 4 * num_sms(h.device, interpreted=2))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    programs = triton.cdiv(M, rows_per_program)
    # One fp32 [programs, N] partial buffer per column sum asked for, stacked for column_sum.
    stack = torch.empty((sum(needs), programs, N), dtype=acc, device=h.device)
    rows = iter(stack)
    parts = [next(rows) if need else mean for need in needs]  # mean: a placeholder pointer, never written
    thresh, scale = _dropout_args(args.dropout_p)
    has_dp = dprenorm is not None
    _add_ln_bwd_kernel[(programs,)](
        dy, dprenorm if has_dp else dy, h, mean, rstd, h if weight is None else weight,
        seed if has_dropout else h, dh, dx if has_dropout else dh, *parts,
        M, N, dy.stride(0), dprenorm.stride(0) if has_dp else 0, h.stride(0), dh.stride(0),
        dx.stride(0) if has_dropout else 0, rows_per_program, thresh, scale,
        HAS_DP=has_dp, HAS_W=weight is not None, HAS_DROPOUT=has_dropout,
        NEED_DW=args.need_dweight, NEED_DB=args.need_dbias, NEED_DXB=args.need_dx_bias, LOOP=loop,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    sums = iter(column_sum(stack, h.dtype))
    sums = [next(sums) if need else empty(h) for need in needs]
    return (dh, dx, *sums)


def embedding_supported(N: int) -> str | None:
    """Why the Triton embedding kernel cannot take rows N wide (None if it can)."""
    if max(4, triton.next_power_of_2(N)) > MAX_BLOCK_N:
        return f"hidden size {N} is wider than the embedding kernel's single tile ({MAX_BLOCK_N})"
    return None


def _index_view(ids: torch.Tensor | None) -> tuple[int, int]:
    """(batch stride, position stride) of a 2-D [M // S, S] id view (0, 0 if absent)."""
    return (0, 0) if ids is None else (ids.stride(0), ids.stride(1))


def embedding_forward(ids: tuple, tables: tuple, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      args: NormArgs):
    """(y [M, N], prenorm or empty, mean, rstd) of embedding_layer_norm. ids = (input_ids, position_ids,
    token_type_ids): 2-D [B, S] views (any strides, e.g. expanded), M = B * S, position_ids None means
    arange(S); tables = (word, position, token_type) embeddings as in reference.embedding_sum."""
    (input_ids, position_ids, token_type_ids), (word, pos, typ) = ids, tables
    Bt, S = input_ids.shape
    M, N = Bt * S, word.shape[1]
    store_prenorm = args.store_prenorm
    y, prenorm, mean, rstd = _forward_outputs(word, M, N, store_prenorm)
    if M == 0:
        return y, prenorm, mean, rstd
    block_m, block_n, num_warps, loop = _tiles(N)
    assert not loop, embedding_supported(N)
    has_pids = pos is not None and position_ids is not None
    has_tids = typ is not None and token_type_ids is not None
    _emb_ln_fwd_kernel[(triton.cdiv(M, block_m),)](
        input_ids, position_ids if has_pids else input_ids, token_type_ids if has_tids else input_ids,
        word, pos if pos is not None else word, typ if typ is not None else word,
        weight if weight is not None else word, bias if bias is not None else word,
        y, prenorm if store_prenorm else y, mean, rstd,
        M, N, S, *_index_view(input_ids),
        *_index_view(position_ids if has_pids else None), *_index_view(token_type_ids if has_tids else None),
        word.shape[0], pos.shape[0] if pos is not None else 0, typ.shape[0] if typ is not None else 0,
        word.stride(0), pos.stride(0) if pos is not None else 0, typ.stride(0) if typ is not None else 0,
        y.stride(0), N, args.eps,
        HAS_POS=pos is not None, HAS_PIDS=has_pids, HAS_TYPE=typ is not None, HAS_TIDS=has_tids,
        HAS_W=weight is not None, HAS_B=bias is not None, STORE_PRENORM=store_prenorm,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, prenorm, mean, rstd


# ---------------------------------------------------------------- compile cases (bertkern.triton.compile_check)
def compile_launch(op, direction, dt, params, meta):
    """The call that makes this op's launches on meta tensors (`meta(shape, dtype)`), for the compile
    test and the SASS report."""
    if op == "embedding_layer_norm":
        B, S, N = 8, 512, params["N"]
        ids = meta((B, S), "int64")
        return functools.partial(embedding_forward, (ids, None, ids), (meta((30522, N), dt), meta((512, N), dt),
                                 meta((2, N), dt)), meta((N,), dt), meta((N,), dt), NormArgs(1e-12, store_prenorm=True))
    # add_layer_norm
    M, N, train = 4096, params["N"], params["variant"] == "train"
    x, w, seed = meta((M, N), dt), meta((N,), dt), meta((1,), "int64")
    p = 0.1 if train else 0.0
    if direction == "fwd":  # BERT: y = LN(dropout(dense + bias) + residual)
        # x, residual, weight, bias, x_bias, seed
        return functools.partial(forward, x, meta((M, N), dt), w, w, w, seed if train else None,
                                 NormArgs(1e-12, p, store_prenorm=train))
    acc = meta((M,), "float32")
    # dy, dprenorm, h, mean, rstd, weight, seed
    return functools.partial(backward, x, x if train else None, x, acc, acc, w, seed if train else None,
                             NormGradArgs(p, need_dweight=True, need_dbias=True, need_dx_bias=train))


def compile_cases() -> list[tuple]:
    """(capability, op, direction, dtype, params) that tests/test_triton_compile.py compiles: 4096 tokens
    of hidden 384 / 768 / 1024 / 4096 (MiniLM, base, large, a wide one) and 20000 (the looped kernel)."""
    c = []
    for dt in ("fp16", "bf16", "fp32"):
        for n in ((384, 768, 1024, 4096) if dt != "fp32" else (768,)):
            c += [(90, "add_layer_norm", d, dt, dict(N=n, variant=v)) for d in ("fwd", "bwd")
                  for v in ("train", "infer")]
            c += [(90, "embedding_layer_norm", "fwd", dt, dict(N=n))]
    c += [(90, "add_layer_norm", d, dt, dict(N=20000, variant="train")) for d in ("fwd", "bwd")
          for dt in ("fp16", "bf16")]
    return c + [(80, "add_layer_norm", d, "fp16", dict(N=768, variant="train")) for d in ("fwd", "bwd")]
