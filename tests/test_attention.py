"""bertkern.ops.attention / attention_varlen and bertkern.padding: the fused kernels against a float64
reference (out, dq, dk, dv; the 2x-of-eager rule, eager = the reference in the inputs' dtype) over
dtypes x lengths x head dims x every mask form, fully masked rows and fully padded sequences, q/k/v
read in place from a packed QKV projection, varlen vs padded, dropout (the masked_softmax Philox mask,
reproducible, the same in forward and backward), gradcheck, opcheck, torch.compile, bad input, and
Hugging Face parity of the reference BERT with fused_attention and padding_free.

Under TRITON_INTERPRET=1 (no GPU) the shapes stay tiny; the gpu-marked tests cover bf16, D = 128
and long sequences on a GPU, and run every kernel test through the CUDA C++ kernels too (backend
"cuda": fp16 / bf16 only, so those tests use fp16 where the Triton ones use fp32)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import bertkern
from bertkern import backend as _backend
from bertkern import padding, reference
from bertkern.models import BertModel
from harness import assert_close_2x, poison_allocator, skip_unless_usable
from test_masked_softmax import make_mask

attn_mod = importlib.import_module("bertkern.ops.attention")  # the module (bertkern.ops.attention is the function)

NEG_INF = float("-inf")
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
KERNEL = pytest.param("triton", id="triton-cuda" if GPU else "triton-interp", marks=[pytest.mark.gpu] if GPU else [])
CUDA = pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)
KERNELS = [KERNEL, CUDA]


def kdtype(backend: str) -> torch.dtype:
    """The dtype a backend-generic test runs in: fp16 for the CUDA kernels (fp16 / bf16 only)."""
    return torch.float16 if backend == "cuda" else torch.float32


def skip_unless_covered(backend: str, q: torch.Tensor) -> None:
    """Skip unless `backend` can run q (which also loads bertkern._C, as bertkern.ops does: the tests
    call torch.ops.bertkern.attention directly, and a fresh xdist worker may not have loaded it yet);
    the CUDA kernels' test params also skip inputs that backend="cuda" sends to Triton instead
    (test_cuda_backend_coverage checks that routing)."""
    skip_unless_usable(backend, q.device)
    why = attn_mod.cuda_unsupported(q) if backend == "cuda" else None
    if why is not None:
        pytest.skip(f"not a CUDA-kernel input: {why}")


class _LaunchSpy:
    """Stands in for a Triton kernel (`kernel[grid](...)`): logs its name, then launches it."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(self.name)
            return self.kernel[grid](*args, **kwargs)
        return launch


# The Triton backward's kernels (besides delta's) by path: the default five-GEMM one, and the
# seven-GEMM one that torch.use_deterministic_algorithms(True) selects.
BWD_KERNELS = {"five_gemm": {"_bwd_kernel"}, "deterministic": {"_bwd_dkdv_kernel", "_bwd_dq_kernel"}}


@pytest.fixture
def bwd_path(request, monkeypatch):
    """Parametrized indirectly with a BWD_KERNELS key: runs the test with that Triton backward (in
    deterministic mode for "deterministic", warn_only so that a GPU reference's cuBLAS calls still
    run) and checks afterwards that a triton-backend test launched exactly that path's kernels."""
    from bertkern.triton import attention as k_mod

    log = []
    for name in set().union(*BWD_KERNELS.values()):
        monkeypatch.setattr(k_mod, name, _LaunchSpy(name, getattr(k_mod, name), log))
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(request.param == "deterministic", warn_only=True)
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    if request.node.callspec.params.get("backend", "triton") == "triton":
        assert log and set(log) == BWD_KERNELS[request.param], log


BWD_PATHS = pytest.mark.parametrize("bwd_path", list(BWD_KERNELS), indirect=True)


def seed_tensor(value: int, device=DEVICE) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


def rand(*shape, dtype=torch.float32, device=DEVICE, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def ref_attention(q, k, v, mask=None, scale=None, dropout_p=0.0, seed=None):
    """reference.attention with masked_softmax's seeded dropout: math in fp32 (fp64), rounded once."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = q.to(acc) @ k.to(acc).transpose(-1, -2)
    p = reference.masked_softmax(s, mask, scale, dropout_p, seed=seed if dropout_p > 0 else None)
    return (p @ v.to(acc)).to(q.dtype)


def fwd_bwd(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad)
    return (out.detach(), *(t.grad for t in leaves))


def assert_attention_close(got, want, eager, names=("out", "dq", "dk", "dv")):
    """The 2x-of-eager rule on each output, with the absolute floor scaled by the largest reference
    value over all of the op's outputs (as the benchmarks' gate scales it by max(1, |reference|)).
    Over all outputs, because the gradients share the dO.V products: a gradient that is exactly 0
    in exact arithmetic (every query that sees a single key) still carries their rounding.
    Implemented by dividing everything by a power of two (exact), then the shared rule."""
    mag = max([1.0] + [w.abs().max().item() for w in want if w.numel()])
    div = 2.0 ** math.ceil(math.log2(mag))
    for name, g, w, e in zip(names, got, want, eager):
        assert_close_2x(g / div, w / div, e / div, name)


def check_attention(backend, q, k, v, mask, grad, scale=None, dropout_p=0.0, seed=None):
    """The custom op (our seed) against the float64 reference, eager = the reference in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    skip_unless_covered(backend, q)

    def ours(q, k, v):
        return torch.ops.bertkern.attention(q, k, v, mask, scale, dropout_p, seed, backend)[0]

    def ref(q, k, v):
        return ref_attention(q, k, v, mask, scale, dropout_p, seed)

    poison_allocator(q.device.type)
    got = fwd_bwd(ours, (q, k, v), grad)
    want = fwd_bwd(ref, (q.double(), k.double(), v.double()), grad.double())
    eager = fwd_bwd(ref, (q, k, v), grad)
    assert_attention_close(got, want, eager)
    return got


# ---------------------------------------------------------------- accuracy: dtype x S x D
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("S", [1, 7, 77, 129])
@pytest.mark.parametrize("D", [32, 64, 80])
def test_attention_matches_reference(backend, dtype, S, D):
    skip_unless_usable(backend, DEVICE)
    check_padding_mask(backend, dtype, S, D)


def check_padding_mask(backend, dtype, S, D, device=DEVICE):
    """[B, 1, 1, S] padding mask (the fast path): a fully padded sequence, a randomly padded one, and
    one with a single real token (also run by test_attention_emulated.py)."""
    B, H = 3, 2
    q, k, v = (rand(B, H, S, D, dtype=dtype, device=device, scale=1.5) for _ in range(3))
    mask = make_mask("b11s", B, H, S, S, dtype, device)
    out, dq, dk, dv = check_attention(backend, q, k, v, mask, rand(B, H, S, D, dtype=dtype, device=device))
    # batch 0 is fully padded: zeros and zero gradients, not NaN or uniform attention
    for t in (out, dq, dk, dv):
        assert (t[0] == 0).all()


MASK_FORMS = ["none", "b11s", "b1ss", "bhss", "expanded", "b11s:inf", "b11s:min", "b1ss:soft", "bhss:min",
              "expanded:min", "s", "ss:inf"]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype, S, bwd_path", [(dt, S, "five_gemm") for dt in (torch.float32, torch.float16)
                                                for S in (7, 77)] + [(torch.float32, 77, "deterministic")],
                         ids=str, indirect=["bwd_path"])
@pytest.mark.parametrize("form", MASK_FORMS)
def test_attention_mask_forms(backend, dtype, S, bwd_path, form):
    """Every mask form masked_softmax takes: bool / 0,-inf / 0,finfo.min / soft additive, over
    [B,1,1,S], [B,1,S,S], [B,H,S,S], stride-0 expanded views, [S] and [S,S]; masked keys get zero
    weight (their dk, dv are 0 where no query sees them). Both Triton backwards (one size for the
    deterministic one)."""
    skip_unless_usable(backend, DEVICE)
    B, H, D = 3, 2, 32
    q, k, v = (rand(B, H, S, D, dtype=dtype, scale=1.5) for _ in range(3))
    mask = make_mask(form, B, H, S, S, dtype, DEVICE)
    check_attention(backend, q, k, v, mask, rand(B, H, S, D, dtype=dtype), scale=0.3)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("q_dtype, mask_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=str)
# fp32's finfo.min times the kernel's log2(e) factor is -inf, as meant; the interpreter's numpy says so
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_mixed_mask_dtype(backend, q_dtype, mask_dtype):
    """The mask's own finfo.min masks a key, whatever q's dtype."""
    skip_unless_usable(backend, DEVICE)
    q, k, v = (rand(2, 2, 33, 32, dtype=q_dtype) for _ in range(3))
    mask = make_mask("b1ss:min", 2, 2, 33, 33, mask_dtype, DEVICE)
    check_attention(backend, q, k, v, mask, rand(2, 2, 33, 32, dtype=q_dtype))


@pytest.mark.parametrize("backend", KERNELS)
@BWD_PATHS
def test_cross_lengths_and_head_dim_128(backend, bwd_path):
    """S_q != S_k (keys longer and shorter), and D = 128 once (the largest BERT-family head)."""
    skip_unless_usable(backend, DEVICE)
    for S_q, S_k, D in [(5, 70, 32), (70, 9, 32), (19, 23, 128)]:
        q = rand(1, 2, S_q, D, dtype=torch.float16)
        k, v = rand(1, 2, S_k, D, dtype=torch.float16), rand(1, 2, S_k, D, dtype=torch.float16)
        mask = make_mask("b1ss", 1, 2, S_q, S_k, torch.float16, DEVICE)
        check_attention(backend, q, k, v, mask, rand(1, 2, S_q, D, dtype=torch.float16))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("reload_kv", [False, True], ids=["held_kv", "reload_kv"])
@BWD_PATHS
def test_many_tiles(backend, reload_kv, bwd_path, monkeypatch):
    """Many key tiles for the online softmax and many query tiles for the backward, with tails, a
    [B,H,S,S] mask and dropout: 16 x 16 tiles under the interpreter; on a GPU, S = 203 spans four of
    the 64-row tiles. Both Triton backwards, their key-block kernel both ways: k, v held across its
    loop or reloaded per step (RELOAD_KV: the sm_80 and D = 256 configs)."""
    skip_unless_usable(backend, DEVICE)
    from bertkern.triton import attention as k_mod

    if reload_kv and backend != "triton":
        pytest.skip("a Triton config")
    monkeypatch.setattr(k_mod, "INTERPRET_BLOCKS", (16, 16))
    real = k_mod.bwd_config
    monkeypatch.setattr(k_mod, "bwd_config", lambda *a: ((*real(*a)[0][:4], reload_kv), real(*a)[1]))
    S, D, dt = (203 if GPU else 37), 32, kdtype(backend)
    q, k, v = (rand(1, 2, S, D, dtype=dt, scale=2.0) for _ in range(3))
    mask = make_mask("bhss:min", 1, 2, S, S, dt, DEVICE)
    check_attention(backend, q, k, v, mask, rand(1, 2, S, D, dtype=dt), dropout_p=0.2, seed=seed_tensor(11))


@pytest.mark.parametrize("backend", KERNELS)
@BWD_PATHS
def test_large_logits_and_fully_masked_rows(backend, bwd_path):
    """Logits of +-100s (the online max must rescale), rows masked entirely through a [B,1,S,S] mask:
    zeros and zero gradients, finite everywhere."""
    skip_unless_usable(backend, DEVICE)
    B, H, S, D, dt = 2, 2, 40, 32, kdtype(backend)
    q, k, v = (rand(B, H, S, D, dtype=dt, scale=6.0) for _ in range(3))
    keep = torch.ones(B, 1, S, S, dtype=torch.bool, device=DEVICE)
    keep[0, :, 3] = False
    keep[1, :, :, 5:] = False
    out, dq, dk, dv = check_attention(backend, q, k, v, keep, rand(B, H, S, D, dtype=dt))
    assert (out[0, :, 3] == 0).all() and (dq[0, :, 3] == 0).all()
    assert (dk[1, :, 5:] == 0).all() and (dv[1, :, 5:] == 0).all()


# ---------------------------------------------------------------- layouts: packed QKV read in place
def test_packed_qkv_views_are_read_in_place(monkeypatch):
    """q, k, v = qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4): the kernel gets the caller's memory
    (same data_ptr and strides), forward and backward, and the output is [B, S, H, D] memory."""
    skip_unless_usable("triton", DEVICE)
    from bertkern.triton import attention as k_mod

    seen = []
    real_fwd, real_bwd = k_mod.forward, k_mod.backward

    def spy_fwd(q, k, v, *args):
        seen.append(("fwd", q, k, v))
        return real_fwd(q, k, v, *args)

    def spy_bwd(grad, q, k, v, *args):
        seen.append(("bwd", q, k, v))
        return real_bwd(grad, q, k, v, *args)

    monkeypatch.setattr(k_mod, "forward", spy_fwd)
    monkeypatch.setattr(k_mod, "backward", spy_bwd)
    B, S, H, D = 2, 13, 3, 32
    qkv = rand(B, S, 3 * H * D).requires_grad_()
    q, k, v = qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride(-1) == 1
    mask = make_mask("b11s", B, H, S, S, torch.float32, DEVICE)
    out = bertkern.ops.attention(q, k, v, mask, backend="triton")
    assert out.transpose(1, 2).is_contiguous()  # [B, S, H * D] is a view
    g = rand(B, H, S, D)
    out.backward(g)
    assert [s[0] for s in seen] == ["fwd", "bwd"]
    for _, sq, sk, sv in seen:
        for mine, theirs in ((sq, q), (sk, k), (sv, v)):
            assert mine.data_ptr() == theirs.data_ptr() and mine.stride() == theirs.stride()
    qkv2 = qkv.detach().double().requires_grad_()
    q2, k2, v2 = qkv2.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    want = ref_attention(q2, k2, v2, mask)
    want.backward(g.double())
    torch.testing.assert_close(out.detach().double(), want.detach(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(qkv.grad.double(), qkv2.grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", KERNELS)
def test_other_strides_are_copied_and_still_right(backend):
    """D not unit-stride (a transposed view) is copied once; odd-strided grads too."""
    skip_unless_usable(backend, DEVICE)
    B, H, S, D, dt = 1, 2, 9, 32, kdtype(backend)
    q = rand(B, H, D, S, dtype=dt).transpose(-1, -2)
    k, v = rand(B, H, S, D, dtype=dt), rand(B, S, H, D, dtype=dt).transpose(1, 2)
    grad = rand(B, H, D, S, dtype=dt).transpose(-1, -2)
    check_attention(backend, q, k, v, None, grad)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 48, 64, 80, 100, 128])
def test_cuda_packed_qkv_views_and_head_dims(D):
    """The CUDA kernels on views of a packed [B, S, 3, H, D] projection (strides (3HD, D, 3HD, 1): the
    16-byte vector loads when D % 8 == 0, element loads otherwise) at every compiled head-dim bucket
    (32, 64, 80, 128) and sizes padded up to one."""
    B, S, H = 2, 77, 3
    qkv = rand(B, S, 3 * H * D, dtype=torch.bfloat16, device="cuda")
    q, k, v = qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    mask = make_mask("b11s", B, H, S, S, torch.bfloat16, "cuda")
    check_attention("cuda", q, k, v, mask, rand(B, H, S, D, dtype=torch.bfloat16, device="cuda"))


# ---------------------------------------------------------------- varlen
def _packed_batch(lengths, H, D, dtype=torch.float32, S=None):
    """(padded q, k, v [B, H, S, D], bool mask [B, S], packed q, k, v [total, H, D], cu_seqlens, max_seqlen)."""
    B = len(lengths)
    S = S or max(max(lengths), 1)
    mask = torch.arange(S, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    padded = [rand(B, S, H, D, dtype=dtype) * mask[:, :, None, None] for _ in range(3)]
    packed = [padding.unpad(t, mask)[0] for t in padded]
    _, _, cu, max_len = padding.unpad(padded[0], mask)
    return [t.transpose(1, 2) for t in padded], mask, packed, cu, max_len


@pytest.mark.parametrize("backend, bwd_path", [
    pytest.param("torch", "five_gemm", id="torch"), pytest.param("cuda", "five_gemm", id="cuda", marks=CUDA.marks),
    *(pytest.param("triton", p, id=f"{KERNEL.id}-{p}", marks=KERNEL.marks) for p in BWD_KERNELS),
], indirect=["bwd_path"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_equals_padded(backend, bwd_path, dropout_p):
    """attention_varlen on the packed real tokens == attention on the padded batch with its padding
    mask, at the real tokens: outputs and gradients, and the same dropout mask (max_seqlen == S); both
    Triton backwards."""
    skip_unless_usable(backend, DEVICE)
    lengths, H, D = [5, 0, 17, 1, 12], 2, 32
    (q, k, v), mask, (qp, kp, vp), cu, max_len = _packed_batch(lengths, H, D, dtype=kdtype(backend))
    assert cu.tolist() == [0, 5, 5, 22, 23, 35] and cu.dtype == torch.int32 and max_len == 17
    seed = seed_tensor(1234) if dropout_p else None
    grad = rand(*q.shape) * mask[:, None, :, None]
    gp = padding.unpad(grad.transpose(1, 2), mask)[0]

    def padded(q, k, v):
        return torch.ops.bertkern.attention(q, k, v, mask[:, None, None, :], 0.25, dropout_p, seed, backend)[0]

    def packed(q, k, v):
        return torch.ops.bertkern.attention_varlen(q, k, v, cu, max_len, 0.25, dropout_p, seed, backend)[0]

    want = fwd_bwd(padded, (q, k, v), grad)
    got = fwd_bwd(packed, (qp, kp, vp), gp)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        w = padding.unpad(w.transpose(1, 2), mask)[0]
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
    if dropout_p:
        ref = ref_attention(q, k, v, mask[:, None, None, :], 0.25, dropout_p, seed)
        tol = dict(rtol=1e-5, atol=1e-6) if q.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got[0], padding.unpad(ref.transpose(1, 2), mask)[0], **tol)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_varlen_accuracy_and_packed_qkv(backend, dtype, monkeypatch):
    """Varlen from views of a packed [total, 3, H, D] projection (read in place), against float64."""
    skip_unless_usable(backend, DEVICE)
    from bertkern.triton import attention as k_mod

    seen = []
    real = k_mod.varlen_forward
    monkeypatch.setattr(k_mod, "varlen_forward", lambda q, *a: seen.append(q) or real(q, *a))
    lengths, H, D = [33, 7, 1, 64], 2, 80
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    total = sum(lengths)
    qkv = rand(total, 3, H, D, dtype=dtype, scale=1.5)
    q, k, v = qkv.unbind(1)
    grad = rand(total, H, D, dtype=dtype)

    def ours(q, k, v):
        return bertkern.ops.attention_varlen(q, k, v, cu, max(lengths), backend=backend)

    def ref(q, k, v):  # per sequence, through the reference
        outs = [ref_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)).transpose(0, 1)
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs)

    got = fwd_bwd(ours, (q, k, v), grad)
    if backend == "triton":
        ours(q, k, v)
        assert seen[-1].data_ptr() == q.data_ptr() and seen[-1].stride() == q.stride()
    want = fwd_bwd(ref, (q.double(), k.double(), v.double()), grad.double())
    eager = fwd_bwd(ref, (q, k, v), grad)
    assert_attention_close(got, want, eager)


def test_varlen_empty_batch():
    skip_unless_usable("triton", DEVICE)
    for backend in ("torch", "triton") + (("cuda",) if GPU else ()):
        q = rand(0, 2, 32, dtype=torch.float16 if GPU else torch.float32)
        cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
        out = bertkern.ops.attention_varlen(q, q, q, cu, 0, backend=backend)
        assert out.shape == (0, 2, 32)


# ---------------------------------------------------------------- padding helpers
def test_unpad_repad_round_trip_and_grads():
    B, S = 3, 6
    hidden = torch.randn(B, S, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 1]])  # right, none, holes
    packed, idx, cu, max_len = padding.unpad(hidden, mask)
    assert packed.shape == (7, 4, 5) and cu.tolist() == [0, 3, 3, 7] and max_len == 4
    assert idx.tolist() == [0, 1, 2, 13, 14, 16, 17]
    back = padding.repad(packed, idx, B, S)
    torch.testing.assert_close(back, hidden * mask[:, :, None, None])
    assert torch.autograd.gradcheck(lambda h: padding.repad(padding.unpad(h, mask)[0] * 2, idx, B, S), (hidden,))
    full = torch.ones(B, S, dtype=torch.bool)  # no padding: a view in place, indices in order
    packed, idx, cu, max_len = padding.unpad(hidden, full)
    assert packed._base is hidden and idx.tolist() == list(range(B * S)) and cu.tolist() == [0, 6, 12, 18]
    torch.testing.assert_close(padding.repad(packed, idx, B, S), hidden)
    with pytest.raises(ValueError, match="attention_mask must be"):
        padding.unpad(hidden, mask[:, :5])
    with pytest.raises(ValueError, match="indices"):
        padding.repad(packed[:3], idx, B, S)


# ---------------------------------------------------------------- dropout
@pytest.mark.parametrize("backend", ["torch", *KERNELS])
@pytest.mark.parametrize("form", ["b11s", "bhss"])
def test_dropout_matches_reference_mask(backend, form):
    """Same seed, same mask as masked_softmax's: out and grads equal the reference built from
    reference.masked_softmax(..., seed) (rows (b, h, i) of the [B, H, S, S] probabilities)."""
    skip_unless_usable(backend, DEVICE)
    B, H, S, D, dt = 2, 3, 37, 32, kdtype(backend)
    q, k, v = (rand(B, H, S, D, dtype=dt) for _ in range(3))
    mask = make_mask(form, B, H, S, S, dt, DEVICE)
    check_attention(backend, q, k, v, mask, rand(B, H, S, D, dtype=dt), dropout_p=0.3,
                    seed=seed_tensor(0x1234_5678_9ABC))


@pytest.mark.parametrize("backend", ["torch", *KERNELS])
def test_dropout_reproducible_and_backward_consistent(backend):
    """torch.manual_seed reproduces the output; consecutive calls differ; the backward uses the
    forward's mask: identical to autograd through the reference with the seed the op drew."""
    skip_unless_usable(backend, DEVICE)
    B, H, S, D, p = 2, 2, 29, 32, 0.4
    q, k, v = (rand(B, H, S, D, dtype=torch.float64 if backend == "torch" else kdtype(backend)) for _ in range(3))
    torch.manual_seed(7)
    y1 = bertkern.ops.attention(q, k, v, dropout_p=p, backend=backend)
    y2 = bertkern.ops.attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(7)
    y3 = bertkern.ops.attention(q, k, v, dropout_p=p, backend=backend)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)
    # The seed the public function draws: the first int64 from the generator after manual_seed(7).
    torch.manual_seed(7)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE)
    torch.manual_seed(7)
    grad = rand(B, H, S, D, dtype=q.dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    out = bertkern.ops.attention(*leaves, dropout_p=p, backend=backend)
    out.backward(grad)
    want = fwd_bwd(lambda *t: ref_attention(*t, dropout_p=p, seed=seed), (q.double(), k.double(), v.double()),
                   grad.double())
    eager = fwd_bwd(lambda *t: ref_attention(*t, dropout_p=p, seed=seed), (q, k, v), grad)
    assert_attention_close((out.detach(), *(t.grad for t in leaves)), want, eager)


@pytest.mark.parametrize("backend", KERNELS)
def test_dropout_statistics(backend):
    skip_unless_usable(backend, DEVICE)
    B, H, S, D, p, dt = 1, 2, 64, 16, 0.25, kdtype(backend)
    q = torch.zeros(B, H, S, D, device=DEVICE, dtype=dt)  # uniform attention: out = mean of the kept v / (1 - p)
    v = torch.eye(S, device=DEVICE, dtype=dt)[None, None, :, :D].expand(B, H, S, D).contiguous()
    out = bertkern.ops.attention(q, q, v, dropout_p=p, backend=backend).float()
    # out[..., i, j] = keep(i, j) / (S (1 - p)) for j < D: read the kept fraction back
    kept = (out * S * (1 - p)).round()
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    frac = 1 - kept.mean().item()
    n = kept.numel()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), frac
    assert torch.equal(bertkern.ops.attention(q, q, v, dropout_p=1.0, backend=backend), torch.zeros_like(v))


# ---------------------------------------------------------------- autograd, registration, compile
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_torch_backend(dropout_p):
    """The written-out backward (torch backend) against finite differences in float64, including
    d mask of a float mask that requires grad and a fully masked batch."""
    B, H, S, D = 2, 2, 5, 4
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.rand(B, 1, 1, S) > 0.3
    keep[0, ..., 0] = True
    keep[1] = False
    m = torch.where(keep, torch.randn(B, 1, 1, S, dtype=torch.float64), NEG_INF).requires_grad_()
    seed = seed_tensor(5, "cpu") if dropout_p else None

    def f(q, k, v, m):
        return torch.ops.bertkern.attention(q, k, v, m, 0.7, dropout_p, seed, "torch")[0]

    assert torch.autograd.gradcheck(f, (q, k, v, m))
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    qp, kp, vp = (torch.randn(7, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.bertkern.attention_varlen(q, k, v, cu, 4, 0.7, dropout_p, seed, "torch")[0],
        (qp, kp, vp))


def test_mask_grad_through_kernel_backend():
    """A float mask that requires grad gets its gradient with the triton backend too."""
    skip_unless_usable("triton", DEVICE)
    q, k, v = (rand(2, 2, 9, 32) for _ in range(3))
    m = torch.randn(2, 1, 9, 9, device=DEVICE).requires_grad_()
    bertkern.ops.attention(q, k, v, m, backend="triton").sum().backward()
    m2 = m.detach().clone().requires_grad_()
    ref_attention(q, k, v, m2).sum().backward()
    torch.testing.assert_close(m.grad, m2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", *KERNELS])
def test_opcheck(backend):
    skip_unless_usable(backend, DEVICE)
    op, bwd = torch.ops.bertkern.attention.default, torch.ops.bertkern.attention_backward.default
    B, H, S, D, dt = 2, 2, 7, 16, kdtype(backend)
    q, k, v = (rand(B, H, S, D, dtype=dt).requires_grad_() for _ in range(3))
    bmask = make_mask("b11s", B, H, S, S, dt, DEVICE)
    fmask = make_mask("b1ss:inf", B, H, S, S, dt, DEVICE)
    seed = seed_tensor(3)
    for args in [(None, 0.5, 0.0, None), (bmask, 0.5, 0.0, None), (fmask, 0.25, 0.2, seed)]:
        torch.library.opcheck(op, (q, k, v, *args, backend))
    out, stats = op(q.detach(), k.detach(), v.detach(), bmask, 0.5, 0.2, seed, backend)
    g = rand(B, H, S, D, dtype=dt)
    torch.library.opcheck(bwd, (g, q.detach(), k.detach(), v.detach(), bmask, out, stats, 0.5, 0.2, seed, backend))
    vop, vbwd = torch.ops.bertkern.attention_varlen.default, torch.ops.bertkern.attention_varlen_backward.default
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32, device=DEVICE)
    qp, kp, vp = (rand(11, H, D, dtype=dt).requires_grad_() for _ in range(3))
    torch.library.opcheck(vop, (qp, kp, vp, cu, 7, 0.5, 0.0, None, backend))
    torch.library.opcheck(vop, (qp, kp, vp, cu, 7, 0.5, 0.2, seed, backend))
    out, stats = vop(qp.detach(), kp.detach(), vp.detach(), cu, 7, 0.5, 0.2, seed, backend)
    torch.library.opcheck(vbwd, (rand(11, H, D, dtype=dt), qp.detach(), kp.detach(), vp.detach(), cu, 7, out, stats,
                                 0.5, 0.2, seed, backend))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compiles_without_graph_breaks(dropout_p):
    B, H, S, D = 2, 2, 8, 16
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    mask = torch.rand(B, 1, 1, S) > 0.3
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)

    def f(q, k, v, m):
        a = bertkern.ops.attention(q, k, v, m, dropout_p=dropout_p, backend="torch")
        b = bertkern.ops.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, 5,
                                          dropout_p=dropout_p, backend="torch")
        return a * 2, b

    a, b = torch.compile(f, fullgraph=True)(q, k, v, mask)
    (a.sum() + b.sum()).backward()
    if dropout_p == 0:
        torch.testing.assert_close(a, 2 * ref_attention(q, k, v, mask))
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------- backends and bad input
def test_backend_selection_and_fallbacks(monkeypatch):
    monkeypatch.delenv("BERTKERN_BACKEND", raising=False)
    skip_unless_usable("triton", DEVICE)
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable.*CUDA tensors"):
        bertkern.ops.attention(*[torch.randn(1, 2, 5, 16)] * 3, backend="cuda")
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.warns(UserWarning, match="falling back to the torch backend.*float64"):
        out = bertkern.ops.attention(q.double(), q.double(), q.double(), backend="triton")
    torch.testing.assert_close(out, ref_attention(q.double(), q.double(), q.double()))
    big = torch.randn(1, 1, 3, 320, device=DEVICE)
    if _triton_ok():
        with pytest.warns(UserWarning, match="head dim 320"):
            bertkern.ops.attention(big, big, big, backend="triton")


def _triton_ok():
    return _backend.unavailable_reason("triton", torch.device(DEVICE)) is None


@pytest.mark.gpu
def test_cuda_backend_coverage(record_backends, monkeypatch):
    """backend="cuda" runs the CUDA kernels on fp16 / bf16 with D <= 128, silently; fp32 and larger
    head dims run Triton with a warning naming why; "auto" follows bertkern.ops.attention_auto's table."""
    import warnings

    monkeypatch.delenv("BERTKERN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_WARNED", set())  # the warnings below are once per process
    q = torch.randn(1, 2, 5, 16, device="cuda", dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bertkern.ops.attention(q, q, q, backend="cuda")
    torch.testing.assert_close(out, ref_attention(q, q, q), rtol=2e-3, atol=2e-3)
    assert record_backends[-1] == ("attention", "cuda")
    for t, why in ((q.float(), "float32"), (torch.randn(1, 2, 5, 160, device="cuda", dtype=torch.float16), "160")):
        with pytest.warns(UserWarning, match=f"CUDA kernel does not cover.*{why}"):
            bertkern.ops.attention(t, t, t, backend="cuda")
        assert record_backends[-1] == ("attention", "triton")
    # auto follows attention_auto's table: torch's SDPA on fp16 / bf16 GPUs with a gradient or inside a
    # CUDA graph capture; eager inference on an H100 runs the CUDA kernels when built (the EAGER rows).
    # auto's "sdpa" runs attention_auto.sdpa without going through backend.resolve, so record_backends
    # sees no call: spy on the SDPA wrapper instead.
    auto = importlib.import_module("bertkern.ops.attention_auto")
    qg = q.clone().requires_grad_()
    assert auto.choose("attention", qg, 0.0) == "sdpa" and auto.choose("attention", qg, 0.1) == "sdpa"
    h100_built = auto._arch(q.device) == "sm_90" and _backend.unavailable_reason("cuda", q.device) is None
    assert auto.eager_inference(q) and not auto.eager_inference(qg)
    assert auto.choose("attention", q, 0.0) == ("cuda" if h100_built else "sdpa")
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        q + 1  # (a graph with no work in it warns)
        assert not auto.eager_inference(q)
        assert auto.choose("attention", q, 0.0) == "sdpa"
    ran, real_sdpa = [], auto.sdpa

    def spy(*args):
        ran.append("sdpa")
        return real_sdpa(*args)

    monkeypatch.setattr(auto, "sdpa", spy)
    calls = len(record_backends)
    out = bertkern.ops.attention(qg, qg, qg)
    torch.testing.assert_close(out, ref_attention(q, q, q), rtol=2e-3, atol=2e-3)
    bertkern.ops.attention(qg, qg, qg, dropout_p=0.1)
    assert ran == ["sdpa", "sdpa"] and len(record_backends) == calls
    out = bertkern.ops.attention(q, q, q)
    torch.testing.assert_close(out, ref_attention(q, q, q), rtol=2e-3, atol=2e-3)
    assert (record_backends[-1] == ("attention", "cuda")) if h100_built else ran[-1] == "sdpa"


@pytest.mark.gpu
def test_auto_varlen_attn_inference_and_training_match(monkeypatch):
    """auto's varlen_attn: the direct ATen call (inference, as in a CUDA graph capture: eager inference
    on an H100 reads the EAGER rows) and torch's varlen_attn (with a gradient) give the reference's
    answer on packed sequences; training with dropout runs too."""
    auto = importlib.import_module("bertkern.ops.attention_auto")
    monkeypatch.setattr(auto, "eager_inference", lambda q: False)
    cu = torch.tensor([0, 1, 70, 70, 200], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(200, 3, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    assert auto.choose("attention_varlen", q, 0.0, 130) == "varlen_attn"
    want = bertkern.ops.attention_varlen(q.double(), k.double(), v.double(), cu, 130, backend="torch")
    eager = bertkern.ops.attention_varlen(q, k, v, cu, 130, backend="torch")
    with torch.no_grad():
        got = bertkern.ops.attention_varlen(q, k, v, cu, 130)
    assert_close_2x(got, want, eager)
    qg = q.clone().requires_grad_()
    got = bertkern.ops.attention_varlen(qg, k, v, cu, 130)
    assert_close_2x(got, want, eager)
    got.float().sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    # With dropout (varlen_attn has none) auto moves down the row: it once raised here (AttributeError).
    qg.grad = None
    bertkern.ops.attention_varlen(qg, k, v, cu, 130, dropout_p=0.1).float().sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_cuda_ops_are_registered():
    """Without a GPU too: the extension registers the attention ops, with CUDA kernels only."""
    ok, why = _backend.cuda_extension_status()
    if not ok:
        pytest.skip(why)  # tests/test_extension.py fails instead when the build was required
    assert str(torch.ops.bertkern_cuda.attention_fwd.default._schema) == (
        "bertkern_cuda::attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_seqlens, "
        "int max_seqlen, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)")
    assert str(torch.ops.bertkern_cuda.attention_bwd.default._schema) == (
        "bertkern_cuda::attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_seqlens, "
        "int max_seqlen, Tensor out, Tensor stats, float scale, float dropout_p, Tensor? seed) "
        "-> (Tensor, Tensor, Tensor)")
    for op in ("attention_fwd", "attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bertkern_cuda::{op}", "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"bertkern_cuda::{op}", "CPU")


@pytest.mark.gpu
def test_cuda_ops_check_their_arguments():
    """Called directly, the CUDA ops refuse what they do not cover, naming the argument."""
    skip_unless_usable("cuda", "cuda")  # loads bertkern._C, which registers torch.ops.bertkern_cuda
    ops = torch.ops.bertkern_cuda
    q = torch.randn(1, 2, 5, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        ops.attention_fwd(q.float(), q.float(), q.float(), None, None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="k has dtype"):
        ops.attention_fwd(q, q.bfloat16(), q, None, None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="head dim 160"):
        big = torch.randn(1, 2, 5, 160, device="cuda", dtype=torch.float16)
        ops.attention_fwd(big, big, big, None, None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="mask must be a .B, H, S_q, S_k. view"):
        ops.attention_fwd(q, q, q, torch.ones(1, 1, 1, 5, dtype=torch.bool, device="cuda"), None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs a seed"):
        ops.attention_fwd(q, q, q, None, None, 0, 1.0, 0.1, None)
    with pytest.raises(RuntimeError, match="unit stride along D"):
        ops.attention_fwd(q.transpose(-1, -2), q.transpose(-1, -2), q.transpose(-1, -2), None, None, 0, 1.0, 0.0,
                          None)


def test_bad_input_names_the_argument():
    q = torch.randn(2, 2, 5, 16)
    A = bertkern.ops.attention
    with pytest.raises(ValueError, match="q must be a 4-D tensor"):
        A(q[0], q, q)
    with pytest.raises(ValueError, match="k dtype torch.float16 does not match q dtype"):
        A(q, q.half(), q)
    with pytest.raises(ValueError, match="k must be .B, H, S_k, D."):
        A(q, q[:, :1], q)
    with pytest.raises(ValueError, match="v must have k's shape"):
        A(q, q, q[..., :8])
    with pytest.raises(ValueError, match="mask of shape .2, 1, 1, 4. does not broadcast"):
        A(q, q, q, torch.ones(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        A(q, q, q, torch.ones(2, 1, 1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="dropout_p must be"):
        A(q, q, q, dropout_p=1.5)
    with pytest.raises(TypeError, match="scale must be"):
        A(q, q, q, scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="q must be a floating-point"):
        A(q.long(), q.long(), q.long())
    V = bertkern.ops.attention_varlen
    p = torch.randn(7, 2, 16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be a 3-D tensor"):
        V(q, q, q, cu, 5)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        V(p, p, p, cu.float(), 4)
    with pytest.raises(ValueError, match="max_seqlen must be"):
        V(p, p, p, cu, 4.0)
    with pytest.raises(ValueError, match="same shape"):
        V(p, p[:5], p, cu, 4)


# ---------------------------------------------------------------- the reference BERT: fused_attention, padding_free
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("flags", [{"fused_attention": True}, {"padding_free": True},
                                   {"padding_free": True, "fused_attention": True, "fused_layer_norm": True,
                                    "fused_bias_gelu": True}], ids=["fused_attention", "padding_free", "all"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bert_matches_hf(flags, backend, monkeypatch, record_backends):
    """fp32 parity with HF BertModel (eager attention) within 1e-5 on real tokens; the pooler too."""
    from test_models import assert_matches_hf, hf_bert

    skip_unless_usable(backend, "cpu")
    monkeypatch.setenv("BERTKERN_BACKEND", backend)
    hf = hf_bert()
    ours = BertModel.from_hf(hf, **flags)
    assert list(ours.state_dict()) == list(hf.state_dict())
    got, mask = assert_matches_hf(ours, hf)
    op = "attention_varlen" if flags.get("padding_free") else "attention"
    calls = [name for name, _ in record_backends]
    assert calls.count(op) == hf.config.num_hidden_layers and "masked_softmax" not in calls
    if flags.get("padding_free"):
        assert (got.last_hidden_state[~mask.bool()] == 0).all()


@pytest.mark.parametrize("flag", ["fused_attention", "padding_free"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bert_gradients_match_unfused(flag, backend, monkeypatch):
    from test_models import hf_bert, padded_batch

    skip_unless_usable(backend, "cpu")
    monkeypatch.setenv("BERTKERN_BACKEND", backend)
    hf = hf_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask, token_types = padded_batch()
    weights = torch.randn(*ids.shape, 32) * mask[..., None]
    grads = []
    for on in (False, True):
        model = BertModel.from_hf(hf, **{flag: on}).train()
        out = model(ids, attention_mask=mask, token_type_ids=token_types)
        ((out.last_hidden_state * weights).sum() + out.pooler_output.square().sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert grads[1][name] is not None, f"no gradient reached {name}"
        err = (grads[1][name] - g).abs().max().item()
        assert err <= 1e-5 * max(1.0, g.abs().max().item()), f"{name}: grad differs by {err:.3g}"


def test_bert_fused_qkv_cache_follows_weight_updates():
    from test_models import hf_bert, padded_batch

    hf = hf_bert()
    ours = BertModel.from_hf(hf, fused_attention=True)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).last_hidden_state
        ours.encoder.layer[0].attention.self.value.weight.mul_(0.5)  # in place: the cached QKV must not be reused
        b = ours(ids, attention_mask=mask).last_hidden_state
        ours.config.fused_attention = False
        c = ours(ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)
    assert "_qkv_cache" not in str(list(ours.state_dict()))


@pytest.mark.parametrize("flag", ["fused_attention", "padding_free"])
def test_bert_dropout_padded_and_packed_agree(flag, monkeypatch):
    """In training with attention dropout, fused_attention and padding_free draw the same attention
    dropout mask when the batch's longest sequence fills S (same seed; hidden dropout off)."""
    from test_models import hf_bert, padded_batch

    skip_unless_usable("triton", "cpu")
    monkeypatch.setenv("BERTKERN_BACKEND", "triton")
    hf = hf_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    ids, mask, _ = padded_batch()
    outs = []
    for flags in ({"fused_attention": True}, {"padding_free": True}):
        model = BertModel.from_hf(hf, **flags).train()
        torch.manual_seed(3)
        outs.append(model(ids, attention_mask=mask).last_hidden_state)
    keep = mask.bool()
    torch.testing.assert_close(outs[0][keep], outs[1][keep], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("form", ["b11s", "bhss:min"])
def test_gpu_bert_shapes(backend, dtype, D, form):
    B, H, S = 2, 4, 384
    q, k, v = (rand(B, H, S, D, dtype=dtype, device="cuda", scale=1.5) for _ in range(3))
    mask = make_mask(form, B, H, S, S, dtype, "cuda")
    check_attention(backend, q, k, v, mask, rand(B, H, S, D, dtype=dtype, device="cuda"), dropout_p=0.1,
                    seed=seed_tensor(9, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_long_sequences_and_varlen(backend, dtype):
    q, k, v = (rand(1, 2, 4096, 64, dtype=dtype, device="cuda") for _ in range(3))
    check_attention(backend, q, k, v, None, rand(1, 2, 4096, 64, dtype=dtype, device="cuda"))
    lengths = [512, 3, 129, 77, 0, 384]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    qp, kp, vp = (rand(sum(lengths), 12, 64, dtype=dtype, device="cuda") for _ in range(3))
    want = bertkern.ops.attention_varlen(qp, kp, vp, cu, 512, backend="torch")
    out = bertkern.ops.attention_varlen(qp, kp, vp, cu, 512, backend=backend)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_cuda_backward_is_deterministic(dtype):
    """The CUDA backward sums each query tile's dQ over key blocks in key order across blocks (a flag
    per tile): with many blocks in flight (8 x 12 heads x 8 key blocks), dQ, dK and dV are the same
    bits run after run, and dQ matches the reference (the ordering lost nothing)."""
    B, H, S, D = 8, 12, 512, 64
    q, k, v = (rand(B, H, S, D, dtype=dtype, device="cuda").requires_grad_() for _ in range(3))
    mask = make_mask("b11s", B, H, S, S, dtype, "cuda")
    grad = rand(B, H, S, D, dtype=dtype, device="cuda")
    runs = [torch.autograd.grad(bertkern.ops.attention(q, k, v, mask, backend="cuda"), (q, k, v), grad)
            for _ in range(3)]
    for again in runs[1:]:
        for a, b in zip(runs[0], again):
            assert torch.equal(a, b)
    want = torch.autograd.grad(bertkern.ops.attention(q, k, v, mask, backend="torch"), (q, k, v), grad)
    for got, ref in zip(runs[0], want):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_compile_fullgraph(backend):
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 1, 128, device="cuda") > 0.2
    f = torch.compile(lambda q, k, v: bertkern.ops.attention(q, k, v, mask, dropout_p=0.1, backend=backend),
                      fullgraph=True)
    f(q, k, v).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_torch_backend_ignores_an_enclosing_autocast():
    """Custom ops run with autocast still on: the eager path must keep its fp32 math (and the varlen
    path its fp32 scatter) instead of having its matmuls re-cast to bf16."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    ref = reference.attention(q, k, v)
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # [total=5, H, D]
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bertkern.ops.attention(q, k, v, backend="torch")
        out_varlen = bertkern.ops.attention_varlen(*packed, cu, 3, backend="torch")
    assert out.dtype == torch.float32 and out_varlen.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
