"""Backend selection shared by every op.

A backend is one of "torch" (the eager reference in bertkern.reference), "triton" (bertkern/triton/)
or "cuda" (the compiled extension bertkern._C). The choice comes, in order, from the call's
`backend=` argument, the BERTKERN_BACKEND environment variable, or "auto":
cuda if the extension is built and the tensors are on a CUDA device, else triton on CUDA, else torch.

An explicitly requested backend that cannot run at all (extension not built, tensors on the wrong
device) raises a RuntimeError saying why. A backend that runs but does not support one particular
input (say float64 in a kernel that only has fp16/bf16/fp32) falls back to torch with a warning.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Plain dicts rather than functools.lru_cache: torch.compile traces these calls and warns on lru_cache.
_STATUS: dict[str, tuple[bool, str]] = {}
_WARNED: set[str] = set()


def cuda_extension_status() -> tuple[bool, str]:
    """(built, why-not). Importing bertkern._C registers the torch.ops.bertkern_cuda ops."""
    if "cuda" not in _STATUS:
        try:
            from bertkern import _C  # noqa: F401

            _STATUS["cuda"] = (True, "")
        except ImportError as e:
            _STATUS["cuda"] = (False, f"bertkern._C is not built ({e}); reinstall with nvcc on PATH and BERTKERN_BUILD_CUDA=1")
    return _STATUS["cuda"]


def triton_status() -> tuple[bool, str]:
    if "triton" not in _STATUS:
        try:
            import triton  # noqa: F401

            _STATUS["triton"] = (True, "")
        except Exception as e:  # ImportError, or a broken install raising something else
            _STATUS["triton"] = (False, f"triton cannot be imported ({type(e).__name__}: {e})")
    return _STATUS["triton"]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors of `device`, or None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return f"triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    if backend == "cuda":
        ok, why = cuda_extension_status()
        if not ok:
            return why
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def auto_backend(device: torch.device) -> str:
    for name in ("cuda", "triton"):
        if device.type == "cuda" and unavailable_reason(name, device) is None:
            return name
    return "torch"


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)


def resolve(op: str, backend: str | None, device: torch.device, unsupported: str | None = None) -> str:
    """Pick the backend for one call of `op`.

    `unsupported` is the op's own reason why this input cannot go to a kernel (None if it can);
    such inputs fall back to torch with a warning.
    """
    requested = backend or os.environ.get("BERTKERN_BACKEND") or "auto"
    if requested == "auto":
        chosen = auto_backend(device)
    else:
        why = unavailable_reason(requested, device)
        if why is not None:
            raise RuntimeError(f"bertkern.ops.{op}: backend={requested!r} is unavailable: {why}")
        chosen = requested
    if chosen != "torch" and unsupported is not None:
        _warn_once(f"bertkern.ops.{op}: falling back to the torch backend: {unsupported}")
        return "torch"
    return chosen


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, last_dim] view with unit stride in the last dim; copies only when it must."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2
