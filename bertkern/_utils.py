"""Small helpers shared by the ops, their Triton launchers and the reference (one copy each).

Imports only torch at module level: bertkern.reference imports this module, so the helpers that
need the reference import it where they run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- argument checks
# Every op checks its arguments with these: each error names the op and the argument. They run on
# every call, so the usual case (all right) is a few comparisons and the message is built on failure.
def check_floating(name: str, arg: str, t, dims: int | None = None, layout: str = "") -> None:
    """`arg` is a floating-point tensor (with `dims` dims, `layout` naming them, when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: {arg} must be a {dims}-D tensor {layout}, got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: {arg} must be a floating-point tensor, got dtype {t.dtype}")


def check_like(name: str, ref_name: str, ref: torch.Tensor, table, dtypes: tuple | None = None) -> None:
    """Each row (arg, t, shape, what) of `table`: t is None, or a tensor on ref's device with ref's dtype
    (one of `dtypes` when given) and, unless shape is None, that shape (`what` says which)."""
    dtype, device = ref.dtype, ref.device
    for arg, t, shape, what in table:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor or None, got {type(t).__name__}")
        if shape is not None and t.shape != shape:
            raise ValueError(f"{name}: {arg} must have shape {list(shape)} ({what}), got {list(t.shape)}")
        if dtypes is not None and t.dtype not in dtypes:
            names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{name}: {arg} must be {names}, got dtype {t.dtype}")
        if dtypes is None and t.dtype != dtype:
            raise ValueError(f"{name}: {arg} dtype {t.dtype} does not match {ref_name} dtype {dtype}")
        if t.device != device:
            raise ValueError(f"{name}: {arg} is on {t.device} but {ref_name} is on {device}")


def check_float(name: str, arg: str, value, lo: float | None = None, hi: float = math.inf,
                none_ok: bool = False) -> None:
    """`arg` is a Python number (not a bool or a tensor), or None if none_ok; with `lo`, in [lo, hi]
    (NaN is not)."""
    if value is None and none_ok:
        return
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: {arg} must be a Python float{' or None' if none_ok else ''}, "
                        f"got {type(value).__name__}")
    if lo is not None and not lo <= value <= hi:
        bounds = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}]"
        raise ValueError(f"{name}: {arg} must be a float {bounds}, got {value!r}")


def check_mask_kind(name: str, mask, arg: str, ref: torch.Tensor) -> None:
    """An attention / softmax mask (not None) is a bool keep-mask or a float additive mask, on the
    device of `ref` (the argument named `arg`); its shape is the caller's check."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name}: mask must be bool (True = attend) or a floating-point additive mask, "
                         f"got dtype {mask.dtype}")
    if mask.device != ref.device:
        raise ValueError(f"{name}: mask is on {mask.device} but {arg} is on {ref.device}")


def broadcasts_to(shape, to) -> bool:
    """expand()'s rule on the shapes alone: every dim of `shape`, aligned from the right, is 1 or
    `to`'s. Checked on every call: torch.broadcast_shapes costs ~100 us of host time there."""
    return len(shape) <= len(to) and all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(to)))


def num_sms(device: torch.device, interpreted: int) -> int:
    """SMs of a CUDA device; `interpreted` elsewhere (the Triton interpreter: few programs keep CPU
    tests fast)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return interpreted


def empty(like: torch.Tensor) -> torch.Tensor:
    """The 0-element placeholder the ops return for an output that was not asked for."""
    return like.new_empty(0)


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """A [N] parameter with unit stride (the kernels index it directly), or None."""
    return None if t is None else t.contiguous()


def keep_mask(seed: torch.Tensor | None, shape, dropout_p: float) -> torch.Tensor | None:
    """The eager dropout keep mask of `shape`, or None without dropout (no seed or p <= 0)."""
    from bertkern import reference

    if seed is None or dropout_p <= 0.0:
        return None
    return reference.dropout_keep_mask(seed, shape, dropout_p)


def dropout_args(op: str, dropout_p: float, seed: torch.Tensor | None, like: torch.Tensor):
    """(seed pointer, keep scale, int32 threshold) for a kernel that takes dropout; without dropout
    `like` stands in for the unused seed pointer."""
    from bertkern import reference

    if dropout_p <= 0.0:
        return like, 1.0, 0
    if seed is None:
        raise ValueError(f"bertkern.ops.{op}: dropout_p > 0 needs a seed tensor")
    return seed, reference.dropout_scale(dropout_p), reference.dropout_threshold(dropout_p)


@dataclass(frozen=True, slots=True)
class NormArgs:
    """The flags of an add_layer_norm / embedding_layer_norm forward launcher (torch, Triton, cuda),
    built once in the custom op's impl: torch.library schemas take only flat arguments."""

    eps: float
    dropout_p: float = 0.0
    store_prenorm: bool = False


@dataclass(frozen=True, slots=True)
class NormGradArgs:
    """The flags of an add_layer_norm backward launcher: the forward's dropout_p and which column sums
    (dweight, dbias, dx_bias) to compute."""

    dropout_p: float
    need_dweight: bool
    need_dbias: bool
    need_dx_bias: bool


def varlen_index(cu_seqlens: torch.Tensor, max_seqlen: int, total: int):
    """(idx [B, max_seqlen] packed token of (b, i), clamped; valid [B, max_seqlen] i < length_b)."""
    cu = cu_seqlens.to(torch.int64)
    pos = torch.arange(max_seqlen, device=cu.device)
    valid = pos[None, :] < (cu[1:] - cu[:-1])[:, None]
    idx = (cu[:-1, None] + pos[None, :]).clamp(0, max(total - 1, 0))
    return idx, valid


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not FakeTensor, DTensor, ...: they need the dispatcher


class OpCall:
    """What a public op calls to run its custom op torch.ops.bertkern.<name>. The custom op itself while
    torch.compile / export traces (they need it and its fake), for meta tensors or tensor subclasses
    (FakeTensor, DTensor, functorch's wrappers) and under a TorchDispatchMode (FlopCounterMode, a
    profiler: they see the op as one call); otherwise its implementation directly, inside a
    torch.autograd.Function running the op's own autograd formula (setup_context, backward) when a
    gradient is needed. The custom op's Python dispatch costs 30-100 us of host time per call: more
    than a BERT-size kernel takes on a GPU. Each op module makes its OpCalls with OpCall.define."""

    @classmethod
    def define(cls, name: str, impl, *, fake, setup_context=None, backward=None, mutates_args=()) -> "OpCall":
        """Create the custom op bertkern::<name> from `impl` (its schema read from impl's annotations),
        register its fake and, when `backward` is given, its autograd formula (setup_context,
        backward), and return the OpCall that runs it: each op states its name, impl and formula once."""
        op = torch.library.custom_op(f"bertkern::{name}", impl, mutates_args=mutates_args)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        return cls(name, impl, setup_context, backward)

    def __init__(self, name: str, impl, setup_context=None, backward=None):
        self.name, self.impl, self.with_grad = name, impl, None
        if backward is not None:
            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx, *args):
                    out = impl(*args)
                    setup_context(ctx, args, out)
                    return out

                @staticmethod
                def backward(ctx, *grads):
                    return backward(ctx, *grads)

            self.with_grad = Fn.apply

    def pick(self, x: torch.Tensor, grad: bool = False):
        if (type(x) not in _PLAIN or x.is_meta or torch.compiler.is_compiling()
                or torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack()
                or (grad and self.with_grad is None)):
            return getattr(torch.ops.bertkern, self.name)
        return self.with_grad if grad else self.impl
