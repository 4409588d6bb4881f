"""masked_softmax: y = dropout(softmax(scores * scale + mask)) over the last dim, forward and backward,
on the torch, triton or cuda backend.

Registered as the custom ops

    bertkern::masked_softmax(Tensor scores, Tensor? mask, float scale, float dropout_p, Tensor? seed,
                             str backend) -> (Tensor out, Tensor probs)
    bertkern::masked_softmax_backward(Tensor grad, Tensor probs, float scale, float dropout_p,
                                      Tensor? seed, str backend) -> Tensor

with fake implementations and autograd, so torch.compile(fullgraph=True) traces through them. `probs`
is the softmax before dropout (what the backward needs); it is an empty tensor when dropout_p == 0,
where the backward uses `out` instead. Both outputs are contiguous.

Dropout is counter-based Philox (bertkern.reference.dropout_keep_mask): the public function draws a
one-element int64 `seed` tensor from torch's generator on the scores' device (torch.manual_seed
reproduces it), the kernels read it from device memory, and the backward regenerates the same keep
mask from it. The triton and cuda backends are therefore CUDA-graph safe (each replay draws a fresh
seed inside the graph); all backends draw the same mask from the same seed.
"""
from __future__ import annotations

import math

import torch

from bertkern import backend as _backend
from bertkern import reference
from bertkern._utils import (OpCall, acc_dtype, broadcasts_to, check_float, check_floating, check_mask_kind,
                             needs_grad)

_NAME = "bertkern.ops.masked_softmax"


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """[B, H, Q, N] view: leading 1s added below 4 dims; above 4, the leading dims merged (a view
    whenever the strides allow, else a copy)."""
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    if t.dim() > 4:
        return t.reshape(-1, *t.shape[-3:])
    return t


def _kernel_inputs(scores: torch.Tensor, mask: torch.Tensor | None, backend: str):
    """scores as a 4-D view with unit stride along keys; mask as a 4-D *broadcast view* of scores'
    shape (stride 0 where broadcast: nothing is materialised for scores of up to 4 dims)."""
    s4 = _as_4d(scores)
    if s4.shape[-1] > 1 and s4.stride(-1) != 1:
        s4 = s4.contiguous()
    if mask is None:
        return s4, None
    if backend == "cuda" and mask.dtype not in (torch.bool, torch.float32, scores.dtype):
        # The CUDA kernels read bool, float32 or the scores' dtype. Convert the (small, unbroadcast)
        # mask, keeping finfo(mask.dtype).min a hard mask.
        mask = torch.where(reference.keep_mask(mask), mask.float(), float("-inf"))
    return s4, _as_4d(mask.expand(scores.shape))


# The CUDA forward's row math is 32-bit within a batch entry of the [B, H, S_q, S_k] view.
_CUDA_MAX_ROWS_PER_BATCH = 2**31 - 1


def _unsupported(scores: torch.Tensor, chosen: str) -> str | None:
    """Why the `chosen` backend's kernels cannot take these scores (None if they can)."""
    if scores.dtype not in _backend.KERNEL_DTYPES:
        return f"dtype {scores.dtype} has no kernel"
    rows = math.prod(scores.shape[-3:-1])  # H x S_q of the [B, H, S_q, S_k] view
    if chosen == "cuda" and rows > _CUDA_MAX_ROWS_PER_BATCH:
        return f"{rows} rows (H x S_q) in one batch entry, past the cuda kernels' {_CUDA_MAX_ROWS_PER_BATCH}"
    return None


def _kernels(backend: str):
    """(forward, backward): forward(scores4, mask4, scale, p, seed) -> (y [rows, N], probs [rows, N] or
    empty); backward(grad [rows, N], probs [rows, N], scale, p, seed) -> dx [rows, N]."""
    if backend == "triton":
        from bertkern.triton import masked_softmax as k

        return k.forward, k.backward
    ops = torch.ops.bertkern_cuda
    return ops.masked_softmax_fwd, ops.masked_softmax_bwd


def _masked_softmax_impl(
    scores: torch.Tensor, mask: torch.Tensor | None, scale: float, dropout_p: float, seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    dropout = dropout_p > 0.0
    if scores.numel() == 0:
        out = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
        return out, torch.empty(scores.shape if dropout else (0,), dtype=scores.dtype, device=scores.device)
    if backend == "torch":
        acc = acc_dtype(scores.dtype)
        p = reference.masked_softmax(scores.to(acc), mask, scale)  # fp32 (fp64) softmax, rounded once below
        if not dropout:
            return p.to(scores.dtype).contiguous(), scores.new_empty(0)
        out = reference.seeded_dropout(p, seed, dropout_p, scores.shape)
        return out.to(scores.dtype).contiguous(), p.to(scores.dtype).contiguous()
    s4, m4 = _kernel_inputs(scores, mask, backend)
    forward, _ = _kernels(backend)
    y, probs = forward(s4, m4, scale, dropout_p, seed)
    return y.view(scores.shape), (probs.view(scores.shape) if dropout else probs)


def _masked_softmax_fake(scores, mask, scale, dropout_p, seed, backend):
    return scores.new_empty(scores.shape), scores.new_empty(scores.shape if dropout_p > 0.0 else (0,))


def _masked_softmax_backward_impl(
    grad: torch.Tensor, probs: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """d scores = scale * p * (dp - sum(dp * p)); probs is the softmax before dropout."""
    if probs.numel() == 0:
        return torch.zeros(probs.shape, dtype=probs.dtype, device=probs.device)
    grad = grad.to(probs.dtype)
    if backend == "torch":
        return reference.masked_softmax_backward(grad, probs, scale, dropout_p, seed).contiguous()
    _, backward = _kernels(backend)
    g2 = _backend.as_rows(grad.expand(probs.shape))
    p2 = _backend.as_rows(probs)
    return backward(g2, p2, scale, dropout_p, seed).view(probs.shape)


def _masked_softmax_backward_fake(grad, probs, scale, dropout_p, seed, backend):
    return probs.new_empty(probs.shape)


_MASKED_SOFTMAX_BACKWARD = OpCall.define("masked_softmax_backward", _masked_softmax_backward_impl,
                                         fake=_masked_softmax_backward_fake)


def _setup_context(ctx, inputs, output):
    scores, mask, scale, dropout_p, seed, backend = inputs
    out, probs = output
    ctx.mark_non_differentiable(probs)
    ctx.save_for_backward(probs if dropout_p > 0.0 else out, seed)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.mask_meta = None if mask is None else (mask.shape, mask.dtype)


def _backward(ctx, grad, _grad_probs):
    probs, seed = ctx.saved_tensors
    want_scores, want_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (want_scores or want_mask):
        return None, None, None, None, None, None
    bwd = _MASKED_SOFTMAX_BACKWARD.pick(probs)
    dscores = dmask = None
    if want_mask:
        # d(mask) = d(logits), summed over the dims the mask was broadcast along; d(scores) = scale * that.
        dz = bwd(grad, probs, 1.0, ctx.dropout_p, seed, ctx.backend)
        shape, dtype = ctx.mask_meta
        dmask = dz.to(torch.promote_types(dtype, torch.float32)).sum_to_size(shape).to(dtype)
        if want_scores:
            dscores = dz * ctx.scale
    else:
        dscores = bwd(grad, probs, ctx.scale, ctx.dropout_p, seed, ctx.backend)
    return dscores, dmask, None, None, None, None


_MASKED_SOFTMAX = OpCall.define("masked_softmax", _masked_softmax_impl, fake=_masked_softmax_fake,
                                setup_context=_setup_context, backward=_backward)


def _check(scores: torch.Tensor, mask: torch.Tensor | None, scale: float, dropout_p: float) -> None:
    check_floating(_NAME, "scores", scores)
    if scores.dim() == 0:
        raise ValueError(f"{_NAME}: scores must have at least one dimension (the keys), got a scalar")
    check_float(_NAME, "scale", scale)
    check_float(_NAME, "dropout_p", dropout_p, 0.0, 1.0)
    if mask is None:
        return
    check_mask_kind(_NAME, mask, "scores", scores)
    if not broadcasts_to(mask.shape, scores.shape):
        raise ValueError(
            f"{_NAME}: mask of shape {list(mask.shape)} does not broadcast to scores' shape {list(scores.shape)} "
            "(dims align from the right, as in scores + mask; a [batch, keys] padding mask goes in as "
            "mask[:, None, None, :])"
        )


def masked_softmax(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """dropout(softmax(scores * scale + mask)) over the last dim, in one pass (and one for backward).

    scores: [..., S_q, S_k] (typically [B, H, S, S]), fp32 / fp16 / bf16 / fp64; math in fp32 (fp64).
    mask: None; bool (True = attend); or additive float (0 = attend; -inf or finfo(mask.dtype).min
        = masked; other values such as -10000 are added as they are). Any dtype of those, on the
        scores' device, broadcasting to scores like `scores + mask`: [B, 1, 1, S_k], [B, 1, S_q, S_k],
        [B, H, S_q, S_k], [S_k], [S_q, S_k], expanded views... Broadcast dims are read with stride 0,
        never materialised. A row whose keys are all masked gives zeros (and zero gradient).
        A float mask that requires grad gets one (d logits summed over its broadcast dims).
    dropout_p: drop probability (applied whenever > 0: pass 0.0 in eval); kept values are scaled by
        1 / (1 - dropout_p). The mask comes from a seed drawn from torch's generator.
    backend: "torch", "triton", "cuda" or "auto" (default: $BERTKERN_BACKEND, else "auto").
    """
    _check(scores, mask, scale, dropout_p)
    chosen = _backend.resolve("masked_softmax", backend, scores.device, lambda chosen: _unsupported(scores, chosen))
    dropout_p = float(dropout_p)
    seed = reference.dropout_seed(dropout_p, scores.device)
    out, _ = _MASKED_SOFTMAX.pick(scores, needs_grad(scores, mask))(scores, mask, float(scale), dropout_p, seed, chosen)
    return out
