"""csrc/masked_softmax.cu's CUDA kernels run on the CPU through the emulation in tests/cuda_emu (threads for
CUDA threads, warp shuffles through per-warp slots), so that a machine without a GPU checks the kernels'
own code: every launch path of the host code (warp-per-row kernels with 1..32 lanes per row and 4..32
registers per lane, on the 16-byte vector path and the element path; the block-per-row kernels for
rows > 1024 keys and for float64), every dtype, mask form and mask dtype, fully masked rows, NaN / inf
under the mask, Philox dropout (the reference's mask bit for bit), the backward with and without
dropout, odd sizes and strided inputs, and the C++ argument checks. The checks are
test_masked_softmax.py's (float64 reference, the 2x-of-eager rule), through bertkern.ops.masked_softmax's
backend="cuda" path with torch.ops.bertkern_cuda pointed at the emulated ops. Every output the kernels
allocate starts as NaN (torch's deterministic mode fills uninitialised memory), so an element that no
thread writes fails the checks.

Not covered here: the real hardware (__expf, fp32 rounding order, speed), which the gpu-marked CUDA
tests in test_masked_softmax.py cover on a GPU. (Misaligned 16-byte accesses are caught: the
emulation builds with UBSan's alignment check.)
"""
from __future__ import annotations

import pytest
import torch

import bertkern
import emulation
import test_masked_softmax as base  # (as a module: its tests must not be collected here again)
from bertkern import reference
from harness import DTYPES, assert_close_2x, randn
from test_masked_softmax import MASK_FORMS, check_fwd_bwd, fwd_bwd, make_mask, seed_tensor

CPU = "cpu"
ALL_DTYPES = [*DTYPES, torch.float64]
NEG_INF, NAN = float("-inf"), float("nan")


emulated, cuda = emulation.fixtures("masked_softmax")


def assert_masked_zero(y, dx, mask, shape):
    masked = ~reference.keep_mask(mask).expand(shape)
    assert (y[masked] == 0).all() and (dx[masked] == 0).all()


# ---------------------------------------------------------------- warp-per-row kernels
# Row lengths N that take every warp-kernel shape (warp_shape(): capacity 2^ceil(log2 N) split into
# lanes x registers): the 16-byte path (N % 8 == 0 for 16-bit, N % 4 == 0 for fp32) and the element
# path each with 1, 2, 4, 8, 16 and 32 lanes per row and 4 (element path) / 8 (16-bit vectors) to 32
# registers per lane; tails where the last lanes of a row hold no column (12, 24, 33...); N = 1.
WARP_LENGTHS = [1, 4, 6, 8, 12, 13, 16, 24, 31, 33, 64, 77, 128, 250, 256, 509, 512, 1023, 1024]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", WARP_LENGTHS)
def test_warp_rows(cuda, dtype, N):
    """6 rows (with 32 lanes a row, the second block has 2 rows and 2 idle warps), a fully masked row
    and a one-key row; a bool mask without dropout, then an additive one with dropout."""
    B, H, S_q = 2, 1, 3
    scores = randn(B, H, S_q, N, dtype=dtype, scale=3.0)
    grad = randn(B, H, S_q, N, dtype=dtype)
    mask = make_mask("bhss", B, H, S_q, N, dtype, CPU)
    y, dx = check_fwd_bwd(cuda, scores, mask, grad, scale=0.7)
    assert_masked_zero(y, dx, mask, scores.shape)
    mask = make_mask("b1ss:min", B, H, S_q, N, dtype, CPU)
    y, dx = check_fwd_bwd(cuda, scores, mask, grad, scale=0.7, dropout_p=0.2, seed=seed_tensor(N, CPU))
    assert_masked_zero(y, dx, mask, scores.shape)


@pytest.mark.parametrize("shape", [(3, 5, 70, 3), (2, 3, 40, 24)], ids=str)
def test_many_rows(cuda, shape):
    """Several blocks of rows (128 rows a block with one lane a row; 32 with four), the last one
    partial, with dropout rows past the first block."""
    scores = randn(*shape, dtype=torch.float16, scale=3.0)
    mask = make_mask("b11s", *shape, torch.float16, CPU)
    check_fwd_bwd(cuda, scores, mask, randn(*shape, dtype=torch.float16), scale=0.5, dropout_p=0.3,
                  seed=seed_tensor(0xABCDEF, CPU))


@pytest.mark.parametrize("dtype, S_q, N, form, dropout_p", [
    (torch.float16, 5, 40, "b11s", 0.3),        # warp rows on the 16-byte path, mask packs
    (torch.bfloat16, 3, 77, "bhss:min", 0.0),   # warp rows on the element path
    (torch.float32, 3, 1024, "b1ss:inf", 0.2),  # a row over a whole warp
    (torch.float16, 3, 2051, "b1ss:inf", 0.2),  # block rows: 512 threads, block reductions
    (torch.float64, 3, 129, "bhss", 0.3),       # float64's block kernels
], ids=str)
def test_every_thread_order_gives_the_same_bits(cuda, monkeypatch, dtype, S_q, N, form, dropout_p):
    """Forward and backward under every thread order: a shared-memory race would change some bits
    (tests/emulation.py)."""
    scores, grad = randn(2, 2, S_q, N, dtype=dtype, scale=3.0), randn(2, 2, S_q, N, dtype=dtype)
    mask, seed = make_mask(form, 2, 2, S_q, N, dtype, CPU), seed_tensor(11, CPU)

    def softmax(x):
        return torch.ops.bertkern.masked_softmax(x, mask, 0.5, dropout_p, seed if dropout_p else None, cuda)[0]

    emulation.same_bits_in_every_order(monkeypatch, lambda: fwd_bwd(softmax, scores, grad))


# ---------------------------------------------------------------- block-per-row kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1025, 2051])
def test_block_rows(cuda, dtype, N):
    """Rows over 1024 keys: one block of 512 threads a row (with 2051 keys, 2 rounds of quads and a
    partial quad); rows of 0, 1 and ~70% kept keys."""
    shape = (1, 1, 3, N)
    scores = randn(*shape, dtype=dtype, scale=4.0)
    mask = make_mask("b1ss:inf", *shape, dtype, CPU)
    dropout_p = 0.2 if N == 2051 else 0.0
    y, dx = check_fwd_bwd(cuda, scores, mask, randn(*shape, dtype=dtype), scale=0.3, dropout_p=dropout_p,
                          seed=seed_tensor(77, CPU) if dropout_p else None)
    assert_masked_zero(y, dx, mask, shape)


@pytest.mark.parametrize("N", [1, 7, 64, 129, 1030])
def test_float64(cuda, N):
    """float64 always takes the block kernels (32 to 512 threads a row), with every mask dtype it reads."""
    shape = (1, 1, 3, N)
    scores = randn(*shape, dtype=torch.float64, scale=3.0)
    grad = randn(*shape, dtype=torch.float64)
    for mask, dropout_p in [(None, 0.0), (make_mask("bhss", *shape, torch.float64, CPU), 0.3),
                            (make_mask("b1ss:min", *shape, torch.float64, CPU), 0.0),
                            (make_mask("b1ss:inf", *shape, torch.float32, CPU), 0.3)]:
        check_fwd_bwd(cuda, scores, mask, grad, scale=0.6, dropout_p=dropout_p,
                      seed=seed_tensor(5, CPU) if dropout_p else None)


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("S", [37, 40])
@pytest.mark.parametrize("form", MASK_FORMS)
def test_mask_forms(cuda, form, S):
    """Every mask form (broadcast dims read with stride 0), on the element path (37) and the 16-byte one (40)."""
    B, H, S_q = 2, 2, 5
    scores = randn(B, H, S_q, S, dtype=torch.float16, scale=3.0)
    mask = make_mask(form, B, H, S_q, S, torch.float16, CPU)
    y, dx = check_fwd_bwd(cuda, scores, mask, randn(B, H, S_q, S, dtype=torch.float16), scale=0.7)
    if mask is not None:
        assert_masked_zero(y, dx, mask, scores.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_packs_and_the_views_that_cannot_use_them(cuda, dtype):
    """On the 16-byte path the mask is loaded in packs of keys when its rows allow (unit key stride,
    aligned base and strides); other masks send the rows down the element path: bool, float32 and
    scores-dtype masks, a mask one element off alignment, and one with key stride 2. (UBSan catches a
    misaligned pack.)"""
    B, H, S_q, N = 2, 2, 3, 40
    scores = randn(B, H, S_q, N, dtype=dtype, scale=3.0)
    grad = randn(B, H, S_q, N, dtype=dtype)
    keep = make_mask("b1ss", B, H, S_q, N + 1, dtype, CPU)
    for m in (keep, torch.where(keep, 0.0, NEG_INF), torch.where(keep, 0.0, -1e4).to(dtype)):
        for view in (m[..., :N].contiguous(), m[..., 1:], torch.repeat_interleave(m[..., :N], 2, -1)[..., ::2]):
            view = view.expand(B, H, S_q, N)
            y, dx = check_fwd_bwd(cuda, scores, view, grad, scale=0.7)
            assert_masked_zero(y, dx, view, scores.shape)


@pytest.mark.parametrize(
    "scores_dtype, mask_dtype",
    [(torch.float16, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
     (torch.float32, torch.float64), (torch.float32, torch.float16), (torch.float64, torch.float32),
     (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
     (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
    ids=str,
)
@pytest.mark.parametrize("kind", ["min", "inf", "soft"])
def test_mask_dtypes(cuda, scores_dtype, mask_dtype, kind):
    """The mask's own finfo.min marks masked keys: the kernels' float32 and scores-dtype masks, and
    the others (converted to float32 by the Python side)."""
    shape = (2, 2, 3, 77)
    scores = randn(*shape, dtype=scores_dtype, scale=3.0)
    mask = make_mask("b1ss:" + kind, *shape, mask_dtype, CPU)
    y, dx = check_fwd_bwd(cuda, scores, mask, randn(*shape, dtype=scores_dtype))
    assert_masked_zero(y, dx, mask, shape)


@pytest.mark.parametrize("kind", ["bool", "inf", "min"])
def test_fully_masked_rows_are_zero(cuda, kind):
    base.test_fully_masked_rows_are_zero((cuda, CPU), kind)


@pytest.mark.parametrize("kind", ["bool", "inf", "min"])
def test_masked_nan_and_inf_do_not_leak(cuda, kind):
    base.test_masked_nan_and_inf_do_not_leak((cuda, CPU), kind)


@pytest.mark.parametrize("dtype, N", [(d, n) for d in DTYPES for n in (37, 40, 1030)] + [(torch.float64, 37)], ids=str)
def test_nan_and_inf_under_the_mask_every_path(cuda, dtype, N):
    """NaN / +-inf scores under the mask, and NaN / -inf mask values at masked keys, change nothing:
    the result is the clean scores' (element path, 16-byte path, block kernel)."""
    shape = (1, 2, 2, N)
    scores = randn(*shape, dtype=dtype, scale=2.0)
    grad = randn(*shape, dtype=dtype)
    keep = make_mask("bhss", *shape, dtype, CPU)
    poison = torch.tensor([NAN, float("inf"), NEG_INF], dtype=dtype)[torch.randint(0, 3, shape)]
    bad = torch.where(keep, scores, poison)
    additive = torch.where(keep, 0.0, torch.where(torch.rand(shape) > 0.5, NEG_INF, NAN)).to(dtype)

    def ref(x):
        return reference.masked_softmax(x, keep, 0.9)

    ref64, eager = fwd_bwd(ref, scores.double(), grad.double()), fwd_bwd(ref, scores, grad)
    for mask in (keep, additive):
        out = fwd_bwd(lambda x: torch.ops.bertkern.masked_softmax(x, mask, 0.9, 0.0, None, cuda)[0], bad, grad)
        for name, o, r, e in zip(["y", "dscores"], out, ref64, eager):
            assert_close_2x(o, r, e, name)


@pytest.mark.parametrize(
    "scores_shape, mask_shape",
    [((77,), (77,)), ((5, 77), (5, 1)), ((4, 5, 77), (4, 1, 77)), ((3, 4, 5, 7), (7,)),
     ((2, 3, 4, 5, 33), (3, 1, 5, 33))],
    ids=str,
)
def test_any_rank(cuda, scores_shape, mask_shape):
    """Scores of 1 to 5 dims; masks broadcast from the right ((5, 1): stride 0 along the keys)."""
    base.test_masked_softmax_any_rank((cuda, CPU), scores_shape, mask_shape)


# ---------------------------------------------------------------- strides
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("N", [32, 33])
def test_strided_scores_and_grad(cuda, dtype, N):
    """Scores views whose rows are 16-byte aligned or not (N % 8 == 0 for 16-bit aligns only when the
    base and the strides do too), broadcast scores, and a grad with a row stride != N (the backward
    reads it through its own stride, aligned or not)."""
    B, H, S = 2, 2, 3
    views = [
        randn(B, S, H, N, dtype=dtype).transpose(1, 2),  # heads-second layout
        randn(B, H, S, N, dtype=dtype, noncontig=True),  # row stride N + 7, 3 elements in
        randn(B, H, N, S, dtype=dtype).transpose(-1, -2),  # keys strided: the Python side copies
        randn(B, H, 2 * S, N, dtype=dtype)[:, :, ::2],  # every other query
        randn(B, H, S, N + 8, dtype=dtype)[..., 8:],  # 16 bytes in for 16-bit types, row stride N + 8
        randn(B, H, S, N + 4, dtype=dtype)[..., 4:],  # 8 bytes in for 16-bit types: never 16-byte aligned
        randn(1, H, S, N, dtype=dtype).expand(B, H, S, N),  # stride 0 over the batch
    ]
    mask = make_mask("b11s", B, H, S, N, dtype, CPU)
    for i, scores in enumerate(views):
        grad = randn(B, H, S, N + 8, dtype=dtype)[..., :N] if i % 2 else randn(B, H, S, N, dtype=dtype)
        check_fwd_bwd(cuda, scores, mask, grad, scale=0.4, dropout_p=0.25 if i % 3 == 0 else 0.0,
                      seed=seed_tensor(i, CPU))


@pytest.mark.parametrize("dtype, N", [(torch.float16, 32), (torch.bfloat16, 33), (torch.float32, 32),
                                      (torch.float32, 33), (torch.float64, 32), (torch.float32, 1030)], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_backward_row_strides(cuda, dtype, N, dropout_p):
    """masked_softmax_bwd on [rows, N] views: row strides of grad and probs that keep 16-byte rows or
    break them, a misaligned base, one row."""
    rows = 3
    seed = seed_tensor(21, CPU) if dropout_p else None
    probs_c = torch.softmax(torch.randn(rows, N) * 2, -1).to(dtype)
    grad_c = randn(rows, N, dtype=dtype)

    def wide(t, extra, offset=0):
        w = torch.full((t.shape[0], t.shape[1] + extra), NAN, dtype=dtype)
        w[:, offset:offset + t.shape[1]] = t
        return w[:, offset:offset + t.shape[1]]

    layouts = [(grad_c, probs_c), (wide(grad_c, 8), wide(probs_c, 16)), (wide(grad_c, 4, 4), probs_c),
               (grad_c, wide(probs_c, 4)), (grad_c[:1], probs_c[1:2])]
    for grad, probs in layouts:
        dx = torch.ops.bertkern_cuda.masked_softmax_bwd(grad, probs, 0.6, dropout_p, seed)
        ref64 = reference.masked_softmax_backward(grad.double(), probs.double(), 0.6, dropout_p, seed)
        eager = reference.masked_softmax_backward(grad, probs, 0.6, dropout_p, seed)
        assert dx.is_contiguous()
        assert_close_2x(dx, ref64, eager, "dx")


# ---------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype, shape", [
    (torch.float16, (2, 3, 5, 64)),  # 16-byte path: 8 columns (two Philox calls) a pack
    (torch.bfloat16, (2, 3, 5, 77)),  # element path: 4 columns a pack
    (torch.float32, (2, 3, 5, 64)),  # 16-byte path: 4 columns a pack
    (torch.float32, (1, 1, 3, 1030)),  # block kernel
    (torch.float64, (1, 2, 3, 77)),  # block kernel
], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_the_reference_bit_for_bit(cuda, dtype, shape, p):
    """No mask and small logits, so every softmax value is > 0 and the kept set is exactly y != 0:
    it equals bertkern.reference.dropout_keep_mask for a seed with high bits; probs is the softmax
    before dropout, and the backward regenerates the same mask."""
    seed = seed_tensor(0x1234_5678_9ABC_DEF0 >> 2, CPU)
    scores = randn(*shape, dtype=dtype)
    y, probs = torch.ops.bertkern.masked_softmax(scores, None, 1.0, p, seed, cuda)
    assert torch.equal(y != 0, reference.dropout_keep_mask(seed, shape, p))
    assert_close_2x(probs, reference.masked_softmax(scores.double()), reference.masked_softmax(scores), "probs")
    check_fwd_bwd(cuda, scores, None, randn(*shape, dtype=dtype), scale=1.0, dropout_p=p, seed=seed)


@pytest.mark.parametrize("dtype, N", [(torch.float16, 64), (torch.float32, 33), (torch.float64, 9),
                                      (torch.bfloat16, 1025)], ids=str)
def test_dropout_everything(cuda, dtype, N):
    """dropout_p = 1: zeros forward and backward, probs still the softmax."""
    shape = (1, 2, 2, N)
    scores = randn(*shape, dtype=dtype)
    y, dx = check_fwd_bwd(cuda, scores, None, randn(*shape, dtype=dtype), dropout_p=1.0, seed=seed_tensor(3, CPU))
    assert (y == 0).all() and (dx == 0).all()
    _, probs = torch.ops.bertkern.masked_softmax(scores, None, 1.0, 1.0, seed_tensor(3, CPU), cuda)
    assert_close_2x(probs, reference.masked_softmax(scores.double()), reference.masked_softmax(scores), "probs")


# ---------------------------------------------------------------- the host code
def test_empty_and_degenerate_shapes(cuda):
    ops = torch.ops.bertkern_cuda
    seed = seed_tensor(1, CPU)
    y, probs = ops.masked_softmax_fwd(torch.randn(2, 3, 0, 4), None, 1.0, 0.5, seed)
    assert y.shape == probs.shape == (2, 3, 0, 4)
    y, probs = ops.masked_softmax_fwd(torch.randn(2, 3, 4, 0), None, 1.0, 0.0, None)
    assert y.shape == (2, 3, 4, 0) and probs.shape == (0,)
    assert ops.masked_softmax_bwd(torch.randn(0, 5), torch.randn(0, 5), 1.0, 0.0, None).shape == (0, 5)
    assert torch.equal(bertkern.ops.masked_softmax(torch.randn(2, 3, 4, 1), backend=cuda), torch.ones(2, 3, 4, 1))


def test_argument_checks(cuda):
    """The host-side checks (they run before any launch). (The "must be a CUDA tensor" checks are
    not reachable here: the emulated ops are registered for CPU tensors only.)"""
    ops = torch.ops.bertkern_cuda
    x = torch.randn(1, 2, 3, 8, dtype=torch.float16)
    seed = seed_tensor(1, CPU)
    fwd_cases = [
        ((x[0], None, 1.0, 0.0, None), "scores must be 4-D"),
        ((x.int(), None, 1.0, 0.0, None), "scores must be float32, float16, bfloat16 or float64"),
        ((x.transpose(-1, -2), None, 1.0, 0.0, None), "unit stride along the keys"),
        ((x, torch.ones(1, 1, 1, 8, dtype=torch.bool), 1.0, 0.0, None),
         r"mask must be a \[B, H, S_q, S_k\] view of scores' shape \[1, 2, 3, 8\] .*, got \[1, 1, 1, 8\]"),
        ((x, torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16), 1.0, 0.0, None),
         "mask must be bool, float32 or the scores' dtype"),
        ((x, None, 1.0, 0.1, None), "dropout_p > 0 needs a seed tensor"),
        ((x, None, 1.0, 1.5, seed), r"dropout_p must be in \[0, 1\]"),
        ((x, None, 1.0, 0.1, seed.int()), "seed must be a one-element int64 tensor"),
        ((x, None, 1.0, 0.1, torch.tensor([1, 2])), "seed must be a one-element int64 tensor"),
    ]
    for args, match in fwd_cases:
        with pytest.raises(RuntimeError, match=match):
            ops.masked_softmax_fwd(*args)
    g = torch.randn(6, 8)
    bwd_cases = [
        ((g, g[None], 1.0, 0.0, None), "probs must be 2-D"),
        ((g[:5], g, 1.0, 0.0, None), r"grad must have probs' shape \[6, 8\], got \[5, 8\]"),
        ((g.int(), g.int(), 1.0, 0.0, None), "probs must be float32, float16, bfloat16 or float64"),
        ((g.half(), g, 1.0, 0.0, None), "does not match probs dtype"),
        ((torch.randn(8, 6).t(), g, 1.0, 0.0, None), "unit stride along the keys"),
        ((g, g, 1.0, 0.3, None), "dropout_p > 0 needs a seed tensor"),
    ]
    for args, match in bwd_cases:
        with pytest.raises(RuntimeError, match=match):
            ops.masked_softmax_bwd(*args)
