"""Without autograd or tracing, each op calls its implementation directly instead of through its custom
op (torch.ops.bertkern.*): the dispatch costs more host time than a BERT-size kernel on a GPU. With
gradients, under torch.compile and on meta tensors the custom op still runs (its autograd formula, its
fake). Both paths give the same answer."""
from __future__ import annotations

import pytest
import torch

import bertkern
from bertkern._utils import direct_call_ok


def _calls():
    x = torch.randn(2, 3, 8)
    w, b = torch.randn(8), torch.randn(8)
    q = torch.randn(2, 2, 5, 4)
    packed = torch.randn(7, 2, 4)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    ids = torch.randint(0, 10, (2, 3))
    table = torch.randn(10, 8)
    return {
        "add_layer_norm": (lambda g: bertkern.ops.add_layer_norm(x.requires_grad_(g), x, w, b, 1e-5, backend="torch")),
        "bias_gelu": (lambda g: bertkern.ops.bias_gelu(x.requires_grad_(g), b, backend="torch")),
        "masked_softmax": (lambda g: bertkern.ops.masked_softmax(q.requires_grad_(g), backend="torch")),
        "attention": (lambda g: bertkern.ops.attention(q.requires_grad_(g), q, q, backend="torch")),
        "attention_varlen": (lambda g: bertkern.ops.attention_varlen(packed.requires_grad_(g), packed, packed, cu, 4,
                                                                     backend="torch")),
        "embedding_layer_norm": (lambda g: bertkern.ops.embedding_layer_norm(
            ids, None, None, table.requires_grad_(g), None, None, w, b, backend="torch")),
    }


@pytest.mark.parametrize("op", sorted(_calls()))
def test_custom_op_only_when_needed(op, monkeypatch):
    call = _calls()[op]
    ran = []
    real = getattr(torch.ops.bertkern, op)
    monkeypatch.setattr(torch.ops.bertkern, op, lambda *a: ran.append(op) or real(*a))
    direct = call(False)
    assert ran == [], "no gradient needed: the implementation runs without the custom op's dispatch"
    through_op = call(True)
    assert ran == [op], "a gradient needed: the custom op (and its autograd formula) runs"
    torch.testing.assert_close(direct, through_op.detach(), rtol=0, atol=0)


def test_direct_call_rules():
    x = torch.randn(3)
    assert direct_call_ok(x, needs_grad=False)
    assert not direct_call_ok(x, needs_grad=True)
    assert not direct_call_ok(x.to("meta"), needs_grad=False)  # the fake runs for meta tensors
    seen = []

    def f(t):
        seen.append(direct_call_ok(t, needs_grad=False))
        return t * 2

    torch.compile(f, backend="eager")(x)
    assert seen == [False], "while dynamo traces, the custom op (and its fake) must run"
