"""csrc/layer_norm.cu's CUDA kernels run on the CPU through the emulation in tests/cuda_emu (threads for
CUDA threads, 4 SMs), so that a machine without a GPU checks the kernels' own code. The checks are
test_layer_norm.py's (float64 reference, the 2x-of-eager rule), through bertkern.ops' backend="cuda"
path with torch.ops.bertkern_cuda pointed at the emulated ops.

Launch paths covered (the host code's choices, see plan_team / with_team in layer_norm.cu):
- team kernels, forward and backward: one warp per row with 8 teams per block, 2-4 warps per row
  with 2-4 teams per block, 5-10 warps and one team per block; 16-byte vectors (V = 8 for fp16 /
  bf16, 4 for fp32) with every compiled ITERS, and the scalar path (V = 1, ITERS 1 / 4 / 8) for odd
  widths and misaligned rows; last blocks with missing teams; the backward's grid-stride rounds
  (one block per SM here) and its partial rows folded through shared memory;
- loop kernels: float64 always, wider rows for the other dtypes; grid-stride rounds (the first writes the partials);
- column_sum over 1 to 16 partial rows; x_bias, residual, weight, bias each present or not;
  return_prenorm (and its gradient); Philox dropout equal to reference.dropout_keep_mask; rows with a
  stride; no rows; the C++ argument checks.
- embedding_layer_norm's forward (the same kernels gathering table rows): test_layer_norm's embedding
  cases (int64 / int32 / mixed ids, [B, S], [1, S], [S] and stride-0 views, absent tables and ids,
  strided tables on the scalar path, with and without the stored pre-norm sum, no tokens) on the
  team kernels of every dtype and the loop kernel (float64, wide rows), with no Triton kernel called;
  ids outside their tables (NaN rows).

Not covered here: the real hardware (timing, memory ordering, fused multiply-adds). The gpu-marked
CUDA tests in test_layer_norm.py cover those on a GPU.

Shapes are small on purpose: every CUDA thread is an OS thread, and each column sum costs one
256-thread block per 32 columns, so wide rows ask for at most one column sum.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bertkern
import emulation
from bertkern import backend as _backend
from bertkern import reference
from harness import assert_close_2x, randn
from test_layer_norm import (EMB_CASES, OPTIONAL, PRESENT, as64, check_all, check_embedding, eager, eager_prenorm,
                             make_inputs, run)

CPU = "cpu"


emulated, cuda = emulation.fixtures("layer_norm")


def eager_pre(x, residual, weight, bias, x_bias, eps, keep=None, p=0.0):
    """test_layer_norm.eager, returning (y, prenorm) for return_prenorm=True."""
    h = eager_prenorm(x, residual, x_bias, keep, p)
    return eager(h, None, weight, bias, None, eps), h


def check(cuda, inputs, eps=1e-5, p=0.0, return_prenorm=False, seed=7, grad=None, gp=None):
    """The public op on backend="cuda" (forward and backward through autograd) against the float64
    reference, with eager in the inputs' dtype as the yardstick. With dropout, the mask is the one
    reference.dropout_keep_mask draws from the seed the op draws after torch.manual_seed(seed).
    grad (of y) and gp (of the pre-norm output) are drawn unless given."""
    x = inputs["x"]
    grad = randn(*x.shape, dtype=x.dtype) if grad is None else grad
    gp = randn(*x.shape, dtype=x.dtype) if return_prenorm and gp is None else gp
    keep = None
    if p > 0:
        torch.manual_seed(seed)
        keep = reference.dropout_keep_mask(reference.dropout_seed(p, x.device), x.shape, p)

    def fused(**a):
        torch.manual_seed(seed)  # the op draws its dropout seed from torch's generator
        return bertkern.ops.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"], eps, x_bias=a["x_bias"],
                                           dropout_p=p, return_prenorm=return_prenorm, backend=cuda)

    def ref(**a):
        out = eager_pre(**a, eps=eps, keep=keep, p=p)
        return out if return_prenorm else out[0]

    out = run(fused, inputs, grad, gp)
    check_all(out, run(ref, as64(inputs), grad.double(), None if gp is None else gp.double()),
              run(ref, inputs, grad, gp))
    return out


# (dtype, [M, N]) and the team layout the host picks for it: V (elements per load), ITERS, warps per
# row (w), teams per block (t); "fwd .. / bwd .." where the two kernels differ.
TEAM_CASES = [
    (torch.float16, (33, 128)),   # V8 IT1 w1 t8: 5 blocks forward, 2 grid-stride rounds backward
    (torch.float16, (9, 384)),    # fwd V8 IT2 w1 t8 / bwd V8 IT1 w2 t4 (<= 8 values a thread first)
    (torch.float16, (7, 768)),    # fwd V8 IT3 w1 t8 / bwd V8 IT1 w3 t2 (BERT-base), the last block one team short
    (torch.float16, (5, 1000)),   # fwd V8 IT2 w2 t4 / bwd V8 IT1 w4 t2
    (torch.float16, (17, 7)),     # V1 IT1 w1 t8 (N % 8 != 0: the scalar path)
    (torch.float16, (6, 41)),     # V1 IT1 w2 t4
    (torch.float16, (9, 100)),    # V1 IT4 w1 t8
    (torch.float16, (9, 250)),    # V1 IT8 w1 t8
    (torch.float16, (3, 300)),    # V1 IT1 w10 t1 (320 threads)
    (torch.float16, (64, 1)),     # V1 IT1 w1 t8; one column: dx == 0 needs the rounded sum's statistics
    (torch.bfloat16, (33, 128)),  # V8 IT1 w1 t8
    (torch.bfloat16, (7, 768)),   # fwd V8 IT3 w1 t8 / bwd V8 IT1 w3 t2
    (torch.bfloat16, (3, 1536)),  # fwd V8 IT3 w2 t4 / bwd V8 IT1 w6 t1
    (torch.bfloat16, (5, 1023)),  # V1 IT8 w4 t2
    (torch.bfloat16, (64, 1)),    # V1 IT1 w1 t8
    (torch.float32, (33, 64)),    # V4 IT1 w1 t8
    (torch.float32, (9, 256)),    # V4 IT2 w1 t8
    (torch.float32, (5, 512)),    # fwd V4 IT4 w1 t8 / bwd V4 IT2 w2 t4
    (torch.float32, (5, 1000)),   # fwd V4 IT4 w2 t4 / bwd V4 IT2 w4 t2
    (torch.float32, (7, 300)),    # V4 IT1 w3 t2
    (torch.float32, (9, 768)),    # fwd V4 IT6 w1 t8 / bwd V4 IT2 w3 t2
    (torch.float32, (9, 97)),     # V1 IT4 w1 t8
    (torch.float32, (6, 33)),     # V1 IT1 w2 t4
]


def _id(v):
    return str(v).replace("torch.", "").replace(" ", "")


@pytest.mark.parametrize("dtype,shape", TEAM_CASES, ids=_id)
def test_team_kernels(cuda, dtype, shape):
    """Every optional input, so dweight, dbias and dx_bias all go through the partial rows."""
    check(cuda, make_inputs(shape, dtype, CPU))


# One team per block (5 to 16 warps per row); only dweight (or no column sum) to keep them fast.
WIDE_CASES = [
    (torch.float16, (3, 1032), ("residual", "weight")),  # V8 IT1 w5 t1 (160 threads)
    (torch.float32, (3, 516), ("residual", "weight")),   # V4 IT1 w5 t1
    (torch.float16, (2, 2049), ("weight",)),             # V1 IT8 w9 t1 (288 threads)
    (torch.bfloat16, (2, 3072), ("residual",)),          # fwd V8 IT3 w4 t2 / bwd V8 IT1 w12 t1 (384 threads)
    (torch.float32, (2, 4100), ("residual",)),           # V4 IT4 w9 t1
    (torch.float16, (2, 8192), ("residual",)),           # V8 IT2 w16 t1 (512 threads: the widest team)
]


@pytest.mark.parametrize("dtype,shape,present", WIDE_CASES, ids=_id)
def test_wide_team_kernels(cuda, dtype, shape, present):
    check(cuda, make_inputs(shape, dtype, CPU, present))


@pytest.mark.parametrize("dtype,shape,present,p", [
    # float64 always loops: 32 forward blocks (2 rounds for the first), 16 backward blocks (3 rounds),
    # 16 partial rows per column sum; with dropout and the pre-norm output.
    (torch.float64, (33, 100), OPTIONAL, 0.2),
    (torch.float64, (3, 7), ("weight", "bias"), 0.0),
    (torch.float32, (2, 4097), ("residual", "x_bias"), 0.1),  # too wide for the registers
    (torch.float16, (2, 8200), ("residual",), 0.0),           # vector-aligned, but past 16 warps x 16 values
    (torch.bfloat16, (3, 4097), ("residual",), 0.0),
], ids=_id)
def test_loop_kernels(cuda, dtype, shape, present, p):
    check(cuda, make_inputs(shape, dtype, CPU, present), p=p, return_prenorm=p > 0)


@pytest.mark.parametrize("dtype,shape", [
    (torch.float16, (17, 96)),   # keep_bits<8>: two Philox calls per vector
    (torch.float32, (17, 96)),   # keep_bits<4>
    (torch.bfloat16, (17, 95)),  # keep_bits<1>: one word per element
], ids=_id)
def test_dropout(cuda, dtype, shape):
    """Dropout with the reference's mask, regenerated by the backward (dx, dx_bias), with the pre-norm
    output and its gradient."""
    check(cuda, make_inputs(shape, dtype, CPU), p=0.2, return_prenorm=True)


def test_dropout_mask_is_the_reference_mask(cuda):
    """x = 1 and nothing else: the pre-norm sum is keep / (1 - p), so it shows the mask bit for bit
    (test_layer_norm.test_dropout_mask_is_the_same_on_every_backend, on every kernel path)."""
    op = torch.ops.bertkern.add_layer_norm
    for dtype, shape in [(torch.float16, (9, 96)), (torch.float32, (9, 64)), (torch.float16, (9, 95)),
                         (torch.float64, (9, 50))]:
        x = torch.ones(shape, dtype=dtype)
        for s in (0, 2**40 + 3):
            seed = torch.tensor([s], dtype=torch.int64)
            pre = op(x, None, None, None, None, seed, 1e-5, 0.3, True, cuda)[1]
            assert torch.equal(pre != 0, reference.dropout_keep_mask(seed, shape, 0.3)), (dtype, shape, s)
        pre = op(x, None, None, None, None, torch.tensor([9]), 1e-5, 1.0, True, cuda)[1]
        assert (pre == 0).all()  # p = 1 drops everything


@pytest.mark.parametrize("present", PRESENT, ids=lambda p: "+".join(p) or "none")
def test_optional_inputs(cuda, present):
    """Each subset of (residual, weight, bias, x_bias), with and without the pre-norm output."""
    for return_prenorm in (False, True):
        check(cuda, make_inputs((9, 40), torch.float32, CPU, present), eps=1e-12, return_prenorm=return_prenorm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=_id)
def test_strided_rows(cuda, dtype):
    """Rows with a stride: misaligned (row stride N + 7: the scalar path even for N % 8 == 0),
    strided parameters (made contiguous), a transposed upstream gradient (copied). Then 2-D
    misaligned gradients of y and of the pre-norm output, which reach the backward as they are."""
    inputs = make_inputs((2, 3, 96), dtype, CPU, noncontig=True)
    inputs["weight"] = randn(192, dtype=dtype)[::2] + 1
    inputs["x_bias"] = randn(96, 2, dtype=dtype)[:, 0]
    x, grad = inputs["x"], randn(3, 2, 96, dtype=dtype).transpose(0, 1)
    assert x.stride(-2) == 103 and not grad.is_contiguous()
    out = run(lambda **a: bertkern.ops.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"], 1e-5,
                                                      x_bias=a["x_bias"], backend=cuda), inputs, grad)
    check_all(out, run(lambda **a: eager(**a, eps=1e-5), as64(inputs), grad.double()),
              run(lambda **a: eager(**a, eps=1e-5), inputs, grad))
    inputs = make_inputs((5, 96), dtype, CPU, noncontig=True)
    check(cuda, inputs, return_prenorm=True, grad=randn(5, 96, dtype=dtype, noncontig=True),
          gp=randn(5, 96, dtype=dtype, noncontig=True))


def test_aligned_strided_rows(cuda):
    """16-byte aligned rows with a stride other than N (inputs, and the gradients of y and of the
    pre-norm output): the vector path reads them in place. And one row with an odd stride (a single
    row needs only its start aligned)."""
    inputs = make_inputs((9, 128), torch.float16, CPU)
    inputs["x"] = randn(9, 136, dtype=torch.float16)[:, :128]
    inputs["residual"] = randn(9, 144, dtype=torch.float16)[:, 8:136]
    check(cuda, inputs, p=0.1, return_prenorm=True, grad=randn(9, 152, dtype=torch.float16)[:, 16:144],
          gp=randn(9, 136, dtype=torch.float16)[:, 8:])
    inputs = make_inputs((1, 128), torch.float16, CPU)
    inputs["x"] = randn(3, 131, dtype=torch.float16)[:1, :128]
    check(cuda, inputs)


@pytest.mark.parametrize("offset", [0.0, 1000.0], ids=["spread", "offset"])
def test_fp16_large_magnitude(cuda, offset):
    """test_layer_norm.test_add_layer_norm_fp16_large_magnitude: fp32 statistics neither overflow
    nor cancel."""
    x = (offset + torch.randn(7, 768).clamp(-3, 3) * (8000.0 if offset == 0 else 1.0)).half()
    out = check(cuda, {"x": x, "residual": randn(7, 768, dtype=torch.float16), "weight": None, "bias": None,
                       "x_bias": None})
    assert torch.isfinite(out[0][0]).all() and all(torch.isfinite(g).all() for g in out[1].values())


@pytest.mark.parametrize("dtype,shape,p", [
    (torch.float16, (9, 384), 0.1),     # fwd one warp a row / bwd two warps a row (team sums via smem)
    (torch.float32, (5, 1000), 0.0),    # fwd two warps a row / bwd four, two teams a block
    (torch.float16, (3, 300), 0.0),     # ten warps, one team a block (scalar path)
    (torch.bfloat16, (3, 4097), 0.1),   # the loop kernels
    (torch.float64, (33, 100), 0.2),    # the loop kernels' grid-stride rounds; column sums of 16 partial rows
], ids=_id)
def test_every_thread_order_gives_the_same_bits(cuda, monkeypatch, dtype, shape, p):
    """Forward (with the pre-norm output) and backward of every input under every thread order: a
    shared-memory race would change some bits (tests/emulation.py)."""
    inputs = make_inputs(shape, dtype, CPU)
    grad, gp = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)

    def fused(**a):
        torch.manual_seed(3)  # the op's dropout seed
        return bertkern.ops.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"], 1e-5, x_bias=a["x_bias"],
                                           dropout_p=p, return_prenorm=True, backend=cuda)

    def outputs():
        outs, grads = run(fused, inputs, grad, gp)
        return [*outs, *grads.values()]

    emulation.same_bits_in_every_order(monkeypatch, outputs)


def test_no_rows(cuda):
    x = torch.randn(0, 3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = bertkern.ops.add_layer_norm(x, torch.randn(0, 3, 16), w, None, dropout_p=0.1, backend=cuda)
    assert y.shape == x.shape
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert gx.shape == x.shape and (gw == 0).all()
    ops = torch.ops.bertkern_cuda
    h = torch.randn(0, 16, dtype=torch.float16)
    stats = torch.empty(0)
    dh, dx, dw, db, dxb = ops.add_layer_norm_bwd(h, None, h, stats, stats, None, None, 0.0, True, True, False)
    assert dh.shape == (0, 16) and dx.numel() == 0 and dxb.numel() == 0
    assert dw.shape == db.shape == (16,) and (dw == 0).all() and (db == 0).all()


# (dtype, hidden size, case) for embedding_layer_norm's kernel: every test_layer_norm case on the
# scalar (N = 7) and vector (384) team paths and on the loop kernel (float64); a few cases on one
# column, BERT-base's row (fp16 V8 IT3, fp32 V4 IT6: one warp per row) and rows too wide for the
# registers (the loop kernel in fp16 / fp32; cases without column sums, which cost 32 emulated
# threads per column).
EMB_PARAMS = (
    [(dt, n, case) for dt, n in [(torch.float32, 7), (torch.float32, 384), (torch.float16, 7), (torch.float16, 384),
                                 (torch.bfloat16, 384), (torch.float64, 7)] for case in EMB_CASES]
    + [(dt, n, case) for dt, n in [(torch.bfloat16, 1), (torch.float16, 768), (torch.float32, 768)]
       for case in ("all", "no-grad")]
    + [(dt, n, case) for dt, n in [(torch.float16, 8200), (torch.float32, 4097)] for case in ("word-only", "no-grad")]
)


@pytest.mark.parametrize("dtype,n,case", EMB_PARAMS, ids=_id)
def test_embedding_layer_norm(cuda, monkeypatch, dtype, n, case):
    """test_layer_norm's embedding cases on backend="cuda": the forward is the CUDA kernel alone (the
    Triton one raises if called), the backward add_layer_norm_bwd (dweight and dbias included)."""
    from bertkern.triton import layer_norm as triton_ln

    def no_triton(*args, **kwargs):
        raise AssertionError("the cuda backend's embedding forward called the Triton kernel")

    monkeypatch.setattr(triton_ln, "embedding_forward", no_triton)
    with _backend.observe() as calls:
        check_embedding(cuda, CPU, dtype, case, n, S=9 if n < 1000 else 2)
    assert {c for op, c in calls if op == "embedding_layer_norm"} == {"cuda"}


@pytest.mark.parametrize("dtype,n", [(torch.float16, 64), (torch.float32, 7), (torch.float64, 5)], ids=_id)
def test_embedding_ids_out_of_range(cuda, dtype, n):
    """Rows with an id outside its table (negative or too large, in any of the three) come out NaN,
    and read nothing; the other rows are unaffected. (The public op checks ids of CPU tensors before
    any kernel runs, so the emulated op is called directly.)"""
    op = torch.ops.bertkern_cuda.embedding_layer_norm_fwd
    word, pos, typ = randn(5, n, dtype=dtype), randn(4, n, dtype=dtype), randn(2, n, dtype=dtype)
    ids = torch.tensor([[0, 5, 1, 2], [-1, 4, 3, 0]], dtype=torch.int32)
    tids = torch.tensor([[0, 0, 2, 1], [0, 1, 1, 0]])
    pids = torch.tensor([[0, 1, 2, 3], [3, 2, -2, 9]])
    bad = torch.tensor([[False, True, True, False], [True, False, True, True]])
    y, pre, mean, rstd = op(ids, pids, tids, word, pos, typ, None, None, 1e-5, True)
    assert y.shape == pre.shape == (2, 4, n) and mean.shape == rstd.shape == (2, 4)
    for t in (y, pre):
        assert t[bad].isnan().all() and not t[~bad].isnan().any()
    assert mean[bad].isnan().all() and rstd[bad].isnan().all()
    good = ~bad
    e = (word[ids.long().clamp(0, 4)].double() + typ[tids.clamp(0, 1)].double() + pos[pids.clamp(0, 3)].double())
    want = F.layer_norm(e.to(dtype).double(), (n,), eps=1e-5)
    assert_close_2x(y[good], want[good], want[good].to(dtype), "y")


def test_argument_checks(cuda):
    """The host-side checks of both ops (they run before any launch). Not the device check: the
    dispatcher sends only CPU tensors to the emulated ops."""
    ops = torch.ops.bertkern_cuda
    fwd, bwd = "bertkern_cuda::add_layer_norm_fwd", "bertkern_cuda::add_layer_norm_bwd"
    x = torch.randn(4, 8)
    w = torch.randn(8)

    def f(x=x, residual=None, weight=None, bias=None, x_bias=None, seed=None, eps=1e-5, p=0.0):
        return ops.add_layer_norm_fwd(x, residual, weight, bias, x_bias, seed, eps, p, False)

    bad_fwd = [
        (dict(x=torch.randn(2, 4, 8)), r"x must be 2-D \[M, N\], got 3-D shape \[2, 4, 8\]"),
        (dict(x=torch.ones(4, 8, dtype=torch.int32)), "x must be float32, float16, bfloat16 or float64"),
        (dict(x=torch.randn(8, 4).t()), "x must have unit stride in dim 1"),
        (dict(residual=torch.randn(4, 9)), r"residual shape \[4, 9\] does not match \[4, 8\]"),
        (dict(residual=torch.randn(4, 8).double()), "residual dtype"),
        (dict(weight=torch.randn(7)), r"weight must have shape \[8\]"),
        (dict(bias=w.half()), "bias dtype"),
        (dict(x_bias=torch.randn(8, 1)), r"x_bias must have shape \[8\], got \[8, 1\]"),
        (dict(p=0.1), "dropout_p > 0 needs a seed"),
        (dict(p=0.1, seed=torch.tensor([1, 2])), r"seed must be a one-element int64 tensor, got Long of shape \[2\]"),
        (dict(p=1.5, seed=torch.tensor([1])), "dropout_p must be in"),
        (dict(eps=-1.0), "eps must be non-negative"),
        (dict(x=torch.randn(4, 0)), "x must have a non-empty last dim"),
    ]
    for kwargs, msg in bad_fwd:
        with pytest.raises(RuntimeError, match=f"{fwd}: {msg}"):
            f(**kwargs)

    y, pre, mean, rstd = ops.add_layer_norm_fwd(x, None, w, None, None, None, 1e-5, 0.0, True)

    def b(grad=x, grad_prenorm=None, h=pre, mean=mean, rstd=rstd, weight=w, seed=None, p=0.0):
        return ops.add_layer_norm_bwd(grad, grad_prenorm, h, mean, rstd, weight, seed, p, True, True, True)

    bad_bwd = [
        (dict(h=torch.randn(4, 8, 1)), "h must be 2-D"),
        (dict(grad=torch.randn(4, 9)), "grad shape"),
        (dict(grad_prenorm=x.half()), "grad_prenorm dtype"),
        (dict(weight=torch.randn(9)), r"weight must have shape \[8\]"),
        (dict(mean=mean[:3]), r"mean must be a contiguous \[4\] tensor, got shape \[3\]"),
        (dict(rstd=rstd.double()), "rstd must be Float"),
        (dict(p=0.5), "dropout_p > 0 needs a seed"),
    ]
    for kwargs, msg in bad_bwd:
        with pytest.raises(RuntimeError, match=f"{bwd}: {msg}"):
            b(**kwargs)

    emb = "bertkern_cuda::embedding_layer_norm_fwd"
    ids, word = torch.zeros(2, 3, dtype=torch.long), torch.randn(5, 8)

    def e(ids=ids, pids=None, tids=None, word=word, pos=None, typ=None, weight=None, eps=1e-5):
        return ops.embedding_layer_norm_fwd(ids, pids, tids, word, pos, typ, weight, None, eps, False)

    bad_emb = [
        (dict(ids=torch.zeros(6, dtype=torch.long)), r"input_ids must be 2-D \[B, S\], got shape \[6\]"),
        (dict(ids=ids.float()), "input_ids must be int64 or int32, got Float"),
        (dict(pos=torch.randn(4, 8), pids=torch.zeros(3, 3, dtype=torch.long)),
         r"position_ids of shape \[3, 3\] does not broadcast to input_ids' \[2, 3\]"),
        (dict(typ=torch.randn(2, 8), tids=torch.zeros(1, 2, 3, dtype=torch.long)), "token_type_ids of shape"),
        (dict(typ=torch.randn(2, 8), tids=torch.zeros(2, 3, dtype=torch.int16)),
         "token_type_ids must be int64 or int32"),
        (dict(pos=torch.randn(4, 9)), r"position_embeddings must have shape \[rows, 8\], got \[4, 9\]"),
        (dict(pos=torch.randn(0, 8)), "position_embeddings must have shape"),
        (dict(typ=torch.randn(2, 8).double()), "token_type_embeddings dtype"),
        (dict(word=torch.randn(8, 5).t()), "word_embeddings must have unit stride in dim 1"),
        (dict(word=torch.randn(5, 0)), "word_embeddings must have a non-empty last dim"),
        (dict(weight=torch.randn(7)), r"weight must have shape \[8\]"),
        (dict(eps=-1.0), "eps must be non-negative"),
    ]
    for kwargs, msg in bad_emb:
        with pytest.raises(RuntimeError, match=f"{emb}: {msg}"):
            e(**kwargs)
    # ids for an absent table are ignored, whatever their shape
    assert e(pids=torch.zeros(7, dtype=torch.long))[0].shape == (2, 3, 8)
