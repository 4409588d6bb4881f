"""The reference BERT with every fused path on backend="cuda", its CUDA kernels running on the CPU
emulation (tests/cuda_emu): a small bf16 model, forward and backward, in the padded (fused attention,
or fused softmax) and padding-free modes, against the unfused model (float64 reference, the
2x-of-eager rule on real tokens and on the parameter gradients). It checks that the CUDA ops work
with the shapes, strides and dtypes a model hands them, not only with the per-op tests' inputs."""
from __future__ import annotations

import copy

import pytest
import torch

import emulation
from bertkern import backend as _backend
from bertkern.models import BertModel
from bertkern.ops import attention_auto
from harness import assert_close_2x
from test_models import hf_bert, padded_batch

OPS = ("attention", "bias_gelu", "layer_norm", "masked_softmax")
FUSED = dict(fused_bias_gelu=True, fused_layer_norm=True, fused_embeddings=True)
MODES = {  # mode: (config flags, the attention-side op it calls)
    "fused_attention": (dict(fused_attention=True), "attention"),
    "fused_softmax": (dict(fused_softmax=True), "masked_softmax"),
    "padding_free": (dict(fused_attention=True, padding_free=True), "attention_varlen"),
}


emulated, cuda = emulation.fixtures(*OPS)


def run(model: BertModel, dtype: torch.dtype, batch, weights):
    """(real-token outputs, parameter gradients) of sum(outputs * weights) through a copy in dtype."""
    ids, mask, token_types = batch
    m = copy.deepcopy(model).to(dtype)
    out = m(ids, mask, token_types).last_hidden_state
    (out.double() * weights).sum().backward()
    return out[mask.bool()].detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", list(MODES))
def test_bert_on_the_cuda_kernels(cuda, monkeypatch, record_backends, mode):
    monkeypatch.setenv("BERTKERN_BACKEND", cuda)
    hf = hf_bert()
    unfused = BertModel.from_hf(hf).eval()
    flags, attention_op = MODES[mode]
    fused = BertModel.from_hf(hf, **FUSED, **flags).eval()
    batch = padded_batch()
    weights = torch.randn(*batch[0].shape, hf.config.hidden_size, dtype=torch.float64) * batch[1][..., None]

    got, got_grads = run(fused, torch.bfloat16, batch, weights)
    want, want_grads = run(unfused, torch.float64, batch, weights)
    eager, eager_grads = run(unfused, torch.bfloat16, batch, weights)
    assert_close_2x(got, want, eager, "last_hidden_state")
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert_close_2x(got_grads[name], want_grads[name], eager_grads[name], f"d {name}")

    backends = {op: b for op, b in record_backends}
    expected = {"bias_gelu", "add_layer_norm", "embedding_layer_norm", attention_op}
    assert set(backends) == expected and set(backends.values()) == {"cuda"}, record_backends


def test_auto_with_an_h100_table_trains_packed_with_dropout_on_the_cuda_kernels(cuda, monkeypatch):
    """backend="auto" as on an H100 with bertkern._C built: the fused ops resolve to cuda and attention
    reads the sm_90 rows. Packed training with dropout: the row's varlen_attn has no dropout, so the
    CUDA kernels run it. (On the H100 this path raised AttributeError and no CPU test took it.)"""
    monkeypatch.delenv("BERTKERN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "auto_backend", lambda device: "cuda")
    monkeypatch.setattr(attention_auto, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(attention_auto, "_CHOSEN", {})
    with _backend.observe() as ran:
        model = BertModel.from_hf(hf_bert(attention_probs_dropout_prob=0.1), **FUSED, fused_attention=True,
                                  padding_free=True).to(torch.bfloat16).train()
        ids, mask, token_types = padded_batch()
        model(ids, mask, token_types).last_hidden_state.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert ("attention_varlen", "cuda") in ran, ran


@pytest.mark.parametrize("mode", ["fused_attention", "padding_free"])
def test_auto_with_an_h100_table_runs_eager_inference_on_the_cuda_kernels(cuda, monkeypatch, mode):
    """backend="auto" as on an H100 with bertkern._C built, called eagerly for inference: attention
    reads the EAGER rows and runs the CUDA kernels, padded or packed, with the unfused model's answer."""
    monkeypatch.delenv("BERTKERN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "auto_backend", lambda device: "cuda")
    monkeypatch.setattr(attention_auto, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(attention_auto, "eager_inference", lambda q: not q.requires_grad)  # CPU tensors here
    monkeypatch.setattr(attention_auto, "_CHOSEN", {})
    hf = hf_bert()
    flags, attention_op = MODES[mode]
    ids, mask, token_types = padded_batch(lengths=(5, 1, 3))  # a short batch: the emulation is slow
    real = mask.bool()
    with torch.no_grad(), _backend.observe() as ran:
        got = BertModel.from_hf(hf, **FUSED, **flags).to(torch.bfloat16).eval()(ids, mask, token_types)
    unfused = BertModel.from_hf(hf).eval()
    with torch.no_grad():
        want = unfused.double()(ids, mask, token_types).last_hidden_state[real]
        eager = unfused.to(torch.bfloat16)(ids, mask, token_types).last_hidden_state[real]
    assert_close_2x(got.last_hidden_state[real], want, eager, "last_hidden_state")
    assert (attention_op, "cuda") in ran, ran
