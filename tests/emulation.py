"""Builds the CPU emulation of a csrc/*.cu file (tests/cuda_emu/<op>_emu.cpp: emu.h, then the .cu file)
as torch.ops.bertkern_cuda_emu.*, so that tests run the CUDA kernels' own code without a GPU; and
points backend="cuda" at it (see tests/cuda_emu/emu.h for what the emulation covers)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from harness import session_dir

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"


def cuda_include() -> str | None:
    """A CUDA toolkit's include folder (the emulation needs cuda_runtime.h, cuda_bf16.h and what they
    include): $CUDA_HOME's, /usr/local/cuda's, or the one next to nvcc on PATH."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    needed = ("cuda_runtime.h", "cuda_bf16.h", "crt/host_defines.h", "nv/target")
    for c in candidates:
        if all(os.path.isfile(os.path.join(c, h)) for h in needed):
            return c
    return None


_BUILT: set[str] = set()  # a library's ops register once per process


def build(op: str, build_dir: Path):
    """torch.ops.bertkern_cuda_emu after loading tests/cuda_emu/<op>_emu.cpp (g++, 10-60 s; once per
    process)."""
    from torch.utils import cpp_extension

    if op in _BUILT:
        return torch.ops.bertkern_cuda_emu

    inc = cuda_include()
    if inc is None:
        pytest.skip("no CUDA toolkit headers to build the emulation against")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch has no c10/cuda headers")
    cpp_extension.load(
        name=f"bertkern_{op}_emu",
        sources=[str(EMU / f"{op}_emu.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(EMU), inc],
        # UBSan's alignment check: x86 forgives a misaligned 16-byte access that a GPU does not, so
        # a wrong vector-path decision would otherwise pass here. -Og: the builds take 115 s of CPU
        # for the four ops (-O1: 177 s; -O0: twice -Og's) and the kernels run ~25% slower than -O1
        # (-O0: ~3.5x), a net saving now that the emulated threads are cheap (fibers).
        extra_cflags=["-std=c++20", "-Og", "-w", "-fsanitize=alignment", "-fno-sanitize-recover=alignment"],
        extra_ldflags=["-fsanitize=alignment"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    _BUILT.add(op)
    return torch.ops.bertkern_cuda_emu


def use_emulation(monkeypatch, ops) -> None:
    """For the test: backend="cuda" accepts CPU tensors, and the ops' cuda path (which calls
    torch.ops.bertkern_cuda.*) runs the emulation. The public functions (bertkern.ops.*) then work
    with backend="cuda" on CPU tensors."""
    from bertkern import backend as _backend

    _backend.cuda_extension_status()  # cached from the real _C's build_info (the emulation has none)
    monkeypatch.setattr(torch.ops, "bertkern_cuda", ops)
    real = _backend.unavailable_reason
    monkeypatch.setattr(_backend, "unavailable_reason",
                        lambda backend, device: (None if backend == "cuda" and device.type == "cpu"
                                                 else real(backend, device)))


def fixtures(*ops: str):
    """(emulated, cuda) pytest fixtures for a test module: `emulated` builds the ops' emulation once
    per module; `cuda` (the backend name to pass) turns the emulation on for one test, with every
    tensor torch allocates filled with NaN (deterministic mode), so an output element that no
    kernel thread writes fails the checks."""

    @pytest.fixture(scope="module")
    def emulated(tmp_path_factory):
        # One build folder per op for the whole session, so a second module (test_models_emulated) or
        # worker loads the library the first built (torch's build holds a file lock there: one
        # builds, the others wait).
        for op in ops:
            lib = build(op, session_dir(tmp_path_factory, f"{op}_emu"))
        return lib

    @pytest.fixture
    def cuda(emulated, monkeypatch):
        use_emulation(monkeypatch, emulated)
        before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield "cuda"
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])

    return emulated, cuda


# Orders besides the default (tests/cuda_emu/emu.h): the threads' ($BERTKERN_EMU_SCHEDULE), and the
# blocks run last to first ($BERTKERN_EMU_BLOCKS=reverse) with the threads in their default order.
THREAD_ORDERS = ("reverse", "lowest", "highest", "random:1")
BLOCKS_REVERSED = "blocks reversed"
ORDERS = (*THREAD_ORDERS, BLOCKS_REVERSED)


def same_bits_in_every_order(monkeypatch, fn, orders=ORDERS) -> None:
    """fn() -> tensors gives the same bits under every emulated order. The CUDA kernels have no atomics
    and sum in a fixed order, so only a race can make the order matter: threads touching the same shared
    memory between the same two barriers, one of them writing, or blocks writing the same outputs.
    test_attention_emulated's probe shows that the thread orders do change a race's result. (The
    attention backward's blocks take turns in key order: not under BLOCKS_REVERSED.)"""
    monkeypatch.setenv("BERTKERN_EMU_SCHEDULE", "forward")
    monkeypatch.setenv("BERTKERN_EMU_BLOCKS", "forward")
    want = fn()
    for order in orders:
        blocks = order == BLOCKS_REVERSED
        monkeypatch.setenv("BERTKERN_EMU_SCHEDULE", "forward" if blocks else order)
        monkeypatch.setenv("BERTKERN_EMU_BLOCKS", "reverse" if blocks else "forward")
        for i, (g, w) in enumerate(zip(fn(), want, strict=True)):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=f"output {i}, order {order}")
