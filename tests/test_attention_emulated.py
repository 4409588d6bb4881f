"""csrc/attention.cu's CUDA kernels run on the CPU through the emulation in tests/cuda_emu (threads for
CUDA threads, the PTX ISA's mma.sync fragment layouts), so that a machine without a GPU checks the
kernels' own code: tiling and tails, head-dim padding, every mask form, fully masked rows, Philox
dropout rows, varlen sequences, packed-QKV strides, the backward's two kernels. The checks are
test_attention.py's (float64 reference, the 2x-of-eager rule), through bertkern.ops.attention's
backend="cuda" path with torch.ops.bertkern_cuda pointed at the emulated ops.

Not covered here: the real hardware (tensor-core rounding and accumulation order, __expf, memory
ordering, speed). The gpu-marked CUDA tests in test_attention.py cover those on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import bertkern
import emulation
from test_attention import (MASK_FORMS, _packed_batch, assert_attention_close, check_attention, check_padding_mask,
                            fwd_bwd, ref_attention, seed_tensor)
from test_masked_softmax import make_mask

CPU = "cpu"


emulated, cuda = emulation.fixtures("attention")


def rand(*shape, dtype=torch.float16, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("S", [1, 77, 129])
@pytest.mark.parametrize("D", [32, 80])
def test_matches_reference(cuda, dtype, S, D):
    """The [B, 1, 1, S] padding mask with a fully padded sequence; several query and key tiles."""
    check_padding_mask(cuda, dtype, S, D, CPU)


@pytest.mark.parametrize("form", MASK_FORMS)
def test_mask_forms(cuda, form):
    B, H, S, D = 2, 2, 37, 32
    q, k, v = (rand(B, H, S, D, scale=1.5) for _ in range(3))
    mask = make_mask(form, B, H, S, S, torch.float16, CPU)
    check_attention(cuda, q, k, v, mask, rand(B, H, S, D), scale=0.3)


def test_fp32_mask_and_cross_lengths(cuda):
    """An fp32 additive mask on fp16 inputs; S_q != S_k both ways."""
    for S_q, S_k in [(5, 70), (70, 9)]:
        q, k, v = rand(1, 2, S_q, 32), rand(1, 2, S_k, 32), rand(1, 2, S_k, 32)
        mask = make_mask("b1ss:min", 1, 2, S_q, S_k, torch.float32, CPU)
        check_attention(cuda, q, k, v, mask, rand(1, 2, S_q, 32))


@pytest.mark.parametrize("form, scale", [("bhss:soft", 0.3), ("bhss:min", -0.3), ("bhss:soft", 0.0)], ids=str)
def test_fp32_4d_mask_read_in_place_and_scale_sign(cuda, form, scale):
    """A contiguous fp32 [B,H,S_q,S_k] mask with S_k a multiple of 64, which the 4-D mask kernels read
    in place (finfo.min masks, as -inf), under a positive, negative and zero scale (the backward takes
    q negated or zeroed with |scale|)."""
    q, k, v = rand(1, 2, 70, 32), rand(1, 2, 128, 32), rand(1, 2, 128, 32)
    mask = make_mask(form, 1, 2, 70, 128, torch.float32, CPU)
    check_attention(cuda, q, k, v, mask, rand(1, 2, 70, 32), scale=scale)


@pytest.mark.parametrize("D", [16, 48, 64, 100, 128])
def test_head_dims_and_packed_qkv_views(cuda, D):
    """Every head-dim bucket (32, 64, 80, 128) with D padded up to it, on views of a packed
    [B, S, 3, H, D] projection: 16-byte loads when D % 8 == 0, element loads otherwise."""
    B, S, H = 1, 40, 2
    qkv = rand(B, S, 3 * H * D, dtype=torch.bfloat16)
    q, k, v = qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    mask = make_mask("b11s", B, H, S, S, torch.bfloat16, CPU)
    check_attention(cuda, q, k, v, mask, rand(B, H, S, D, dtype=torch.bfloat16))


def test_large_logits_fully_masked_rows_and_dropout(cuda):
    """Logits of +-100s, rows masked entirely through a [B,1,S,S] mask (zeros, zero gradients), and
    dropout over two key tiles with the reference's Philox mask."""
    B, H, S, D = 2, 2, 70, 32
    q, k, v = (rand(B, H, S, D, scale=6.0) for _ in range(3))
    keep = torch.ones(B, 1, S, S, dtype=torch.bool)
    keep[0, :, 3] = False
    keep[1, :, :, 5:] = False
    out, dq, dk, dv = check_attention(cuda, q, k, v, keep, rand(B, H, S, D))
    assert (out[0, :, 3] == 0).all() and (dq[0, :, 3] == 0).all()
    assert (dk[1, :, 5:] == 0).all() and (dv[1, :, 5:] == 0).all()
    q, k, v = (rand(B, H, S, D) for _ in range(3))
    mask = make_mask("bhss", B, H, S, S, torch.float16, CPU)
    check_attention(cuda, q, k, v, mask, rand(B, H, S, D), dropout_p=0.3, seed=seed_tensor(0x1234_5678_9ABC, CPU))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen(cuda, dropout_p):
    """attention_varlen (int32 and int64 cu_seqlens) equals the padded op at the real tokens, and
    matches the float64 reference sequence by sequence."""
    lengths, H, D = [5, 0, 70, 1, 12], 2, 32
    (q, k, v), mask, (qp, kp, vp), cu, max_len = _packed_batch(lengths, H, D, dtype=torch.float16)
    seed = seed_tensor(1234, CPU) if dropout_p else None
    grad = rand(*q.shape) * mask[:, None, :, None]
    gp = bertkern.padding.unpad(grad.transpose(1, 2), mask)[0]

    def padded(q, k, v):
        return torch.ops.bertkern.attention(q, k, v, mask[:, None, None, :], 0.25, dropout_p, seed, cuda)[0]

    want = fwd_bwd(padded, (q, k, v), grad)
    for cu_t in (cu, cu.long()):
        def packed(q, k, v):
            return torch.ops.bertkern.attention_varlen(q, k, v, cu_t, max_len, 0.25, dropout_p, seed, cuda)[0]

        got = fwd_bwd(packed, (qp, kp, vp), gp)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(g, bertkern.padding.unpad(w.transpose(1, 2), mask)[0], rtol=0, atol=0,
                                       msg=name)

    if not dropout_p:  # and against float64, sequence by sequence (an empty one has no rows)
        def ref(q, k, v):
            return torch.cat([ref_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=0.25).transpose(0, 1)
                              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a])

        assert_attention_close(got, fwd_bwd(ref, (qp.double(), kp.double(), vp.double()), gp.double()),
                               fwd_bwd(ref, (qp, kp, vp), gp))


# ---------------------------------------------------------------- the forward kernel's compiled variants
# attention_fwd_kernel<T, kD, mask kind, dropout>: mask kinds none, key (a mask varying along keys
# only: [B,1,1,S_k], its expanded view, [S_k]; read once per key tile) and any (a strided 4-D mask
# read per element). A covering set rather than the full product: every mask kind meets every S
# (1: one row; 17: one partial tile; 130: two query tiles, a 2-key tail; 257: three query tiles,
# five key tiles), every head-dim bucket, dropout on and off, and both dtypes.
def _fwd_cases():
    forms = {"none": ["none", "none"], "key": ["b11s", "expanded:soft", "s:inf"], "any": ["bhss:min", "b1ss"]}
    cases = []
    for mi, kind in enumerate(forms):
        for si, S in enumerate([1, 17, 130, 257]):
            D = [32, 64, 80, 128][(si + mi) % 4]
            dropout = (si + mi) % 2 == 1
            dtype = [torch.float16, torch.bfloat16][(si // 2 + mi) % 2]
            form = forms[kind][si % len(forms[kind])]
            cases.append(pytest.param(form, S, D, dropout, dtype,
                                      id=f"{kind}-{form}-S{S}-D{D}-{'drop' if dropout else 'nodrop'}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("form, S, D, dropout, dtype", _fwd_cases())
def test_forward_variants(cuda, form, S, D, dropout, dtype):
    B, H = 2, 1
    q, k, v = (rand(B, H, S, D, dtype=dtype, scale=1.5) for _ in range(3))
    mask = make_mask(form, B, H, S, S, dtype, CPU)
    seed = seed_tensor(0x5EED + S, CPU) if dropout else None
    check_attention(cuda, q, k, v, mask, rand(B, H, S, D, dtype=dtype), dropout_p=0.3 if dropout else 0.0, seed=seed)


@pytest.mark.parametrize("D, dtype", [(80, torch.bfloat16), (128, torch.float16)], ids=str)
def test_varlen_long_sequences(cuda, D, dtype):
    """Varlen over several query and key tiles (257 tokens: three 128-query tiles, five 64-key tiles),
    with dropout: equal to the padded op at the real tokens (which runs the key-mask kernel)."""
    lengths, H = [257, 1, 130, 17], 1
    (q, k, v), mask, (qp, kp, vp), cu, max_len = _packed_batch(lengths, H, D, dtype=dtype)
    seed = seed_tensor(77, CPU)
    got = torch.ops.bertkern.attention_varlen(qp, kp, vp, cu, max_len, 0.2, 0.25, seed, cuda)[0]
    want = torch.ops.bertkern.attention(q, k, v, mask[:, None, None, :], 0.2, 0.25, seed, cuda)[0]
    torch.testing.assert_close(got, bertkern.padding.unpad(want.transpose(1, 2), mask)[0], rtol=0, atol=0)
    ref = ref_attention(q.double(), k.double(), v.double(), mask[:, None, None, :], 0.2, 0.25, seed)
    eager = ref_attention(q, k, v, mask[:, None, None, :], 0.2, 0.25, seed)
    assert_attention_close((want,), (ref,), (eager,), names=("out",))


@pytest.mark.parametrize("D, form, dropout", [(30, "b11s", True), (33, "bhss:min", False)], ids=str)
def test_backward_dq_accumulation(cuda, D, form, dropout):
    """The backward sums dQ over key blocks (130 keys: three) in an fp32 accumulator whose rows are D
    rounded up to 4; the last key block writes dQ: head dims not a multiple of 4 take its
    element-by-element path, with S_q != S_k (query tiles of the two lengths)."""
    for S_q, S_k in [(130, 130), (70, 200)]:
        q, k, v = rand(1, 2, S_q, D), rand(1, 2, S_k, D), rand(1, 2, S_k, D)
        mask = make_mask(form, 1, 2, S_q, S_k, torch.float16, CPU)
        seed = seed_tensor(99, CPU) if dropout else None
        check_attention(cuda, q, k, v, mask, rand(1, 2, S_q, D), dropout_p=0.2 if dropout else 0.0, seed=seed)


def test_ptx_primitives_follow_the_isa(emulated):
    """csrc/ptx.cuh on the emulation against the PTX ISA: ldmatrix .x1/.x2/.x4 (.trans) fragment
    layouts, and cp.async's zero-fill and deferred completion (nothing lands before its wait_group)."""
    out = torch.full((6, 32, 4), -7, dtype=torch.int64)
    emulated.ldmatrix_probe(out)
    for variant, (n, trans) in enumerate([(1, False), (1, True), (2, False), (2, True), (4, False), (4, True)]):
        for lane in range(32):
            g, t = divmod(lane, 4)
            for m in range(4):  # the probe's tile holds 16 * row + col at (row, col); matrix m = rows 8m..
                if m >= n:
                    want = -1
                elif trans:
                    want = (16 * (8 * m + 2 * t) + g) | (16 * (8 * m + 2 * t + 1) + g) << 16
                else:
                    want = (16 * (8 * m + g) + 2 * t) | (16 * (8 * m + g) + 2 * t + 1) << 16
                assert out[variant, lane, m].item() == want, (variant, lane, m)

    src = torch.arange(256, dtype=torch.int32) + 1000
    out = torch.full((4, 32, 8), 7, dtype=torch.int32)
    emulated.cp_async_probe(src, out)
    for lane in range(32):
        n = lane % 5  # int32 words copied of group 0; the rest zero-filled
        g0 = [1000 + 4 * lane + x if x < n else 0 for x in range(4)]
        g1 = [1128 + 4 * lane, 1129 + 4 * lane, 1130 + 4 * lane, 0]
        assert out[0, lane, :4].tolist() == [-1] * 4  # before any wait: the NaN-filled shared memory
        assert out[1, lane, :4].tolist() == g0  # wait_group 1: group 0 landed
        assert out[2, lane, 4:].tolist() == [-1] * 4  # ... group 1 not yet
        assert out[3, lane].tolist() == g0 + g1  # wait_all


def test_thread_orders_change_a_race_and_only_a_race(emulated, monkeypatch):
    """The emulation's thread orders (tests/cuda_emu/emu.h) are what they say, and decide a racy read:
    without a block barrier, the last lane of a warp reads the next warp's shared-memory slot before or
    after that warp wrote it; with one, every order reads the same. The block order decides which of
    several blocks writing one element wins."""
    n, warp0, warp1, runs = 64, slice(0, 32), slice(32, 64), {}
    for order in ("forward", "reverse", "lowest", "highest", "random:1", "random:2", "random:1"):
        monkeypatch.setenv("BERTKERN_EMU_SCHEDULE", order)
        for barrier in (False, True):
            out = torch.empty(3 * n + 1, dtype=torch.int32)
            emulated.schedule_probe(barrier, out)
            first, second, read = out[:n], out[n:2 * n], out[2 * n:3 * n].tolist()
            assert sorted(out[:2 * n].tolist()) == list(range(2 * n))  # every thread took its two turns
            if barrier:
                assert read == [(t + 1) % n for t in range(n)], order
            runs.setdefault((order, barrier), (out[:2 * n].tolist(), read))
            assert runs[order, barrier] == (out[:2 * n].tolist(), read)  # a seed gives one order
        starts = first.tolist()
        if order in ("forward", "reverse"):  # round robin: every thread starts before a lane's second turn
            assert starts == sorted(starts, reverse=order == "reverse")
            assert first.max() < second.max() and first[warp1].min() < second[warp0].max()
        if order == "lowest":  # warp 0 runs to its end before warp 1 starts
            assert starts == sorted(starts) and second[warp0].max() < first[warp1].min()
        if order == "highest":
            assert starts == sorted(starts, reverse=True) and second[warp1].max() < first[warp0].min()
    assert len({str(runs[o, False][0]) for o in ("forward", "reverse", "lowest", "highest", "random:1",
                                                 "random:2")}) == 6
    assert len({str(runs[o, False][1]) for o in ("forward", "reverse")}) == 2  # the race's result
    monkeypatch.setenv("BERTKERN_EMU_SCHEDULE", "sideways")
    with pytest.raises(RuntimeError, match="BERTKERN_EMU_SCHEDULE must be forward, reverse, lowest, highest or"):
        emulated.schedule_probe(True, torch.empty(3 * n + 1, dtype=torch.int32))
    monkeypatch.setenv("BERTKERN_EMU_SCHEDULE", "forward")
    for blocks, last in (("forward", 3), ("reverse", 0)):  # every block writes the same element
        monkeypatch.setenv("BERTKERN_EMU_BLOCKS", blocks)
        out = torch.full((1,), -1, dtype=torch.int32)
        emulated.block_order_probe(out)
        assert out.item() == last, blocks
    monkeypatch.setenv("BERTKERN_EMU_BLOCKS", "sideways")
    with pytest.raises(RuntimeError, match="BERTKERN_EMU_BLOCKS must be forward or reverse"):
        emulated.schedule_probe(True, torch.empty(3 * n + 1, dtype=torch.int32))


@pytest.mark.parametrize("form, S_q, S_k, D, dropout, dtype", [
    ("none", 130, 130, 64, False, torch.float16),  # two query tiles, three key tiles (peeled tail)
    ("b11s", 70, 200, 32, True, torch.bfloat16),  # key mask, dropout, S_q != S_k: four key blocks
    ("bhss:min", 130, 70, 80, True, torch.float16),  # any-mask kernels, 32-key tiles (dropout)
    ("b1ss", 40, 130, 128, False, torch.bfloat16),  # the widest head-dim bucket
], ids=str)
def test_every_thread_order_gives_the_same_bits(cuda, monkeypatch, form, S_q, S_k, D, dropout, dtype):
    """Forward and backward (the ordered dQ accumulation over key blocks included) under every thread
    order, and the forward with its blocks last to first: a race would change some bits
    (tests/emulation.py)."""
    q, k, v = rand(1, 1, S_q, D, dtype=dtype), rand(1, 1, S_k, D, dtype=dtype), rand(1, 1, S_k, D, dtype=dtype)
    mask, grad = make_mask(form, 1, 1, S_q, S_k, dtype, CPU), rand(1, 1, S_q, D, dtype=dtype)
    p, seed = (0.2, seed_tensor(5, CPU)) if dropout else (0.0, None)

    def attend(q, k, v):
        return torch.ops.bertkern.attention(q, k, v, mask, 0.3, p, seed, cuda)[0]

    emulation.same_bits_in_every_order(monkeypatch, lambda: fwd_bwd(attend, (q, k, v), grad), emulation.THREAD_ORDERS)
    # The blocks last to first: the forward only (the backward's key blocks add to dQ in turn).
    emulation.same_bits_in_every_order(monkeypatch, lambda: [attend(q, k, v)], [emulation.BLOCKS_REVERSED])


def test_argument_checks(cuda):
    """The host-side checks the real ops share (they run before any launch)."""
    ops = torch.ops.bertkern_cuda
    q = rand(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        ops.attention_fwd(q.float(), q.float(), q.float(), None, None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="head dim 160"):
        big = rand(1, 2, 5, 160)
        ops.attention_fwd(big, big, big, None, None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs a seed"):
        ops.attention_fwd(q, q, q, None, None, 0, 1.0, 0.1, None)
    with pytest.raises(RuntimeError, match=r"k must be \[B, H, S_k, D\] .*, got \[1, 1, 5, 16\] for q \[1, 2, 5, 16\]"):
        ops.attention_fwd(q, q[:, :1], q[:, :1], None, None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"q must have unit stride along D, got strides \[160, 80, 1, 16\]"):
        t = q.transpose(-1, -2)
        ops.attention_fwd(t, t, t, None, None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"mask must be a \[B, H, S_q, S_k\] view .*, got \[1, 1, 1, 5\]"):
        ops.attention_fwd(q, q, q, torch.ones(1, 1, 1, 5, dtype=torch.bool), None, 0, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="varlen attention takes no mask"):
        p = q[0].transpose(0, 1)
        ops.attention_fwd(p, p, p, torch.ones(1, 2, 5, 5, dtype=torch.bool), torch.tensor([0, 5]), 5, 1.0, 0.0, None)
