"""bias_gelu: y = gelu(x + bias), forward and backward, on the torch, triton or cuda backend.

Registered as the custom ops bertkern::bias_gelu and bertkern::bias_gelu_backward (with fake
implementations and autograd), so torch.compile(fullgraph=True) traces through them.
"""
from __future__ import annotations

import torch

from bertkern import backend as _backend
from bertkern import reference
from bertkern._utils import OpCall, check_floating, check_like, contiguous_or_none, needs_grad


def _kernels(backend: str):
    """(forward, backward) of one backend, all taking 2-D row views."""
    if backend == "triton":
        from bertkern.triton import bias_gelu as k

        return k.forward, k.backward
    if backend == "cuda":
        ops = torch.ops.bertkern_cuda

        def cuda_backward(dy, x, bias, approximate):
            dx, db = ops.bias_gelu_bwd(dy, x, bias, approximate)
            return dx, (db if bias is not None else None)

        return ops.bias_gelu_fwd, cuda_backward
    return reference.bias_gelu, reference.bias_gelu_backward


def _bias_gelu_impl(x: torch.Tensor, bias: torch.Tensor | None, approximate: str, backend: str) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    forward, _ = _kernels(backend)
    return _backend.shaped(forward(_backend.as_rows(x), contiguous_or_none(bias), approximate), x.shape)


def _bias_gelu_fake(x, bias, approximate, backend):
    return x.new_empty(x.shape)


def _bias_gelu_backward_impl(
    grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias); dbias is an empty tensor when there is no bias."""
    no_dbias = x.new_empty(0) if bias is None else None
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device), (
            no_dbias if bias is None else torch.zeros_like(bias)
        )
    _, backward = _kernels(backend)
    dx, dbias = backward(_backend.as_rows(grad), _backend.as_rows(x), contiguous_or_none(bias), approximate)
    return _backend.shaped(dx, x.shape), (no_dbias if bias is None else dbias)


def _bias_gelu_backward_fake(grad, x, bias, approximate, backend):
    return x.new_empty(x.shape), (x.new_empty(0) if bias is None else bias.new_empty(bias.shape))


_BIAS_GELU_BACKWARD = OpCall.define("bias_gelu_backward", _bias_gelu_backward_impl, fake=_bias_gelu_backward_fake)


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend = approximate, backend


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, dbias = _BIAS_GELU_BACKWARD.pick(grad)(grad, x, bias, ctx.approximate, ctx.backend)
    return dx, (dbias if bias is not None else None), None, None


_BIAS_GELU = OpCall.define("bias_gelu", _bias_gelu_impl, fake=_bias_gelu_fake, setup_context=_setup_context,
                           backward=_backward)


def _check(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> None:
    name = "bertkern.ops.bias_gelu"
    check_floating(name, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension, got a scalar")
    if approximate not in reference.GELU_APPROXIMATIONS:
        raise ValueError(f"{name}: approximate must be one of {reference.GELU_APPROXIMATIONS}, got {approximate!r}")
    check_like(name, "x", x, (("bias", bias, x.shape[-1:], "x's last dim"),))


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor | None = None, *, approximate: str = "none", backend: str | None = None
) -> torch.Tensor:
    """gelu(x + bias) over any shape whose last dim is bias's size.

    approximate="none" is the exact erf GELU (HF "gelu"); "tanh" is HF "gelu_new" / "gelu_pytorch_tanh".
    backend: "torch", "triton", "cuda" or "auto" (default: $BERTKERN_BACKEND, else "auto").
    """
    if bias is not None and isinstance(x, torch.Tensor) and _backend.autocast_enabled(x):
        # Under autocast the Linear before us returns fp16/bf16 while its bias stays fp32:
        # add in x's dtype, as autocast's own addmm would.
        bias = bias.to(x.dtype)
    _check(x, bias, approximate)
    unsupported = None if x.dtype in _backend.KERNEL_DTYPES else f"dtype {x.dtype} has no kernel"
    chosen = _backend.resolve("bias_gelu", backend, x.device, unsupported)
    return _BIAS_GELU.pick(x, needs_grad(x, bias))(x, bias, approximate, chosen)
