"""Eager PyTorch definitions of every bertkern op.

These are the truth for tests, the fallback for inputs a kernel does not support, and the "torch"
backend. Math runs in float32 (float64 for float64 inputs) and casts back, like the kernels do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GELU_APPROXIMATIONS = ("none", "tanh")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- bias_gelu
def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias): "none" is the exact erf form (HF "gelu"), "tanh" is HF "gelu_new"."""
    h = x.to(_acc_dtype(x.dtype))
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
    acc = _acc_dtype(x.dtype)
    h = x.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    dh = grad.to(acc) * gelu_grad(h, approximate)
    dbias = None
    if bias is not None:
        dbias = dh.reshape(-1, dh.shape[-1]).sum(0).to(bias.dtype)
    return dh.to(x.dtype), dbias


# ---------------------------------------------------------------- add_layer_norm
def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-12,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """layer_norm(dropout(x + x_bias) + residual) over the last dim."""
    acc = _acc_dtype(x.dtype)
    h = x.to(acc)
    if x_bias is not None:
        h = h + x_bias.to(acc)
    if dropout_p > 0.0:
        h = F.dropout(h, dropout_p, training=training)
    if residual is not None:
        h = h + residual.to(acc)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(h, h.shape[-1:], w, b, eps).to(x.dtype)


# ---------------------------------------------------------------- masked_softmax
def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean 'may attend' view of a mask: bool masks as given (True = keep); float masks keep
    every key whose additive value is above -inf / finfo.min (-10000 stays a soft additive mask)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min


def masked_softmax(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """dropout(softmax(scores * scale + mask)) over the last dim; rows with every key masked give 0."""
    s = scores.to(_acc_dtype(scores.dtype)) * scale
    if mask is not None:
        keep = keep_mask(mask)
        if mask.dtype != torch.bool:
            s = s + torch.where(keep, mask, 0).to(s.dtype)
        s = s.masked_fill(~keep, float("-inf"))  # where(), not +: NaN/inf under the mask must not leak
    row_max = s.amax(-1, keepdim=True)
    dead = torch.isneginf(row_max)  # every key masked
    e = torch.exp(s - torch.where(dead, 0.0, row_max))
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    p = torch.where(dead, 0.0, p)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=training)
    return p.to(scores.dtype)


# ---------------------------------------------------------------- attention
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
    acc = _acc_dtype(q.dtype)
    scores = q.to(acc) @ k.to(acc).transpose(-1, -2)
    p = masked_softmax(scores, mask, scale=scale, dropout_p=dropout_p, training=training)
    return (p @ v.to(acc)).to(q.dtype)
