"""bertkern.optimize's whole fast path on Hugging Face models: fused attention from one QKV GEMM under
the default attn_implementation, the padding-free encoder, fused embeddings, DistilBERT blocks,
sentence-transformers; CPU auto never swaps in something slower; the attention auto table.

Every model is a tiny random config (nothing downloaded) except the shipped all-MiniLM-L6-v2."""
from __future__ import annotations

import copy
import importlib
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import bertkern  # noqa: E402
from bertkern import testing  # noqa: E402
from bertkern.ops import attention_auto  # noqa: E402
from harness import skip_unless_usable  # noqa: E402
from test_optimize import VOCAB, padded_batch, tiny  # noqa: E402

opt = importlib.import_module("bertkern.optimize")
LENGTHS = [7, 4, 1, 0]  # full, padded, a single real token, fully padded


class BertkernOps(TorchDispatchMode):
    """Records every torch.ops.bertkern.* op that runs (and whether torch's SDPA ran)."""

    def __init__(self):
        super().__init__()
        self.ran: list[str] = []
        self.dims: dict[str, set[int]] = {}  # op -> the dims of its first argument

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("bertkern::") or "scaled_dot_product" in name:
            op = name.split("::")[1].split(".")[0]
            self.ran.append(op)
            self.dims.setdefault(op, set()).add(args[0].dim())
        return func(*args, **(kwargs or {}))


def tiny_distilbert(**kw):
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                           max_position_embeddings=20, initializer_range=0.2, **kw)
    return transformers.DistilBertForSequenceClassification(config).eval()


def model_of(arch: str, **kw):
    if arch == "distilbert":
        return tiny_distilbert(**kw)
    return tiny(arch, **{"attn_implementation": "sdpa", **kw})  # transformers 5's default


def real_outputs(out, mask) -> list[torch.Tensor]:
    """Every tensor output; [B, S, ...] ones at real tokens only; rows with no real token dropped
    (HF's values there are meaningless: uniform attention over padding)."""
    rows = mask.bool().any(1)
    got = []
    for v in out.values():
        if not isinstance(v, torch.Tensor):
            continue
        if v.dim() >= 2 and v.shape[:2] == mask.shape:
            got.append(v[mask.bool()])
        elif v.shape[:1] == mask.shape[:1]:
            got.append(v[rows])
    return got


# ---------------------------------------------------------------- the 2x rule, every architecture
ARCHS = ["bert-seqcls", "roberta", "electra", "xlm-roberta", "distilbert"]


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_real_tokens_within_2x_of_eager(arch, dtype, padding_free, monkeypatch):
    """Padded batch with a 1-token row and a fully padded row: optimized outputs at real tokens (and
    pooled / head outputs of rows with any real token) against a float64 copy, within 2x eager's
    error in the same dtype; the fused ops ran."""
    monkeypatch.setenv("BERTKERN_BACKEND", "torch")
    base = model_of(arch)
    ids, mask = padded_batch(base, LENGTHS)
    eager, ref64 = copy.deepcopy(base).to(dtype), copy.deepcopy(base).double()
    model = bertkern.optimize(copy.deepcopy(base).to(dtype), padding_free=padding_free)
    with torch.no_grad(), BertkernOps() as seen:
        got = real_outputs(model(input_ids=ids, attention_mask=mask), mask)
    with torch.no_grad():
        want = real_outputs(eager(input_ids=ids, attention_mask=mask), mask)
        ref = real_outputs(ref64(input_ids=ids, attention_mask=mask), mask)
    testing.assert_close_2x(got, ref, want, f"{arch} {dtype}", floor="model")
    attention = "attention_varlen" if padding_free else "attention"
    assert {attention, "embedding_layer_norm", "add_layer_norm", "bias_gelu"} <= set(seen.ran), seen.ran
    assert seen.ran.count(attention) == 2


def test_padded_positions_are_zeros_and_restore_is_exact():
    model = model_of("roberta")
    ids, mask = padded_batch(model, LENGTHS)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        bertkern.optimize(model)
        base = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(base[~mask.bool()], torch.zeros_like(base[~mask.bool()]))  # documented: zeros at pads
        bertkern.restore(model)
        after = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert all(m.forward.__func__ is type(m).forward for m in model.modules())
    assert torch.equal(before.logits, after.logits)


# ---------------------------------------------------------------- what goes to the original forward
def test_hidden_states_and_attentions_requests_get_the_original_answer():
    model = model_of("bert-seqcls")
    ids, mask = padded_batch(model, LENGTHS)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        eager = model_of("bert-seqcls", attn_implementation="eager")
        eager.load_state_dict(model.state_dict())
        want_att = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        bertkern.optimize(model)
        bertkern.optimize(eager)
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got_att = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got.hidden_states) == 3
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert (g - w)[mask.bool()].abs().max() <= 1e-5
    assert all(a is not None for a in got_att) and len(got_att) == 2
    for g, w in zip(got_att, want_att):
        assert (g - w).abs().max() <= 1e-5


def test_return_dict_false_and_no_mask_and_full_batch():
    model = model_of("bert")
    ids, _ = padded_batch(model, [5, 5])
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        bertkern.optimize(model)
        with BertkernOps() as seen:
            got = model(input_ids=ids, return_dict=False)
            full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert isinstance(got, tuple) and (got[0] - want).abs().max() <= 1e-5
    assert (full - want).abs().max() <= 1e-5
    assert "attention_varlen" not in seen.ran  # nothing to unpad: the padded path, no mask


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_a_batch_without_padding_runs_the_layers_on_rows(arch):
    """No padding (the padded path): every fused op of the layers gets [B * S, hidden] rows, its own
    layout, as on the padding-free path; a reshape into and out of each op cost ~12 views per layer of
    host time. The answer is the padded batch's."""
    model = model_of(arch)
    ids, mask = padded_batch(model, [5, 5])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask)[0]
        bertkern.optimize(model, backend="torch")
        with BertkernOps() as seen:
            got = model(input_ids=ids, attention_mask=mask)[0]
    assert (got - want).abs().max() <= 1e-5
    assert seen.dims["add_layer_norm"] == seen.dims["bias_gelu"] == {2}
    assert seen.dims["attention"] == {4} and "attention_varlen" not in seen.ran


@pytest.mark.parametrize("arch", ["bert-seqcls", "distilbert"])
def test_gradient_checkpointing_runs_the_original_encoder(arch):
    """With HF's gradient checkpointing on, a training forward runs the original encoder (which
    checkpoints; the fused loop would bypass it): no packed attention, HF's loss and gradients. Off,
    the same batch takes the padding-free path."""
    no_dropout = ({"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0} if arch == "distilbert"
                  else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = model_of(arch, attn_implementation="eager", **no_dropout)
    ids, mask = padded_batch(model, [5, 3])
    ref = copy.deepcopy(model).train()
    bertkern.optimize(model, backend="torch")
    model.train()
    for checkpointing in (False, True):
        if checkpointing:
            for m in (model, ref):  # transformers 5's name, else 4.x's
                enable = getattr(m, "activation_checkpointing_enable", None)
                if enable is not None:
                    enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with BertkernOps() as seen:
            loss = model(input_ids=ids, attention_mask=mask).logits.sum()
        want = ref(input_ids=ids, attention_mask=mask).logits.sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        want_grads = torch.autograd.grad(want, list(ref.parameters()))
        assert ("attention_varlen" in seen.ran) is not checkpointing
        assert abs(loss.item() - want.item()) <= 1e-5
        assert max((g - w).abs().max().item() for g, w in zip(grads, want_grads)) <= 1e-4


# ---------------------------------------------------------------- the QKV weight cache
def test_qkv_cache_never_stale_after_optimizer_step_and_load_state_dict():
    model = model_of("bert-seqcls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    plain = copy.deepcopy(model)
    bertkern.optimize(model)
    # No fully padded row here: its (meaningless) pooled output differs from HF's, and so would the step.
    ids, mask = padded_batch(model, [7, 4, 1, 2])

    def agree():
        with torch.no_grad():  # inference: the cached concatenation is used
            got = model(input_ids=ids, attention_mask=mask).logits
            want = plain(input_ids=ids, attention_mask=mask).logits
        assert (got - want)[mask.bool().any(1)].abs().max() <= 1e-5

    agree()
    for m in (model, plain):  # one identical SGD step on both
        m.train()
        torch.optim.SGD(m.parameters(), lr=0.5).zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        torch.optim.SGD(m.parameters(), lr=0.5).step()
        m.eval()
    agree()
    fresh = model_of("bert-seqcls")
    model.load_state_dict(fresh.state_dict())
    plain.load_state_dict(fresh.state_dict())
    agree()


# ---------------------------------------------------------------- CPU auto: never slower
def test_cpu_auto_leaves_slower_modules_alone_and_attention_runs_sdpa(monkeypatch):
    monkeypatch.delenv("BERTKERN_BACKEND", raising=False)
    model = model_of("bert-seqcls")
    ids, mask = padded_batch(model, LENGTHS)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        _, report = bertkern.optimize(model, return_report=True)
        with BertkernOps() as seen:
            got = model(input_ids=ids, attention_mask=mask).logits
    assert report.counts() == {"padding_free": 1, "attention": 2}, str(report)
    cpu = {r.kind for r in report.left_alone if "CPU model with backend auto" in r.reason}
    assert cpu == {"add_layer_norm", "bias_gelu", "embedding_layer_norm"}
    assert seen.ran and all("scaled_dot_product" in op for op in seen.ran), seen.ran  # torch's SDPA only
    assert (got - want)[mask.bool().any(1)].abs().max() <= 1e-5


@pytest.mark.parametrize("auto", ["triton", "cuda"])
def test_gpu_auto_without_the_cuda_extension_leaves_the_row_ops_alone(monkeypatch, auto):
    """A GPU model with backend auto and no usable bertkern._C (auto runs Triton, slower called eagerly
    than HF's own modules): add & norm, bias + GELU and the embeddings are left alone, attention and the
    padding-free encoder swapped; with _C (auto runs cuda) every op is swapped; backend="triton" asked
    for by name is not second-guessed. (The model stays on the CPU; only its device is faked.)"""
    monkeypatch.delenv("BERTKERN_BACKEND", raising=False)
    monkeypatch.setattr(opt, "_model_device", lambda model: torch.device("cuda", 0))
    monkeypatch.setattr(opt._backend, "auto_backend", lambda device: auto)
    model = model_of("bert-seqcls")
    _, report = bertkern.optimize(model, return_report=True)
    slower = {r.kind for r in report.left_alone if "no usable bertkern._C" in r.reason}
    if auto == "triton":
        assert report.counts() == {"padding_free": 1, "attention": 2}, str(report)
        assert slower == {"add_layer_norm", "bias_gelu", "embedding_layer_norm"}
    else:
        assert not slower and {"add_layer_norm", "bias_gelu", "embedding_layer_norm"} <= set(report.counts())
    assert opt._slower_under_auto(model, "triton") is None


def test_auto_varlen_attn_calls_the_aten_kernel_in_inference(monkeypatch):
    """auto's "varlen_attn": without a gradient, the ATen flash kernel directly (no Python custom-op
    dispatch); with one, torch's public varlen_attn (its autograd). Both stand-ins here (CUDA only)."""
    calls = []

    def aten_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, debug, *, scale):
        calls.append(("aten", cu_q.dtype, max_q, dropout_p, causal, scale))
        return (q * 2, None, None, None, None)

    def public(q, k, v, cu_q, cu_k, max_q, max_k, *, scale):
        calls.append(("public", cu_q.dtype, max_q, scale))
        return q * 3

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", aten_flash)
    monkeypatch.setattr(attention_auto, "_varlen_attn", lambda: public)
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 2, 5])
    assert torch.equal(attention_auto.varlen_attn(q, q, q, cu, 3, 0.5), q * 2)
    with torch.no_grad():
        attention_auto.varlen_attn(q.requires_grad_(), q, q, cu, 3, 0.5)
    assert torch.equal(attention_auto.varlen_attn(q, q, q, cu, 3, 0.5), q * 3)
    assert calls == [("aten", torch.int32, 3, 0.0, False, 0.5)] * 2 + [("public", torch.int32, 3, 0.5)]


def test_auto_table_reads_measured_rows_first(tmp_path, monkeypatch):
    """Rows the benchmark suite measured (attention_auto.json) win over the static ones for their
    bucket and arch; other inputs still follow the static rows; a bad file is an error naming it."""
    measured = {"rows": [{"arch": "sm_90", "dtype": "float16", "head_dim": "<=64", "seq": "<=128",
                          "attention": "cuda", "why": "measured"}]}
    path = tmp_path / "attention_auto.json"
    path.write_text(json.dumps(measured))
    monkeypatch.setattr(attention_auto, "TABLE", attention_auto.load_measured(path) + attention_auto.STATIC)
    assert attention_auto.lookup("attention", "sm_90", torch.float16, 64, 100) == "cuda"
    assert attention_auto.lookup("attention", "sm_90", torch.float16, 64, 300) == "sdpa"  # another bucket
    assert attention_auto.lookup("attention", "sm_80", torch.float16, 64, 100) == "sdpa"  # another arch
    assert attention_auto.lookup("attention_varlen", "sm_90", torch.float16, 64, 100) == "varlen_attn"  # no such op
    assert "measured" in attention_auto.format_table()
    assert attention_auto.load_measured(tmp_path / "none.json") == []
    measured["rows"][0]["attention"] = "fastest"
    path.write_text(json.dumps(measured))
    with pytest.raises(ValueError, match="attention_auto.json.*'fastest'"):
        attention_auto.load_measured(path)
    measured["rows"][0].update(attention="cuda", arch="sm_9.")  # a key no GPU gives would never match
    path.write_text(json.dumps(measured))
    with pytest.raises(ValueError, match="attention_auto.json.*arch='sm_9.'"):
        attention_auto.load_measured(path)


@pytest.mark.parametrize("runnable, want", [({"varlen_attn", "cuda", "sdpa"}, "varlen_attn"),
                                            ({"cuda", "sdpa"}, "cuda"),  # dropout: packed CUDA kernels
                                            ({"sdpa"}, "sdpa"), (set(), "torch")])
def test_auto_falls_back_in_order(monkeypatch, runnable, want):
    """A choice that cannot run an input moves down its row's order, never to Triton, and ends at torch."""
    monkeypatch.setattr(attention_auto, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(attention_auto, "_can_run", lambda c, op, q, p: c in runnable or c == "torch")
    monkeypatch.setattr(attention_auto, "_CHOSEN", {})  # choose() caches per input kind; _can_run changed
    q = torch.empty(4, 2, 64, dtype=torch.float16)
    assert attention_auto.choose("attention_varlen", q, 0.1, 128) == want


@pytest.mark.parametrize("eager", [True, False])
def test_auto_reads_the_eager_rows_only_for_eager_inference(monkeypatch, eager):
    """Eager inference on an H100 runs the CUDA kernels for padded attention up to S = 128 and packed
    attention up to 512; with a gradient, in a capture or under compile, the kernel-time rows; where
    the CUDA kernels cannot run, the row's fallback order (never varlen_attn for padded attention)."""
    assert not attention_auto.eager_inference(torch.empty(2, 3, 4, 8))  # a CPU call
    monkeypatch.setattr(attention_auto, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(attention_auto, "eager_inference", lambda q: eager)
    runnable = {"cuda", "sdpa", "varlen_attn"}
    monkeypatch.setattr(attention_auto, "_can_run", lambda c, op, q, p: c == "torch" or (
        c in runnable and (op, c) != ("attention", "varlen_attn")))  # as the real one: varlen_attn is packed only
    monkeypatch.setattr(attention_auto, "_CHOSEN", {})
    q = torch.empty(4, 2, 64, dtype=torch.float16)
    got = {(op, seq): attention_auto.choose(op, q, 0.0, seq)
           for op in ("attention", "attention_varlen") for seq in (128, 512, 513)}
    table = {("attention", 128): "sdpa", ("attention", 512): "sdpa", ("attention", 513): "sdpa",
             ("attention_varlen", 128): "varlen_attn", ("attention_varlen", 512): "varlen_attn",
             ("attention_varlen", 513): "varlen_attn"}
    assert got == (table | {("attention", 128): "cuda", ("attention_varlen", 128): "cuda",
                            ("attention_varlen", 512): "cuda"} if eager else table)
    runnable.discard("cuda")  # bertkern._C not built
    monkeypatch.setattr(attention_auto, "_CHOSEN", {})
    assert attention_auto.choose("attention", q, 0.0, 128) == "sdpa"
    assert attention_auto.choose("attention_varlen", q, 0.0, 128) == "varlen_attn"
    assert attention_auto.lookup("attention", "sm_80", torch.float16, 64, 128, eager=True) == "sdpa"  # H100 rows


def test_auto_can_run_asks_the_kernels_own_checks():
    """_can_run unstubbed, for the choices a GPU row gives: a dtype the CUDA kernels or every kernel lack
    moves down the order. (On an H100 packed training with dropout chose "cuda", and this check raised
    AttributeError: it had looked the checks up on the attention function, not its module.)"""
    q = torch.empty(2, 3, 16, 64)
    assert not attention_auto._can_run("cuda", "attention_varlen", q, 0.1)  # fp32
    assert not attention_auto._can_run("triton", "attention", q.double(), 0.0)
    assert attention_auto._can_run("sdpa", "attention", q, 0.1)


def test_auto_choice_is_cached_per_input_kind(monkeypatch):
    """choose() walks the table once per (op, device, dtype, head dim, seq bucket, dropout) and again
    when the table is swapped; a call with another key walks it anew."""
    calls = []
    real = attention_auto.lookup
    monkeypatch.setattr(attention_auto, "lookup", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(attention_auto, "_CHOSEN", {})
    q = torch.empty(2, 3, 100, 16)
    for seq in (100, 120, 128):  # one bucket
        assert attention_auto.choose("attention", q, 0.0, seq) == "sdpa"
    assert len(calls) == 1
    attention_auto.choose("attention", q, 0.0, 129)  # the next bucket
    attention_auto.choose("attention", q, 0.1, 128)  # dropout
    attention_auto.choose("attention", q.double(), 0.0, 128)  # dtype
    attention_auto.choose("attention_varlen", q, 0.0, 128)  # op
    assert len(calls) == 5
    monkeypatch.setattr(attention_auto, "TABLE", [{"arch": "*", "dtype": "*", "head_dim": "*", "seq": "*",
                                                   "attention": "torch"}])
    assert attention_auto.choose("attention", q, 0.0, 128) == "torch"
    assert len(calls) == 6


def test_auto_table_and_sdpa_varlen_match_the_reference():
    q = torch.randn(10, 2, 8, dtype=torch.float64)
    assert attention_auto.choose("attention_varlen", q, 0.0, 7) == "sdpa"
    assert attention_auto.lookup("attention_varlen", "sm_90", torch.bfloat16, 64, 128) == "varlen_attn"
    assert attention_auto.lookup("attention", "sm_80", torch.float16, 64, 512) == "sdpa"
    assert attention_auto.lookup("attention", "sm_75", torch.float16, 64, 512) == "sdpa"  # the last row
    assert all("triton" not in order for order in attention_auto.FALLBACK.values())  # never automatic
    rows = attention_auto.table()
    assert rows and {"arch", "dtype", "head_dim", "seq", "attention", "attention_varlen"} <= set(rows[0])
    assert "attention_varlen" in attention_auto.format_table()
    cu = torch.tensor([0, 7, 7, 10], dtype=torch.int32)  # a middle sequence with no tokens
    k, v = torch.randn_like(q), torch.randn_like(q)
    got = bertkern.ops.attention_varlen(q, k, v, cu, 7)  # auto: SDPA over padded blocks
    want = bertkern.ops.attention_varlen(q, k, v, cu, 7, backend="torch")
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- Triton kernels through the whole path
def test_triton_padding_free_and_training(monkeypatch, record_backends):
    skip_unless_usable("triton", "cpu")
    monkeypatch.setenv("BERTKERN_BACKEND", "triton")
    model = model_of("bert-seqcls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_hidden_layers=1)
    plain = copy.deepcopy(model).train()
    bertkern.optimize(model)
    model.train()
    ids, mask = padded_batch(model, [5, 2, 1])
    labels = torch.tensor([0, 1, 1])
    record_backends.clear()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    ref = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    assert {("attention_varlen", "triton"), ("add_layer_norm", "triton")} <= set(record_backends)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)


# ---------------------------------------------------------------- the real checkpoint, sentence-transformers
def _minilm_path():
    try:
        from bertkern.verify import minilm_path

        return minilm_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_minilm_default_load_sdpa_padding_free(monkeypatch):
    monkeypatch.setenv("BERTKERN_BACKEND", "torch")
    base = transformers.AutoModel.from_pretrained(_minilm_path()).eval()
    assert base.config._attn_implementation == "sdpa"
    ids, mask = padded_batch(base, [12, 5, 1, 0])
    ids = torch.where(mask.bool(), torch.randint(1000, 30000, ids.shape), 0)
    ref64 = copy.deepcopy(base).double()
    with torch.no_grad():
        want = real_outputs(base(input_ids=ids, attention_mask=mask), mask)
        ref = real_outputs(ref64(input_ids=ids, attention_mask=mask), mask)
        _, report = bertkern.optimize(base, return_report=True)
        got = real_outputs(base(input_ids=ids, attention_mask=mask), mask)
    assert report.counts()["attention"] == 6 and report.counts()["padding_free"] == 1
    testing.assert_close_2x(got, ref, want, "MiniLM", floor="model")


def test_sentence_transformer_encode(monkeypatch):
    st = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("BERTKERN_BACKEND", "torch")
    model = st.SentenceTransformer(_minilm_path(), device="cpu")
    sentences = ["a short one", "a rather longer sentence that needs more tokens than the first", "x"]
    want = model.encode(sentences, convert_to_tensor=True)
    ref64 = copy.deepcopy(model).double()
    ref = ref64.encode(sentences, convert_to_tensor=True)
    _, report = bertkern.optimize(model, return_report=True)
    assert len(report.replaced_names("padding_free")) == 1, str(report)  # the transformer inside, found by structure
    got = model.encode(sentences, convert_to_tensor=True)
    testing.assert_close_2x(got, ref.float(), want, "SentenceTransformer.encode", floor="model")
