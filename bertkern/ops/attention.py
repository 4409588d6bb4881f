"""attention: out = dropout(softmax(q k^T * scale + mask)) v, fused (the S x S scores never reach
memory), forward and backward; and attention_varlen, the same on packed variable-length sequences.

Registered as the custom ops

    bertkern::attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float dropout_p,
                        Tensor? seed, str backend) -> (Tensor out, Tensor stats)
    bertkern::attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out,
                                 Tensor stats, float scale, float dropout_p, Tensor? seed, str backend)
                                 -> (Tensor dq, Tensor dk, Tensor dv)
    bertkern::attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen,
                               float scale, float dropout_p, Tensor? seed, str backend) -> (Tensor out, Tensor stats)
    bertkern::attention_varlen_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens,
                                        SymInt max_seqlen, Tensor out, Tensor stats, float scale,
                                        float dropout_p, Tensor? seed, str backend) -> (Tensor dq, Tensor dk, Tensor dv)

with fake implementations and autograd, so torch.compile(fullgraph=True) traces through them.

Layouts. Padded: q [B, H, S_q, D], k / v [B, H, S_k, D], any strides with unit stride along D (views
of a packed QKV projection `qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)` are read in place; other
layouts are copied once). `out` is [B, H, S_q, D] stored as [B, S_q, H, D] (so
`out.transpose(1, 2).reshape(B, S_q, H * D)` is a view, what a BERT layer wants next); the gradients
likewise. `stats` is fp32 [2, B, H, S_q]: the row max m of the logits q k^T * scale + mask and
1 / sum(exp(logits - m)) (-inf and 0 for a fully masked row), from which the backward recomputes the
probabilities. Varlen: q / k / v [total, H, D] packed tokens (sequence b = tokens
cu_seqlens[b] : cu_seqlens[b + 1], which must end at total), out / grads [total, H, D] contiguous,
stats [2, H, total].

Dropout uses masked_softmax's Philox scheme (bertkern.reference.dropout_keep_mask) on the
[B, H, S_q, S_k] probabilities: element (b, h, i, j) is row (b * H + h) * S_q + i, column j. In
varlen mode the row is (b * H + h) * max_seqlen + i, so a packed batch whose max_seqlen equals the
padded length drops exactly what the padded call drops. The seed is a one-element int64 tensor drawn
from torch's generator (torch.manual_seed reproduces it); the backward regenerates the same mask.

Backends: "triton" (bertkern/triton/attention.py; fp16 / bf16 / fp32, head dim up to 256); "cuda"
(csrc/attention.cu: tensor-core mma.sync kernels, fp16 / bf16, head dim up to 128, sm_80+; other
inputs run the Triton kernel, with a one-time warning); "torch" (the eager reference: S x S scores
in memory, the backward written out). "auto" follows the table in bertkern.ops.attention_auto (torch's
own SDPA / varlen_attn until benchmarks on a GPU show which is faster). float64 inputs and head dims above 256 fall
back to the torch backend with a warning.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from bertkern import backend as _backend
from bertkern import reference
from bertkern._utils import (OpCall, acc_dtype, broadcasts_to, check_float, check_floating, check_like,
                             check_mask_kind, needs_grad, varlen_index)
from bertkern.ops import attention_auto as _auto

_NAME = "bertkern.ops.attention"
_VNAME = "bertkern.ops.attention_varlen"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
CUDA_MAX_HEAD_DIM = 128


# ---------------------------------------------------------------- torch backend (the written-out reference)
def _logits(q, k, mask, scale):
    """(q k^T * scale + mask) in fp32 (fp64), -inf where masked: what masked_softmax normalises."""
    acc = acc_dtype(q.dtype)
    return reference.masked_logits((q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale, mask)


def _probs(q, k, mask, scale):
    """softmax of the logits before dropout, fp32 (fp64); fully masked rows are 0."""
    acc = acc_dtype(q.dtype)
    s = q.to(acc) @ k.to(acc).transpose(-1, -2)
    return reference.masked_softmax(s, mask, scale)


def _stats(q, k, mask, scale):
    """[2, ..., S_q]: the row max of the logits and 1 / sum(exp(logits - max)); -inf, 0 if fully masked."""
    z = _logits(q, k, mask, scale)
    m = z.amax(-1)
    dead = torch.isneginf(m)
    total = torch.exp(z - torch.where(dead, 0.0, m)[..., None]).sum(-1)
    return torch.stack((m, torch.where(dead, 0.0, 1.0 / torch.where(dead, 1.0, total))))


def _no_autocast(fn):
    """The eager math picks its own precision (fp32 accumulation); an enclosing autocast must not
    re-cast its matmuls (custom ops run their implementation with autocast still on)."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapper


@_no_autocast
def torch_forward(q, k, v, mask, scale, dropout_p, seed):
    """(out, stats) in fp32 (fp64) of 4-D q, k, v: the reference the kernels are tested against."""
    acc = acc_dtype(q.dtype)
    if k.shape[2] == 0:  # no keys: every row is fully masked
        stats = torch.stack((q.new_full(q.shape[:3], float("-inf"), dtype=acc), q.new_zeros(q.shape[:3], dtype=acc)))
        return q.new_zeros(q.shape, dtype=acc), stats
    p = _probs(q, k, mask, scale)
    stats = _stats(q, k, mask, scale)
    if dropout_p > 0.0:
        p = reference.seeded_dropout(p, seed, dropout_p)
    return p @ v.to(p.dtype), stats


def torch_dlogits(grad, q, k, v, mask, scale, dropout_p, seed):
    """(d logits, probs, dropped probs): d logits = P * (dP - rowsum(dP * P)), the gradient with
    respect to q k^T * scale + mask (before dropout), in fp32 (fp64)."""
    p = _probs(q, k, mask, scale)
    acc = p.dtype
    dpd = grad.to(acc) @ v.to(acc).transpose(-1, -2)
    dz = reference.masked_softmax_backward(dpd, p, 1.0, dropout_p, seed)
    pd = p
    if dropout_p > 0.0:
        pd = reference.seeded_dropout(p, seed, dropout_p)
    return dz, p, pd


@_no_autocast
def torch_backward(grad, q, k, v, mask, scale, dropout_p, seed):
    """(dq, dk, dv) in fp32 (fp64), written out (no autograd) so that gradcheck tests the formula."""
    if k.shape[2] == 0:
        acc = acc_dtype(q.dtype)
        return q.new_zeros(q.shape, dtype=acc), k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)
    dz, _, pd = torch_dlogits(grad, q, k, v, mask, scale, dropout_p, seed)
    acc = dz.dtype
    dv = pd.transpose(-1, -2) @ grad.to(acc)
    dq = (dz @ k.to(acc)) * scale
    dk = (dz.transpose(-1, -2) @ q.to(acc)) * scale
    return dq, dk, dv


def _bshd(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """t ([B, H, S, D]) copied into [B, S, H, D] memory, returned as the [B, H, S, D] view."""
    B, H, S, D = t.shape
    out = torch.empty((B, S, H, D), dtype=dtype or t.dtype, device=t.device).transpose(1, 2)
    out.copy_(t)
    return out


def _bshd_empty(B, H, S, D, dtype, device) -> torch.Tensor:
    return torch.empty((B, S, H, D), dtype=dtype, device=device).transpose(1, 2)


def _pad(t: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[total, H, D] -> [B, H, max_seqlen, D], zeros past each sequence's end."""
    return torch.where(valid[:, :, None, None], t[idx], 0).transpose(1, 2)


def torch_varlen_forward(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    total, H, D = q.shape
    acc = acc_dtype(q.dtype)
    out = torch.zeros((total, H, D), dtype=acc, device=q.device)
    stats = torch.stack((torch.full((H, total), float("-inf"), dtype=acc, device=q.device),
                         torch.zeros((H, total), dtype=acc, device=q.device)))
    if total == 0 or cu_seqlens.numel() < 2 or max_seqlen == 0:
        return out, stats
    idx, valid = varlen_index(cu_seqlens, max_seqlen, total)
    mask = valid[:, None, None, :]
    o, l = torch_forward(_pad(q, idx, valid), _pad(k, idx, valid), _pad(v, idx, valid), mask, scale, dropout_p, seed)
    _unpad_into(out, o.transpose(1, 2), idx, valid)
    covered = _unpad_into(torch.zeros(total, dtype=acc, device=q.device), valid.to(acc), idx, valid) > 0
    packed = _unpad_into(stats.new_zeros((total, 2, H)), l.permute(1, 3, 0, 2), idx, valid)  # l: [2, B, H, S]
    stats = torch.where(covered, packed.permute(1, 2, 0), stats).contiguous()  # the fake's layout
    return out, stats


def _unpad_into(dest: torch.Tensor, padded: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """dest[idx[b, i]] = padded[b, i] for the valid (b, i), in place. An accumulating scatter of
    zeros at the invalid positions (each token is one valid position) instead of boolean indexing,
    whose data-dependent shape syncs the host and cannot be captured in a CUDA graph."""
    keep = valid.view(*valid.shape, *([1] * (padded.dim() - 2)))
    return dest.index_put_((idx.reshape(-1),), torch.where(keep, padded, 0).reshape(-1, *padded.shape[2:]),
                           accumulate=True)


def torch_varlen_backward(grad, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    total, H, D = q.shape
    acc = acc_dtype(q.dtype)
    grads = [torch.zeros((total, H, D), dtype=acc, device=q.device) for _ in range(3)]
    if total == 0 or cu_seqlens.numel() < 2 or max_seqlen == 0:
        return tuple(grads)
    idx, valid = varlen_index(cu_seqlens, max_seqlen, total)
    mask = valid[:, None, None, :]
    padded = torch_backward(_pad(grad, idx, valid), _pad(q, idx, valid), _pad(k, idx, valid), _pad(v, idx, valid),
                            mask, scale, dropout_p, seed)
    for g, p in zip(grads, padded):
        _unpad_into(g, p.transpose(1, 2), idx, valid)
    return tuple(grads)


# ---------------------------------------------------------------- kernel-side helpers
def _kernel_ok(q: torch.Tensor) -> bool:
    return q.dtype in _TRITON_DTYPES and q.shape[-1] <= MAX_HEAD_DIM


def _unit_d(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has unit stride (e.g. a view of a packed QKV), else a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _mask4(mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """The mask as a 4-D broadcast view of [B, H, S_q, S_k] (stride 0 over broadcast dims, no copy)."""
    if mask is None:
        return None
    return mask.expand(shape)


def _triton():
    from bertkern.triton import attention as k

    return k


def _cuda_mask(mask: torch.Tensor | None, q: torch.Tensor, shape) -> torch.Tensor | None:
    """The mask as the CUDA kernels read it: bool, fp32 or q's dtype (other float dtypes are cast
    before broadcasting, so a [B, 1, 1, S_k] mask stays small), as a 4-D broadcast view."""
    if mask is not None and mask.dtype not in (torch.bool, torch.float32, q.dtype):
        mask = mask.float()
    return _mask4(mask, shape)


# ---------------------------------------------------------------- padded custom ops
def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, dropout_p: float,
    seed: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, S_q, D = q.shape
    if backend == "torch" or not _kernel_ok(q) or q.numel() == 0 or k.shape[2] == 0:
        o, stats = torch_forward(q, k, v, mask, scale, dropout_p, seed)
        return _bshd(o, q.dtype), stats.contiguous()
    shape = (B, H, S_q, k.shape[2])
    if backend == "cuda":
        return torch.ops.bertkern_cuda.attention_fwd(_unit_d(q), _unit_d(k), _unit_d(v), _cuda_mask(mask, q, shape),
                                                     None, 0, scale, dropout_p, seed)
    return _triton().forward(_unit_d(q), _unit_d(k), _unit_d(v), _mask4(mask, shape), scale, dropout_p, seed)


def _attention_fake(q, k, v, mask, scale, dropout_p, seed, backend):
    B, H, S_q, D = q.shape
    return _bshd_empty(B, H, S_q, D, q.dtype, q.device), q.new_empty((2, B, H, S_q), dtype=acc_dtype(q.dtype))


def _attention_backward_impl(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    out: torch.Tensor, stats: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    if backend == "torch" or not _kernel_ok(q) or q.numel() == 0 or S_k == 0:
        dq, dk, dv = torch_backward(grad, q, k, v, mask, scale, dropout_p, seed)
        return _bshd(dq, q.dtype), _bshd(dk, q.dtype), _bshd(dv, q.dtype)
    if backend == "cuda":
        return torch.ops.bertkern_cuda.attention_bwd(
            _unit_d(grad.to(q.dtype)), _unit_d(q), _unit_d(k), _unit_d(v), _cuda_mask(mask, q, (B, H, S_q, S_k)), None,
            0, _unit_d(out), stats, scale, dropout_p, seed)
    return _triton().backward(_unit_d(grad.to(q.dtype)), _unit_d(q), _unit_d(k), _unit_d(v),
                              _mask4(mask, (B, H, S_q, S_k)), _unit_d(out), stats, scale, dropout_p, seed)


def _attention_backward_fake(grad, q, k, v, mask, out, stats, scale, dropout_p, seed, backend):
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    return (_bshd_empty(B, H, S_q, D, q.dtype, q.device), _bshd_empty(B, H, S_k, D, q.dtype, q.device),
            _bshd_empty(B, H, S_k, D, q.dtype, q.device))


_ATTENTION_BACKWARD = OpCall.define("attention_backward", _attention_backward_impl, fake=_attention_backward_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, dropout_p, seed, backend = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, mask, out, stats, seed)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.mask_meta = None if mask is None else (mask.shape, mask.dtype)


def _backward(ctx, grad, _grad_stats):
    q, k, v, mask, out, stats, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq = dk = dv = dmask = None
    if any(need[:3]):
        dq, dk, dv = _ATTENTION_BACKWARD.pick(grad)(
            grad, q, k, v, mask, out, stats, ctx.scale, ctx.dropout_p, seed, ctx.backend)
    if need[3]:
        # A float mask that requires grad (a learned bias): d mask = d logits summed over its broadcast
        # dims. Computed eagerly (S x S in memory), whatever the backend: slow, but right.
        dz, _, _ = torch_dlogits(grad, q, k, v, mask, ctx.scale, ctx.dropout_p, seed)
        shape, dtype = ctx.mask_meta
        dmask = dz.sum_to_size(shape).to(dtype)
    return dq, dk, dv, dmask, None, None, None, None


_ATTENTION = OpCall.define("attention", _attention_impl, fake=_attention_fake, setup_context=_setup_context,
                           backward=_backward)


# ---------------------------------------------------------------- varlen custom ops
def _attention_varlen_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
    dropout_p: float, seed: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch" or not _kernel_ok(q):
        o, stats = torch_varlen_forward(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed)
        return o.to(q.dtype), stats
    if backend == "cuda":
        return torch.ops.bertkern_cuda.attention_fwd(_unit_d(q), _unit_d(k), _unit_d(v), None, cu_seqlens, max_seqlen,
                                                     scale, dropout_p, seed)
    return _triton().varlen_forward(_unit_d(q), _unit_d(k), _unit_d(v), cu_seqlens, max_seqlen, scale, dropout_p, seed)


def _attention_varlen_fake(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, backend):
    total, H, D = q.shape
    return q.new_empty((total, H, D)), q.new_empty((2, H, total), dtype=acc_dtype(q.dtype))


def _attention_varlen_backward_impl(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, out: torch.Tensor, stats: torch.Tensor, scale: float, dropout_p: float,
    seed: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "torch" or not _kernel_ok(q):
        grads = torch_varlen_backward(grad, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed)
        return tuple(g.to(q.dtype) for g in grads)
    if backend == "cuda":
        return torch.ops.bertkern_cuda.attention_bwd(
            _unit_d(grad.to(q.dtype)), _unit_d(q), _unit_d(k), _unit_d(v), None, cu_seqlens, max_seqlen, _unit_d(out),
            stats, scale, dropout_p, seed)
    return _triton().varlen_backward(_unit_d(grad.to(q.dtype)), _unit_d(q), _unit_d(k), _unit_d(v), cu_seqlens,
                                     max_seqlen, _unit_d(out), stats, scale, dropout_p, seed)


def _attention_varlen_backward_fake(grad, q, k, v, cu_seqlens, max_seqlen, out, stats, scale, dropout_p, seed, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


_ATTENTION_VARLEN_BACKWARD = OpCall.define("attention_varlen_backward", _attention_varlen_backward_impl,
                                           fake=_attention_varlen_backward_fake)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, backend = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, cu_seqlens, out, stats, seed)
    ctx.max_seqlen, ctx.scale, ctx.dropout_p, ctx.backend = max_seqlen, scale, dropout_p, backend


def _varlen_backward(ctx, grad, _grad_stats):
    q, k, v, cu_seqlens, out, stats, seed = ctx.saved_tensors
    dq = dk = dv = None
    if any(ctx.needs_input_grad[:3]):
        dq, dk, dv = _ATTENTION_VARLEN_BACKWARD.pick(grad)(
            grad, q, k, v, cu_seqlens, ctx.max_seqlen, out, stats, ctx.scale, ctx.dropout_p, seed, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


_ATTENTION_VARLEN = OpCall.define("attention_varlen", _attention_varlen_impl, fake=_attention_varlen_fake,
                                  setup_context=_varlen_setup_context, backward=_varlen_backward)


# ---------------------------------------------------------------- public functions
def _pick_backend(op: str, backend: str | None, q: torch.Tensor, dropout_p: float = 0.0, seq: int | None = None) -> str:
    """backend.resolve, with two attention-specific rules: "auto" reads bertkern.ops.attention_auto's
    table (which may answer torch's own "sdpa" / "varlen_attn", returned as they are), and "cuda" runs
    Triton (warning once) on inputs the CUDA kernels do not cover (fp32, head dim > 128, before sm_80)."""
    requested = backend or os.environ.get("BERTKERN_BACKEND") or "auto"
    if requested == "auto":
        requested = _auto.choose(op, q, dropout_p, seq)
        if requested in ("sdpa", "varlen_attn"):
            _backend.record(op, requested)
            return requested
    elif requested == "cuda" and _backend.unavailable_reason("cuda", q.device) is None:
        why = cuda_unsupported(q)
        if why is not None and kernel_unsupported(q) is None:
            _backend.warn_once(f"bertkern.ops.{op}: the CUDA kernel does not cover this input ({why}); "
                               "running the Triton kernel")
            requested = "triton"
    return _backend.resolve(op, requested, q.device, kernel_unsupported(q))


def cuda_unsupported(q: torch.Tensor) -> str | None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}: the CUDA kernels are fp16 / bf16"
    if q.shape[-1] > CUDA_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {CUDA_MAX_HEAD_DIM}"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 8:
        return "the CUDA kernels need sm_80 or newer"
    return None


def kernel_unsupported(q: torch.Tensor) -> str | None:
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} has no attention kernel"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} has no attention kernel"
    return None


def _check_common(name, q, k, v, scale, dropout_p, dims, layout):
    for arg, t in (("q", q), ("k", k), ("v", v)):
        check_floating(name, arg, t, dims, layout)
    check_like(name, "q", q, (("k", k, None, ""), ("v", v, None, "")))
    check_float(name, "scale", scale, none_ok=True)
    check_float(name, "dropout_p", dropout_p, 0.0, 1.0)


def _check(q, k, v, mask, scale, dropout_p) -> None:
    _check_common(_NAME, q, k, v, scale, dropout_p, 4, "[B, H, S, D]")
    B, H, S_q, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"{_NAME}: k must be [B, H, S_k, D] with q's B={B}, H={H}, D={D}, got {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{_NAME}: v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    if mask is None:
        return
    check_mask_kind(_NAME, mask, "q", q)
    scores = (B, H, S_q, k.shape[2])
    if not broadcasts_to(mask.shape, scores):
        raise ValueError(f"{_NAME}: mask of shape {list(mask.shape)} does not broadcast to the scores' shape "
                         f"{list(scores)} [B, H, S_q, S_k] (a [B, S_k] padding mask goes in as mask[:, None, None, :])")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """dropout(softmax(q k^T * scale + mask)) v, fused: the scores are never written to memory.

    q: [B, H, S_q, D]; k, v: [B, H, S_k, D]; fp16 / bf16 / fp32 (fp64 through the torch backend);
        any strides with unit stride along D (views of a packed QKV projection are read in place).
        Math in fp32.
    mask: None; bool (True = attend); or additive float (0 = attend; -inf or finfo(mask.dtype).min =
        masked; other values such as -10000 are added as they are), broadcasting to [B, H, S_q, S_k]:
        [B, 1, 1, S_k] (the padding mask: the fast path), [B, 1, S_q, S_k], [B, H, S_q, S_k], expanded
        views (read with stride 0, never materialised). A query whose keys are all masked gets zeros
        (and zero gradients). A float mask that requires grad gets one (computed eagerly: slow).
    scale: default 1 / sqrt(D).
    dropout_p: drop probability on the attention probabilities (applied whenever > 0: pass 0.0 in
        eval); Philox mask from a seed drawn from torch's generator, same bits as masked_softmax's.
    backend: "torch", "triton", "cuda" (the CUDA C++ kernels: fp16 / bf16, D <= 128, sm_80+; other
        inputs run Triton, warning once) or "auto" (default: $BERTKERN_BACKEND, else "auto": Triton
        on CUDA tensors, else torch).

    Returns [B, H, S_q, D] stored as [B, S_q, H, D]: `out.transpose(1, 2).reshape(B, S_q, H * D)` is free.
    """
    _check(q, k, v, mask, scale, dropout_p)
    chosen = _pick_backend("attention", backend, q, dropout_p, k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if chosen == "sdpa":  # backend="auto" chose torch's own kernel (bertkern.ops.attention_auto)
        return _auto.sdpa(q, k, v, mask, scale, dropout_p)
    seed = reference.dropout_seed(dropout_p, q.device)
    out, _ = _ATTENTION.pick(q, needs_grad(q, k, v, mask))(q, k, v, mask, scale, dropout_p, seed, chosen)
    return out


def _check_max_seqlen(cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    """Raise ValueError if a sequence is longer than max_seqlen (the launch grid and the dropout rows
    are sized by it). Checked where it costs no device sync: cu_seqlens on the CPU, or any device with
    BERTKERN_DEBUG=1. Unchecked (CUDA tensors, torch.compile tracing), the Triton kernels write NaN
    over every output and gradient row of a longer sequence rather than leave them uninitialised."""
    if cu_seqlens.numel() < 2 or torch.compiler.is_compiling():
        return
    if cu_seqlens.device.type != "cpu" and os.environ.get("BERTKERN_DEBUG", "0") in ("", "0"):
        return
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if longest > max_seqlen:
        raise ValueError(f"{_VNAME}: max_seqlen={max_seqlen} is smaller than the longest sequence in cu_seqlens "
                         f"({longest} tokens); pass the longest length (bertkern.padding.unpad returns it)")


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """attention over packed variable-length sequences, no padding anywhere.

    q, k, v: [total, H, D] packed tokens (any strides with unit stride along D, e.g. views of a packed
        QKV projection [total, 3, H, D]); sequence b is tokens cu_seqlens[b] : cu_seqlens[b + 1] and
        attends only to itself.
    cu_seqlens: int32 (or int64) [B + 1] cumulative lengths, starting at 0 and ending at total (see
        bertkern.padding.unpad), on q's device. Not checked against the data (that would sync the host).
    max_seqlen: the longest length (a Python int); it sizes the launch grid and the dropout rows. A
        smaller one raises ValueError where that costs no device sync (cu_seqlens on the CPU, or
        BERTKERN_DEBUG=1); otherwise the Triton kernels give NaN for the longer sequences.
    Dropout row of query i in (b, h) is (b * H + h) * max_seqlen + i: with max_seqlen equal to a padded
    batch's S, the same mask as `attention` on that padded batch.

    Returns [total, H, D] contiguous.
    """
    _check_common(_VNAME, q, k, v, scale, dropout_p, 3, "[total, H, D]")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{_VNAME}: q, k and v must have the same shape [total, H, D], got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{_VNAME}: cu_seqlens must be a 1-D int32 tensor [B + 1], got "
                         + (f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}"
                            if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__))
    if cu_seqlens.device != q.device:
        raise ValueError(f"{_VNAME}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if isinstance(max_seqlen, (bool, torch.Tensor)) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{_VNAME}: max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    _check_max_seqlen(cu_seqlens, max_seqlen)
    chosen = _pick_backend("attention_varlen", backend, q, dropout_p, max_seqlen)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if chosen == "sdpa":  # backend="auto" chose torch's own kernels (bertkern.ops.attention_auto)
        return _auto.sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p)
    if chosen == "varlen_attn":
        return _auto.varlen_attn(q, k, v, cu_seqlens, max_seqlen, scale)
    out, _ = _ATTENTION_VARLEN.pick(q, needs_grad(q, k, v))(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p,
                                                            reference.dropout_seed(dropout_p, q.device), chosen)
    return out
