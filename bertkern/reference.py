"""Eager PyTorch definitions of every bertkern op.

These are the truth for tests, the fallback for inputs a kernel does not support, and the "torch"
backend. Math runs in float32 (float64 for float64 inputs) and casts back, like the kernels do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bertkern._utils import acc_dtype

GELU_APPROXIMATIONS = ("none", "tanh")


# ---------------------------------------------------------------- bias_gelu
def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias): "none" is the exact erf form (HF "gelu"), "tanh" is HF "gelu_new"."""
    h = x.to(acc_dtype(x.dtype))
    if bias is not None:
        h = h + bias.to(h.dtype)
    return F.gelu(h, approximate=approximate).to(x.dtype)


def gelu_grad(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """d gelu(h) / dh, written out (no autograd) so gradcheck can test the formula."""
    if approximate == "tanh":
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): the kernels use the sigmoid form, which never overflows.
        z = 2.0 * k * (h + c * h**3)
        s = torch.sigmoid(z)
        return s + h * 2.0 * s * torch.sigmoid(-z) * k * (1.0 + 3.0 * c * h * h)
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf


def bias_gelu_backward(
    grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dbias) of bias_gelu; dbias is reduced over every leading dim in float32."""
    acc = acc_dtype(x.dtype)
    h = x.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    dh = grad.to(acc) * gelu_grad(h, approximate)
    dbias = None
    if bias is not None:
        dbias = dh.reshape(-1, dh.shape[-1]).sum(0).to(bias.dtype)
    return dh.to(x.dtype), dbias


# ---------------------------------------------------------------- add_layer_norm
# Dropout masks are counter-based (Philox4x32-10, as in curand and tl.randint4x), so every op and
# backend draws the same mask from the same seed and a backward regenerates its forward's mask instead
# of storing it. Element (row, col) of a [rows, N] view uses counter (col // 8, row, 0, 0), key (seed low
# 32 bits, seed high 32 bits), 16-bit half col % 2 (low first) of output word (col % 8) // 2, and is kept
# when that half >= dropout_threshold(p). One Philox call serves 8 elements (the 10 rounds were most of
# a dropout kernel's instructions at 4); the drop rate is p to within 2**-16, kept values are scaled by
# exactly 1 / (1 - p).
_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def dropout_threshold(p: float) -> int:
    """A 16-bit draw h keeps its element iff h >= this; the drop rate is threshold / 2**16 (all at p = 1)."""
    return min(int(p * 2**16), 2**16)


def _mulhilo32(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * c for a constant a < 2**32 and int64 c < 2**32, without
    int64 overflow: c is split into 16-bit halves."""
    t = a * (c & 0xFFFF)  # < 2**48
    s = a * (c >> 16) + (t >> 16)  # < 2**49
    return s >> 16, ((s & 0xFFFF) << 16) | (t & 0xFFFF)


def philox_words(seed: torch.Tensor, rows: int, counters: int) -> torch.Tensor:
    """The [rows, 4 x counters] int64 tensor of Philox4x32-10 words (each < 2**32): word j of counter
    (c, row, 0, 0) at column 4 c + j; seed is a one-element int64 tensor (it stays on its device: no
    host sync)."""
    dev = seed.device
    seed = seed.reshape(()).to(torch.int64)
    c0 = torch.arange(counters, dtype=torch.int64, device=dev).expand(rows, counters)
    c1 = (torch.arange(rows, dtype=torch.int64, device=dev) & _M32)[:, None].expand(rows, counters)
    c2 = torch.zeros((rows, counters), dtype=torch.int64, device=dev)
    c3 = c2
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_ROUND_A, c0)
        hi2, lo2 = _mulhilo32(_PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return torch.stack((c0, c1, c2, c3), dim=-1).reshape(rows, 4 * counters)


def dropout_keep_mask(seed: torch.Tensor, shape: torch.Size | tuple, p: float) -> torch.Tensor:
    """The boolean keep mask (True = kept) that every op's dropout applies to an input of `shape`,
    drawn from `seed`; the leading dims are flattened into rows."""
    cols = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1]) if len(shape) else 1
    calls = (cols + 7) // 8
    words = philox_words(seed, rows, calls)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(rows, 8 * calls)[:, :cols]
    return (halves >= dropout_threshold(p)).reshape(shape)


def dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def seeded_dropout(t: torch.Tensor, seed: torch.Tensor, p: float, shape=None) -> torch.Tensor:
    """Dropout of t with the kernels' keep mask from `seed` (dropout_keep_mask of `shape`, default t's;
    pass the mask's own shape where t broadcasts to it), kept values scaled by 1 / (1 - p)."""
    return torch.where(dropout_keep_mask(seed, t.shape if shape is None else shape, p), t * dropout_scale(p), 0.0)


def dropout_seed(dropout_p: float, device: torch.device) -> torch.Tensor | None:
    """The Philox seed every op's dropout draws its mask from (None without dropout): a one-element
    device tensor from torch's generator, so torch.manual_seed reproduces it and no host sync (or
    CUDA-graph replay) freezes it."""
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


# Same arguments as bertkern.ops.add_layer_norm, the op it defines (training and keep: eager dropout).
def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-12,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    keep: torch.Tensor | None = None,
    return_prenorm: bool = False,
):
    """layer_norm(dropout(x + x_bias) + residual) over the last dim.

    Dropout uses the boolean mask `keep` (True = kept, scaled by 1 / (1 - dropout_p)) when given,
    else F.dropout. return_prenorm=True returns (y, prenorm), prenorm being the sum fed to the norm.
    """
    h = add_layer_norm_prenorm(x, residual, x_bias, dropout_p, training, keep)
    y = layer_norm(h, weight, bias, eps).to(x.dtype)
    return (y, h.to(x.dtype)) if return_prenorm else y


def add_layer_norm_prenorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """dropout(x + x_bias) + residual in float32 (float64 for float64 input): what the norm sees."""
    acc = acc_dtype(x.dtype)
    h = x.to(acc)
    if x_bias is not None:
        h = h + x_bias.to(acc)
    if dropout_p > 0.0 and training:
        if keep is not None:
            h = torch.where(keep, h * dropout_scale(dropout_p), 0.0)
        else:
            h = F.dropout(h, dropout_p, training=True)
    if residual is not None:
        h = h + residual.to(acc)
    return h


def layer_norm(h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.layer_norm over the last dim in h's dtype (weight and bias cast to it)."""
    w = None if weight is None else weight.to(h.dtype)
    b = None if bias is None else bias.to(h.dtype)
    return F.layer_norm(h, h.shape[-1:], w, b, eps)


def layer_norm_with_stats(h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): layer_norm's output in h's dtype and its statistics over the last dim, from one
    ATen call (torch.native_layer_norm, the op F.layer_norm ends in; a separate two-pass mean and
    variance made the torch backend's add_layer_norm 158 instead of 119 us per call on a 2-core CPU)."""
    w = None if weight is None else weight.to(h.dtype)
    b = None if bias is None else bias.to(h.dtype)
    y, mean, rstd = torch.native_layer_norm(h, h.shape[-1:], w, b, eps)
    return y, mean.squeeze(-1), rstd.squeeze(-1)


def add_layer_norm_backward(
    grad: torch.Tensor,
    h: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    grad_prenorm: torch.Tensor | None = None,
):
    """Gradients of add_layer_norm, written out (no autograd) so gradcheck tests the formula.

    h is the pre-norm sum; mean and rstd its statistics. Returns (dh, dx, dweight, dbias, dx_bias):
    dh is the gradient of the sum (= d residual), dx = dh * keep / (1 - p) (= dh without dropout),
    and the column sums dweight = sum(grad * xhat), dbias = sum(grad), dx_bias = sum(dx) over rows.
    """
    acc = acc_dtype(h.dtype)
    n = h.shape[-1]
    xhat = (h.to(acc) - mean.to(acc)[..., None]) * rstd.to(acc)[..., None]
    dy = grad.to(acc)
    g = dy if weight is None else dy * weight.to(acc)
    c1 = (g * xhat).sum(-1, keepdim=True) / n
    c2 = g.sum(-1, keepdim=True) / n
    dh = (g - xhat * c1 - c2) * rstd.to(acc)[..., None]
    if grad_prenorm is not None:
        dh = dh + grad_prenorm.to(acc)
    dx = dh if keep is None else torch.where(keep, dh * dropout_scale(dropout_p), 0.0)

    def colsum(t):
        return t.reshape(-1, n).sum(0)

    dweight = colsum(dy * xhat)
    return dh.to(h.dtype), dx.to(h.dtype), dweight, colsum(dy), colsum(dx)


# ---------------------------------------------------------------- embedding_layer_norm
def embedding_sum(ids: tuple, tables: tuple) -> torch.Tensor:
    """word[input_ids] + type[token_type_ids] + pos[position_ids] (HF BertEmbeddings' order) in float32
    (float64 for float64 tables). ids = (input_ids, position_ids, token_type_ids) and tables = (word,
    position, token_type) embeddings travel as these two triples through the op and its kernels.
    position_ids None means arange(S) along the last dim, token_type_ids None means zeros; a None
    table is left out."""
    input_ids, position_ids, token_type_ids = ids
    word_embeddings, position_embeddings, token_type_embeddings = tables
    acc = acc_dtype(word_embeddings.dtype)
    e = F.embedding(input_ids, word_embeddings).to(acc)
    if token_type_embeddings is not None:
        if token_type_ids is None:
            e = e + token_type_embeddings[0].to(acc)
        else:
            e = e + F.embedding(token_type_ids.expand(input_ids.shape), token_type_embeddings).to(acc)
    if position_embeddings is not None:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)
        e = e + F.embedding(position_ids.expand(input_ids.shape), position_embeddings).to(acc)
    return e


# Same arguments as bertkern.ops.embedding_layer_norm, the op it defines.
def embedding_layer_norm(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor | None,
    token_type_embeddings: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """LayerNorm(word[ids] + type[token_type_ids] + pos[position_ids]) over the hidden dim."""
    e = embedding_sum((input_ids, position_ids, token_type_ids),
                      (word_embeddings, position_embeddings, token_type_embeddings))
    return layer_norm(e, weight, bias, eps).to(word_embeddings.dtype)


# ---------------------------------------------------------------- masked_softmax
def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean 'may attend' view of a mask: bool masks as given (True = keep); float masks keep
    every key whose additive value is above -inf / finfo.min (-10000 stays a soft additive mask).
    The comparison is made in the mask's own dtype (finfo of the mask, not of the scores)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min


def masked_logits(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """s + mask in s's dtype, -inf where the mask masks (see keep_mask): the logits a masked softmax
    normalises. Masked entries are filled, not added to: NaN / inf under the mask must not leak."""
    if mask is None:
        return s
    keep = keep_mask(mask)
    if mask.dtype != torch.bool:
        s = s + torch.where(keep, mask, 0).to(s.dtype)
    return s.masked_fill(~keep, float("-inf"))


def masked_softmax(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """dropout(softmax(scores * scale + mask)) over the last dim; rows with every key masked give 0.

    The mask broadcasts against scores like `scores + mask` (bool: True = keep; float: additive, with
    -inf / finfo(mask.dtype).min meaning masked). With a `seed` (one-element int64 tensor), dropout
    applies the kernels' Philox mask (dropout_keep_mask over the [rows, S_k] view); without, F.dropout.
    """
    s = masked_logits(scores.to(acc_dtype(scores.dtype)) * scale, mask)
    row_max = s.amax(-1, keepdim=True)
    dead = torch.isneginf(row_max)  # every key masked
    e = torch.exp(s - torch.where(dead, 0.0, row_max))
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    p = torch.where(dead, 0.0, p)
    if dropout_p > 0.0 and training:
        if seed is None:
            p = F.dropout(p, dropout_p)
        else:
            p = seeded_dropout(p, seed, dropout_p)
    return p.to(scores.dtype)


def masked_softmax_backward(
    grad: torch.Tensor, probs: torch.Tensor, scale: float = 1.0, dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """d scores of masked_softmax, written out: scale * p * (dp - sum(dp * p)), dp = dropout's
    backward of grad. `probs` is the softmax before dropout; with dropout_p > 0, `seed` is the
    forward's. Fully masked rows have p == 0 everywhere and so get 0."""
    acc = acc_dtype(probs.dtype)
    dp, p = grad.to(acc), probs.to(acc)
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("masked_softmax_backward: dropout_p > 0 needs the forward's seed")
        dp = seeded_dropout(dp, seed, dropout_p, p.shape)
    return (scale * p * (dp - (dp * p).sum(-1, keepdim=True))).to(probs.dtype)


# ---------------------------------------------------------------- attention
# Same arguments as bertkern.ops.attention, the op it defines, plus the eager-only `training`.
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q, k, v of shape [B, H, S, D]."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    acc = acc_dtype(q.dtype)
    scores = q.to(acc) @ k.to(acc).transpose(-1, -2)
    p = masked_softmax(scores, mask, scale=scale, dropout_p=dropout_p, training=training)
    return (p @ v.to(acc)).to(q.dtype)
