"""Test helpers shared by every op's tests: backends to run, inputs, and the 2x-of-eager error rule."""
from __future__ import annotations

import pytest
import torch

from bertkern import backend as _backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute floor of the error rule, per dtype: a few ulps near 1.0 (eager can be exact on easy inputs).
ATOL_FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def kernel_backends() -> list:
    """(backend, device) pairs whose kernels can run here, as pytest params; gpu-marked when on CUDA."""
    params = []
    if torch.cuda.is_available():
        params.append(pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu))
        params.append(pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.gpu))
    else:
        params.append(pytest.param(("triton", "cpu"), id="triton-interp"))
        params.append(pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.gpu))
    return params


def skip_unless_usable(backend: str, device: str) -> None:
    why = _backend.unavailable_reason(backend, torch.device(device))
    if why is not None:
        pytest.skip(why)


def randn(*shape, dtype=torch.float32, device="cpu", noncontig=False, scale=1.0):
    """Fresh normal inputs; noncontig=True gives a view with a row stride larger than its width."""
    if noncontig:
        big = (torch.randn(*shape[:-1], shape[-1] + 7, device=device) * scale).to(dtype)
        return big[..., 3 : 3 + shape[-1]]
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)


def poison_allocator(device: str) -> None:
    """Leave NaNs in memory the CUDA caching allocator will hand out next, so unwritten outputs show."""
    if torch.device(device).type == "cuda":
        torch.empty(64 << 20, dtype=torch.float32, device=device).fill_(float("nan"))


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0


def assert_close_2x(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, name: str = "output") -> None:
    """The kernel's max error against the float64 reference is at most 2x eager's in the same dtype,
    plus a small absolute floor. NaN never passes; shapes and dtypes must match eager's."""
    assert out.shape == eager.shape, f"{name}: shape {tuple(out.shape)} != {tuple(eager.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != {eager.dtype}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    ref_nan = torch.isnan(ref64)
    assert not ref_nan.any(), f"{name}: NaN in reference (test bug)"
    err, eager_err = _err(out, ref64), _err(eager, ref64)
    tol = 2 * eager_err + ATOL_FLOOR[out.dtype]
    if out.dtype == torch.bfloat16 and out.device.type == "cpu" and _backend.triton_interpreted() and err > tol:
        # Triton's interpreter casts fp32 -> bf16 by truncation (numpy has no bf16); GPUs round to
        # nearest. Allow that one extra ulp per element (ulp <= |value| * 2^-7), only here.
        slack = (out.double() - ref64.double()).abs() - ref64.double().abs() * 2.0**-7
        err = slack.max().item()
    assert err <= tol, f"{name}: max error {err:.3g} > 2 x eager's {eager_err:.3g} + floor {ATOL_FLOOR[out.dtype]:.1g}"
