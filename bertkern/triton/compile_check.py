"""Compile a Triton kernel for a real NVIDIA GPU on a host without one, and report its resources.

TRITON_INTERPRET=1 runs kernels on CPU but never lowers them, so it cannot catch what only a real
compile hits: lowering/type errors, shared memory over the per-block limit, register spills. Here
`triton.compile` builds the cubin for sm_<capability> with Triton's bundled ptxas (no driver, no
GPU), and the bundled cuobjdump reads its registers and stack (spill) bytes.

Needs TRITON_INTERPRET unset when triton is imported (under the interpreter @triton.jit gives
interpreted functions that cannot be compiled). Used by tests/test_triton_compile.py and by
bertkern.triton.attention.compile_report.
"""
from __future__ import annotations

import re
import subprocess
import tempfile

import triton

# Largest dynamic shared memory one block may opt into, in bytes (CUDA C Programming Guide, compute
# capabilities table): A100 163 KiB, H100 227 KiB.
MAX_SHARED = {80: 166912, 90: 232448}


def toolchain_missing() -> str | None:
    """Why this triton cannot compile for an NVIDIA target on this host (None if it can). Does not
    look at TRITON_INTERPRET, so a test process running under the interpreter can ask before it
    starts a child without it."""
    try:
        from triton.backends import backends
    except ImportError as e:
        return f"triton has no backends here ({e})"
    if "nvidia" not in backends:
        return "triton's nvidia backend is not installed"
    try:  # raise RuntimeError when the binaries are absent (bundled or TRITON_*_PATH)
        triton.knobs.nvidia.ptxas.path  # noqa: B018
        triton.knobs.nvidia.cuobjdump.path  # noqa: B018
    except RuntimeError as e:
        return f"no usable ptxas / cuobjdump: {e}"
    return None


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                   capability: int = 90, divisible_by_16=()) -> dict:
    """Compile the @triton.jit `fn` for sm_<capability>.

    signature: Triton type of runtime arguments by name ("*fp16", "*u8", "fp32", "i64", ...); an
    argument named in neither dict is "i32", the type of a Python int (sizes, strides) at launch.
    constexprs: value of every tl.constexpr argument by name.
    divisible_by_16: names of arguments to specialise as multiples of 16, as a launch does for
    16-byte-aligned pointers and ints (it then vectorises loads and needs fewer address registers).
    Without them this is the specialisation for unaligned inputs: the most registers.

    Returns {"shared": bytes, "registers": per thread, "stack": bytes per thread (> 0 means spills)},
    or {"error": "..."} if the compile fails.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.JITFunction):
        return {"error": f"{fn!r} is not a compilable @triton.jit function (TRITON_INTERPRET=1 at triton import?)"}
    try:
        sig = {name: "constexpr" if name in constexprs else signature.get(name, "i32") for name in fn.arg_names}
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
        src = ASTSource(fn, sig, constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        return {"shared": kernel.metadata.shared, **_resource_usage(kernel.asm["cubin"])}
    except Exception as e:  # noqa: BLE001  (a compile error is a result here)
        return {"error": _describe(e)}


def _describe(e: BaseException, limit: int = 3000) -> str:
    """The error and its causes: Triton's CompilationError says where ("at line:col" and the source),
    the exception it wraps says what (e.g. the NameError of a non-constexpr global)."""
    parts = []
    while e is not None:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__
    return "\ncaused by ".join(parts)[:limit]


def _resource_usage(cubin: bytes) -> dict:
    """{"registers", "stack"} of the one kernel in `cubin` (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out[:300]!r}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2))}
