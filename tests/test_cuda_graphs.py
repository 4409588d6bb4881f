"""bertkern.cuda_graphs: bucket choice and output slicing (pure Python, CPU), the refusal on CPU, and
(gpu-marked) capture / replay of tiny HF models through the fused ops."""
from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from torch.utils import _pytree as pytree

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import bertkern  # noqa: E402
from bertkern import cuda_graphs as cg  # noqa: E402
from harness import skip_unless_usable  # noqa: E402

VOCAB = 101


def tiny(cls="BertModel", **kw):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64, initializer_range=0.2,
                                     attn_implementation="eager", **kw)
    return getattr(transformers, cls)(config).eval()


def batch(b, s, lengths=None, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=gen)
    lengths = lengths or [s] + [int(n) for n in torch.randint(1, s + 1, (b - 1,), generator=gen)]
    mask = (torch.arange(s)[None] < torch.tensor(lengths)[:, None]).long()
    return torch.where(mask.bool(), ids, 0).to(device), mask.to(device)


# ---------------------------------------------------------------- buckets, slicing: pure Python
def test_choose_bucket_fewest_padded_tokens_then_shorter_seq():
    buckets = [(1, 128), (4, 32), (8, 16), (8, 64), (16, 16)]
    assert cg.choose_bucket(buckets, 1, 100) == (1, 128)
    assert cg.choose_bucket(buckets, 3, 20) == (4, 32)  # 128 padded tokens, not (8, 64)
    assert cg.choose_bucket(buckets, 8, 16) == (8, 16)  # exact fit
    assert cg.choose_bucket(buckets, 2, 16) == (8, 16)  # 128 tokens each: (8, 16) has the shorter seq
    assert cg.choose_bucket(buckets, 9, 8) == (16, 16)
    assert cg.choose_bucket(buckets, 2, 200) is None  # longer than every bucket
    assert cg.choose_bucket(buckets, 17, 1) is None  # more rows than every bucket
    assert cg.choose_bucket([], 1, 1) is None


def test_default_buckets_follow_the_models_longest_input():
    full = cg.default_buckets(512)
    assert (1, 16) in full and (64, 512) in full and len(full) == 7 * 6
    short = cg.default_buckets(20)  # seq capped at max_position_embeddings, which becomes a bucket
    assert sorted({s for _, s in short}) == [16, 20]
    assert cg.default_buckets(512, batch_sizes=(1, 3), seq_lens=(8,)) == [(1, 8), (3, 8)]
    assert cg._max_seq(tiny()) == 64
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=66, pad_token_id=1))
    assert cg._max_seq(roberta) == 64  # positions start after padding_idx


@pytest.mark.parametrize("bad", [[(0, 8)], [(2,)], [(2, 8.0)], [(True, 8)], []])
def test_bad_buckets(bad):
    with pytest.raises(ValueError):
        cg._check_buckets(bad)


def test_outputs_are_sliced_on_the_dims_that_follow_batch_and_seq():
    # Bucket (4, 6) vs probe (5, 5): hidden [B, S, H], attention [B, H, S, S], logits [B, 6] (6 labels
    # = the bucket's seq: not a seq dim, its size did not follow), a scalar, a non-tensor.
    bucket, probe = (4, 6), (5, 5)
    hidden, hidden_p = torch.randn(4, 6, 6), torch.randn(5, 5, 6)
    attn, attn_p = torch.randn(4, 2, 6, 6), torch.randn(5, 2, 5, 5)
    logits, logits_p = torch.randn(4, 6), torch.randn(5, 6)
    loss, loss_p = torch.tensor(1.0), torch.tensor(2.0)
    assert cg._follow_dims(hidden, hidden_p, bucket, probe) == ([0], [1])  # H = 6 = seq, but it did not follow
    assert cg._follow_dims(attn, attn_p, bucket, probe) == ([0], [2, 3])
    assert cg._follow_dims(logits, logits_p, bucket, probe) == ([0], [])
    assert cg._follow_dims(loss, loss_p, bucket, probe) == ([], [])
    assert cg._follow_dims(None, None, bucket, probe) is None
    assert cg._slice_back(hidden, ([0], [1]), 3, 2, copy=False).shape == (3, 2, 6)
    assert cg._slice_back(attn, ([0], [2, 3]), 3, 2, copy=False).shape == (3, 2, 2, 2)
    view = cg._slice_back(logits, ([0], []), 3, 2, copy=False)
    assert view.shape == (3, 6) and view.data_ptr() == logits.data_ptr()
    copied = cg._slice_back(logits, ([0], []), 3, 2, copy=True)
    assert torch.equal(copied, view) and copied.data_ptr() != logits.data_ptr()
    assert cg._slice_back("text", None, 3, 2, copy=True) == "text"


def test_refuses_on_cpu_with_the_reason():
    model = tiny()
    with pytest.raises(RuntimeError, match="CUDA") as info:
        cg.CUDAGraphRunner(model)
    assert "GPU" in str(info.value) or "cuda" in str(info.value)
    with pytest.raises(RuntimeError, match="CUDA"):
        cg.capture_graphs(model, batch_sizes=(1,), seq_lens=(8,))
    with pytest.raises(TypeError):
        cg.CUDAGraphRunner("bert-base-uncased")


# ---------------------------------------------------------------- capture and replay
class CPURecorder(cg.CUDAGraphRunner):
    """The runner with its four CUDA hooks replaced so that its own logic (buckets, static buffers,
    padding, the probe, slicing, keys, copies, misses) runs on CPU: "capturing" records the forward
    and its outputs; "replaying" runs it again on the static inputs and writes the results into those
    same output tensors, as a graph replay does. `capturing` is True while it records."""

    capturing = False

    def _graph_device(self, model):
        return torch.device("cpu")

    def _on_device(self):
        return contextlib.nullcontext()

    def _warm_up(self, forward, probe):
        return forward(), probe()

    def _record(self, forward):
        CPURecorder.capturing = True
        try:
            out = forward()
        finally:
            CPURecorder.capturing = False
        return _Replayer(forward, out), out


class _Replayer:
    def __init__(self, forward, out):
        self.forward, self.out = forward, out

    def replay(self):
        for old, new in zip(pytree.tree_leaves(self.out), pytree.tree_leaves(self.forward())):
            if isinstance(old, torch.Tensor):
                old.copy_(new)


RUNNERS = [pytest.param((CPURecorder, "cpu", "torch"), id="cpu-recorder")] + [
    pytest.param((cg.CUDAGraphRunner, "cuda", b), id=f"cuda-{b}", marks=pytest.mark.gpu)
    for b in ("torch", "triton", "cuda")
]


@pytest.fixture(params=RUNNERS)
def setup(request):
    """(runner class, device, make_model): models optimized with the fused ops on that backend."""
    runner_cls, device, backend = request.param
    skip_unless_usable(backend, device)

    def make(cls="BertModel", **kw):
        return bertkern.optimize(tiny(cls, **kw).to(device), backend=backend)

    return runner_cls, device, make


@pytest.mark.parametrize("padding_free", [False, None])
def test_graph_outputs_equal_eager_and_replay_without_recapture(setup, padding_free):
    runner_cls, device, make = setup
    model = make()
    runner = runner_cls(model, buckets=[(2, 8), (4, 16)], padding_free=padding_free)
    assert runner.padding_free is (padding_free is None)
    shapes = set()  # padding-free: one graph per (token capacity, max_seqlen) in bucket (4, 16)
    with torch.no_grad():
        for b, s in ((4, 16), (3, 10), (4, 11), (1, 16)):  # all in bucket (4, 16)
            ids, mask = batch(b, s, device=device, seed=b * s)
            packed = cg.choose_packed_shapes(mask.sum(1).tolist(), 4, 16, [8, 16])
            shapes.add(packed if runner.padding_free and packed[0] < 4 * 16 else None)  # else the padded graph
            want = model(input_ids=ids, attention_mask=mask)
            got = runner(input_ids=ids, attention_mask=mask)
            assert type(got) is type(want)
            assert got.last_hidden_state.shape == (b, s, 32) and got.pooler_output.shape == (b, 32)
            real = mask.bool()
            torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-4, atol=1e-5)
    assert not runner.uncapturable  # the eager fallback would give the same outputs: say why it ran
    assert runner.captures == len(shapes) and runner.replays == 4  # a capture per key, then replays
    assert {k[:2] for k in runner.captured} == {(4, 16)} and {k[-1] for k in runner.captured} == shapes
    with torch.no_grad():
        ids, mask = batch(2, 5, device=device)
        runner(input_ids=ids, attention_mask=mask)
        runner(input_ids=ids)  # no mask: all tokens real (a mask buffer is still used for the padding)
    assert runner.captures == len(shapes) + 1  # (2, 8): both calls have 10 real tokens of at most 5
    assert sorted({k[:2] for k in runner.captured}) == [(2, 8), (4, 16)]


def test_graph_head_and_attention_maps_sliced(setup):
    runner_cls, device, make = setup
    model = make("BertForSequenceClassification", num_labels=16)  # num_labels == the bucket's seq
    runner = runner_cls(model, buckets=[(4, 16)])
    ids, mask = batch(3, 9, device=device)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = runner(input_ids=ids, attention_mask=mask, output_attentions=True)
        tt = torch.ones_like(ids)
        with_types = runner(input_ids=ids, attention_mask=mask, token_type_ids=tt)  # another input set
        want_types = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert got.logits.shape == (3, 16)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    assert len(got.attentions) == 2 and got.attentions[0].shape == (3, 4, 9, 9)
    for g, w in zip(got.attentions, want.attentions):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_types.logits, want_types.logits, rtol=1e-4, atol=1e-5)
    # (output_attentions=True) and (token_type_ids) are two input sets. output_attentions runs Hugging
    # Face's own forward (bertkern.optimize leaves it alone), whose mask code copies from CPU memory in
    # transformers 5.x: not capturable on a GPU, so it ran eagerly, with one warning saying why.
    fell_back = [str(w.message) for w in caught if "cannot be captured" in str(w.message)]
    assert runner.captures == 2 - len(fell_back) and runner.eager_calls == len(fell_back) <= 1
    assert [dict(consts) for _, consts in runner.uncapturable] == [{"output_attentions": True}] * len(fell_back)


def test_padding_free_graphs_follow_the_token_count_and_never_go_stale(setup, monkeypatch):
    """Each call's (token capacity, max_seqlen) is picked from its own mask: a batch that outgrows a
    graph's gets another graph (never the stale one), a batch that fits an earlier one replays it.
    The graphs run the static packed path (unpad_static), except where it would pack the whole bucket."""
    runner_cls, device, make = setup
    model = make()
    packed_calls = []
    unpad_static = bertkern.padding.unpad_static
    monkeypatch.setattr(bertkern.padding, "unpad_static",
                        lambda *a: packed_calls.append(a[2:]) or unpad_static(*a))
    runner = runner_cls(model, buckets=[(4, 16)])
    assert runner.padding_free and runner._seq_lens == [16]
    runner._seq_lens = [4, 8, 16]
    # (capacity, max_seqlen), capacities in CAPACITY_STEPS steps per power of two; None: a capacity of the
    # whole bucket, so the padded path's graph (packing would save no rows)
    calls = [([3, 2], (16, 4)), ([16, 16, 1], (40, 16)), ([3, 1, 2], (16, 4)), ([8, 8, 8], (24, 8)),
             ([5, 4], (16, 8)), ([2, 2, 2, 2], (16, 4)), ([16, 16, 16, 15], None)]
    seen = []
    with torch.no_grad():
        for i, (lengths, shapes) in enumerate(calls):
            ids, mask = batch(len(lengths), max(lengths), lengths, device=device, seed=i)
            want = model(input_ids=ids, attention_mask=mask)
            got = runner(input_ids=ids, attention_mask=mask)
            real = mask.bool()
            torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-4, atol=1e-5)
            assert not got.last_hidden_state[~real].any()  # zeros at padding, like the eager padding-free path
            seen.append(shapes)
            assert not runner.uncapturable
            assert {k[-1] for k in runner.captured} == set(seen), (lengths, runner.captured)
    assert runner.captures == 5 and runner.replays == len(calls)
    assert set(packed_calls) == set(seen) - {None}  # every packed graph was warmed up / captured packed


def test_graph_outputs_are_copies_and_misses_run_eagerly(setup):
    runner_cls, device, make = setup
    model = make()
    if runner_cls is CPURecorder:
        runner = CPURecorder(model, buckets=[(2, 8)])
        runner.capture(2, 8)
    else:
        runner = cg.capture_graphs(model, batch_sizes=(2,), seq_lens=(8,))
    assert runner.captures == 1
    with torch.no_grad():
        a = runner(*batch(2, 8, device=device, seed=1))
        kept = a.last_hidden_state.clone()
        runner(*batch(2, 8, device=device, seed=2))
        assert torch.equal(a.last_hidden_state, kept)  # not overwritten by the next replay
        assert runner.captures == 1 and runner.replays == 2
        view = runner_cls(model, buckets=[(2, 8)], copy_outputs=False)
        first = view(*batch(2, 8, device=device, seed=1)).last_hidden_state
        second = view(*batch(2, 8, device=device, seed=2)).last_hidden_state
        assert not view.uncapturable and first.data_ptr() == second.data_ptr()  # views of the static outputs
        with pytest.warns(UserWarning, match="eagerly"):
            big = runner(*batch(3, 8, device=device))
        assert big.last_hidden_state.shape == (3, 8, 32) and runner.eager_calls == 1
        strict = runner_cls(model, buckets=[(2, 8)], strict=True)
        with pytest.raises(ValueError, match="no bucket"):
            strict(*batch(2, 9, device=device))
        with pytest.raises(ValueError, match="every input"):
            runner(input_ids=torch.zeros(2, 8, dtype=torch.long, device=device),
                   attention_mask=torch.ones(2, 7, dtype=torch.long, device=device))
    model.train()
    with pytest.raises(ValueError, match="eval"):
        runner(*batch(2, 8, device=device))


class HostSync(torch.nn.Module):
    """A model whose forward reads a value on the host when called with sync=True: not capturable (on a
    GPU .item() under capture fails and invalidates the capture; CPURecorder's capture fails by hand)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, sync=False):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        if sync and CPURecorder.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        if sync:
            out.last_hidden_state.sum().item()
        return out


def test_a_forward_that_cannot_be_captured_runs_eagerly_from_then_on(setup):
    """Its input set runs eagerly (a miss, one warning naming why) in every bucket from then on; the
    next capture (another input set) works, so the failed one left CUDA and the runner usable;
    strict=True raises instead."""
    runner_cls, device, make = setup
    model = HostSync(make()).eval()
    runner = runner_cls(model, buckets=[(2, 8), (4, 16)])
    ids, mask = batch(3, 9, device=device)
    with torch.no_grad():
        want = model(ids, mask)
        with pytest.warns(UserWarning, match="cannot be captured.*capturing.*'sync': True.* eagerly from now on"):
            got = runner(ids, mask, sync=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="CUDAGraphRunner")
            runner(*batch(2, 5, device=device), sync=True)  # another bucket: eager, no capture tried
            replayed = runner(ids, mask)
        real = mask.bool()
        for out in (got, replayed):
            torch.testing.assert_close(out.last_hidden_state[real], want.last_hidden_state[real], rtol=1e-4, atol=1e-5)
        assert runner.eager_calls == 2 and runner.captures == 1 and runner.replays == 1
        assert [dict(consts) for _, consts in runner.uncapturable] == [{"sync": True}]
        with pytest.raises(RuntimeError, match="cannot be captured"):
            runner_cls(model, buckets=[(4, 16)], strict=True)(ids, mask, sync=True)


def test_a_failed_capture_gives_its_pool_back(monkeypatch):
    """torch's capture_end raises before it stops routing allocations to the pool when the capture
    was invalidated: the runner stops it and drops the pool; where capture_end got that far, the
    graph cleans up itself."""
    runner = CPURecorder(tiny(), buckets=[(1, 8)])
    calls = []

    def end(device, pool):
        calls.append(("end", pool))
        if pool == "ended":
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda device, pool: calls.append(("release", pool)),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for pool in ("recording", "ended", None):
        runner._pool = pool
        runner._drop_pool()
        assert runner._pool is None
    assert calls == [("end", "recording"), ("release", "recording"), ("end", "ended")]
