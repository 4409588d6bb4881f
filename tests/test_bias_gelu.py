import pytest
import torch
import torch.nn.functional as F

import bertkern
from bertkern import reference
from harness import (DTYPES, NO_LAUNCH_OPS, assert_close_2x, assert_float8_falls_back_visibly, gradcheck_fast_mode,
                     kernel_backends, launches_and_torch_ops, poison_allocator, randn, skip_unless_usable)

SHAPES = [(1, 384), (97, 768), (97, 1023), (5, 3072), (3, 4096), (2, 7, 384)]
APPROX = ["none", "tanh"]


def eager(x, bias, approximate):
    """What a user would write: an add then F.gelu, in x's dtype."""
    return F.gelu(x + bias if bias is not None else x, approximate=approximate)


def run_fwd_bwd(fn, x, bias, grad):
    x = x.detach().requires_grad_()
    b = None if bias is None else bias.detach().requires_grad_()
    y = fn(x, b)
    y.backward(grad)
    return y.detach(), x.grad, (None if b is None else b.grad)


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_bias_gelu_matches_reference(backend_device, shape, dtype, approximate, has_bias):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    x = randn(*shape, dtype=dtype, device=device, scale=2.0)
    bias = randn(shape[-1], dtype=dtype, device=device) if has_bias else None
    grad = randn(*shape, dtype=dtype, device=device)

    poison_allocator(device)
    out = run_fwd_bwd(lambda x, b: bertkern.ops.bias_gelu(x, b, approximate=approximate, backend=backend),
                      x, bias, grad)
    ref = run_fwd_bwd(lambda x, b: eager(x, b, approximate),
                      x.double(), None if bias is None else bias.double(), grad.double())
    eag = run_fwd_bwd(lambda x, b: eager(x, b, approximate), x, bias, grad)
    for name, o, r, e in zip(["y", "dx", "dbias"], out, ref, eag):
        if e is None:
            assert o is None
            continue
        assert_close_2x(o, r, e, name)


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_noncontiguous(backend_device, dtype):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    x = randn(6, 5, 384, dtype=dtype, device=device, noncontig=True)  # row stride 391
    xt = randn(384, 6, dtype=dtype, device=device).t()  # column-major: the op must copy, not misread
    bias = randn(1000, dtype=dtype, device=device)[::2][:384]  # strided bias
    grad = randn(6, 5, 384, dtype=dtype, device=device).transpose(0, 1)  # non-contiguous upstream grad
    for inp, g in [(x, grad.transpose(0, 1)), (xt, randn(6, 384, dtype=dtype, device=device))]:
        out = run_fwd_bwd(lambda x, b: bertkern.ops.bias_gelu(x, b, backend=backend), inp, bias, g)
        ref = run_fwd_bwd(lambda x, b: eager(x, b, "none"), inp.double(), bias.double(), g.double())
        eag = run_fwd_bwd(lambda x, b: eager(x, b, "none"), inp, bias, g)
        for name, o, r, e in zip(["y", "dx", "dbias"], out, ref, eag):
            assert_close_2x(o, r, e, name)


def test_triton_backward_is_two_launches():
    """The backward kernel, then column_sum for dbias: no torch reduction or cast."""
    from bertkern.triton import bias_gelu as tk

    x, dy, bias = randn(37, 200), randn(37, 200), randn(200)
    launched, ran = launches_and_torch_ops(tk, lambda: tk.backward(dy, x, bias, "none"))
    assert launched == ["_bias_gelu_bwd_kernel", "_column_sum_kernel"]
    assert ran <= NO_LAUNCH_OPS, ran


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu_gradcheck(backend, approximate):
    """The backward formulas (reference and kernel) against finite differences, in float64."""
    device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
    skip_unless_usable(backend, device)
    x = torch.randn(9, 33, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(33, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: bertkern.ops.bias_gelu(x, b, approximate=approximate, backend=backend), (x, b),
        fast_mode=gradcheck_fast_mode(backend, device),
    )


def test_reference_gelu_grad_matches_autograd():
    h = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    for approximate in APPROX:
        (g,) = torch.autograd.grad(F.gelu(h, approximate=approximate).sum(), h)
        torch.testing.assert_close(reference.gelu_grad(h.detach(), approximate), g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_gelu_opcheck(backend):
    skip_unless_usable(backend, "cpu")
    x = torch.randn(4, 3, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    torch.library.opcheck(torch.ops.bertkern.bias_gelu.default, (x, b, "tanh", backend))
    torch.library.opcheck(torch.ops.bertkern.bias_gelu.default, (x, None, "none", backend))
    g = torch.randn(4, 3, 40)
    torch.library.opcheck(torch.ops.bertkern.bias_gelu_backward.default, (g, x.detach(), b.detach(), "none", backend))


def test_bias_gelu_compiles_without_graph_breaks():
    x, b = torch.randn(8, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    fn = torch.compile(lambda x, b: bertkern.ops.bias_gelu(x, b, backend="torch") * 2, fullgraph=True)
    y = fn(x, b)
    y.sum().backward()
    torch.testing.assert_close(y, 2 * F.gelu(x + b))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bias_gelu_compiles_on_gpu(backend):
    skip_unless_usable(backend, "cuda")
    x = torch.randn(64, 3072, device="cuda", dtype=torch.float16)
    b = torch.randn(3072, device="cuda", dtype=torch.float16)
    fn = torch.compile(lambda x, b: bertkern.ops.bias_gelu(x, b, backend=backend), fullgraph=True)
    assert_close_2x(fn(x, b), eager(x.double(), b.double(), "none"), eager(x, b, "none"))


def test_bias_gelu_empty_and_scalar_free_shapes():
    x = torch.randn(0, 16)
    assert bertkern.ops.bias_gelu(x, torch.randn(16), backend="triton").shape == (0, 16)
    assert bertkern.ops.bias_gelu(torch.randn(16), torch.randn(16), backend="triton").shape == (16,)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(7)), ValueError, "bias must have shape \\[8\\]"),
        (lambda: (torch.randn(4, 8), torch.randn(2, 8)), ValueError, "bias must have shape"),
        (lambda: (torch.randint(0, 5, (4, 8)), None), ValueError, "x must be a floating-point tensor"),
        (lambda: (torch.randn(4, 8), torch.randn(8, dtype=torch.float64)), ValueError, "bias dtype"),
        (lambda: (torch.randn(4, 8), torch.randn(8, device="meta")), ValueError, "bias is on meta"),
        (lambda: (torch.tensor(1.0), None), ValueError, "at least one dimension"),
        (lambda: ([1.0, 2.0], None), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bias_gelu_bad_input(make, error, match):
    x, b = make()
    with pytest.raises(error, match=match):
        bertkern.ops.bias_gelu(x, b)


def test_bias_gelu_bad_options():
    with pytest.raises(ValueError, match="approximate must be one of"):
        bertkern.ops.bias_gelu(torch.randn(2, 4), approximate="sigmoid")
    with pytest.raises(ValueError, match="backend must be one of"):
        bertkern.ops.bias_gelu(torch.randn(2, 4), backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            bertkern.ops.bias_gelu(torch.randn(2, 4), backend="cuda")


def test_bias_gelu_env_backend(monkeypatch):
    monkeypatch.setenv("BERTKERN_BACKEND", "torch")
    x, b = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(bertkern.ops.bias_gelu(x, b), F.gelu(x + b))


def test_bias_gelu_unsupported_dtype_falls_back_visibly():
    assert_float8_falls_back_visibly(bertkern.ops.bias_gelu)


def test_bias_gelu_module():
    m = bertkern.nn.BiasGELU(16, approximate="tanh", backend="triton")
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(4, 16, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.gelu(x + m.bias, approximate="tanh"))
    y.sum().backward()
    assert m.bias.grad is not None and x.grad is not None


def test_bias_gelu_under_autocast_casts_the_fp32_bias():
    x, b = torch.randn(4, 32), torch.randn(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x.bfloat16()
        y = bertkern.ops.bias_gelu(h, b, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.gelu(h + b.bfloat16()))
    with pytest.raises(ValueError, match="bias dtype"):  # outside autocast a mismatch is an error
        bertkern.ops.bias_gelu(x.bfloat16(), b)
