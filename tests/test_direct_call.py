"""Outside torch.compile, each op runs its implementation without its custom op's dispatch
(torch.ops.bertkern.*, 30-100 us of host time per call: more than a BERT-size kernel on a GPU):
directly without gradients, inside a torch.autograd.Function with the op's own autograd formula with
them. While dynamo traces, and on meta tensors, the custom op runs (its fake, its registered autograd).
Both paths give the same outputs and gradients."""
from __future__ import annotations

import pytest
import torch

import bertkern
from bertkern._utils import OpCall


def _calls():
    x = torch.randn(2, 3, 8)
    w, b = torch.randn(8), torch.randn(8)
    q = torch.randn(2, 2, 5, 4)
    packed = torch.randn(7, 2, 4)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    ids = torch.randint(0, 10, (2, 3))
    table = torch.randn(10, 8)
    return {  # op name -> (input that may require grad, call)
        "add_layer_norm": (x, lambda t: bertkern.ops.add_layer_norm(t, x, w, b, 1e-5, backend="torch")),
        "bias_gelu": (x, lambda t: bertkern.ops.bias_gelu(t, b, backend="torch")),
        "masked_softmax": (q, lambda t: bertkern.ops.masked_softmax(t, backend="torch")),
        "attention": (q, lambda t: bertkern.ops.attention(t, q, q, backend="torch")),
        "attention_varlen": (packed, lambda t: bertkern.ops.attention_varlen(t, packed, packed, cu, 4,
                                                                             backend="torch")),
        "embedding_layer_norm": (table, lambda t: bertkern.ops.embedding_layer_norm(ids, None, None, t, None, None,
                                                                                    w, b, backend="torch")),
    }


@pytest.mark.parametrize("op", sorted(_calls()))
def test_custom_op_only_while_tracing(op, monkeypatch):
    t, call = _calls()[op]
    ran = []
    real = getattr(torch.ops.bertkern, op)
    monkeypatch.setattr(torch.ops.bertkern, op, lambda *a: ran.append(op) or real(*a))
    direct = call(t)
    assert ran == [] and direct.grad_fn is None, "no gradient needed: the implementation runs directly"
    leaf = t.clone().requires_grad_()
    eager = call(leaf)
    assert ran == [] and eager.grad_fn is not None, "a gradient: an autograd.Function, not the custom op"
    grad = torch.randn_like(eager)
    (eager_grad,) = torch.autograd.grad(eager, leaf, grad)
    monkeypatch.undo()  # dynamo cannot trace the spy: look at the traced graph instead
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    traced_leaf = t.clone().requires_grad_()
    traced = torch.compile(call, backend=backend, fullgraph=True)(traced_leaf)
    assert f"bertkern.{op}" in targets, f"while dynamo traces, the custom op runs: {targets}"
    (traced_grad,) = torch.autograd.grad(traced, traced_leaf, grad)
    torch.testing.assert_close(direct, eager.detach(), rtol=0, atol=0)
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    torch.testing.assert_close(traced_grad, eager_grad, rtol=0, atol=0)


def test_meta_and_subclasses_take_the_custom_op():
    impl = object()
    call = OpCall("bias_gelu", impl)
    x = torch.randn(3)
    assert call.pick(x) is impl
    assert call.pick(x, grad=True) is torch.ops.bertkern.bias_gelu  # no autograd formula given
    assert call.pick(x.to("meta")) is torch.ops.bertkern.bias_gelu  # the fake runs for meta tensors
    assert call.pick(torch.nn.Parameter(x)) is impl  # model weights are plain tensors to the dispatcher
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert call.pick(mode.from_tensor(x)) is torch.ops.bertkern.bias_gelu  # a subclass
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert call.pick(x) is torch.ops.bertkern.bias_gelu  # dispatch modes see the op as one call
