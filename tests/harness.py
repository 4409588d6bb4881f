"""Test helpers shared by every op's tests: backends to run and inputs. The 2x-of-eager error rule is
bertkern.testing's (re-exported here for the tests' imports)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bertkern import backend as _backend
from bertkern.testing import assert_close_2x  # noqa: F401  (the rule, for the tests)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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


def gradcheck_fast_mode(backend: str, device: str) -> bool:
    """gradcheck's fast mode (the Jacobian in one random direction) where the kernels run in the Triton
    interpreter: the full Jacobian is an interpreted kernel pair per input element, minutes of CI per
    test. The torch backend and GPUs check the full Jacobian."""
    return backend == "triton" and device == "cpu"


def session_dir(tmp_path_factory, name: str) -> Path:
    """A folder for the whole test session, shared by the pytest-xdist workers (their temp folders
    share a parent): what one worker builds there, the others find."""
    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = base / name
    folder.mkdir(exist_ok=True)
    return folder


def randn(*shape, dtype=torch.float32, device="cpu", noncontig=False, scale=1.0):
    """Fresh normal inputs; noncontig=True gives a view with a row stride larger than its width."""
    if noncontig:
        big = (torch.randn(*shape[:-1], shape[-1] + 7, device=device) * scale).to(dtype)
        return big[..., 3 : 3 + shape[-1]]
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)


def launches_and_torch_ops(module, call) -> tuple[list[str], set[str]]:
    """(the Triton kernels `call` launches, the other torch ops it runs), the kernels of `module` and the
    shared ones swapped for recorders (compile_check.record_launches): on a GPU each of those torch ops
    but an allocation or a view is a launch of its own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bertkern.triton.compile_check import record_launches

    ran = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        launched = [name for _, name, _, _ in record_launches(module, call)]
    return launched, ran


# torch ops that launch nothing on a GPU
NO_LAUNCH_OPS = {"empty", "new_empty", "empty_strided", "unbind", "select", "view", "as_strided", "detach"}


def poison_allocator(device: str) -> None:
    """Leave NaNs in memory the CUDA caching allocator will hand out next, so unwritten outputs show."""
    if torch.device(device).type == "cuda":
        torch.empty(64 << 20, dtype=torch.float32, device=device).fill_(float("nan"))


def assert_float8_falls_back_visibly(op) -> None:
    """op(x, backend="triton") on a float8 x warns that it falls back to the torch backend. Eager
    PyTorch itself may not compute in float8: the warning is what is checked."""
    x = torch.randn(3, 8).to(torch.float8_e4m3fn)
    with pytest.warns(UserWarning, match="falling back to the torch backend"):
        try:
            op(x, backend="triton")
        except (RuntimeError, NotImplementedError):
            pass
