"""torch.compile(bertkern.optimize(model), dynamic=True): one compilation serves every sequence length
(a server batching requests of varying length must not recompile per length). On CPU through the torch
backend; the Triton path under compile is a GPU matter (see DESIGN.md)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import bertkern  # noqa: E402


def _tiny_bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertModel(config).eval()


def _batch(seq: int, batch: int = 3):
    ids = torch.randint(5, 50, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0  # one padded row, so the padding path is traced too
    return ids, mask


def test_dynamic_compile_does_not_recompile_per_length():
    """Padded batches run padding-free under compile too (bertkern.optimize's encoder picks the packed
    shapes in an eager prologue, then one graph): with dynamic=True the token capacity and max_seqlen
    are symbolic like the lengths, so new lengths and new buckets reuse the graphs."""
    from test_compile_padding_free import GraphRecorder

    model = _tiny_bert()
    optimized = bertkern.optimize(model, backend="torch", inplace=False)
    torch._dynamo.reset()
    # aot_eager: the same Dynamo guards (which decide recompiles) and fake-tensor tracing of every
    # bertkern op with symbolic shapes as Inductor, without minutes of C++ codegen on a CPU runner.
    counter = GraphRecorder("aot_eager")
    compiled = torch.compile(optimized, dynamic=True, backend=counter)
    try:
        with torch.no_grad():
            # lengths whose token capacity is under B x S (at the whole batch it runs the padded path)
            ids, mask = _batch(12)
            compiled(input_ids=ids, attention_mask=mask)
            frames = counter.frame_count
            assert frames >= 1
            for seq in (9, 16, 20, 31):
                ids, mask = _batch(seq)
                counter.clear_calls()
                got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
                assert counter.ran() == ["attention_varlen"] * 2  # the packed path, compiled
                want = model(input_ids=ids, attention_mask=mask).last_hidden_state
                real = mask.bool()
                torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
                assert not got[~real].any()  # zeros at padding, as the eager padding-free path
                torch.testing.assert_close(got, optimized(input_ids=ids, attention_mask=mask).last_hidden_state,
                                           rtol=1e-5, atol=1e-5)
        assert counter.frame_count == frames, f"recompiled: {counter.frame_count} compilations for 5 lengths"
        with torch.no_grad():  # 12 real tokens of 15: a capacity of 16 would pack nothing away
            ids, mask = _batch(5)
            counter.clear_calls()
            got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
            assert counter.ran() == ["attention"] * 2
            torch.testing.assert_close(got, optimized(input_ids=ids, attention_mask=mask).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
