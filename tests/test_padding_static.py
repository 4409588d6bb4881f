"""Padding-free with fixed shapes (CUDA graphs of the packed path), on CPU: the token-count / max_seqlen
buckets, bertkern.padding.unpad_static / repad_static against unpad / repad, NaN (never wrong
numbers) for a batch that does not fit, and optimized HF models under static_shapes against the
dynamic padding-free path and the HF model (2x rule)."""
from __future__ import annotations

import copy
import itertools
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import bertkern  # noqa: E402
from bertkern import padding, testing  # noqa: E402
from bertkern.cuda_graphs import MIN_TOKEN_CAPACITY, choose_packed_shapes  # noqa: E402

VOCAB = 101


# ---------------------------------------------------------------- buckets
def test_packed_shapes_hold_every_batch():
    seq_lens = [8, 16, 32, 64]
    rng = random.Random(0)
    for _ in range(500):
        batch, seq = rng.choice([1, 2, 3, 8]), rng.choice(seq_lens)
        lengths = [rng.randint(0, seq) for _ in range(rng.randint(1, batch))]
        capacity, max_seqlen = choose_packed_shapes(lengths, batch, seq, seq_lens)
        assert sum(lengths) <= capacity <= batch * seq
        total = sum(lengths)  # a step of CAPACITY_STEPS per power of two: wastes at most ~1/4
        assert (capacity == batch * seq
                or MIN_TOKEN_CAPACITY <= capacity <= max(MIN_TOKEN_CAPACITY, total + max(8, total // 4)))
        assert max(lengths) <= max_seqlen <= seq and max_seqlen in seq_lens


def test_packed_shapes_pick_the_smallest_and_grow():
    assert choose_packed_shapes([5, 3], 4, 16, [8, 16]) == (16, 8)  # at least 16 tokens
    assert choose_packed_shapes([16, 1], 4, 16, [8, 16]) == (24, 16)  # 17 tokens: steps of 8 up to 32
    assert choose_packed_shapes([16, 16, 16, 9], 4, 16, [8, 16]) == (64, 16)  # capped at batch x seq
    assert choose_packed_shapes([0, 0], 2, 16, [8, 16]) == (16, 8)  # fully padded rows
    assert choose_packed_shapes([12], 1, 12, [8, 16]) == (12, 12)  # no seq length fits: the bucket's seq
    assert choose_packed_shapes([3], 1, 4, [8]) == (4, 4)
    with pytest.raises(ValueError):
        choose_packed_shapes([17], 1, 16, [16])
    with pytest.raises(ValueError):
        choose_packed_shapes([1, 1, 1], 2, 16, [16])


# ---------------------------------------------------------------- unpad_static / repad_static
def masks(batch, seq, seed):
    """Right padding, left padding, holes, fully padded and full rows."""
    gen = torch.Generator().manual_seed(seed)
    right = torch.arange(seq)[None] < torch.randint(0, seq + 1, (batch, 1), generator=gen)
    yield right
    yield right.flip(1)
    yield torch.rand(batch, seq, generator=gen) < 0.6
    full = right.clone()
    full[0] = True
    full[-1] = False
    yield full


@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 7), (4, 16)])
def test_unpad_static_is_unpad_plus_filler(batch, seq):
    for i, mask in enumerate(masks(batch, seq, batch * seq)):
        hidden = torch.randn(batch, seq, 6)
        packed, indices, cu, longest = padding.unpad(hidden, mask)
        total = packed.shape[0]
        for capacity, m in itertools.product({max(total, 1), batch * seq}, {max(longest, 1), seq}):
            p, idx, cus, ok = padding.unpad_static(hidden, mask, capacity, m)
            assert ok.item(), (i, capacity, m)
            assert p.shape == (capacity, 6) and idx.shape == (capacity,)
            assert cus.shape == (batch + 1 + -(-capacity // m),) and cus.dtype == torch.int32
            assert torch.equal(p[:total], packed) and torch.equal(idx[:total], indices)
            assert torch.equal(cus[:batch + 1], cu) and cus[-1].item() == capacity
            assert int(cus.diff().max()) <= m and int(cus.diff().min()) >= 0  # no sequence longer than m
            assert len(set(idx.tolist())) == capacity  # distinct positions: the scatter back is exact
            out = p * 2
            out[total:] = float("nan")  # whatever the filler rows hold is dropped
            want = padding.repad(packed * 2, indices, batch, seq)
            assert torch.equal(padding.repad_static(out, idx, cus, ok, batch, seq), want)


def test_a_batch_that_does_not_fit_gives_nan():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    hidden = torch.randn(2, 4, 3)
    for capacity, m in ((5, 4), (8, 3)):  # 6 tokens > 5; a row of 4 > 3
        p, idx, cus, ok = padding.unpad_static(hidden, mask, capacity, m)
        assert not ok.item() and int(cus.max()) <= capacity  # still in bounds
        assert padding.repad_static(p, idx, cus, ok, 2, 4).isnan().all()
    with pytest.raises(ValueError):
        padding.unpad_static(hidden, mask, 9, 4)  # capacity > B * S
    with pytest.raises(ValueError):
        padding.static_shapes(0, 4).__enter__()


def test_static_shapes_nest_and_restore():
    assert padding.current_static_shapes() is None
    with padding.static_shapes(16, 8):
        with padding.static_shapes(32, 4):
            assert padding.current_static_shapes() == (32, 4)
        assert padding.current_static_shapes() == (16, 8)
    assert padding.current_static_shapes() is None


# ---------------------------------------------------------------- models
def tiny(arch):
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, initializer_range=0.2, attn_implementation="eager")
    if arch == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_heads=4, hidden_dim=37, max_position_embeddings=64, **common)
        return transformers.DistilBertModel(config).eval()
    cls, cfg = {"bert": (transformers.BertModel, transformers.BertConfig),
                "roberta": (transformers.RobertaModel, transformers.RobertaConfig)}[arch]
    return cls(cfg(hidden_size=32, num_attention_heads=4, intermediate_size=37, max_position_embeddings=66,
                   pad_token_id=1, **common)).eval()


def real_outputs(out, mask):
    real = mask.bool()
    pooled = getattr(out, "pooler_output", None)
    return [out.last_hidden_state[real]] + ([pooled] if pooled is not None else [])


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_static_path_equals_dynamic_path_and_hf(arch):
    torch.manual_seed(0)
    eager = tiny(arch)
    ref64 = copy.deepcopy(eager).double()
    model = bertkern.optimize(copy.deepcopy(eager), backend="torch")
    assert bertkern.cuda_graphs._padding_free(model)
    gen = torch.Generator().manual_seed(1)
    for mask in list(masks(3, 12, 3))[:3] + [torch.ones(3, 12, dtype=torch.bool)]:
        mask = mask.long()
        mask[:, 0] = 1  # the pooler reads token 0, which padding-free leaves zero at padding
        ids = torch.where(mask.bool(), torch.randint(3, VOCAB, (3, 12), generator=gen), 1)
        lengths = mask.sum(1).tolist()
        with torch.no_grad():
            want = real_outputs(eager(input_ids=ids, attention_mask=mask), mask)
            ref = real_outputs(ref64(input_ids=ids, attention_mask=mask), mask)
            dynamic = model(input_ids=ids, attention_mask=mask)
            for shapes in {choose_packed_shapes(lengths, 3, 12, [4, 8, 12]), (36, 12)}:
                with padding.static_shapes(*shapes):
                    static = model(input_ids=ids, attention_mask=mask)
                assert torch.equal(static.last_hidden_state[~mask.bool()], torch.zeros_like(
                    static.last_hidden_state[~mask.bool()]))  # zeros at padding, like the dynamic path
                testing.assert_close_2x(real_outputs(static, mask), ref, want, f"{arch} {shapes}", floor="model")
                torch.testing.assert_close(static.last_hidden_state, dynamic.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_static_path_with_a_stale_max_seqlen_gives_nan_not_wrong_numbers():
    model = bertkern.optimize(tiny("bert"), backend="torch")
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 5:] = 0
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad(), padding.static_shapes(20, 8):  # row 0 has 12 tokens > 8
        # On CPU attention_varlen sees cu_seqlens without a sync and refuses; on a GPU (no check
        # without a sync) repad_static's guard makes every output NaN.
        with pytest.raises(ValueError, match="max_seqlen"):
            model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), padding.static_shapes(16, 12):  # 17 tokens > 16
        assert model(input_ids=ids, attention_mask=mask).last_hidden_state.isnan().all()
