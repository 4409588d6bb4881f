"""The compiled extension bertkern._C: was it built when asked, what it registers, how it fails.

With BERTKERN_REQUIRE_CUDA_EXT=1 (CI sets it after building with BERTKERN_BUILD_CUDA=1) a missing
extension is a failure; otherwise these tests skip when it is not built. Everything except the
gpu-marked tests runs without a GPU. Numerical correctness against the reference is in the per-op
tests (tests/test_bias_gelu.py, over every backend); the gpu tests here cover what only the C++
side has: argument checks, empty shapes, and the vector/scalar/grid-stride launch paths.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from bertkern import reference

REQUIRED = os.environ.get("BERTKERN_REQUIRE_CUDA_EXT", "0") == "1"

SCHEMAS = {
    "build_info": "bertkern_cuda::build_info() -> str",
    "bias_gelu_fwd": "bertkern_cuda::bias_gelu_fwd(Tensor x, Tensor? bias, str approximate) -> Tensor",
    "bias_gelu_bwd": (
        "bertkern_cuda::bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, str approximate) -> (Tensor, Tensor)"
    ),
}


@pytest.fixture(scope="module")
def ext():
    try:
        import bertkern._C as C
    except ImportError as e:
        if REQUIRED:
            pytest.fail(f"BERTKERN_REQUIRE_CUDA_EXT=1 but bertkern._C does not import: {e}")
        pytest.skip(f"bertkern._C is not built ({e}); set BERTKERN_REQUIRE_CUDA_EXT=1 to make this a failure")
    return C


def test_extension_imports(ext):
    from bertkern import backend

    assert ext.__name__ == "bertkern._C"
    assert backend.cuda_extension_status()[0], backend.cuda_extension_status()[1]


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_op_schema(ext, op):
    assert hasattr(torch.ops.bertkern_cuda, op), f"torch.ops.bertkern_cuda.{op} is not registered"
    assert str(getattr(torch.ops.bertkern_cuda, op).default._schema) == SCHEMAS[op]


@pytest.mark.parametrize("op", ["bias_gelu_fwd", "bias_gelu_bwd"])
def test_kernels_are_cuda_only(ext, op):
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has_kernel(f"bertkern_cuda::{op}", "CUDA")
    assert not has_kernel(f"bertkern_cuda::{op}", "CPU")


def _arch_list(text: str) -> list[str]:
    return [a for a in re.split(r"[; ]+", text.strip()) if a]


def test_build_info(ext):
    info = torch.ops.bertkern_cuda.build_info()
    m = re.fullmatch(r"archs=(\S+) cuda=(\d+)\.(\d+) torch=(\d+\.\d+\.\d+)", info)
    assert m, f"unexpected build_info(): {info!r}"
    archs = _arch_list(m.group(1))
    assert archs and "unknown" not in archs and all(re.fullmatch(r"[\w.+]+", a) for a in archs), info
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if wanted:  # the build read the same variable: a mismatch means a stale build
        assert archs == _arch_list(wanted), f"built for {archs}, TORCH_CUDA_ARCH_LIST={wanted!r}: rebuild"
    # The CUDA major version must match torch's (its runtime is the one loaded), and the extension
    # must have been built against this torch (its C++ ABI is not stable across releases).
    assert torch.version.cuda is not None and m.group(2) == torch.version.cuda.split(".")[0], info
    assert m.group(4) == torch.__version__.split("+")[0], f"built against torch {m.group(4)}: rebuild"


@pytest.mark.parametrize("op", ["bias_gelu_fwd", "bias_gelu_bwd"])
def test_cpu_tensors_raise(ext, op):
    x = torch.randn(4, 8)
    args = (x, None, "none") if op == "bias_gelu_fwd" else (torch.randn(4, 8), x, None, "none")
    # The dispatcher finds no CPU kernel: NotImplementedError, a RuntimeError, naming the op.
    with pytest.raises(RuntimeError, match=rf"bertkern_cuda::{op}.*'CPU' backend"):
        getattr(torch.ops.bertkern_cuda, op)(*args)


# ------------------------------------------------------------------------------------------ gpu
def _ref(x, bias, approximate):
    return reference.bias_gelu(x, bias, approximate)


def _ref_bwd(dy, x, bias, approximate):
    return reference.bias_gelu_backward(dy, x, bias, approximate)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_fwd(x, b, "erf"), "approximate must be 'none' or 'tanh'"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_fwd(x[None], b, "none"),
         r"x must be 2-D \[M, N\], got 3-D shape \[1, 8, 16\]"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_fwd(x.t(), None, "none"),
         r"x must have unit stride .*, got strides \[1, 16\]"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_fwd(x.long(), None, "none"), "x must be float32"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_fwd(x, b[:-1], "none"),
         r"bias must have shape \[16\] .*, got \[15\]"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_fwd(x, b.double(), "none"), "bias dtype"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_fwd(x, b.cpu(), "none"), "bias is on cpu"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_bwd(dy[:-1], x, b, "none"),
         r"dy shape \[7, 16\] does not match x shape \[8, 16\]"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_bwd(dy.half(), x, b, "none"), "dy dtype"),
        (lambda x, b, dy: torch.ops.bertkern_cuda.bias_gelu_bwd(dy.cpu(), x, b, "none"), "dy must be a CUDA tensor"),
    ],
    ids=["approximate", "dim", "stride", "dtype", "bias-shape", "bias-dtype", "bias-device", "dy-shape",
         "dy-dtype", "dy-device"],
)
def test_argument_checks(ext, call, message):
    x = torch.randn(8, 16, device="cuda")
    b = torch.randn(16, device="cuda")
    dy = torch.randn(8, 16, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        call(x, b, dy)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(0, 16), (5, 0), (0, 0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_empty(ext, shape, with_bias):
    x = torch.randn(shape, device="cuda")
    b = torch.randn(shape[1], device="cuda") if with_bias else None
    y = torch.ops.bertkern_cuda.bias_gelu_fwd(x, b, "none")
    dx, db = torch.ops.bertkern_cuda.bias_gelu_bwd(x, x, b, "tanh")
    torch.cuda.synchronize()
    assert y.shape == shape and dx.shape == shape
    if with_bias:
        assert db.shape == (shape[1],) and not db.any()  # a sum over no rows is 0
    else:
        assert db.numel() == 0


def _view(M, N, dtype, row_stride, offset):
    """[M, N] rows of a bigger buffer: row stride >= N, starting `offset` elements in (misaligns)."""
    buf = torch.randn(offset + M * row_stride + N, device="cuda").to(dtype)
    return buf.as_strided((M, N), (row_stride, 1), offset)


# (M, N, row_stride, offset): which launch path each one takes for fp32 (vector width 4).
PATHS = {
    "vector": (300, 1024, 1024, 0),
    "vector-row-view": (257, 1536, 1536 + 8, 4),
    "scalar-odd-N": (129, 1003, 1003, 0),
    "scalar-misaligned": (64, 1024, 1024, 1),
    "scalar-row-stride": (64, 1024, 1026, 0),
    "one-row-odd-stride": (1, 768, 7, 0),
    "tiny-N": (1000, 3, 5, 0),
    "fwd-grid-stride": (2_100_000, 2, 2, 0),  # > 65535 row blocks: the forward grid-strides
}


@pytest.mark.gpu
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_launch_paths(ext, path, approximate):
    M, N, row_stride, offset = PATHS[path]
    x = _view(M, N, torch.float32, row_stride, offset)
    dy = _view(M, N, torch.float32, row_stride, offset)
    b = torch.randn(N + 1, device="cuda")[1:] if "misaligned" in path else torch.randn(N, device="cuda")
    y = torch.ops.bertkern_cuda.bias_gelu_fwd(x, b, approximate)
    assert y.is_contiguous()
    torch.testing.assert_close(y, _ref(x, b, approximate), rtol=1e-5, atol=1e-5)
    dx, db = torch.ops.bertkern_cuda.bias_gelu_bwd(dy, x, b, approximate)
    dx_ref, db_ref = _ref_bwd(dy.double(), x.double(), b.double(), approximate)
    torch.testing.assert_close(dx, dx_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db_ref.float(), rtol=1e-4, atol=1e-4 * max(1.0, M**0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_determinism(ext, dtype):
    M, N = 4099, 3072  # a row tail in every launch path
    x = torch.randn(M, N, device="cuda").to(dtype)
    dy = torch.randn(M, N, device="cuda").to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(
        torch.ops.bertkern_cuda.bias_gelu_fwd(x, b, "none"), _ref(x, b, "none"), rtol=tol, atol=tol
    )
    dx1, db1 = torch.ops.bertkern_cuda.bias_gelu_bwd(dy, x, b, "none")
    dx2, db2 = torch.ops.bertkern_cuda.bias_gelu_bwd(dy, x, b, "none")
    assert dx1.dtype == dtype and db1.dtype == dtype
    assert torch.equal(db1, db2) and torch.equal(dx1, dx2), "backward is not deterministic"
    dx_ref, db_ref = _ref_bwd(dy, x, b, "none")
    torch.testing.assert_close(dx1, dx_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(db1.double(), db_ref.double(), rtol=tol, atol=tol * M**0.5)


def _cuobjdump() -> str | None:
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # Triton ships one
        import triton

        return triton.knobs.nvidia.cuobjdump.path
    except Exception:
        return None


def test_binary_has_the_archs_it_claims(ext):
    """Every arch of build_info() has a cubin in the .so, and "+PTX" ones their PTX too (what newer
    GPUs JIT-compile: without it a Blackwell GPU has no kernel image; backend.has_kernel_image)."""
    import subprocess

    tool = _cuobjdump()
    if not tool or not os.path.exists(tool):
        pytest.skip("no cuobjdump")
    m = re.search(r"archs=(\S+)", torch.ops.bertkern_cuda.build_info())
    archs = _arch_list(m.group(1))

    def listed(flag: str, ext_name: str) -> set[str]:
        out = subprocess.run([tool, flag, ext.__file__], capture_output=True, text=True, timeout=120).stdout
        return set(re.findall(rf"\.(sm_\d+[a-z]?)\.{ext_name}", out))

    cubins, ptx = listed("-lelf", "cubin"), listed("-lptx", "ptx")
    for arch in archs:
        sm = "sm_" + arch.split("+")[0].replace(".", "")
        assert sm in cubins, f"{arch}: no {sm} cubin in {ext.__file__} (has {sorted(cubins)})"
        if arch.endswith("+PTX"):
            assert sm in ptx, f"{arch}: no {sm} PTX in {ext.__file__} (has {sorted(ptx)})"
