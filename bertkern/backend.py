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

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

BACKENDS = ("torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Plain dicts rather than functools.lru_cache: torch.compile traces these calls and warns on lru_cache.
_STATUS: dict[str, tuple[bool, str]] = {}
_WARNED: set[str] = set()
_ARCHS: dict[str, str | None] = {}  # "cuda": the arch list read from _C when it loaded

# The status functions below read facts fixed for the process (the extension, the GPU's arch).
# torch.compile calls them eagerly at trace time instead of tracing into them: a first call inside a
# compiled region would otherwise trace build_info() or get_device_capability() (non-Tensor results:
# a graph break, an error under fullgraph=True).
_process_constant = torch.compiler.assume_constant_result


@_process_constant
def cuda_extension_status() -> tuple[bool, str]:
    """(built, why-not). Importing bertkern._C registers the torch.ops.bertkern_cuda ops."""
    if "cuda" not in _STATUS:
        try:
            from bertkern import _C  # noqa: F401

            m = re.search(r"archs=(\S+)", str(torch.ops.bertkern_cuda.build_info()))
            _ARCHS["cuda"] = m.group(1) if m and m.group(1) != "unknown" else None
            _STATUS["cuda"] = (True, "")
        except ImportError as e:
            _STATUS["cuda"] = (False, extension_diagnosis(e).why)
    return _STATUS["cuda"]


# ---------------------------------------------------------------- why bertkern._C is missing
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Written by setup.py at build time: whether _C was built, or why not, and against which torch/CUDA.
BUILD_RECORD = os.path.join(PACKAGE_DIR, "_build_config.json")
REBUILD = "`pip install --no-build-isolation -e .` (in a checkout: `make install`)"
_HERE = object()  # "this installation's value" for extension_diagnosis's keyword arguments


class Diagnosis(NamedTuple):
    state: str  # built | load_failed | other_torch | missing | off_by_choice | cpu_torch | no_toolchain | not_built
    why: str  # one sentence for a user: what is the case, and what to do


def build_record() -> dict | None:
    try:
        with open(BUILD_RECORD, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _extension_file() -> str | None:
    import importlib.machinery

    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(PACKAGE_DIR, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def _nvcc_found() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc") or (home and os.path.isfile(os.path.join(home, "bin", "nvcc"))))


def extension_diagnosis(
    error: BaseException | None,
    *,
    record=_HERE,
    so_file=_HERE,
    torch_version=_HERE,
    torch_cuda=_HERE,
    nvcc=_HERE,
) -> Diagnosis:
    """Why bertkern._C does not import (error None: it did), with the advice that fits. The keyword
    arguments default to this installation (tests pass their own)."""
    record = build_record() if record is _HERE else record
    so_file = _extension_file() if so_file is _HERE else so_file
    torch_version = torch.__version__ if torch_version is _HERE else torch_version
    torch_cuda = torch.version.cuda if torch_cuda is _HERE else torch_cuda
    nvcc = _nvcc_found() if nvcc is _HERE else nvcc
    here = f"torch {torch_version} (CUDA {torch_cuda or 'none: CPU-only build'})"
    if error is None:
        return Diagnosis("built", "")
    if so_file:  # present but does not load: usually built against another torch or CUDA
        built_for = (f"torch {record.get('torch')} (CUDA {record.get('torch_cuda')})"
                     if record and record.get("torch") else "an unknown torch (no build record)")
        if record and (record.get("torch") != torch_version or record.get("torch_cuda") != torch_cuda):
            return Diagnosis("other_torch", f"bertkern._C was built for {built_for} but this is {here}: rebuild "
                             f"against this torch with {REBUILD}, or install the torch it was built for ({error})")
        return Diagnosis("load_failed", f"bertkern._C ({so_file}) is there but does not load ({error}); built for "
                         f"{built_for}, this is {here}; rebuild with {REBUILD}")
    if record and record.get("cuda_extension") == "built":
        return Diagnosis("missing", "bertkern._C was being built (build record) but there is no bertkern/_C*.so: the "
                         f"build failed or was interrupted, or `make clean` removed it; rebuild with {REBUILD}")
    if record and record.get("cuda_extension") == "off":
        return Diagnosis("off_by_choice", "bertkern._C was left out on purpose (BERTKERN_BUILD_CUDA=0 at install); "
                         "the torch backend works (and Triton's, where triton is installed); to build it: "
                         f"BERTKERN_BUILD_CUDA=1 {REBUILD}")
    if torch_cuda is None:
        return Diagnosis("cpu_torch", f"bertkern._C is not built and cannot be here: {here} is a CPU-only build; "
                         "install a CUDA build of torch (and nvcc) to build it; the torch backend and the Triton "
                         "kernels under TRITON_INTERPRET=1 work on CPU")
    if not nvcc:
        return Diagnosis("no_toolchain", "bertkern._C is not built: no CUDA toolchain "
                         "(nvcc not on PATH, no CUDA_HOME); install the CUDA toolkit matching torch's CUDA "
                         f"{torch_cuda}, then run {REBUILD}")
    reason = f" (at install: {record['why_not']})" if record and record.get("why_not") else ""
    return Diagnosis("not_built", f"bertkern._C is not built{reason}; nvcc and a CUDA torch are here now, so "
                     f"reinstalling builds it: {REBUILD}")


# ---------------------------------------------------------------- does _C have code for this GPU
def parse_archs(text: str) -> list[tuple[int, int, bool]]:
    """TORCH_CUDA_ARCH_LIST text ("8.0;9.0+PTX", "8.6 9.0a") -> [(major, minor, ptx)]."""
    archs = []
    for item in re.split(r"[;\s]+", text.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", item, re.I)
        if m:
            archs.append((int(m.group(1)), int(m.group(2)), bool(m.group(3))))
    return archs


def has_kernel_image(capability: tuple[int, int], archs: list[tuple[int, int, bool]]) -> bool:
    """Whether a GPU of `capability` can run code built for `archs`: a cubin runs on the same major
    arch at an equal or higher minor; PTX is JIT-compiled for any newer GPU."""
    major, minor = capability
    return any((a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor))
               for a_major, a_minor, ptx in archs)


def extension_archs() -> str | None:
    """The arch list bertkern._C was built for ("8.0;9.0+PTX"), or None if unknown."""
    return _ARCHS.get("cuda") if cuda_extension_status()[0] else None


@_process_constant
def cuda_arch_problem(device: torch.device) -> str | None:
    """Why bertkern._C has no kernel for the GPU of `device`, or None if it has (or cannot tell)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = f"arch{index}"
    if key not in _STATUS:
        archs = extension_archs()
        cap = torch.cuda.get_device_capability(index)
        ok = archs is None or has_kernel_image(cap, parse_archs(archs))
        _STATUS[key] = (ok, "" if ok else (
            f"bertkern._C has no kernel image for this GPU (sm_{cap[0]}{cap[1]}; built for {archs}); rebuild with "
            f"TORCH_CUDA_ARCH_LIST including {cap[0]}.{cap[1]} (or an older arch with +PTX): {REBUILD}"))
    return None if _STATUS[key][0] else _STATUS[key][1]


@_process_constant
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
        return cuda_arch_problem(device)
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def auto_backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "torch"
    if cuda_extension_status()[0]:
        why = unavailable_reason("cuda", device)
        if why is None:
            return "cuda"
        warn_once(f"bertkern: auto backend falls back to Triton: {why}")  # e.g. a GPU newer than _C's archs
    return "triton" if unavailable_reason("triton", device) is None else "torch"


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)


def resolve(op: str, backend: str | None, device: torch.device,
            unsupported: str | Callable[[str], str | None] | None = None) -> str:
    """Pick the backend for one call of `op`.

    `unsupported` is the op's own reason why this input cannot go to a kernel (None if it can), or a
    function of the chosen backend giving it (a limit of one backend's kernel); such inputs fall back
    to torch with a warning, and observe() sees "torch".
    """
    requested = check_name(f"bertkern.ops.{op}", backend)
    if device.type == "meta":
        chosen = "torch"  # shapes only: the reference's meta kernels compute them, nothing runs
    elif requested == "auto":
        chosen = auto_backend(device)
    else:
        why = unavailable_reason(requested, device)
        if why is not None:
            raise RuntimeError(f"bertkern.ops.{op}: backend={requested!r} is unavailable: {why}")
        chosen = requested
    if callable(unsupported):
        unsupported = unsupported(chosen) if chosen != "torch" else None
    if chosen != "torch" and unsupported is not None:
        warn_once(f"bertkern.ops.{op}: falling back to the torch backend: {unsupported}")
        chosen = "torch"
    record(op, chosen)
    return chosen


def check_name(where: str, backend: str | None) -> str:
    """The requested backend name (argument, else $BERTKERN_BACKEND, else "auto"); a ValueError naming
    `where` (the op) and where the bad name came from."""
    env = os.environ.get("BERTKERN_BACKEND")
    requested = backend or env or "auto"
    if requested == "auto" or requested in BACKENDS:
        return requested
    # attention passes $BERTKERN_BACKEND on as `backend`: an equal value is the variable's
    source = "BERTKERN_BACKEND=" if env and (backend is None or backend == env) else "backend="
    hint = f" (did you mean {requested.lower()!r}?)" if requested.lower() in BACKENDS else ""
    raise ValueError(f"{where}: {source}{requested!r} is not a backend{hint}: backend must be one of "
                     f"'auto', {', '.join(map(repr, BACKENDS))}")


# Callbacks (op, backend) for every resolved call: verify() reports what actually ran through them.
_OBSERVERS: list = []


def record(op: str, chosen: str) -> None:
    """Tell observe()'s collectors which backend an op call runs on (resolve() does it; attention's
    "auto" calls it for torch's own kernels, which do not go through resolve)."""
    for observer in _OBSERVERS:
        observer(op, chosen)


@contextlib.contextmanager
def observe():
    """`with observe() as calls:` collects (op, backend) for every op call resolved inside."""
    calls: list[tuple[str, str]] = []
    _OBSERVERS.append(lambda op, chosen: calls.append((op, chosen)))
    try:
        yield calls
    finally:
        _OBSERVERS.pop()


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)  # one C call; Dynamo folds it


def autocast_enabled(t: torch.Tensor) -> bool:
    """torch.is_autocast_enabled for t's device; False on devices autocast does not know (meta)."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():
        return False  # the usual case, without the per-device query (microseconds on every op call)
    if t.device.type == "meta":
        return False
    return torch.is_autocast_enabled(t.device.type)


def shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """t viewed as `shape`, or t itself when it has that shape already: a view costs several
    microseconds of host time, and the ops' outputs usually come back in the caller's shape."""
    return t if t.shape == shape else t.view(shape)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, last_dim] view with unit stride in the last dim; copies only when it must."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2
