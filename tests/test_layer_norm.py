"""add_layer_norm and embedding_layer_norm: every backend against a float64 reference (the 2x-of-eager
rule), dropout masks, gradcheck, opcheck, bad input, and HF BERT parity with the fused paths on."""
import pytest
import torch
import torch.nn.functional as F

import bertkern
from bertkern import reference
from bertkern._utils import NormArgs
from harness import (DTYPES, NO_LAUNCH_OPS, assert_close_2x, gradcheck_fast_mode, kernel_backends,
                     launches_and_torch_ops, poison_allocator, randn, skip_unless_usable)

OPTIONAL = ("residual", "weight", "bias", "x_bias")
# (64, 1): with one column the input gradients are 0 only when the statistics come from the sum as
# rounded to the dtype; 64 rows, as one row's sum may happen to be exact
# (a (1, 1) case passed on CPU and failed on a GPU).
SHAPES = [(64, 1), (7, 7), (33, 384), (7, 768), (5, 1023), (2, 3, 384)]


def all_backends():
    """The torch backend plus every kernel backend (as in harness.kernel_backends)."""
    return [pytest.param(("torch", "cpu"), id="torch")] + kernel_backends()


def make_inputs(shape, dtype, device, present=OPTIONAL, noncontig=False, scale=1.0):
    n = shape[-1]
    t = {
        "x": randn(*shape, dtype=dtype, device=device, noncontig=noncontig, scale=scale),
        "residual": randn(*shape, dtype=dtype, device=device, noncontig=noncontig, scale=scale),
        "weight": (1.0 + 0.5 * torch.randn(n, device=device)).to(dtype),
        "bias": (0.5 * torch.randn(n, device=device)).to(dtype),
        "x_bias": (0.5 * torch.randn(n, device=device)).to(dtype),
    }
    return {k: (v if k == "x" or k in present else None) for k, v in t.items()}


def eager_prenorm(x, residual, x_bias, keep=None, p=0.0):
    """The sum eager normalises, in the inputs' dtype: add, dropout (an explicit mask here), add."""
    h = x if x_bias is None else x + x_bias
    if keep is not None:
        h = h * keep.to(h.dtype) * (1.0 / (1.0 - p))
    if residual is not None:
        h = h + residual
    return h


def eager(x, residual, weight, bias, x_bias, eps, keep=None, p=0.0):
    """What a user writes, in the inputs' dtype: add, dropout (an explicit mask here), add, F.layer_norm."""
    h = eager_prenorm(x, residual, x_bias, keep, p)
    return F.layer_norm(h, h.shape[-1:], weight, bias, eps)


def run(fn, inputs, grad, grad_prenorm=None):
    """(outputs..., grads of every present input) of fn(**inputs), by autograd."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    out = fn(**args)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [grad] + ([grad_prenorm] if grad_prenorm is not None else [])
    gs = torch.autograd.grad(outs, list(leaves.values()), grads, allow_unused=True)
    return [o.detach() for o in outs], dict(zip(leaves, gs))


def as64(inputs):
    return {k: (None if v is None else v.double()) for k, v in inputs.items()}


def check_all(out, ref, eag):
    (o_outs, o_grads), (r_outs, r_grads), (e_outs, e_grads) = out, ref, eag
    for i, (o, r, e) in enumerate(zip(o_outs, r_outs, e_outs)):
        assert_close_2x(o, r, e, ["y", "prenorm"][i])
    assert o_grads.keys() == e_grads.keys()
    for k in e_grads:
        assert o_grads[k] is not None, f"no gradient for {k}"
        # Parameter and table gradients are sums over rows, often ~10 in size: the absolute floor scales
        # with them (fp32's 1e-6 is under one ulp there; eager's own error depends on its thread count).
        assert_close_2x(o_grads[k], r_grads[k], e_grads[k], f"d{k}", scale_floor=k not in ("x", "residual"))


def check_against_eager(backend, inputs, grad, eps):
    """add_layer_norm on `backend` vs eager in float64 (the truth) and in the inputs' dtype (the
    error allowed); returns bertkern's (outputs, grads)."""
    out = run(lambda **a: bertkern.ops.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"], eps,
                                                      x_bias=a["x_bias"], backend=backend), inputs, grad)
    ref = run(lambda **a: eager(**a, eps=eps), as64(inputs), grad.double())
    eag = run(lambda **a: eager(**a, eps=eps), inputs, grad)
    check_all(out, ref, eag)
    return out


# ---------------------------------------------------------------- forward + backward vs reference
@pytest.mark.parametrize("backend_device", all_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layer_norm_matches_reference(backend_device, shape, dtype):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    inputs = make_inputs(shape, dtype, device)
    grad = randn(*shape, dtype=dtype, device=device)
    poison_allocator(device)
    check_against_eager(backend, inputs, grad, 1e-5)


# One tile of 8192 columns in every dtype; rows too wide for one tile / the registers (Triton loop
# path, CUDA loop kernel), of odd width, in fp32 and bf16.
WIDE_ROWS = [((2, 8192), dt) for dt in DTYPES] + [((3, 20001), dt) for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("shape,dtype", WIDE_ROWS,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_add_layer_norm_wide_row(backend_device, shape, dtype):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    inputs = make_inputs(shape, dtype, device)
    grad = randn(*shape, dtype=dtype, device=device)
    check_against_eager(backend, inputs, grad, 1e-5)


@pytest.mark.parametrize("backend_device", all_backends())
def test_add_layer_norm_no_rows(backend_device):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    y = bertkern.ops.add_layer_norm(x, torch.randn(0, 3, 16, device=device), w, None, dropout_p=0.1, backend=backend)
    assert y.shape == x.shape
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert gx.shape == x.shape and (gw == 0).all()


PRESENT = [(), ("residual",), ("weight", "bias"), ("x_bias",), ("residual", "x_bias"), ("weight",), ("bias",),
           OPTIONAL]


@pytest.mark.parametrize("backend_device", all_backends())
@pytest.mark.parametrize("present", PRESENT, ids=lambda p: "+".join(p) or "none")
@pytest.mark.parametrize("return_prenorm", [False, True], ids=["y", "prenorm"])
def test_add_layer_norm_optional_inputs(backend_device, present, return_prenorm):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    dtype = torch.float32
    inputs = make_inputs((9, 40), dtype, device, present)
    grad = randn(9, 40, dtype=dtype, device=device)
    gp = randn(9, 40, dtype=dtype, device=device) if return_prenorm else None

    def eager_pre(x, residual, weight, bias, x_bias):
        h = x if x_bias is None else x + x_bias
        h = h if residual is None else h + residual
        y = F.layer_norm(h, h.shape[-1:], weight, bias, 1e-12)
        return (y, h) if return_prenorm else y

    out = run(lambda **a: bertkern.ops.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"],
                                                      x_bias=a["x_bias"], return_prenorm=return_prenorm,
                                                      backend=backend), inputs, grad, gp)
    ref = run(eager_pre, as64(inputs), grad.double(), None if gp is None else gp.double())
    eag = run(eager_pre, inputs, grad, gp)
    check_all(out, ref, eag)


@pytest.mark.parametrize("backend_device", all_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layer_norm_noncontiguous(backend_device, dtype):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    inputs = make_inputs((3, 5, 384), dtype, device, noncontig=True)  # row stride 391
    inputs["weight"] = randn(768, dtype=dtype, device=device)[::2] + 1  # strided parameters
    inputs["x_bias"] = randn(384, 2, dtype=dtype, device=device)[:, 0]
    grad = randn(5, 3, 384, dtype=dtype, device=device).transpose(0, 1)  # non-contiguous upstream grad
    check_against_eager(backend, inputs, grad, 1e-5)


@pytest.mark.parametrize("backend_device", all_backends())
@pytest.mark.parametrize("offset", [0.0, 1000.0], ids=["spread", "offset"])
def test_add_layer_norm_fp16_large_magnitude(backend_device, offset):
    """fp16 rows whose sum of squares is far past fp16's range (and rows far from zero): fp32
    statistics must neither overflow nor cancel."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    dtype = torch.float16
    x = (offset + torch.randn(7, 768, device=device).clamp(-3, 3) * (8000.0 if offset == 0 else 1.0)).to(dtype)
    inputs = {"x": x, "residual": randn(7, 768, dtype=dtype, device=device), "weight": None, "bias": None,
              "x_bias": None}
    grad = randn(7, 768, dtype=dtype, device=device)
    out = check_against_eager(backend, inputs, grad, 1e-5)  # weight, bias, x_bias None
    assert torch.isfinite(out[0][0]).all() and all(torch.isfinite(g).all() for g in out[1].values())


def test_triton_loop_path(monkeypatch):
    """Rows wider than one tile (shrunk here so the interpreter stays fast): chunked statistics,
    a second sweep to normalize, partial column sums in memory (several rows per program: 11 rows, 6
    programs in the interpreter); with dropout and prenorm. Against the one-tile path (the same
    rounding; checked against float64 above)."""
    if torch.cuda.is_available():
        device = "cuda"
    else:
        device = "cpu"
    skip_unless_usable("triton", device)
    from bertkern.triton import layer_norm as tk

    def tile_and_loop(fn):
        tile = fn()
        with monkeypatch.context() as m:
            m.setattr(tk, "MAX_BLOCK_N", 128)
            m.setattr(tk, "LOOP_BLOCK_N", 64)
            assert tk._tiles(300)[3]
            return tile, fn()

    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs((11, 300), dtype, device)
        args = [inputs[k] for k in ("x", "residual", "weight", "bias", "x_bias")]
        seed = torch.tensor([77], dtype=torch.int64, device=device)
        want, got = tile_and_loop(lambda: torch.ops.bertkern.add_layer_norm(*args, seed, 1e-5, 0.25, True, "triton"))
        for name, g, w in zip(["y", "prenorm", "mean", "rstd"], got, want):
            torch.testing.assert_close(g, w, msg=name)
        dy = randn(11, 300, dtype=dtype, device=device)
        dp = randn(11, 300, dtype=dtype, device=device)
        pre, mean, rstd = want[1:]
        want, got = tile_and_loop(lambda: torch.ops.bertkern.add_layer_norm_backward(
            dy, dp, pre, mean, rstd, inputs["weight"], seed, 0.25, True, True, True, "triton"))
        for name, g, w in zip(["dh", "dx", "dweight", "dbias", "dx_bias"], got, want):
            torch.testing.assert_close(g, w, msg=name, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)


@pytest.mark.parametrize("loop", [False, True], ids=["tile", "loop"])
def test_triton_backward_is_two_launches(monkeypatch, loop):
    """The backward kernel, then one column_sum launch for dweight, dbias and dx_bias together: no torch
    reduction or cast (they were 6 launches more), and no zero-fill of the partial rows."""
    from bertkern._utils import NormGradArgs
    from bertkern.triton import layer_norm as tk

    if loop:
        monkeypatch.setattr(tk, "MAX_BLOCK_N", 128)
        monkeypatch.setattr(tk, "LOOP_BLOCK_N", 64)
    h, dy, w = randn(37, 300), randn(37, 300), randn(300)
    args = NormGradArgs(0.1, need_dweight=True, need_dbias=True, need_dx_bias=True)
    seed, mean, rstd = torch.tensor([5], dtype=torch.int64), torch.zeros(37), torch.ones(37)
    call = lambda: tk.backward(dy, None, h, mean, rstd, w, seed, args)  # noqa: E731
    launched, ran = launches_and_torch_ops(tk, call)
    assert launched == ["_add_ln_bwd_kernel", "_column_sum_kernel"]
    assert ran <= NO_LAUNCH_OPS, ran


@pytest.mark.parametrize("count", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_triton_column_sum(count, dtype):
    """The backwards' column sums (bias_gelu's too): more partial rows than one load takes, a ragged
    last column tile, each sum to its own output; fp64 partials for fp64."""
    from bertkern.triton.column_sum import column_sum

    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip_unless_usable("triton", device)
    parts = torch.randn(count, 70, 45, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    got = column_sum(parts, dtype)
    assert len(got) == count
    for g, p in zip(got, parts):
        assert g.dtype == dtype and g.shape == (45,)
        torch.testing.assert_close(g, p.sum(0).to(dtype))


# ---------------------------------------------------------------- gradcheck / opcheck
def _gradcheck_device(backend):
    return "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"


GRADCHECK_BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.5], ids=["nodrop", "drop"])
def test_add_layer_norm_gradcheck(backend, dropout_p):
    """The backward formulas (reference and kernel) against finite differences, in float64, through
    the raw op with a fixed seed (a fixed dropout mask), y and the pre-norm sum both differentiated."""
    device = _gradcheck_device(backend)
    skip_unless_usable(backend, device)
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, r = torch.randn(3, 11, **kw), torch.randn(3, 11, **kw)
    w, b, xb = torch.randn(11, **kw), torch.randn(11, **kw), torch.randn(11, **kw)
    seed = torch.tensor([1234], dtype=torch.int64, device=device) if dropout_p else None

    def fn(x, r, w, b, xb):
        y, pre, _, _ = torch.ops.bertkern.add_layer_norm(x, r, w, b, xb, seed, 1e-5, dropout_p, True, backend)
        return y, pre

    assert torch.autograd.gradcheck(fn, (x, r, w, b, xb), fast_mode=gradcheck_fast_mode(backend, device))


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_add_layer_norm_gradcheck_public(backend):
    device = _gradcheck_device(backend)
    skip_unless_usable(backend, device)
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, w, b = torch.randn(2, 3, 9, **kw), torch.randn(9, **kw), torch.randn(9, **kw)
    assert torch.autograd.gradcheck(lambda x, w, b: bertkern.ops.add_layer_norm(x, None, w, b, backend=backend),
                                    (x, w, b), fast_mode=gradcheck_fast_mode(backend, device))


def test_reference_backward_matches_autograd():
    """reference.add_layer_norm_backward (the torch backend's formula) against autograd of F.layer_norm."""
    h = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 13, dtype=torch.float64)
    y = F.layer_norm(h, (13,), w, None, 1e-5)
    gh, gw = torch.autograd.grad(y, (h, w), dy)
    _, mean, rstd = reference.layer_norm_with_stats(h.detach(), None, None, 1e-5)
    dh, dx, dw, db, dxb = reference.add_layer_norm_backward(dy, h.detach(), mean, rstd, w.detach())
    torch.testing.assert_close(dh, gh)
    torch.testing.assert_close(dw, gw)
    torch.testing.assert_close(db, dy.sum(0))


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_opcheck(backend):
    device = _gradcheck_device(backend)
    skip_unless_usable(backend, device)
    x = torch.randn(4, 3, 16, device=device, requires_grad=True)
    r = torch.randn(4, 3, 16, device=device, requires_grad=True)
    w, b, xb = (torch.randn(16, device=device, requires_grad=True) for _ in range(3))
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    ops = torch.ops.bertkern
    torch.library.opcheck(ops.add_layer_norm.default, (x, r, w, b, xb, seed, 1e-5, 0.1, True, backend))
    torch.library.opcheck(ops.add_layer_norm.default, (x, None, None, None, None, None, 1e-5, 0.0, False, backend))
    y, pre, mean, rstd = ops.add_layer_norm(x, r, w, b, xb, seed, 1e-5, 0.1, True, backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(ops.add_layer_norm_backward.default,
                          (dy, dy, pre.detach(), mean, rstd, w.detach(), seed, 0.1, True, True, True, backend))
    torch.library.opcheck(ops.add_layer_norm_backward.default,
                          (dy, None, pre.detach(), mean, rstd, None, None, 0.0, False, False, False, backend))
    ids = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 1]], device=device)
    word = torch.randn(5, 16, device=device, requires_grad=True)
    pos = torch.randn(8, 16, device=device, requires_grad=True)
    typ = torch.randn(2, 16, device=device, requires_grad=True)
    torch.library.opcheck(ops.embedding_layer_norm.default,
                          (ids, None, torch.zeros_like(ids), word, pos, typ, w, b, 1e-12, 0, True, backend))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the public ops without graph breaks (the torch backend on
    CPU: the Triton kernels under the interpreter cannot run inside compiled CPU graphs)."""
    torch._dynamo.reset()

    def f(x, r, w, b, xb, ids, word, pos):
        y = bertkern.ops.add_layer_norm(x, r, w, b, 1e-5, x_bias=xb, dropout_p=0.1, backend="torch")
        e = bertkern.ops.embedding_layer_norm(ids, None, None, word, pos, None, w, b, backend="torch")
        return y.sum() + e.sum()

    args = (torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 4, 8), torch.randn(8, requires_grad=True),
            torch.randn(8), torch.randn(8), torch.randint(0, 5, (2, 4)), torch.randn(5, 8, requires_grad=True),
            torch.randn(6, 8))
    torch.manual_seed(3)
    want = f(*args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    got = compiled(*args)
    torch.testing.assert_close(got, want)
    got.backward()


def test_autocast_runs_in_float32():
    x = torch.randn(4, 32).bfloat16()
    r = torch.randn(4, 32)
    w, b = torch.randn(32), torch.randn(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bertkern.ops.add_layer_norm(x, r, w, b, 1e-5, backend="torch")
        want = F.layer_norm(x.float() + r, (32,), w, b, 1e-5)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want)


# ---------------------------------------------------------------- dropout
def _prenorm_keep(backend, device, shape, p, seed=None):
    """Run with x = 1, no residual: the pre-norm sum is keep / (1 - p), so it reveals the mask."""
    x = torch.ones(*shape, device=device)
    if seed is not None:
        torch.manual_seed(seed)
    _, pre = bertkern.ops.add_layer_norm(x, None, None, None, dropout_p=p, return_prenorm=True, backend=backend)
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    vals = pre.unique()
    assert all(torch.isclose(v, torch.tensor(0.0, device=device))
               or torch.isclose(v, torch.tensor(scale, device=device))
               for v in vals), vals
    return pre != 0


@pytest.mark.parametrize("backend_device", all_backends())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_reproducibility(backend_device, p):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    shape = (64, 1024)
    keep = _prenorm_keep(backend, device, shape, p, seed=11)
    n = keep.numel()
    rate = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, (rate, 1 - p)
    # Rows and column groups are not copies of each other.
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, :4], keep[:, 4:8])
    assert torch.equal(keep, _prenorm_keep(backend, device, shape, p, seed=11))  # same seed, same mask
    assert not torch.equal(keep, _prenorm_keep(backend, device, shape, p, seed=12))
    assert not torch.equal(keep, _prenorm_keep(backend, device, shape, p))  # a fresh draw


@pytest.mark.parametrize("backend_device", kernel_backends())
def test_dropout_mask_is_the_same_on_every_backend(backend_device):
    """Kernels draw exactly reference.dropout_keep_mask(seed, shape, p) (Philox, counter (col // 8, row))."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    x = torch.ones(37, 300, device=device)
    for s in (0, 1, 2**40 + 3):
        seed = torch.tensor([s], dtype=torch.int64, device=device)
        _, pre, _, _ = torch.ops.bertkern.add_layer_norm(x, None, None, None, None, seed, 1e-5, 0.3, True, backend)
        assert torch.equal(pre != 0, reference.dropout_keep_mask(seed, x.shape, 0.3))
    seed = torch.tensor([9], dtype=torch.int64, device=device)
    pre = torch.ops.bertkern.add_layer_norm(x, None, None, None, None, seed, 1e-5, 1.0, True, backend)[1]
    assert (pre == 0).all()  # p = 1 drops everything


@pytest.mark.parametrize("backend_device", all_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_forward_backward_agree(backend_device, dtype):
    """Gradients equal the reference's computed with the mask recovered from the forward output."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    p, shape = 0.2, (17, 96)
    inputs = make_inputs(shape, dtype, device)
    grad = randn(*shape, dtype=dtype, device=device)
    torch.manual_seed(5)
    out = run(lambda **a: bertkern.ops.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"], 1e-5,
                                                      x_bias=a["x_bias"], dropout_p=p, backend=backend), inputs, grad)
    # Recover the mask: same seed, x = 1 and nothing else -> the pre-norm sum is keep / (1 - p).
    keep = _prenorm_keep(backend, device, shape, p, seed=5)
    ref = run(lambda **a: eager(**a, eps=1e-5, keep=keep, p=p), as64(inputs), grad.double())
    eag = run(lambda **a: eager(**a, eps=1e-5, keep=keep, p=p), inputs, grad)
    check_all(out, ref, eag)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    op = bertkern.ops.add_layer_norm
    x = torch.randn(4, 8)
    w = torch.randn(8)
    with pytest.raises(ValueError, match="weight"):
        op(x, None, torch.randn(7), None)
    with pytest.raises(ValueError, match="bias"):
        op(x, None, w, torch.randn(8, 1))
    with pytest.raises(ValueError, match="x_bias"):
        op(x, None, w, None, x_bias=torch.randn(9))
    with pytest.raises(ValueError, match="residual"):
        op(x, torch.randn(4, 9), w, None)
    with pytest.raises(ValueError, match="x must be a floating"):
        op(torch.ones(4, 8, dtype=torch.int32), None, None, None)
    with pytest.raises(ValueError, match="residual dtype"):
        op(x, torch.randn(4, 8, dtype=torch.float64), None, None)
    with pytest.raises(ValueError, match="weight dtype"):
        op(x, None, w.half(), None)
    with pytest.raises(ValueError, match="residual is on meta"):
        op(x, torch.randn(4, 8, device="meta"), None, None)
    with pytest.raises(ValueError, match="dropout_p"):
        op(x, None, None, None, dropout_p=1.5)
    with pytest.raises(ValueError, match="eps"):
        op(x, None, None, None, eps=-1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\], got nan"):
        op(x, None, None, None, dropout_p=float("nan"))
    with pytest.raises(TypeError, match="eps must be a Python float, got bool"):
        op(x, None, None, None, eps=True)
    with pytest.raises(TypeError, match="x_bias must be a torch.Tensor or None, got list"):
        op(x, None, None, None, x_bias=[0.0] * 8)
    with pytest.raises(ValueError, match="non-empty last dim"):
        op(torch.randn(4, 0), None, None, None)
    with pytest.raises(ValueError, match="backend"):
        op(x, None, None, None, backend="nope")

    emb = bertkern.ops.embedding_layer_norm
    ids = torch.randint(0, 5, (2, 3))
    word, pos, typ = torch.randn(5, 8), torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="input_ids must be int64 or int32, got dtype torch.float32"):
        emb(ids.float(), None, None, word, pos, typ, w, None)
    with pytest.raises(ValueError, match="token_type_ids is on meta but word_embeddings is on cpu"):
        emb(ids, None, torch.zeros(2, 3, dtype=torch.long, device="meta"), word, pos, typ, w, None)
    with pytest.raises(ValueError, match="position_embeddings"):
        emb(ids, None, None, word, torch.randn(4, 9), typ, w, None)
    with pytest.raises(ValueError, match="token_type_embeddings dtype"):
        emb(ids, None, None, word, pos, typ.double(), w, None)
    with pytest.raises(ValueError, match="token_type_ids"):
        emb(ids, None, torch.zeros(2, 4, dtype=torch.long), word, pos, typ, w, None)
    with pytest.raises(ValueError, match="weight"):
        emb(ids, None, None, word, pos, typ, torch.randn(7), None)
    with pytest.raises(ValueError, match="input_ids has values outside"):
        emb(ids + 5, None, None, word, pos, typ, w, None)
    with pytest.raises(ValueError, match="sequence length"):
        emb(torch.randint(0, 5, (2, 6)), None, None, word, pos, typ, w, None)


# ---------------------------------------------------------------- embedding_layer_norm
def emb_eager(ids, pids, tids, word, pos, typ, weight, bias, eps=1e-12, padding_idx=None):
    """HF BertEmbeddings (no dropout) in the tables' dtype."""
    e = F.embedding(ids, word, padding_idx=padding_idx)
    if typ is not None:
        e = e + F.embedding(tids if tids is not None else torch.zeros_like(ids), typ)
    if pos is not None:
        pids = pids if pids is not None else torch.arange(ids.shape[-1], device=ids.device)
        e = e + F.embedding(pids.expand(ids.shape), pos)
    return F.layer_norm(e, e.shape[-1:], weight, bias, eps)


# Keys: pids / tids: None (arange(S) / zeros), "given" [B, S], "row" [1, S] (+ 2), "1d" [S] (+ 1),
# "expanded" (a stride-0 view); typ / pos: the table present; index: the ids' dtype (position ids
# stay int64: mixed index dtypes); affine: weight and bias; grad: False runs the forward alone (no
# pre-norm sum stored); B: batch rows (0: no tokens), lead: the ids' leading dims (default (B,));
# strided: tables as row views of wider buffers.
EMB_CASES = {
    "all": dict(pids="given", tids="given", typ=True),
    "defaults": dict(pids=None, tids=None, typ=True),
    "broadcast-ids": dict(pids="row", tids="expanded", typ=True),
    "no-types": dict(pids=None, tids=None, typ=False),
    "int32-ids": dict(pids="1d", tids="given", typ=True, index=torch.int32),
    "word-only": dict(pids="given", tids="given", typ=False, pos=False, affine=False),
    "no-grad": dict(pids="row", tids=None, typ=True, grad=False),
    "strided": dict(pids=None, tids="given", typ=True, strided=True),
    "no-tokens": dict(pids=None, tids=None, typ=True, B=0),
    "3d-ids": dict(pids="row", tids="given", typ=True, lead=(2, 2)),
}


def check_embedding(backend, device, dtype, case, n, S=9):
    """embedding_layer_norm on `backend` (forward and, unless the case says grad=False, backward through
    autograd) against float64 eager by the 2x rule, outputs poisoned first."""
    c = EMB_CASES[case]
    V, index = 5, c.get("index", torch.int64)  # few ids: many repeats, so table gradients must accumulate
    lead = c.get("lead", (c.get("B", 3),))
    ids = torch.randint(0, V, (*lead, S), device=device).to(index)
    pids = {"given": torch.randint(0, 12, (*lead, S), device=device), "row": torch.arange(S, device=device)[None] + 2,
            "1d": torch.arange(S, device=device) + 1, None: None}[c["pids"]]
    tids = {"given": torch.randint(0, 2, (*lead, S), device=device).to(index),
            "expanded": torch.zeros((), dtype=index, device=device).expand(*lead, S), None: None}[c["tids"]]
    noncontig = c.get("strided", False)
    tables = {"word": randn(V, n, dtype=dtype, device=device, noncontig=noncontig),
              "pos": randn(12, n, dtype=dtype, device=device, noncontig=noncontig) if c.get("pos", True) else None,
              "typ": randn(2, n, dtype=dtype, device=device, noncontig=noncontig) if c["typ"] else None,
              "weight": (1 + 0.5 * torch.randn(n, device=device)).to(dtype) if c.get("affine", True) else None,
              "bias": (0.5 * torch.randn(n, device=device)).to(dtype) if c.get("affine", True) else None}
    grad = randn(*lead, S, n, dtype=dtype, device=device)
    pad = 1 if case == "all" else None
    eps = 1e-5  # not BERT's 1e-12: fp16 eager rounds that to 0, and a one-column row has variance 0

    def fused(word, pos, typ, weight, bias):
        return bertkern.ops.embedding_layer_norm(ids, pids, tids, word, pos, typ, weight, bias, eps,
                                                 padding_idx=pad, backend=backend)

    def eag_fn(word, pos, typ, weight, bias):
        return emb_eager(ids.long(), pids, None if tids is None else tids.long(), word, pos, typ, weight, bias, eps,
                         padding_idx=pad)

    poison_allocator(device)
    if not c.get("grad", True):
        y = fused(**tables)
        with torch.no_grad():
            assert_close_2x(y, eag_fn(**{k: v if v is None else v.double() for k, v in tables.items()}),
                            eag_fn(**tables), "y")
        return
    out = run(fused, tables, grad)
    ref = run(eag_fn, as64(tables), grad.double())
    eag = run(eag_fn, tables, grad)
    check_all(out, ref, eag)
    assert out[0][0].shape == (*lead, S, n)
    if pad is not None:
        assert (out[1]["word"][pad] == 0).all()


@pytest.mark.parametrize("backend_device", all_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(EMB_CASES))
@pytest.mark.parametrize("n", [1, 7, 384])
def test_embedding_layer_norm(backend_device, dtype, case, n):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    check_embedding(backend, device, dtype, case, n)


def test_embedding_deterministic_mode():
    ids = torch.randint(0, 3, (4, 6))
    word = torch.randn(3, 16, requires_grad=True)
    pos = torch.randn(6, 16)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y = bertkern.ops.embedding_layer_norm(ids, None, None, word, pos, None, None, None, backend="torch")
        (g,) = torch.autograd.grad(y, word, torch.ones_like(y))
    finally:
        torch.use_deterministic_algorithms(prev)
    want = torch.autograd.grad(emb_eager(ids, None, None, word, pos, None, None, None), word, torch.ones_like(y))[0]
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("backend_device", [p for p in kernel_backends() if p.values[0][0] == "triton"])
def test_embedding_ids_out_of_range_triton(backend_device):
    """Rows with an id outside its table (negative or too large, in any of the three) come out NaN and
    read nothing; the other rows are unaffected (as the CUDA kernel, tests/test_layer_norm_emulated.py).
    The public op checks the ids of CPU tensors first, so the Triton launcher is called directly."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    from bertkern.triton import layer_norm as triton_ln

    word, pos, typ = (randn(r, 64, dtype=torch.float16, device=device) for r in (5, 4, 2))
    ids = torch.tensor([[0, 5, 1, 2], [-1, 4, 3, 0]], dtype=torch.int32, device=device)
    tids = torch.tensor([[0, 0, 2, 1], [0, 1, 1, 0]], device=device)
    pids = torch.tensor([[0, 1, 2, 3], [3, 2, -2, 9]], device=device)
    bad = torch.tensor([[False, True, True, False], [True, False, True, True]], device=device).flatten()
    y, pre, mean, rstd = triton_ln.embedding_forward((ids, pids, tids), (word, pos, typ), None, None,
                                                     NormArgs(1e-5, store_prenorm=True))
    for t in (y, pre, mean, rstd):
        assert t[bad].isnan().all() and not t[~bad].isnan().any()
    e = word[ids.long().clamp(0, 4)].double() + typ[tids.clamp(0, 1)].double() + pos[pids.clamp(0, 3)].double()
    want = F.layer_norm(e.to(torch.float16).double(), (64,), eps=1e-5).flatten(0, 1)
    assert_close_2x(y[~bad], want[~bad], want[~bad].half(), "y")


def test_embedding_wider_than_triton_tile_falls_back_visibly(monkeypatch):
    """A hidden size past the Triton kernel's single tile runs on the torch backend, with a warning,
    and observe() reports "torch" (what ran), not "triton"."""
    from bertkern import backend as _backend
    from bertkern.triton import layer_norm as tk

    skip_unless_usable("triton", "cpu")
    monkeypatch.setattr(tk, "MAX_BLOCK_N", 64)
    monkeypatch.setattr(_backend, "_WARNED", set())
    ids = torch.randint(0, 5, (2, 3))
    word, pos = torch.randn(5, 100), torch.randn(4, 100)
    with pytest.warns(UserWarning, match="wider than the embedding kernel"), _backend.observe() as calls:
        y = bertkern.ops.embedding_layer_norm(ids, None, None, word, pos, None, None, None, backend="triton")
    assert calls == [("embedding_layer_norm", "torch")]
    torch.testing.assert_close(y, emb_eager(ids, None, None, word, pos, None, None, None))


# ---------------------------------------------------------------- nn modules
@pytest.mark.parametrize("backend_device", all_backends())
def test_nn_modules(backend_device):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    ln = torch.nn.LayerNorm(48, device=device)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    fused = bertkern.nn.FusedLayerNorm.from_layer_norm(ln, backend=backend)
    x = torch.randn(5, 48, device=device)
    torch.testing.assert_close(fused(x), ln(x))
    new = bertkern.nn.FusedLayerNorm(48, backend=backend, device=device)
    new.load_state_dict(ln.state_dict())
    torch.testing.assert_close(new(x), ln(x))
    add = bertkern.nn.FusedAddLayerNorm(48, eps=1e-5, dropout_p=0.5, backend=backend, device=device)
    add.load_state_dict(ln.state_dict())
    r = torch.randn(5, 48, device=device)
    add.eval()
    torch.testing.assert_close(add(x, r), ln(x + r))
    add.train()
    assert not torch.allclose(add(x, r), ln(x + r))
    emb = bertkern.nn.FusedEmbeddingLayerNorm(11, 48, max_position_embeddings=9, backend=backend, device=device)
    ids = torch.randint(0, 11, (2, 9), device=device)
    tt = torch.randint(0, 2, (2, 9), device=device)
    want = emb_eager(ids, None, tt, emb.word_embeddings.weight, emb.position_embeddings.weight,
                     emb.token_type_embeddings.weight, emb.LayerNorm.weight, emb.LayerNorm.bias)
    torch.testing.assert_close(emb(ids, token_type_ids=tt), want)


# ---------------------------------------------------------------- HF BERT parity
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bert_parity_with_fused_layer_norm(backend, monkeypatch):
    transformers = pytest.importorskip("transformers")
    models = pytest.importorskip("bertkern.models")
    device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
    skip_unless_usable(backend, device)
    monkeypatch.setenv("BERTKERN_BACKEND", backend)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=24, type_vocab_size=2,
                                  attn_implementation="eager")
    hf = transformers.BertModel(cfg).to(device).eval()
    ours = models.BertModel.from_hf(hf, fused_layer_norm=True, fused_embeddings=True).to(device).eval()
    ids = torch.randint(1, 50, (2, 11), device=device)
    types = torch.randint(0, 2, (2, 11), device=device)
    mask = torch.ones(2, 11, dtype=torch.long, device=device)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0]
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
