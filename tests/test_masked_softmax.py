"""bertkern.ops.masked_softmax: every mask form x dtype x odd lengths against a float64 reference
(forward and backward, the 2x-of-eager rule), fully masked rows, NaN under the mask, strides,
dropout (statistics, reproducibility, forward/backward agreement, same mask on every backend),
gradcheck, opcheck, torch.compile, bad input, and parity of the fused BERT path with Hugging Face."""
from __future__ import annotations

import math
import os

import pytest
import torch

import bertkern
from bertkern import reference
from harness import (DTYPES, assert_close_2x, assert_float8_falls_back_visibly, gradcheck_fast_mode, kernel_backends,
                     poison_allocator, randn, skip_unless_usable)

NEG_INF = float("-inf")


# ---------------------------------------------------------------- helpers
def make_mask(form: str, B: int, H: int, S_q: int, S_k: int, dtype, device="cpu"):
    """A mask of `form` ("<shape>[:<kind>]"; shape b11s = [B,1,1,S_k], b1ss, bhss, expanded = a
    [B,1,1,S_k] mask expanded to [B,H,S_q,S_k] with stride 0, s = [S_k], ss = [S_q,S_k]; kind bool
    (default), inf / min (additive 0 or -inf / finfo.min), soft (additive values, masked = -10000)).
    About 30% of keys are masked; the 4-D and 2-D forms also have fully masked rows and a one-key row."""
    g = torch.Generator().manual_seed(1)
    if form == "none":
        return None
    shape = {
        "b11s": (B, 1, 1, S_k), "b1ss": (B, 1, S_q, S_k), "bhss": (B, H, S_q, S_k),
        "expanded": (B, 1, 1, S_k), "s": (S_k,), "ss": (S_q, S_k),
    }[form.split(":")[0]]
    keep = torch.rand(shape, generator=g) > 0.3
    if len(shape) == 4:
        keep[0, ..., 0, :] = False  # fully masked rows
        if S_k > 1:
            keep[-1, ..., -1, 1:] = False  # a row with one key
    elif len(shape) == 2:
        keep[0] = False
    else:
        keep[0] = True
    keep = keep.to(device)
    kind = form.split(":")[1] if ":" in form else "bool"
    if kind == "bool":
        m = keep
    elif kind == "inf":
        m = torch.where(keep, 0.0, NEG_INF).to(dtype)
    elif kind == "min":
        m = torch.where(keep, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    elif kind == "soft":  # a soft additive mask with some non-zero kept values (ALiBi-like)
        m = torch.where(keep, torch.rand(shape, generator=g).to(device), -10000.0).to(dtype)
    else:
        raise ValueError(kind)
    if form.startswith("expanded"):
        m = m.expand(B, H, S_q, S_k)
    return m


def fwd_bwd(fn, scores, grad):
    x = scores.detach().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def check_fwd_bwd(backend, scores, mask, grad, scale=0.5, dropout_p=0.0, seed=None):
    """The op (through its custom op, so the seed is ours) against the float64 reference, with the
    reference in the scores' dtype as eager, for y and d scores."""
    op = torch.ops.bertkern.masked_softmax

    def ours(x):
        return op(x, mask, scale, dropout_p, seed, backend)[0]

    def ref(x):
        return reference.masked_softmax(x, mask, scale, dropout_p, seed=seed)

    poison_allocator(scores.device.type)
    out = fwd_bwd(ours, scores, grad)
    ref64 = fwd_bwd(ref, scores.double(), grad.double())
    eager = fwd_bwd(ref, scores, grad)
    for name, o, r, e in zip(["y", "dscores"], out, ref64, eager):
        assert_close_2x(o, r, e, name)
    return out


def seed_tensor(value: int, device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


# ---------------------------------------------------------------- accuracy over mask forms
MASK_FORMS = ["none", "b11s", "b1ss", "bhss", "expanded", "b11s:inf", "b11s:min", "b1ss:soft", "expanded:min",
              "s", "ss:inf"]


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S", [1, 7, 77, 129])
@pytest.mark.parametrize("form", MASK_FORMS)
def test_masked_softmax_matches_reference(backend_device, dtype, S, form):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    B, H = 2, 3
    scores = randn(B, H, S, S, dtype=dtype, device=device, scale=3.0)
    mask = make_mask(form, B, H, S, S, dtype, device)
    grad = randn(B, H, S, S, dtype=dtype, device=device)
    y, dx = check_fwd_bwd(backend, scores, mask, grad, scale=0.7)
    if mask is not None:  # masked keys get exactly 0, and so does their gradient
        masked = ~reference.keep_mask(mask).expand(scores.shape)
        assert (y[masked] == 0).all() and (dx[masked] == 0).all()


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["b11s", "bhss:min"])
def test_masked_softmax_bert_length(backend_device, dtype, form):
    """S = 512 (BERT's longest), with dropout."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    scores = randn(1, 2, 16, 512, dtype=dtype, device=device, scale=4.0)
    mask = make_mask(form, 1, 2, 16, 512, dtype, device)
    grad = randn(1, 2, 16, 512, dtype=dtype, device=device)
    check_fwd_bwd(backend, scores, mask, grad, scale=0.125, dropout_p=0.1, seed=seed_tensor(7, device))


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_softmax_long_rows(backend_device, dtype):
    """S_k = 2048 in one program (registers)."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    scores = randn(1, 1, 4, 2048, dtype=dtype, device=device, scale=4.0)
    mask = make_mask("b11s", 1, 1, 4, 2048, dtype, device)
    mask[..., 0, :] = True
    check_fwd_bwd(backend, scores, mask, randn(1, 1, 4, 2048, dtype=dtype, device=device), scale=0.3)


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("S", [77, 129, 4096])
@pytest.mark.parametrize("form", ["none", "b11s", "expanded:min"])
def test_masked_softmax_looped_rows(backend_device, S, form, monkeypatch):
    """The tiled path for rows longer than one program holds (online max/sum, then a write pass),
    forced on short rows by lowering the register limit; S = 4096 takes it at its natural size
    when the limit is 4096."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    if backend == "triton":
        from bertkern.triton import masked_softmax as k

        monkeypatch.setattr(k, "MAX_BLOCK_N", 32 if S < 4096 else 2048)
        monkeypatch.setattr(k, "CHUNK", 32 if S < 4096 else 1024)
    S_q = 3 if S < 4096 else 1
    dtype = torch.float16
    scores = randn(2, 2, S_q, S, dtype=dtype, device=device, scale=3.0)
    mask = make_mask(form, 2, 2, S_q, S, dtype, device)
    grad = randn(2, 2, S_q, S, dtype=dtype, device=device)
    check_fwd_bwd(backend, scores, mask, grad, scale=0.7, dropout_p=0.2, seed=seed_tensor(3, device))


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize(
    "scores_dtype, mask_dtype",
    [(torch.float16, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
     (torch.float32, torch.float64), (torch.float32, torch.float16), (torch.float64, torch.float32)],
    ids=str,
)
@pytest.mark.parametrize("kind", ["min", "inf", "soft"])
def test_masked_softmax_mixed_mask_dtype(backend_device, scores_dtype, mask_dtype, kind):
    """The mask's own finfo.min marks masked keys, whatever the scores' dtype."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    scores = randn(2, 3, 9, 77, dtype=scores_dtype, device=device, scale=3.0)
    mask = make_mask("b1ss:" + kind, 2, 3, 9, 77, mask_dtype, device)
    check_fwd_bwd(backend, scores, mask, randn(2, 3, 9, 77, dtype=scores_dtype, device=device))


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize(
    "scores_shape, mask_shape",
    [((77,), (77,)), ((5, 77), (77,)), ((5, 77), (5, 1)), ((4, 5, 77), (4, 1, 77)), ((3, 4, 5, 7), (7,)),
     ((2, 3, 4, 5, 33), (2, 1, 1, 1, 33)), ((2, 3, 4, 5, 33), (3, 1, 5, 33)), ((2, 3, 4, 5, 33), (1, 33))],
    ids=str,
)
def test_masked_softmax_any_rank(backend_device, scores_shape, mask_shape):
    """Scores of 1 to 5 dims; masks broadcast from the right, like scores + mask."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    scores = randn(*scores_shape, device=device, scale=2.0)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(mask_shape, generator=g) > 0.3).to(device)
    check_fwd_bwd(backend, scores, mask, randn(*scores_shape, device=device), scale=1.3)


# ---------------------------------------------------------------- masks and strides
@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("kind", ["bool", "inf", "min"])
def test_fully_masked_rows_are_zero(backend_device, kind):
    """Every key masked: zeros forward and backward (not NaN, not uniform); a row masked only by
    -10000 (a soft mask) is an ordinary softmax."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    scores = randn(2, 2, 5, 33, device=device, scale=3.0)
    keep = torch.ones(2, 1, 5, 33, dtype=torch.bool, device=device)
    keep[0] = False  # batch 0: every row masked
    keep[1, :, 2] = False  # one row of batch 1
    mask = {"bool": keep, "inf": torch.where(keep, 0.0, NEG_INF).to(device),
            "min": torch.where(keep, 0.0, torch.finfo(torch.float32).min).to(device)}[kind]
    x = scores.detach().requires_grad_()
    y = bertkern.ops.masked_softmax(x, mask, scale=0.5, backend=backend)
    y.backward(torch.randn_like(y))
    dead = ~keep.expand(2, 2, 5, 33)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert (y[dead] == 0).all() and (x.grad[dead] == 0).all()
    assert torch.allclose(y[1, :, 3].sum(-1), torch.ones(2, device=device))

    soft = torch.full((2, 1, 5, 33), -10000.0, device=device)
    y = bertkern.ops.masked_softmax(scores, soft, scale=0.5, backend=backend)
    # (logits near -10000 keep ~3 decimal digits in fp32, in eager as here)
    torch.testing.assert_close(y, torch.softmax(scores * 0.5, -1), rtol=5e-3, atol=1e-4)


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("kind", ["bool", "inf", "min"])
def test_masked_nan_and_inf_do_not_leak(backend_device, kind):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    scores = randn(2, 2, 4, 40, device=device)
    keep = torch.rand(2, 1, 4, 40, device=device) > 0.4
    keep[..., 0] = True
    bad = scores.clone()
    poison = torch.tensor([float("nan"), float("inf"), NEG_INF], device=device)
    bad = torch.where(keep, bad, poison[torch.randint(0, 3, bad.shape, device=device)])
    mask = {"bool": keep, "inf": torch.where(keep, 0.0, NEG_INF),
            "min": torch.where(keep, 0.0, torch.finfo(torch.float32).min)}[kind]
    if kind == "inf":  # NaN in the mask's masked positions must not leak either
        mask = torch.where(keep, mask, torch.where(torch.rand_like(mask) > 0.5, NEG_INF, float("nan")))
    x = bad.detach().requires_grad_()
    y = bertkern.ops.masked_softmax(x, mask, scale=0.9, backend=backend)
    y.backward(torch.randn_like(y))
    want = reference.masked_softmax(scores, keep, 0.9)
    torch.testing.assert_close(y, want)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_scores_and_grad(backend_device, dtype):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    B, H, S = 2, 3, 33
    views = [
        randn(B, S, H, S, dtype=dtype, device=device).transpose(1, 2),  # heads-second layout
        randn(B, H, S, S, dtype=dtype, device=device, noncontig=True),  # padded rows
        randn(B, H, S, S, dtype=dtype, device=device).transpose(-1, -2),  # keys strided: must copy
        randn(B, H, 2 * S, S, dtype=dtype, device=device)[:, :, ::2],  # every other query
    ]
    mask = make_mask("b11s", B, H, S, S, dtype, device)
    for scores in views:
        grad = randn(B, H, S, S, dtype=dtype, device=device).transpose(-1, -2)
        check_fwd_bwd(backend, scores, mask, grad, scale=0.4)


def test_broadcast_mask_is_read_in_place(monkeypatch):
    """The kernel gets the caller's mask memory with stride 0 over broadcast dims: no copy."""
    skip_unless_usable("triton", "cpu")
    from bertkern.triton import masked_softmax as k

    seen = []
    real = k.forward

    def spy(scores, mask, *args):
        seen.append(mask)
        return real(scores, mask, *args)

    monkeypatch.setattr(k, "forward", spy)
    scores = torch.randn(2, 3, 5, 7)
    base = torch.rand(2, 1, 1, 7) > 0.5
    for mask, strides in [(base, (7, 0, 0, 1)), (base.expand(2, 3, 5, 7), (7, 0, 0, 1)),
                          (torch.rand(5, 7) > 0.5, (0, 0, 7, 1))]:
        bertkern.ops.masked_softmax(scores, mask, backend="triton")
        assert seen[-1].data_ptr() == mask.data_ptr() and seen[-1].stride() == strides


# ---------------------------------------------------------------- dropout
@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_mask(backend_device, p):
    """Same seed, same mask on every backend: the kernels' Philox stream is the reference's."""
    backend, device = backend_device
    skip_unless_usable(backend, device)
    scores = randn(2, 3, 17, 77, device=device, scale=2.0)
    mask = make_mask("b11s", 2, 3, 17, 77, torch.float32, device)
    seed = seed_tensor(0x1234_5678_9ABC, device)
    y, _ = check_fwd_bwd(backend, scores, mask, randn(2, 3, 17, 77, device=device), dropout_p=p, seed=seed)
    want = reference.masked_softmax(scores, mask, 0.5, p, seed=seed)
    assert torch.equal(y == 0, want == 0)


def test_philox_is_the_standard_one():
    """The reference's Philox4x32-10, the spec of every backend's dropout, is Random123's (its known
    answer for counter 0, key 0) and tl.randint4x's (counter (offset lo, offset hi, 0, 0))."""
    assert reference.philox_words(torch.tensor([0]), 1, 1).tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                         0x9B00DBD8]]
    import triton
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the tl.randint4x comparison runs under the Triton interpreter")

    @triton.jit
    def randint4x(out, seed, COLS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, COLS)
        r0, r1, r2, r3 = tl.randint4x(seed, (row << 32) | cols)
        tl.store(out + row * 4 * COLS + 4 * cols, r0)
        tl.store(out + row * 4 * COLS + 4 * cols + 1, r1)
        tl.store(out + row * 4 * COLS + 4 * cols + 2, r2)
        tl.store(out + row * 4 * COLS + 4 * cols + 3, r3)

    seed, rows, cols = 0x1234_5678_9ABC_DEF0, 3, 8
    out = torch.empty(rows, 4 * cols, dtype=torch.int64)
    randint4x[(rows,)](out, seed, COLS=cols)
    want = reference.philox_words(torch.tensor([seed]), rows, cols)
    assert torch.equal(out & 0xFFFFFFFF, want)
    assert reference.dropout_threshold(0.1) == 6553 and reference.dropout_threshold(1.0) == 2**16


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_statistics_and_reproducibility(backend):
    skip_unless_usable(backend, "cpu")
    p = 0.3
    scores = torch.randn(4, 4, 64, 129)
    torch.manual_seed(123)
    y1 = bertkern.ops.masked_softmax(scores, dropout_p=p, backend=backend)
    y2 = bertkern.ops.masked_softmax(scores, dropout_p=p, backend=backend)
    torch.manual_seed(123)
    y3 = bertkern.ops.masked_softmax(scores, dropout_p=p, backend=backend)
    assert torch.equal(y1, y3), "torch.manual_seed must reproduce the dropout mask"
    assert not torch.equal(y1 == 0, y2 == 0), "consecutive calls must draw fresh masks"
    n = y1.numel()
    dropped = (y1 == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n), dropped
    # unbiased: kept values are scaled by 1 / (1 - p), so rows still sum to 1 on average
    probs = torch.softmax(scores, -1)
    torch.testing.assert_close(y1[y1 != 0], (probs / (1 - p))[y1 != 0])
    assert abs(y1.sum(-1).mean().item() - 1.0) < 0.01
    # no pattern across rows or columns: the per-column and per-row drop rates look binomial
    per_col = (y1 == 0).float().reshape(-1, 129).mean(0)
    assert (per_col - p).abs().max().item() < 6 * math.sqrt(p * (1 - p) / (n / 129))
    # neighbours independent (columns 2w, 2w + 1 share a Philox word; 8 columns share a call)
    dropped2 = (y1 == 0).reshape(-1, 129)
    for gap in (1, 4):
        both = (dropped2[:, :-gap] & dropped2[:, gap:]).float().mean().item()
        assert abs(both - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / (n - n // 129 * gap)), (gap, both)
    assert torch.equal(bertkern.ops.masked_softmax(scores, dropout_p=1.0, backend=backend), torch.zeros_like(scores))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_backward_uses_forward_mask(backend):
    """Through the public function (its own seed): the gradient is eager's for the mask the forward
    drew, read back from the output."""
    skip_unless_usable(backend, "cpu")
    p, scale = 0.25, 0.6
    scores = torch.randn(2, 3, 9, 50, dtype=torch.float64)
    mask = make_mask("b11s", 2, 3, 9, 50, torch.float64)
    mask[0] = True  # no dead rows, so every kept position is visible as a non-zero output
    x = scores.clone().requires_grad_()
    y = bertkern.ops.masked_softmax(x, mask, scale=scale, dropout_p=p, backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)
    kept = (y != 0).detach()
    x2 = scores.clone().requires_grad_()
    probs = torch.softmax((x2 * scale).masked_fill(~mask, NEG_INF), -1)
    y2 = torch.where(kept, probs / (1 - p), 0.0)
    y2.backward(grad)
    torch.testing.assert_close(y, y2.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- autograd, registration, compile
@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck(backend, dropout_p):
    """d scores and d mask (a float mask that requires grad) against finite differences, float64."""
    device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
    skip_unless_usable(backend, device)
    x = torch.randn(2, 2, 3, 9, dtype=torch.float64, device=device, requires_grad=True)
    keep = torch.rand(2, 1, 1, 9, device=device) > 0.3
    keep[1, ..., 1:] = False  # one key left
    keep[1, :, :, 0] = False  # ... and then none: a fully masked batch
    m = torch.where(keep, torch.randn(2, 1, 1, 9, dtype=torch.float64, device=device), NEG_INF)
    m.requires_grad_()
    seed = seed_tensor(99, device) if dropout_p else None

    def f(x, m):
        return torch.ops.bertkern.masked_softmax(x, m, 0.8, dropout_p, seed, backend)[0]

    assert torch.autograd.gradcheck(f, (x, m), fast_mode=gradcheck_fast_mode(backend, device))


@pytest.mark.parametrize("backend_device", [("torch", "cpu"), *kernel_backends()])
def test_opcheck(backend_device):
    backend, device = backend_device
    skip_unless_usable(backend, device)
    op, bwd = torch.ops.bertkern.masked_softmax.default, torch.ops.bertkern.masked_softmax_backward.default
    x = torch.randn(2, 3, 5, 19, device=device, requires_grad=True)
    bmask = torch.rand(2, 1, 1, 19, device=device) > 0.3
    fmask = torch.where(bmask, torch.randn(2, 1, 1, 19, device=device), NEG_INF).expand(2, 3, 5, 19)
    fmask.requires_grad_()
    seed = seed_tensor(5, device)
    for args in [(x, None, 1.0, 0.0, None), (x, bmask, 0.5, 0.0, None), (x, fmask, 0.5, 0.0, None),
                 (x, bmask, 0.5, 0.2, seed)]:
        torch.library.opcheck(op, (*args, backend))
    probs = torch.softmax(x.detach(), -1)
    g = torch.randn(2, 3, 5, 19, device=device)
    torch.library.opcheck(bwd, (g, probs, 0.5, 0.0, None, backend))
    torch.library.opcheck(bwd, (g, probs, 0.5, 0.2, seed, backend))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compiles_without_graph_breaks(dropout_p):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    mask = torch.rand(2, 1, 1, 8) > 0.3
    fn = torch.compile(
        lambda x, m: bertkern.ops.masked_softmax(x, m, scale=0.5, dropout_p=dropout_p, backend="torch") * 2,
        fullgraph=True,
    )
    y = fn(x, mask)
    y.sum().backward()
    if dropout_p == 0:
        torch.testing.assert_close(y, 2 * reference.masked_softmax(x, mask, 0.5))
    else:
        kept = y != 0
        torch.testing.assert_close(y[kept], 2 * reference.masked_softmax(x, mask, 0.5)[kept] / (1 - dropout_p))
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_empty_and_degenerate_shapes():
    for backend in ["torch", "triton"]:
        skip_unless_usable(backend, "cpu")
        op = bertkern.ops.masked_softmax
        assert op(torch.randn(0, 3, 4, 4), backend=backend).shape == (0, 3, 4, 4)
        assert op(torch.randn(2, 3, 0, 4), dropout_p=0.5, backend=backend).shape == (2, 3, 0, 4)
        assert torch.equal(op(torch.randn(2, 3, 4, 1), backend=backend), torch.ones(2, 3, 4, 1))  # one key


def test_torch_backend_autograd_and_env(monkeypatch):
    monkeypatch.setenv("BERTKERN_BACKEND", "torch")
    x = torch.randn(2, 2, 5, 9)
    torch.testing.assert_close(bertkern.ops.masked_softmax(x, scale=0.3), torch.softmax(x * 0.3, -1))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(2, 3, 4, 8), torch.ones(2, 8, dtype=torch.bool)), ValueError,
         r"mask of shape \[2, 8\] does not broadcast to scores' shape \[2, 3, 4, 8\]"),
        (lambda: (torch.randn(2, 3, 4, 8), torch.ones(2, 1, 1, 7, dtype=torch.bool)), ValueError, "does not broadcast"),
        (lambda: (torch.randn(1, 3, 4, 8), torch.ones(2, 1, 1, 8, dtype=torch.bool)), ValueError, "does not broadcast"),
        (lambda: (torch.randn(4, 8), torch.ones(1, 1, 4, 8, dtype=torch.bool)), ValueError, "does not broadcast"),
        (lambda: (torch.randint(0, 5, (2, 8)), None), ValueError, "scores must be a floating-point tensor"),
        (lambda: (torch.randn(2, 8), torch.ones(2, 8, dtype=torch.int64)), ValueError, "mask must be bool"),
        (lambda: (torch.randn(2, 8), torch.ones(2, 8, device="meta")), ValueError, "mask is on meta"),
        (lambda: (torch.tensor(1.0), None), ValueError, "at least one dimension"),
        (lambda: ([1.0, 2.0], None), TypeError, "scores must be a torch.Tensor"),
        (lambda: (torch.randn(2, 8), [True] * 8), TypeError, "mask must be a torch.Tensor"),
    ],
)
def test_bad_input(make, error, match):
    x, m = make()
    with pytest.raises(error, match=match):
        bertkern.ops.masked_softmax(x, m)


def test_bad_options():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\]"):
        bertkern.ops.masked_softmax(x, dropout_p=1.5)
    with pytest.raises(TypeError, match="scale must be a Python float"):
        bertkern.ops.masked_softmax(x, scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="backend must be one of"):
        bertkern.ops.masked_softmax(x, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            bertkern.ops.masked_softmax(x, backend="cuda")


def test_unsupported_dtype_falls_back_visibly():
    assert_float8_falls_back_visibly(bertkern.ops.masked_softmax)


def test_cuda_rows_past_int32_per_batch_entry_fall_back(monkeypatch):
    """The CUDA forward's 32-bit row math covers 2^31 - 1 rows (H x S_q) per batch entry: past that, the
    op's reason to fall back names it (checked on zero-stride views: nothing is allocated)."""
    reasons = []

    def resolve(op, backend, device, unsupported):
        reasons.append({b: unsupported(b) for b in ("cuda", "triton")})
        raise InterruptedError  # stop before anything runs

    monkeypatch.setattr(bertkern.backend, "resolve", resolve)
    for shape in [(3, 2**30, 1), (4, 2**20, 2**11 - 1, 1), (2**31, 1)]:
        with pytest.raises(InterruptedError):
            bertkern.ops.masked_softmax(torch.zeros(()).expand(shape))
    past, within, two_d = reasons
    assert "3221225472 rows (H x S_q) in one batch entry" in past["cuda"] and past["triton"] is None
    assert within == {"cuda": None, "triton": None}
    assert "2147483648 rows" in two_d["cuda"]


def test_module():
    m = bertkern.nn.MaskedSoftmax(scale=0.5, dropout_p=0.4, backend="torch")
    x = torch.randn(2, 2, 4, 6)
    mask = torch.rand(2, 1, 1, 6) > 0.3
    m.eval()
    torch.testing.assert_close(m(x, mask), reference.masked_softmax(x, mask, 0.5))
    m.train()
    assert (m(x, mask) == 0).float().mean() > (reference.masked_softmax(x, mask, 0.5) == 0).float().mean()
    assert "dropout_p=0.4" in repr(m)


# ---------------------------------------------------------------- GPU-only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compiles_on_gpu(backend):
    skip_unless_usable(backend, "cuda")
    x = torch.randn(4, 12, 128, 128, device="cuda", dtype=torch.float16)
    mask = torch.rand(4, 1, 1, 128, device="cuda") > 0.2
    fn = torch.compile(lambda x, m: bertkern.ops.masked_softmax(x, m, scale=0.125, backend=backend), fullgraph=True)
    ref = reference.masked_softmax(x.double(), mask, 0.125)
    assert_close_2x(fn(x, mask), ref, reference.masked_softmax(x, mask, 0.125))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("S", [64, 77, 128, 384, 512, 1000, 1024, 1025, 3000, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sizes(backend, S, dtype):
    """Every size class of the CUDA kernels (sub-warp rows, warp rows with and without 16-byte
    vectors, block rows) and Triton's, with dropout."""
    skip_unless_usable(backend, "cuda")
    B, H, S_q = 2, 3, 5
    scores = randn(B, H, S_q, S, dtype=dtype, device="cuda", scale=3.0)
    for form in ["b11s", "bhss:min", "expanded:inf"]:
        mask = make_mask(form, B, H, S_q, S, dtype, "cuda")
        grad = randn(B, H, S_q, S, dtype=dtype, device="cuda")
        check_fwd_bwd(backend, scores, mask, grad, scale=0.2, dropout_p=0.15, seed=seed_tensor(11, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_draw_fresh_masks(backend):
    """The seed is drawn on the device inside the graph and read by the kernel from memory: every
    replay drops a different set, with the right statistics and values."""
    skip_unless_usable(backend, "cuda")
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compile Triton) outside the capture
        for _ in range(2):
            bertkern.ops.masked_softmax(x, dropout_p=0.5, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = bertkern.ops.masked_softmax(x, dropout_p=0.5, backend=backend)
    g.replay()
    a = y.clone()
    g.replay()
    b = y.clone()
    assert not torch.equal(a == 0, b == 0)
    want = torch.softmax(x.float(), -1) * 2
    for out in (a, b):
        assert abs((out == 0).float().mean().item() - 0.5) < 0.02
        torch.testing.assert_close(out[out != 0].float(), want[out != 0], rtol=2e-3, atol=1e-4)


def test_cuda_mask_dtypes_are_converted_keeping_hard_masks():
    """The CUDA kernels read bool, float32 or the scores' dtype; other float masks become float32
    with finfo(mask dtype).min turned into -inf (it would be a soft value in float32)."""
    from bertkern.ops.masked_softmax import _kernel_inputs

    scores = torch.randn(2, 3, 4, 5, dtype=torch.float16)
    lo = torch.finfo(torch.bfloat16).min
    mask = torch.tensor([0.0, -1.5, lo, float("-inf"), 2.0], dtype=torch.bfloat16)
    _, m4 = _kernel_inputs(scores, mask, "cuda")
    assert m4.dtype == torch.float32 and m4.shape == scores.shape and m4.stride() == (0, 0, 0, 1)
    assert m4[0, 0, 0].tolist() == [0.0, -1.5, float("-inf"), float("-inf"), 2.0]
    for ok in (torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.float16), torch.zeros(5)):
        assert _kernel_inputs(scores, ok, "cuda")[1].dtype == ok.dtype
    assert _kernel_inputs(scores, mask, "triton")[1].dtype == torch.bfloat16  # Triton reads any dtype


# ---------------------------------------------------------------- the fused BERT path
def test_bert_fused_softmax_matches_hf(monkeypatch, record_backends):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bertkern.models import BertModel

    cfg = transformers.BertConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=16, initializer_range=0.2, attn_implementation="eager",
    )
    hf = transformers.BertModel(cfg).eval()
    lengths = [9, 5, 1]
    ids = torch.randint(1, 101, (3, 9))
    attn = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        attn[row, :n] = 1
    ids = ids * attn
    with torch.no_grad():
        want = hf(ids, attention_mask=attn).last_hidden_state
    ours = BertModel.from_hf(hf, fused_softmax=True)
    calls = record_backends
    for backend in ["torch", "triton"]:
        skip_unless_usable(backend, "cpu")
        monkeypatch.setenv("BERTKERN_BACKEND", backend)
        calls.clear()
        with torch.no_grad():
            got = ours(ids, attention_mask=attn).last_hidden_state
        real_tokens = attn.bool()
        err = (got[real_tokens] - want[real_tokens]).abs().max().item()
        assert err < 1e-5, f"{backend}: {err:.3g}"
        assert [c for c in calls if c[0] == "masked_softmax"] == [("masked_softmax", backend)] * 2
