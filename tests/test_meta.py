"""Every op on meta tensors: shapes only, nothing runs (models built on the meta device, fake-shape
passes); an explicitly requested backend is not an error there, and autocast is not queried."""
from __future__ import annotations

import pytest
import torch

from bertkern import ops

META = torch.device("meta")


def _calls():
    x = torch.randn(2, 5, 16, device=META)
    w = torch.randn(16, device=META)
    ids = torch.zeros(2, 5, dtype=torch.long, device=META)
    emb = torch.randn(10, 16, device=META)
    scores = torch.randn(2, 3, 5, 5, device=META)
    q = torch.randn(2, 3, 5, 8, device=META)
    packed = torch.randn(7, 3, 8, device=META)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=META)
    return {
        "bias_gelu": (lambda **kw: ops.bias_gelu(x, w, **kw), (2, 5, 16)),
        "add_layer_norm": (lambda **kw: ops.add_layer_norm(x, x, w, w, x_bias=w, **kw), (2, 5, 16)),
        "embedding_layer_norm": (lambda **kw: ops.embedding_layer_norm(ids, ids, ids, emb, emb, emb[:2], w, w, **kw),
                                 (2, 5, 16)),
        "masked_softmax": (lambda **kw: ops.masked_softmax(
            scores, torch.ones(2, 1, 1, 5, dtype=torch.bool, device=META), **kw), (2, 3, 5, 5)),
        "attention": (lambda **kw: ops.attention(q, q, q, **kw), (2, 3, 5, 8)),
        "attention_varlen": (lambda **kw: ops.attention_varlen(packed, packed, packed, cu, 4, **kw), (7, 3, 8)),
    }


@pytest.mark.parametrize("backend", [None, "torch", "triton", "cuda"])
@pytest.mark.parametrize("op", sorted(_calls()))
def test_op_on_meta(op, backend):
    call, shape = _calls()[op]
    out = call(backend=backend)
    assert out.device.type == "meta" and tuple(out.shape) == shape


@pytest.mark.parametrize("op", ["bias_gelu", "add_layer_norm"])
def test_backward_on_meta_under_autocast(op):
    x = torch.randn(4, 16, device=META, requires_grad=True)
    w = torch.randn(16, device=META)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on for CPU: meta must not be asked
        y = ops.bias_gelu(x, w) if op == "bias_gelu" else ops.add_layer_norm(x, x, w, w)
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"


def test_reference_bert_on_meta():
    from bertkern.models import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, fused_bias_gelu=True,
                        fused_layer_norm=True, fused_embeddings=True, fused_softmax=True)
    with META:
        model = BertModel(config)
        ids = torch.zeros(2, 7, dtype=torch.long)
    out = model(ids, torch.ones(2, 7, dtype=torch.long, device=META))
    hidden = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
    assert hidden.device.type == "meta" and tuple(hidden.shape) == (2, 7, 16)
