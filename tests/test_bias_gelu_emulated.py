"""csrc/bias_gelu.cu's CUDA kernels run on the CPU through the emulation in tests/cuda_emu (threads for
CUDA threads, NaN-poisoned dynamic shared memory, 4 SMs), so that a machine without a GPU checks the
kernels' own code: the 16-byte vector and the scalar paths in every dtype (fp32, fp16, bf16, fp64),
erf and tanh GELU, with and without bias, column tiles of odd widths (whole-warp rounding, idle
threads, by = 1 with no shared memory, by > 1 with it), row tails, row views of bigger buffers,
several row chunks of dbias partial sums (the emulated occupancy gives one block per SM, so one
wave is 4 blocks) and the reduction of those partial rows, empty shapes and the C++ argument checks.
The checks are test_bias_gelu.py's (float64 reference, the 2x-of-eager rule), through
bertkern.ops.bias_gelu's backend="cuda" path with torch.ops.bertkern_cuda pointed at the emulated ops.

Not covered here: the forward's grid-stride over more than 65535 row blocks (millions of rows, too
many emulated threads; test_extension.py's gpu test "fwd-grid-stride" runs it); more than 16 row
chunks (the reduction's lanes striding over partial rows: 4 emulated blocks per wave give at most
4); the device-mismatch checks (every tensor is a CPU one here, and a meta tensor sends the
dispatcher to a Meta kernel instead); and the real hardware (libdevice erff/expf rounding,
timing). The gpu-marked tests cover those on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import bertkern
import emulation
import test_bias_gelu
from harness import assert_close_2x, randn
from test_bias_gelu import APPROX, eager, run_fwd_bwd

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


emulated, cuda = emulation.fixtures("bias_gelu")


def check(backend, x, bias, grad, approximate):
    """Forward and backward (y, dx, dbias) against float64 eager, eager in x's dtype the yardstick."""
    ops = (lambda x, b: bertkern.ops.bias_gelu(x, b, approximate=approximate, backend=backend),
           lambda x, b: eager(x, b, approximate))
    out = run_fwd_bwd(ops[0], x, bias, grad)
    ref = run_fwd_bwd(ops[1], x.double(), None if bias is None else bias.double(), grad.double())
    eag = run_fwd_bwd(ops[1], x, bias, grad)
    for name, o, r, e in zip(["y", "dx", "dbias"], out, ref, eag):
        if e is None:
            assert o is None, name
        else:
            assert_close_2x(o, r, e, name)


# Launch configuration per shape (V = 4 fp32, 8 fp16/bf16, 2 fp64; tiles of bx column threads x by rows,
# backward row chunks of a multiple of 4 * by rows):
#  (3, 7, 40)  [21 x 40]  vector in every dtype; bx = 32, by = 8 (10 / 5 / 20 vectors: idle lanes)
#  (37, 33)               scalar everywhere; bx = 64 (31 idle), by = 4; 3 row chunks, the last 5 rows
#  (50, 136)              fp32 vector bx = 64 by = 4, 4 chunks (the last 2 rows); fp16/bf16 vector
#                         bx = 32 by = 8, 2 chunks; fp64 vector bx = 96 by = 2 (192-thread blocks)
#  (9, 131)               scalar, bx = 160 (29 idle), by = 1: no shared memory in the backward;
#                         3 chunks of 4 rows, the last 1 row
SHAPES = [(3, 7, 40), (37, 33), (50, 136), (9, 131)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(cuda, dtype, shape, approximate, has_bias):
    x = randn(*shape, dtype=dtype, scale=2.0)
    bias = randn(shape[-1], dtype=dtype) if has_bias else None
    check(cuda, x, bias, randn(*shape, dtype=dtype), approximate)


def rows_view(M, N, dtype, row_stride, offset):
    """[M, N] rows of a bigger buffer: row stride >= N, starting `offset` elements in (misaligns)."""
    buf = randn(offset + M * row_stride + N, dtype=dtype)
    return buf.as_strided((M, N), (row_stride, 1), offset)


# (dtype, M, N, row_stride, offset): the launch path each one takes (test_extension.py's PATHS, small).
PATHS = {
    "vector": (torch.float32, 40, 128, 128, 0),
    "vector-row-view": (torch.float32, 37, 96, 96 + 8, 4),
    "vector-by1-col-tail": (torch.float32, 9, 520, 520, 0),  # 130 vectors: bx = 160, by = 1
    "vector-by1-fp64": (torch.float64, 11, 258, 260, 2),  # 129 vectors: bx = 160, by = 1
    "vector-fp16-row-view": (torch.float16, 19, 64, 72, 8),
    "scalar-two-col-tiles": (torch.float32, 13, 301, 301, 0),  # 2 tiles of 160: 2 row chunks
    "scalar-odd-N": (torch.float32, 29, 45, 45, 0),
    "scalar-misaligned": (torch.float32, 20, 64, 64, 1),
    "scalar-misaligned-fp16": (torch.float16, 20, 64, 64, 4),
    "scalar-row-stride": (torch.float32, 20, 64, 66, 0),
    "scalar-row-stride-bf16": (torch.bfloat16, 20, 64, 68, 0),
    "one-row-odd-stride": (torch.float32, 1, 96, 7, 0),  # M == 1: the row stride is never read
    "tiny-N": (torch.float32, 300, 3, 5, 0),  # 4 row chunks of 96 rows, the last 12 rows
    "one-column": (torch.float32, 33, 1, 3, 0),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("approximate", APPROX)
def test_launch_paths(cuda, path, approximate):
    """Row views reach the kernels as they are (as_rows keeps them): x and dy strided, misaligned
    starts, a misaligned bias (contiguous, so the op keeps it), one row, one column."""
    dtype, M, N, row_stride, offset = PATHS[path]
    x = rows_view(M, N, dtype, row_stride, offset)
    dy = rows_view(M, N, dtype, row_stride, offset)
    bias = randn(N + 1, dtype=dtype)[1:] if "misaligned" in path else randn(N, dtype=dtype)
    y = bertkern.ops.bias_gelu(x, bias, approximate=approximate, backend=cuda)
    dx, dbias = torch.ops.bertkern.bias_gelu_backward(dy, x, bias, approximate, cuda)
    assert y.is_contiguous() and dx.is_contiguous()
    ref = run_fwd_bwd(lambda x, b: eager(x, b, approximate), x.double(), bias.double(), dy.double())
    eag = run_fwd_bwd(lambda x, b: eager(x, b, approximate), x, bias, dy)
    for name, o, r, e in zip(["y", "dx", "dbias"], (y, dx, dbias), ref, eag):
        assert_close_2x(o, r, e, name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_thread_order_gives_the_same_bits(cuda, monkeypatch, shape):
    """Forward and backward (dbias: partial sums through shared memory, then their reduction) under
    every thread order: a shared-memory race would change some bits (tests/emulation.py)."""
    x, dy = randn(*shape, dtype=torch.float16, scale=2.0), randn(*shape, dtype=torch.float16)
    bias = randn(shape[-1], dtype=torch.float16)

    def outputs():
        y = bertkern.ops.bias_gelu(x, bias, approximate="tanh", backend=cuda)
        return (y, *torch.ops.bertkern.bias_gelu_backward(dy, x, bias, "tanh", cuda))

    emulation.same_bits_in_every_order(monkeypatch, outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_noncontiguous(cuda, dtype):
    """test_bias_gelu's non-contiguous inputs: a row view (stride 391), a column-major x (copied), a
    strided bias, a transposed upstream gradient."""
    test_bias_gelu.test_bias_gelu_noncontiguous((cuda, "cpu"), dtype)


@pytest.mark.parametrize("shape", [(0, 16), (5, 0), (0, 0)])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_empty(cuda, shape, has_bias):
    """The C++ ops themselves (the public op answers empty inputs before reaching them): no launch,
    a dbias of zeros (the sum over no rows) or an empty one without bias."""
    ops = torch.ops.bertkern_cuda
    x = torch.randn(shape)
    b = torch.randn(shape[1]) if has_bias else None
    assert ops.bias_gelu_fwd(x, b, "none").shape == shape
    dx, db = ops.bias_gelu_bwd(x, x, b, "tanh")
    assert dx.shape == shape
    if has_bias:
        assert db.shape == (shape[1],) and not db.any()
    else:
        assert db.numel() == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda o, x, b, dy: o.bias_gelu_fwd(x, b, "erf"), "approximate must be 'none' or 'tanh'"),
        (lambda o, x, b, dy: o.bias_gelu_bwd(dy, x, b, "sigmoid"), "approximate must be 'none' or 'tanh'"),
        (lambda o, x, b, dy: o.bias_gelu_fwd(x[None], b, "none"),
         r"x must be 2-D \[M, N\], got 3-D shape \[1, 8, 16\]"),
        (lambda o, x, b, dy: o.bias_gelu_fwd(x.t(), None, "none"),
         r"x must have unit stride .*, got strides \[1, 16\]"),
        (lambda o, x, b, dy: o.bias_gelu_bwd(dy.t(), x.t(), None, "none"), r"x must have unit stride"),
        (lambda o, x, b, dy: o.bias_gelu_fwd(x.long(), None, "none"), "x must be float32"),
        (lambda o, x, b, dy: o.bias_gelu_fwd(x, b[:-1], "none"), r"bias must have shape \[16\] .*, got \[15\]"),
        (lambda o, x, b, dy: o.bias_gelu_bwd(dy, x, b[None], "none"), r"bias must have shape \[16\] .*, got \[1, 16\]"),
        (lambda o, x, b, dy: o.bias_gelu_fwd(x, b.double(), "none"), "bias dtype"),
        (lambda o, x, b, dy: o.bias_gelu_bwd(dy[:-1], x, b, "none"),
         r"dy shape \[7, 16\] does not match x shape \[8, 16\]"),
        (lambda o, x, b, dy: o.bias_gelu_bwd(dy.half(), x, b, "none"), "dy dtype"),
        (lambda o, x, b, dy: o.bias_gelu_bwd(dy[None], x, b, "none"), "dy must be 2-D"),
    ],
    ids=["approximate", "bwd-approximate", "dim", "stride", "bwd-stride", "dtype", "bias-shape",
         "bwd-bias-shape", "bias-dtype", "dy-shape", "dy-dtype", "dy-dim"],
)
def test_argument_checks(cuda, call, message):
    """The host-side checks the real ops share (they run before any launch)."""
    x, b, dy = torch.randn(8, 16), torch.randn(16), torch.randn(8, 16)
    with pytest.raises(RuntimeError, match=message):
        call(torch.ops.bertkern_cuda, x, b, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tanh_grad_over_the_whole_range(cuda, dtype):
    """The tanh backward's one-exp sigmoid pair (e = exp(-2|u|)) at both signs, near 0 and where
    exp(2|u|) would overflow (|h| of 10 to 60): no NaN, and the 2x rule against float64."""
    x = torch.cat([torch.linspace(-60, 60, 121), torch.linspace(-3, 3, 119)]).to(dtype).reshape(8, 30)
    check(cuda, x, None, randn(8, 30, dtype=dtype), "tanh")
