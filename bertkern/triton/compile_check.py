"""Compile a Triton kernel for a real NVIDIA GPU on a host without one, and report its resources.

TRITON_INTERPRET=1 runs kernels on CPU but never lowers them, so it cannot catch what only a real
compile hits: lowering/type errors, shared memory over the per-block limit, register spills. Here
`triton.compile` builds the cubin for sm_<capability> with Triton's bundled ptxas (no driver, no
GPU), and the bundled cuobjdump reads its registers and stack (spill) bytes.

The launches themselves come from the modules' own launch functions (bias_gelu.forward,
attention.backward, ...) called on meta tensors with each @triton.jit kernel swapped for a recorder
(op_launch, record_launches, launch_job), so what is compiled is exactly what the code launches. Each
Triton module declares its ops' calls in its own compile_launch; op_launch only looks the module up.

Needs TRITON_INTERPRET unset when triton is imported (under the interpreter @triton.jit gives
interpreted functions that cannot be compiled). Used by tests/test_triton_compile.py and
benchmarks/sass_report.py.
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
                   capability: int = 90, divisible_by_16=(), sass: bool = False) -> dict:
    """Compile the @triton.jit `fn` for sm_<capability>.

    signature: Triton type of runtime arguments by name ("*fp16", "*u8", "fp32", "i64", ...); an
    argument named in neither dict is "i32", the type of a Python int (sizes, strides) at launch.
    constexprs: value of every tl.constexpr argument by name.
    divisible_by_16: names of arguments to specialise as multiples of 16, as a launch does for
    16-byte-aligned pointers and ints (it then vectorises loads and needs fewer address registers).
    Without them this is the specialisation for unaligned inputs: the most registers.

    Returns {"shared": bytes, "registers": per thread, "stack": bytes per thread (> 0 means spills)}
    (with sass=True also "sass": the cuobjdump -sass text), or {"error": "..."} if the compile fails.
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
        out = {"shared": kernel.metadata.shared, **_resource_usage(kernel.asm["cubin"])}
        if sass:
            out["sass"] = _cuobjdump(kernel.asm["cubin"], "-sass")
        return out
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


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, f.name], capture_output=True,
                              text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    """{"registers", "stack"} of the one kernel in `cubin` (cuobjdump -res-usage)."""
    out = _cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out[:300]!r}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2))}


# ---------------------------------------------------------------- the launches the code makes
def meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
                                            .get(dtype, dtype)), device="meta")


# The Triton module that declares each op's compile launches (its compile_launch).
OP_MODULES = {"bias_gelu": "bias_gelu", "add_layer_norm": "layer_norm", "embedding_layer_norm": "layer_norm",
              "masked_softmax": "masked_softmax", "attention": "attention"}


def case_id(case) -> str:
    """A compile case's name, e.g. sm90-attention-bwd-bf16-D64-S512-float_BHSS (usable with pytest -k;
    the static report's row ids)."""
    cap, op, direction, dt, params = case
    labels = {"N": "N{}", "D": "D{}", "S": "S{}", "approximate": "gelu_{}", "mask": "{}_mask"}
    parts = [labels.get(k, "{}").format(v) for k, v in params.items()
             if k not in ("dropout_p", "bias", "deterministic")]
    parts += ["dropout"] * bool(params.get("dropout_p")) + ["no_bias"] * (params.get("bias") is False)
    return "-".join([f"sm{cap}", op, direction, dt, *parts])


def compile_cases() -> list[tuple]:
    """Every module's compile_cases() (capability, op, direction, dtype, params), in OP_MODULES' order."""
    import importlib

    modules = dict.fromkeys(OP_MODULES.values())
    return [c for m in modules for c in importlib.import_module(f"bertkern.triton.{m}").compile_cases()]


def op_launch(op, direction, dt, params):
    """(module, call) that makes the launches of one op on meta tensors."""
    import importlib

    if op not in OP_MODULES:
        raise ValueError(op)
    module = importlib.import_module(f"bertkern.triton.{OP_MODULES[op]}")
    return module, module.compile_launch(op, direction, dt, params, meta)


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, module, name, log):
        self.module, self.name, self.log = module, name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.module, self.name, args, kwargs))


# Modules whose kernels the op modules launch through a helper (the backwards' column sums).
SHARED_MODULES = ("bertkern.triton.column_sum",)


def record_launches(module, call, capability: int | None = None) -> list[tuple]:
    """The (module, kernel name, args, kwargs) of every launch `call` makes, of the kernels of `module`
    and of SHARED_MODULES (compiled, or interpreted: the tests count launches on the CPU too). A module
    whose configs depend on the GPU (attention: TARGET_CAPABILITY) picks them for sm_<capability>
    meanwhile."""
    import importlib

    import triton

    homes = [module] + [importlib.import_module(m) for m in SHARED_MODULES]
    kernels = [(m, n, f) for m in homes for n, f in vars(m).items() if isinstance(f, triton.runtime.KernelInterface)]
    log = []
    target = getattr(module, "TARGET_CAPABILITY", None)
    try:
        for m, n, _ in kernels:
            setattr(m, n, _Recorder(m, n, log))
        if capability is not None and hasattr(module, "TARGET_CAPABILITY"):
            module.TARGET_CAPABILITY = capability
        call()
    finally:  # the kernels' globals must be the real helpers again before compiling
        for m, n, f in kernels:
            setattr(m, n, f)
        if hasattr(module, "TARGET_CAPABILITY"):
            module.TARGET_CAPABILITY = target
    return log


def launch_job(module, name, args, kwargs, cap) -> tuple:
    """(module, kernel, signature, constexprs, divisible_by_16, num_warps, num_stages, capability) of
    one launch, specialised on its arguments by Triton's own launch-time function: argument types,
    ints equal to 1 made constexpr, 16-byte-aligned pointers and multiples of 16 marked divisible."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = getattr(module, name)
    bound = {**dict(zip(fn.arg_names, args)), **{k: v for k, v in kwargs.items() if k in fn.arg_names}}
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    assert set(options) <= {"num_warps", "num_stages"}, options  # others would need passing to the compile
    sig, consts, aligned = {}, {}, []
    for p in fn.params:
        v = bound[p.name]
        if p.is_constexpr:
            consts[p.name] = v
            continue
        ty, key = native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            consts[p.name] = key
        else:
            sig[p.name] = ty
            if key == "D":
                aligned.append(p.name)
    # unset num_warps / num_stages: Triton's defaults (CUDAOptions)
    return (module.__name__, name, sig, consts, aligned, options.get("num_warps", 4), options.get("num_stages", 3),
            cap)


def compile_job(job, sass: bool = False) -> dict:
    """compile_kernel on a launch_job tuple."""
    import importlib

    mod, name, sig, consts, aligned, warps, stages, cap = job
    return compile_kernel(getattr(importlib.import_module(mod), name), sig, consts, warps, stages, cap, aligned, sass)
