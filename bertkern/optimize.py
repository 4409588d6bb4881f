"""Swap bertkern's fused ops into an existing model, in place, and back.

    model = bertkern.optimize(model)              # HF BERT / RoBERTa / ELECTRA / XLM-R / CamemBERT ...
    compiled = torch.compile(model)               # optional; padding-free inside (see the encoder below)
    print(bertkern.optimize_report(model))        # what was replaced, what was left alone and why
    bertkern.restore(model)                       # the original forwards again, exactly

    model, report = bertkern.optimize(model, return_report=True)  # the same, report in hand
    with bertkern.optimized(model):               # optimized inside the block, undone on exit
        ...

`optimize` returns the model (the same object; a deep copy with inplace=False) and logs the report
at INFO on the "bertkern.optimize" logger. The report of the latest optimize() of a model stays
reachable with `bertkern.optimize_report(model)` (also through a torch.compile wrapper) until
`restore`; it is held in a weak-keyed table, so it neither keeps the model alive nor travels with
a deep copy or a pickle.

Models: transformers' BERT family (BertModel, BertFor*, RoBERTa, ELECTRA, XLM-RoBERTa, CamemBERT and
anything with the same blocks), DistilBERT, sentence-transformers' SentenceTransformer wrapping them
(the transformer inside is found like any submodule), and bertkern.models.

Blocks are found by structure, not by class name, and each candidate is checked by running its own
forward once on a small random input (on a private generator: the global RNG is not touched) against
the computation bertkern will substitute. Only blocks that pass are swapped:

- encoder model (BertModel / RobertaModel / ElectraModel / DistilBertModel ...: `embeddings` and
  `encoder.layer` or `transformer.layer`), the padding-free path (padding_free=True, the default):
  called with a [B, S] attention_mask that has padding, it runs the embeddings, packs the real tokens
  once (bertkern.padding.unpad), runs every layer on [total, hidden] (attention by
  `ops.attention_varlen`, the layers' add & norm and FFN on the packed rows), scatters back once
  (padded positions of last_hidden_state are zeros: HF's values there are meaningless), then the
  pooler. Without padding (or without a mask) the layers run on [B, S, hidden] with no mask at all.
  Packing with fixed shapes and no host sync (bertkern.padding.unpad_static into a token capacity T,
  dummy sequences of at most max_seqlen m for the filler rows) serves the two places where unpad's
  host sync cannot happen:
  - a CUDA graph: inside `bertkern.padding.static_shapes(T, m)`, which
    bertkern.cuda_graphs.CUDAGraphRunner sets from its token-count buckets;
  - torch.compile (any mode; "reduce-overhead" = CUDA graphs through cudagraph trees): the encoder
    starts with one deliberate graph break, an eager prologue (`_compiled_packing`) that reads the
    real lengths on the host and picks (T, m) with cuda_graphs.choose_packed_shapes (T the smallest
    of 4 steps per power of two >= the real tokens, at least 16, at most B x S; m the smallest of
    cuda_graphs.DEFAULT_SEQ_LENS >= the longest row, at most S), or "no padding". The graph after it
    (embeddings, every layer, pooler) depends only on that bucket: Dynamo guards on T and m, so a
    batch of a bucket already seen reuses its graph, a new bucket compiles at most once (and once
    Dynamo's automatic dynamic shapes, or dynamic=True, make T and m symbolic, not even that), and
    max_seqlen is never stale. One host sync per call, as eager's unpad. Where a graph break is not
    allowed (fullgraph=True, torch.export, error_on_graph_break) and under other tracers (make_fx),
    the padded batch runs under a bool mask instead: one graph for every padding pattern, HF's
    values at padded positions. Any other capture (torch.cuda.graph without the runner) also runs
    the padded path. Dynamo shares compiled code between models of the same structure compiled with
    the same backend and mode, and fullgraph is not part of its guards: in one process, a copy
    compiled with fullgraph=True after one without reuses the packed code (no error), and the other
    way round the padded code; both are right at real tokens.
  Calls it does not cover go to the original forward: output_hidden_states / output_attentions (HF
  records them per layer), a KV cache, cross-attention, a head mask, a 4-D mask, gradient
  checkpointing. A fully padded row (no real token) gets zeros everywhere (HF: uniform attention
  over its padding); real rows are unaffected.
- self-attention (BertSelfAttention and family): `query` / `key` / `value` Linears, whatever the
  attn_implementation ("eager", "sdpa", flash: the config is not consulted). Fused: one QKV GEMM on
  the concatenated weights (concatenated per call in training; cached in inference, keyed by each
  parameter's version counter, so an optimizer step or load_state_dict never leaves it stale), then
  `ops.attention` on strided q / k / v views under HF's mask as given (additive float or SDPA's bool;
  flash's [B, S] is made [B, 1, 1, S]); dropout on the probabilities in training. A KV cache,
  cross-attention inputs, a head mask or attention weights asked for go to the original forward.
  With ops=("masked_softmax", ...) and no "attention", eager attention keeps its matmuls and only the
  softmax is fused (the older path).
- embeddings (word / position / token type embeddings + LayerNorm + dropout): `ops.embedding_layer_norm`
  with the module's own position rule (RoBERTa's from padding_idx via its own
  create_position_ids_from_input_ids: a staticmethod in transformers 5.x, a function of its modeling
  file in 4.x); ELECTRA's embeddings_project runs after it, in the encoder.
  inputs_embeds goes to the original forward.
- DistilBERT TransformerBlock: fused attention, out_lin + sa_layer_norm (add_layer_norm), FFN
  lin1 + GELU (bias_gelu), lin2 + dropout + output_layer_norm (add_layer_norm).
- add & norm (BertSelfOutput / BertOutput and family): children `dense` (Linear), `dropout`
  (Dropout) and one LayerNorm, forward (hidden_states, input_tensor) ->
  LayerNorm(dropout(dense(hidden_states)) + input_tensor). Fused: `ops.add_layer_norm` with the
  dense bias, the LayerNorm's own eps, and the dropout's own p in training mode.
- intermediate (BertIntermediate and family): `dense` + a GELU-type `intermediate_act_fn`, forward
  act(dense(h)). Fused: `ops.bias_gelu` ("gelu" -> exact erf, "gelu_new" / "gelu_pytorch_tanh" /
  nn.GELU("tanh") -> "tanh"). Other activations are left alone and reported.

Never slower with backend auto (no backend=, no $BERTKERN_BACKEND): where auto's only path for add &
norm, bias + GELU and the embeddings is slower than HF's own modules, they are left alone (reported),
while attention and the padding-free encoder are swapped (attention's auto table picks torch's own
kernels there), so the model still saves the padded tokens' GEMMs and two of three QKV GEMM launches:
- a CPU model: bertkern's CPU path is the eager reference, slower than HF's modules; attention runs
  torch's SDPA (for packed tokens: SDPA over [B, max_seqlen] blocks);
- a GPU model without a usable bertkern._C (a pure-Python install; auto runs Triton): called eagerly,
  each Triton launch costs tens of microseconds of host time, and the backward several launches. H100,
  BERT-base sizes, per call eagerly (graph replay): add_layer_norm backward 272-293 us on Triton, 55-99
  in eager PyTorch (47 and 36); bias_gelu backward 132-174 against 50-56 (43 and 46); end to end,
  `optimize(model, backend="triton")` ran inference at 0.56-0.95x of HF sdpa and a fine-tuning step
  at 0.65-0.80x (benchmarks/results/h100). In CUDA graphs or torch.compile Triton is the faster one
  (add_layer_norm forward 8 us against 25 in graph replay): pass backend="triton" there.

A swap sets `forward` on the module instance (a bound method of a function in this module) and
records what it did in `module._bertkern_patch`; the class, the parameters (same objects) and the
state dict are untouched, and `restore` deletes the instance attribute so the class's forward is
back. Modules whose `forward` is already overridden on the instance (accelerate hooks, another
tool) are left alone. On `bertkern.models` models the config's `fused_*` flags are set instead
(shared by every module of that config) and restored by `restore`.

Which backend runs is decided by the op at each call (`backend=`, else $BERTKERN_BACKEND, else
auto).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import os
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bertkern import backend as _backend
from bertkern import cuda_graphs as _cuda_graphs
from bertkern import nn as _nn
from bertkern import ops as _ops
from bertkern import padding as _padding

logger = logging.getLogger(__name__)

DEFAULT_OPS = ("attention", "bias_gelu", "add_layer_norm", "embedding_layer_norm")
KNOWN_OPS = ("attention", "bias_gelu", "add_layer_norm", "embedding_layer_norm", "masked_softmax")

_MARK = "_bertkern_patch"  # attribute set on each patched module
_SAVED_FLAGS = "_bertkern_saved_flags"  # attribute set on a bertkern BertConfig whose flags we set


# ---------------------------------------------------------------- report
@dataclass(frozen=True)
class Replaced:
    name: str  # qualified module name ("" is the model itself)
    kind: str  # the bertkern op now computing it
    module_type: str
    detail: str = ""


@dataclass(frozen=True)
class LeftAlone:
    name: str
    kind: str  # the op that would have computed it
    module_type: str
    reason: str


@dataclass
class OptimizeReport:
    """What one `optimize` call did. `model` is the optimized model (a copy when inplace=False),
    held weakly: None once that model is gone."""

    model_type: str  # the class name of the optimized model
    backend: str | None
    ops: tuple[str, ...]
    replaced: list[Replaced] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    # What this call changed, for optimized(): ("module", weakref to it) or ("flag", config, flag, old
    # value). Nothing here refers strongly to the model (which may itself be a patched module): the
    # report is the value of a weak-keyed table keyed by the model, and a strong reference back to
    # the key would keep both alive forever.
    _undo: list = field(default_factory=list, repr=False, compare=False)
    _model_ref: Any = field(default=None, repr=False, compare=False)

    @property
    def model(self) -> nn.Module | None:
        return self._model_ref() if self._model_ref is not None else None

    def counts(self) -> dict[str, int]:
        """Replaced modules per op."""
        out: dict[str, int] = {}
        for r in self.replaced:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    def replaced_names(self, kind: str | None = None) -> list[str]:
        return [r.name for r in self.replaced if kind is None or r.kind == kind]

    def left_alone_names(self, kind: str | None = None) -> list[str]:
        return [r.name for r in self.left_alone if kind is None or r.kind == kind]

    def to_dict(self) -> dict:
        return {
            "model": self.model_type,
            "backend": self.backend,
            "ops": list(self.ops),
            "replaced": [dataclasses.asdict(r) for r in self.replaced],
            "left_alone": [dataclasses.asdict(r) for r in self.left_alone],
        }

    def __str__(self) -> str:
        backend = self.backend or "per call ($BERTKERN_BACKEND, else auto)"
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items())) or "nothing"
        lines = [f"bertkern.optimize({self.model_type}): replaced {len(self.replaced)} module(s): "
                 f"{counts}; left alone {len(self.left_alone)}; ops {', '.join(self.ops)}; backend {backend}"]
        for (kind, detail), names in _group(self.replaced, lambda r: (r.kind, r.detail)).items():
            note = f"  ({detail})" if detail else ""
            lines.append(f"  replaced    {kind:<20} x{len(names):<3} {_names(names)}{note}")
        for (kind, reason), names in _group(self.left_alone, lambda r: (r.kind, r.reason)).items():
            lines.append(f"  left alone  {kind:<20} x{len(names):<3} {_names(names)}: {reason}")
        return "\n".join(lines)


def _group(entries, key) -> dict:
    """Names of the entries grouped by key(entry), in first-seen order."""
    out: dict = {}
    for e in entries:
        out.setdefault(key(e), []).append(e.name)
    return out


def _names(names: list[str], shown: int = 3) -> str:
    names = [n or "<model>" for n in names]
    more = f", ... (+{len(names) - shown})" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ---------------------------------------------------------------- the fused forwards
# Module-level functions bound to each patched instance with types.MethodType, so a patched model
# deep-copies (the copy's forward binds to the copy) and torch.compile traces them like any method.
@dataclass(frozen=True)
class _Patch:
    kind: str
    backend: str | None
    approximate: str | None = "none"  # bias_gelu; block: the FFN's GELU form (None: not fused)
    norm: str = "LayerNorm"  # add_layer_norm: the LayerNorm child's name
    scale: float | None = 1.0  # masked_softmax / attention: the attention's scaling
    fused_norms: bool = True  # block: add & norm and bias + GELU through the ops (False: HF's modules)
    padding_free: bool = True  # encoder: run the layers on packed real tokens
    layers: str = "encoder"  # encoder: the child holding the `layer` list ("encoder" / "transformer")
    step: str = "bert"  # encoder: how one layer runs ("bert" / "block")
    output_cls: Any = None  # encoder: the ModelOutput class the original forward returns
    pooled: bool = False  # encoder: output_cls has a pooler_output
    arg_names: tuple = ()  # embedding_layer_norm: the original forward's parameter names; block: those after the mask
    position_rule: Any = None  # embedding_layer_norm: RoBERTa's create_position_ids_from_input_ids (None: arange)
    tuple_output: bool = False  # block: the original returns (hidden_states,) (transformers 4.x)


def _linear_add_norm(x, dense: nn.Linear, dropout: nn.Module | None, residual, norm: nn.LayerNorm, fused: bool,
                     backend: str | None) -> torch.Tensor:
    """LayerNorm(dropout(dense(x)) + residual). Fused: the matmul without its bias, then bias + dropout +
    residual + LayerNorm in one op; else HF's own modules. eps and p are read at every call."""
    if not fused:
        y = dense(x)
        return norm((dropout(y) if dropout is not None else y) + residual)
    p = dropout.p if dropout is not None and dropout.training else 0.0
    return _nn.linear_add_layer_norm(x, dense, residual, norm, p, backend)


def _linear_gelu(x, dense: nn.Linear, act: Any, approximate: str | None, backend: str | None) -> torch.Tensor:
    """act(dense(x)); with a GELU form, the matmul without its bias, then bias + GELU in one op."""
    if approximate is None:
        return act(dense(x))
    return _nn.linear_bias_gelu(x, dense, approximate, backend)


def _intermediate_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """gelu(dense(h)): the matmul without its bias, then bias + GELU in one op."""
    patch = self._bertkern_patch
    return _linear_gelu(hidden_states, self.dense, None, patch.approximate, patch.backend)


def _add_norm_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """LayerNorm(dropout(dense(h)) + input_tensor) in one op after the matmul."""
    patch = self._bertkern_patch
    return _linear_add_norm(hidden_states, self.dense, self.dropout, input_tensor, getattr(self, patch.norm), True,
                            patch.backend)


# ---- fused attention (one QKV GEMM), DistilBERT blocks, embeddings, the padding-free encoder
def _hf_collecting_attentions() -> bool:
    """transformers 5.x records attention weights through hooks when output_attentions is asked for
    (the attention module never sees the flag): then the original forward must run. The check reads
    HF's context variable, which torch.compile cannot trace; compiled models skip it."""
    capture = sys.modules.get("transformers.utils.output_capturing")
    if capture is None or torch.compiler.is_compiling():
        return False
    collector = getattr(capture, "_active_collector", None)
    try:
        collected = collector.get() if collector is not None else None
    except LookupError:
        return False
    return bool(collected) and "attentions" in collected


_UNFUSED_ATTENTION_KWARGS = ("cache", "past_key_values", "past_key_value", "encoder_hidden_states", "head_mask")


def _attention_falls_back(args, kwargs, mask) -> bool:
    """Calls the fused attention does not cover: extra positional arguments, a KV cache, cross-attention
    inputs, a head mask, attention weights asked for, a mask that is not a [B, S] / 4-D tensor."""
    return bool(
        args
        or any(kwargs.get(k) is not None for k in _UNFUSED_ATTENTION_KWARGS)
        or kwargs.get("output_attentions")
        or (mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() in (2, 4)))
        or _hf_collecting_attentions()
    )


def _as_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF's attention mask as bertkern.ops.attention takes it: 4-D masks (eager's additive float, SDPA's
    bool keep-mask) as they are; flash attention's [B, S] padding mask (1 = real) as a bool [B, 1, 1, S]."""
    if mask is not None and mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    return mask


def _attention_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
    """HF BERT-family self-attention, whatever its attn_implementation: one QKV GEMM and
    bertkern.ops.attention on strided views of its output. Returns (output, None) as HF's SDPA path
    does; calls it does not cover go to the class's own forward."""
    if _attention_falls_back(args, kwargs, attention_mask):
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    from bertkern.models.bert import qkv_attention

    patch = self._bertkern_patch
    p = self.dropout.p if self.training else 0.0
    out = qkv_attention(self, self.query, self.key, self.value, self.num_attention_heads, hidden_states,
                        _as_mask(attention_mask), dropout_p=p, scale=patch.scale, backend=patch.backend)
    return out, None


def _block_step(self, h, mask, varlen, patch: _Patch, seq_len: int | None = None) -> torch.Tensor:
    """One DistilBERT TransformerBlock on [B, S, dim] or its [B * S, dim] rows (seq_len S; mask) or on
    packed [total, dim] (varlen)."""
    from bertkern.models.bert import qkv_attention

    att, ffn = self.attention, self.ffn
    p = att.dropout.p if att.training else 0.0
    a = qkv_attention(att, att.q_lin, att.k_lin, att.v_lin, att.n_heads, h, mask, varlen, dropout_p=p,
                      scale=patch.scale, backend=patch.backend, seq_len=seq_len)
    a = _linear_add_norm(a, att.out_lin, None, h, self.sa_layer_norm, patch.fused_norms, patch.backend)
    f = _linear_gelu(a, ffn.lin1, ffn.activation, patch.approximate if patch.fused_norms else None, patch.backend)
    return _linear_add_norm(f, ffn.lin2, ffn.dropout, a, self.output_layer_norm, patch.fused_norms, patch.backend)


def _block_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
    """DistilBERT's TransformerBlock: fused attention, add & norm, FFN, add & norm."""
    patch = self._bertkern_patch
    if args and len(args) <= len(patch.arg_names):
        # transformers 4.x's Transformer passes head_mask and output_attentions positionally
        kwargs = {**dict(zip(patch.arg_names, args)), **kwargs}
        args = ()
    if _attention_falls_back(args, kwargs, attention_mask):
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    out = _block_step(self, hidden_states, _as_mask(attention_mask), None, patch)
    return (out,) if patch.tuple_output else out


def _bert_layer_step(layer, h, mask, varlen, backend, seq_len: int | None = None) -> torch.Tensor:
    """One BERT-family layer: fused attention, then its own (possibly patched) add & norm and FFN."""
    from bertkern.models.bert import qkv_attention

    att = layer.attention.self
    p = att.dropout.p if att.training else 0.0
    a = qkv_attention(att, att.query, att.key, att.value, att.num_attention_heads, h, mask, varlen, dropout_p=p,
                      scale=getattr(att, "scaling", None), backend=backend, seq_len=seq_len)
    a = layer.attention.output(a, h)
    return layer.output(layer.intermediate(a), a)


def _run_layers(self, patch: _Patch, h, mask, varlen, seq_len: int | None = None) -> torch.Tensor:
    """Every layer on 2-D rows: packed tokens (varlen), or a padded batch's [B * S, hidden] (seq_len S)."""
    for layer in getattr(self, patch.layers).layer:
        if patch.step == "block":
            h = _block_step(layer, h, mask, varlen, layer.__dict__.get(_MARK) or _unfused_block(patch), seq_len)
        else:
            h = _bert_layer_step(layer, h, mask, varlen, patch.backend, seq_len)
    return h


def _unfused_block(patch: _Patch) -> _Patch:
    return _Patch("block", patch.backend, approximate=None, scale=None, fused_norms=False)


_ENCODER_INPUTS = ("token_type_ids", "position_ids", "inputs_embeds")


def _encoder_falls_back(self, patch: _Patch, args, kwargs, attention_mask) -> bool:
    """Calls the packed / fused encoder does not cover go to the original forward: hidden states or
    attention weights asked for (HF records them per layer), a KV cache, cross-attention inputs, a head
    mask, a 4-D mask, gradient checkpointing, extra positional arguments or unknown inputs."""
    config = getattr(self, "config", None)
    if args or (attention_mask is not None and attention_mask.dim() != 2):
        return True
    if getattr(config, "output_attentions", False) or getattr(config, "output_hidden_states", False):
        return True
    if self.training:
        # HF checkpoints in the encoder's forward or (GradientCheckpointingLayer) in each layer's __call__,
        # both of which the fused loop bypasses: their flags, not a walk over every module (host time).
        encoder = getattr(self, patch.layers)
        if any(getattr(m, "gradient_checkpointing", False) for m in (self, encoder, *encoder.layer)):
            return True
    return any(v is not None and v is not False
               for k, v in kwargs.items() if k not in _ENCODER_INPUTS + ("return_dict",))


def _capturing() -> bool:
    """Inside torch.compile or a CUDA graph capture, where unpad's host sync (token count, max_seqlen)
    cannot happen: the encoder then packs with fixed shapes (unpad_static) or runs the padded batch."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# ---- the padding-free encoder under torch.compile: an eager prologue, then fixed shapes per bucket
_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)  # torch < 2.5


@torch.compiler.assume_constant_result
def _graph_breaks_allowed() -> bool:
    """While Dynamo traces: whether this compile may graph break (False under fullgraph=True, export or
    torch._dynamo.error_on_graph_break(True)). Dynamo runs it once at trace time and bakes the answer in
    (fullgraph does not change within one compiled frame); False when it cannot tell (a private API)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
        return not (tx.one_graph or getattr(tx, "error_on_graph_break", False) or exporting)
    except Exception:
        return False


def _eager_only(fn):
    """torch.compiler.disable(fn), with a reason that graph-break reports show (torch >= 2.7 takes one)."""
    reason = ("bertkern padding-free encoder: the real-token count and the longest row are read on the host "
              "to pick the (token capacity, max_seqlen) bucket")
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:
        return torch.compiler.disable(fn)


@_eager_only
def _compiled_packing(attention_mask: torch.Tensor) -> tuple[int, int] | None:
    """The eager prologue of the encoder under torch.compile, and its one deliberate graph break:
    (capacity, max_seqlen) for this batch from bertkern.cuda_graphs' bucket rule (capacity the smallest
    of cuda_graphs.CAPACITY_STEPS steps per power of two >= the real tokens, at least 16, at most B x S;
    max_seqlen the smallest of DEFAULT_SEQ_LENS >= the longest row, at most S), or None when the batch
    has no padding. The compiled region after it sees these as Python ints, so it is guarded on (or,
    once Dynamo's automatic dynamic shapes kick in, symbolic in) the bucket: never a stale max_seqlen.
    One host sync per call, as unpad's outside compile."""
    batch, seq = attention_mask.shape
    lengths = attention_mask.ne(0).sum(1).tolist()
    if sum(lengths) == batch * seq:
        return None
    return _cuda_graphs.choose_packed_shapes(lengths, batch, seq, _cuda_graphs.DEFAULT_SEQ_LENS)


def _encoder_forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     *args, **kwargs):
    """The encoder model (BertModel and family, DistilBertModel): embeddings once, then every layer on
    the packed real tokens (padding-free) or on the padded batch under a bool mask, then the pooler."""
    patch = self._bertkern_patch
    if _encoder_falls_back(self, patch, args, kwargs, attention_mask):
        return type(self).forward(self, input_ids, attention_mask, *args, **kwargs)
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    packing = None  # (token capacity, max_seqlen): pack with fixed shapes and no host sync
    if attention_mask is not None and patch.padding_free and _dynamo_compiling() and _graph_breaks_allowed():
        # torch.compile: graph break here, read the lengths eagerly, resume with the bucket's shapes (the
        # embeddings, every layer and the pooler in the graph after the break). fullgraph: padded path.
        packing = _compiled_packing(attention_mask)
        if packing is None:
            attention_mask = None  # no padding: no mask at all
    h = self.embeddings(input_ids=input_ids, **{k: kwargs[k] for k in _ENCODER_INPUTS if kwargs.get(k) is not None})
    if getattr(self, "embeddings_project", None) is not None:  # ELECTRA: embedding_size -> hidden_size
        h = self.embeddings_project(h)
    batch, seq = h.shape[:2]
    static = _padding.current_static_shapes()
    if packing is None and attention_mask is not None and patch.padding_free and static is not None \
            and not torch.compiler.is_compiling() and static[0] <= batch * seq:
        packing = static  # a CUDA graph: bertkern.cuda_graphs picked them on the host
    done = False
    if packing is not None and packing[0] < batch * seq:
        # Padding-free with fixed shapes: no host sync; a batch that does not fit them gives NaN. (A
        # capacity of the whole batch saves no rows: the padded path below, without gather and scatter.)
        capacity, max_seqlen = packing
        packed, indices, cu_seqlens, ok = _padding.unpad_static(h, attention_mask, capacity, max_seqlen)
        packed = _run_layers(self, patch, packed, None, (cu_seqlens, max_seqlen))
        h = _padding.repad_static(packed, indices, cu_seqlens, ok, batch, seq)
        done = True
    elif packing is None and attention_mask is not None and patch.padding_free and not _capturing():
        # Padding-free: pack once (one host sync), every layer on [total, hidden], scatter back once.
        # Padded positions of the output are zeros (HF's values there are meaningless anyway).
        packed, indices, cu_seqlens, max_seqlen = _padding.unpad(h, attention_mask)
        if packed.shape[0] < batch * seq:
            h = _padding.repad(_run_layers(self, patch, packed, None, (cu_seqlens, max_seqlen)), indices, batch, seq)
            done = True
        else:
            attention_mask = None  # no padding: no mask at all
    if not done:
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        # On [B * S, hidden] rows, the ops' own layout: no reshape into and out of each op (host time).
        h = _run_layers(self, patch, h.reshape(batch * seq, -1), mask, None, seq).reshape(batch, seq, -1)
        if mask is not None and patch.padding_free:  # zeros at padding, whichever path a batch took
            h = h.masked_fill(~mask[:, 0, 0, :, None], 0)
    out = {"last_hidden_state": h}
    if patch.pooled:
        pooler = getattr(self, "pooler", None)
        out["pooler_output"] = pooler(h) if pooler is not None else None
    out = patch.output_cls(**out)
    return out if return_dict else out.to_tuple()


def _embeddings_forward(self, *args, **kwargs):
    """word + position + token type embeddings and LayerNorm in one op (RoBERTa's position ids from
    padding_idx by the module's own rule), then the module's dropout. inputs_embeds or a cache offset
    go to the original forward."""
    patch = self._bertkern_patch
    bound = dict(zip(patch.arg_names, args))
    bound.update(kwargs)
    input_ids = bound.get("input_ids")
    if (input_ids is None or bound.get("inputs_embeds") is not None or bound.get("cache_length")
            or bound.get("past_key_values_length") or set(bound) - set(patch.arg_names)):
        return type(self).forward(self, *args, **kwargs)
    position_ids = bound.get("position_ids")
    position = getattr(self, "position_embeddings", None)
    if position_ids is None and position is not None and patch.position_rule is not None:
        position_ids = patch.position_rule(input_ids, self.padding_idx)  # RoBERTa family
    token_type = getattr(self, "token_type_embeddings", None)
    word = self.word_embeddings
    x = _ops.embedding_layer_norm(
        input_ids, position_ids, bound.get("token_type_ids"), word.weight,
        position.weight if position is not None else None, token_type.weight if token_type is not None else None,
        self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, padding_idx=word.padding_idx,
        backend=patch.backend)
    return self.dropout(x)


def _self_attention_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            *args, **kwargs):
    """HF's eager self-attention with the scale + mask + softmax + dropout in one op. Anything the
    fused path does not cover (another attention implementation, a KV cache, cross-attention inputs,
    a head mask, extra positional arguments) goes to the class's own forward. transformers 4.x
    passes head_mask / encoder_hidden_states / past_key_values / output_attentions / cache_position
    as keywords (None / False in encoder use) and returns (context, probs) as 5.x does."""
    patch = self._bertkern_patch
    config = getattr(self, "config", None)  # 4.x: no config on the module (implementation fixed by class)
    if (
        args
        or (config is not None and getattr(config, "_attn_implementation", None) != "eager")
        or kwargs.get("cache") is not None
        or kwargs.get("past_key_values") is not None
        or kwargs.get("past_key_value") is not None
        or kwargs.get("encoder_hidden_states") is not None
        or kwargs.get("head_mask") is not None
    ):
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.attention_head_size)
    q = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
    p = self.dropout.p if self.training else 0.0
    probs = _ops.masked_softmax(q @ k.transpose(-1, -2), attention_mask, scale=patch.scale, dropout_p=p,
                                backend=patch.backend)
    out = (probs @ v).transpose(1, 2).reshape(*input_shape, -1).contiguous()
    return out, probs


_FORWARDS = {
    "bias_gelu": _intermediate_forward,
    "add_layer_norm": _add_norm_forward,
    "masked_softmax": _self_attention_forward,
    "attention": _attention_forward,
    "block": _block_forward,
    "encoder": _encoder_forward,
    "embedding_layer_norm": _embeddings_forward,
}


# ---------------------------------------------------------------- structure checks
_PROBE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


class _NoMatch(Exception):
    """The module looked like a candidate but is left alone; the message says why."""


def _plain(module: Any, cls: type) -> bool:
    """An instance of cls whose forward is cls's own (a quantized / LoRA / hooked subclass is not),
    with no hooks that a fused path would bypass."""
    return (
        isinstance(module, cls)
        and type(module).forward is cls.forward
        and "forward" not in module.__dict__
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _param_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    w = module.weight
    if not w.is_floating_point():
        raise _NoMatch(f"{type(module).__name__} weight has dtype {w.dtype} (quantized?)")
    return w.device, w.dtype


def _randn(gen: torch.Generator, shape, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _probe_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for one probe; every submodule's training flag is put back."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def _check_close(got: Any, want: torch.Tensor, what: str) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise _NoMatch(f"its forward returned {shape}, not {what}'s {tuple(want.shape)}")
    tol = _PROBE_TOL.get(want.dtype, 1e-4)
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol, equal_nan=True):
        err = (got.double() - want.double()).abs().max().item()
        raise _NoMatch(f"its forward does not compute {what} (max difference {err:.2g} on a probe input)")


def _positional_arity(module: nn.Module) -> int | None:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty)


def _layer_norm_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    norms = [(n, c) for n, c in module.named_children() if isinstance(c, nn.LayerNorm)]
    return norms[0] if len(norms) == 1 else None


def _is_add_norm_candidate(module: nn.Module) -> bool:
    return isinstance(getattr(module, "dense", None), nn.Linear) and _layer_norm_child(module) is not None


def _match_add_norm(module: nn.Module, backend: str | None) -> _Patch:
    """dense + dropout + LayerNorm with forward (h, input_tensor) -> LayerNorm(dropout(dense(h)) + input_tensor)."""
    dense, (norm_name, norm) = module.dense, _layer_norm_child(module)
    if not isinstance(getattr(module, "dropout", None), nn.Dropout):
        raise _NoMatch("no `dropout` child: not the dense -> dropout -> + residual -> LayerNorm block "
                       "(e.g. a prediction-head transform)")
    if _positional_arity(module) != 2:
        raise _NoMatch("forward does not take (hidden_states, input_tensor): no residual add to fuse")
    if not _plain(dense, nn.Linear):
        raise _NoMatch(f"`dense` is a {type(dense).__name__} with its own forward or hooks (quantized, LoRA, ...)")
    if not _plain(norm, nn.LayerNorm) or not _plain(module.dropout, nn.Dropout):
        raise _NoMatch("its LayerNorm or Dropout has a custom forward or hooks")
    if len(norm.normalized_shape) != 1 or norm.normalized_shape[0] != dense.out_features:
        raise _NoMatch(f"LayerNorm normalizes {tuple(norm.normalized_shape)}, not the dense output's last dim")
    device, dtype = _param_device_dtype(dense)
    if device.type != "meta":
        gen = torch.Generator().manual_seed(0)
        h = _randn(gen, (2, 3, dense.in_features), device, dtype)
        r = _randn(gen, (2, 3, dense.out_features), device, dtype)
        with _probe_mode(module):
            got = module.forward(h, r)
            want = F.layer_norm(F.linear(h, dense.weight, dense.bias) + r, norm.normalized_shape, norm.weight,
                                norm.bias, norm.eps)
        _check_close(got, want, "LayerNorm(dense(h) + input_tensor)")
    return _Patch("add_layer_norm", backend, norm=norm_name)


def _gelu_approximate(act: Any) -> str | None:
    """"none" / "tanh" for the GELU forms bias_gelu computes exactly, else None."""
    if isinstance(act, nn.GELU):
        return act.approximate
    if act is F.gelu:
        return "none"
    if isinstance(act, functools.partial) and act.func is F.gelu and not act.args:
        return act.keywords.get("approximate", "none")
    hf = sys.modules.get("transformers.activations")
    if hf is not None:
        for cls_name, approximate in (("GELUActivation", "none"), ("NewGELUActivation", "tanh"),
                                      ("GELUTanh", "tanh"), ("PytorchGELUTanh", "tanh")):
            cls = getattr(hf, cls_name, None)
            if isinstance(cls, type) and type(act) is cls:
                return approximate
    return None


def _act_name(act: Any) -> str:
    if isinstance(act, nn.Module):
        return type(act).__name__
    return getattr(act, "__name__", None) or type(act).__name__


def _intermediate_activation(module: nn.Module) -> Any:
    """The activation of a `dense` + activation block: `intermediate_act_fn`, else a sole parameter-free
    child module next to `dense`; None if the module is not such a block."""
    if not isinstance(getattr(module, "dense", None), nn.Linear) or _layer_norm_child(module) is not None:
        return None
    act = getattr(module, "intermediate_act_fn", None)
    if act is not None:
        return act
    others = [c for n, c in module.named_children() if n != "dense"]
    if len(others) == 1 and _gelu_approximate(others[0]) is not None:
        return others[0]
    return None


def _match_intermediate(module: nn.Module, act: Any, backend: str | None) -> _Patch:
    """dense + a GELU-type activation with forward h -> act(dense(h))."""
    approximate = _gelu_approximate(act)
    if approximate is None:
        raise _NoMatch(f"activation {_act_name(act)} is not a GELU bias_gelu computes "
                       "(supported: gelu, gelu_new, gelu_pytorch_tanh, nn.GELU)")
    if isinstance(act, nn.Module) and not _plain(act, type(act)):
        raise _NoMatch(f"activation {_act_name(act)} has hooks or an instance forward that a fused path would skip")
    dense = module.dense
    if not _plain(dense, nn.Linear):
        raise _NoMatch(f"`dense` is a {type(dense).__name__} with its own forward or hooks (quantized, LoRA, ...)")
    if _positional_arity(module) != 1:
        raise _NoMatch("forward does not take a single hidden_states input")
    device, dtype = _param_device_dtype(dense)
    if device.type != "meta":
        gen = torch.Generator().manual_seed(0)
        with _probe_mode(module):
            # The activation alone on a grid where the two GELU forms differ by up to ~5e-4 ...
            grid = torch.linspace(-5.0, 5.0, 101).to(device=device, dtype=dtype)
            _check_close(act(grid), F.gelu(grid, approximate=approximate), f"gelu(approximate={approximate!r})")
            # ... and the whole block.
            h = _randn(gen, (2, 3, dense.in_features), device, dtype)
            want = F.gelu(F.linear(h, dense.weight, dense.bias), approximate=approximate)
            _check_close(module.forward(h), want, f"gelu(dense(h), approximate={approximate!r})")
    return _Patch("bias_gelu", backend, approximate=approximate)


def _is_attention_candidate(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("query", "key", "value"))


def _attn_implementation(module: nn.Module) -> str | None:
    """The attention implementation a self-attention module runs: its config's (transformers 5.x:
    one class, the implementation read from the config at each call), else read from its class
    (transformers 4.x: one class per implementation, picked at construction: BertSelfAttention for
    "eager", BertSdpaSelfAttention for "sdpa", ...); None if neither says."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "_attn_implementation"):
        return config._attn_implementation
    name = type(module).__name__.lower()
    if "sdpa" in name:
        return "sdpa"
    if "flash" in name:
        return "flash_attention_2"
    if name.endswith("selfattention") and "config" not in module.__dict__:
        return "eager"
    return None


def _is_cross_attention(module: nn.Module) -> bool:
    """transformers 5.x has a separate cross-attention class whose forward takes the encoder states
    before the mask; 4.x has one class for both, cross-attention only when encoder states are passed
    (the fused forward sends those calls to the original) and only in decoders (rejected anyway)."""
    if "cross" in type(module).__name__.lower():
        return True
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    if "encoder_hidden_states" not in names:
        return False
    return "attention_mask" not in names or names.index("encoder_hidden_states") < names.index("attention_mask")


def _attention_layout(module: nn.Module) -> float:
    """Checks shared by both attention swaps (the BERT layout, nothing the fused path would skip);
    returns the attention's scaling."""
    config = getattr(module, "config", None)
    if _is_cross_attention(module):
        raise _NoMatch("cross-attention")
    if (getattr(module, "is_causal", False) or getattr(module, "is_decoder", False)
            or getattr(config, "is_decoder", False)):
        raise _NoMatch("decoder (causal) attention")
    head = getattr(module, "attention_head_size", None)
    if not isinstance(head, int) or not isinstance(getattr(module, "dropout", None), nn.Dropout):
        raise _NoMatch("no attention_head_size / dropout attributes of the BERT layout")
    for n in ("query", "key", "value"):
        if not _plain(getattr(module, n), nn.Linear):
            raise _NoMatch(f"{n} is a {type(getattr(module, n)).__name__} with its own forward or hooks, not a Linear")
    position = getattr(module, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise _NoMatch(f"position_embedding_type={position!r}: relative position scores the fused path would skip")
    extra = [n for n, _ in module.named_children() if n not in ("query", "key", "value", "dropout")]
    extra += list(module._parameters)
    if extra:
        # The probe could miss them with small weights (relative position embeddings at
        # initialisation shift the scores by ~1e-4), so anything beyond q / k / v / dropout is refused.
        raise _NoMatch(f"has {', '.join(extra)} besides query / key / value / dropout (relative positions, "
                       "rotary, ...), which the fused path would skip")
    return float(getattr(module, "scaling", head**-0.5))


def _probe_attention(module: nn.Module, head: int, scale: float, check_probs: bool) -> None:
    """Run the module's own forward on a small input under an additive padding mask and check it
    computes softmax(q k^T * scale + mask) v (and returns those probabilities when check_probs)."""
    device, dtype = _param_device_dtype(module.query)
    if device.type == "meta":
        return
    gen = torch.Generator().manual_seed(0)
    batch, seq, hidden = 2, 3, module.query.in_features
    h = _randn(gen, (batch, seq, hidden), device, dtype)
    mask = torch.zeros(batch, 1, seq, seq, device=device, dtype=dtype)
    mask[1, :, :, seq - 1] = torch.finfo(dtype).min
    with _probe_mode(module):
        out = module.forward(h, attention_mask=mask)

        def heads(x):
            return x.view(batch, seq, -1, head).transpose(1, 2)

        q, k, v = heads(module.query(h)), heads(module.key(h)), heads(module.value(h))
        probs = torch.softmax(q @ k.transpose(-1, -2) * scale + mask, dim=-1)
        want = (probs @ v).transpose(1, 2).reshape(batch, seq, -1)
    # The fused forwards return (output, weights) like transformers 5.x; an attention returning
    # anything else (4.x returns (output,) without output_attentions) keeps its own forward.
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise _NoMatch("its forward does not return (output, attention weights) as transformers 5.x does")
    _check_close(out[0], want, "softmax(q k^T * scaling + mask) v")
    if check_probs:
        _check_close(out[1], probs, "the attention weights softmax(q k^T * scaling + mask)")


def _match_self_attention(module: nn.Module, backend: str | None) -> _Patch:
    """HF's BERT-family self-attention on the eager path (transformers 4.x and 5.x): the softmax only."""
    scale = _attention_layout(module)
    impl = _attn_implementation(module)
    if impl is None:
        raise _NoMatch("no HF config with an _attn_implementation, and not an eager *SelfAttention class")
    if impl != "eager":
        raise _NoMatch(f"uses attn_implementation={impl!r} ({type(module).__name__}): masked_softmax fuses the "
                       "eager path only (the 'attention' op covers every implementation)")
    _probe_attention(module, module.attention_head_size, scale, check_probs=True)
    return _Patch("masked_softmax", backend, scale=scale)


def _match_attention(module: nn.Module, backend: str | None) -> _Patch:
    """HF's BERT-family self-attention, any attn_implementation: one QKV GEMM + ops.attention."""
    scale = _attention_layout(module)
    if not isinstance(getattr(module, "num_attention_heads", None), int):
        raise _NoMatch("no num_attention_heads attribute of the BERT layout")
    _probe_attention(module, module.attention_head_size, scale, check_probs=False)
    return _Patch("attention", backend, scale=scale)


def _is_block_candidate(module: nn.Module) -> bool:
    """DistilBERT's TransformerBlock layout."""
    att, ffn = getattr(module, "attention", None), getattr(module, "ffn", None)
    return (all(isinstance(getattr(att, n, None), nn.Linear) for n in ("q_lin", "k_lin", "v_lin", "out_lin"))
            and all(isinstance(getattr(ffn, n, None), nn.Linear) for n in ("lin1", "lin2"))
            and isinstance(getattr(module, "sa_layer_norm", None), nn.LayerNorm)
            and isinstance(getattr(module, "output_layer_norm", None), nn.LayerNorm))


def _match_block(module: nn.Module, backend: str | None, fused_norms: bool, fuse_gelu: bool) -> _Patch:
    """attention (q_lin / k_lin / v_lin, out_lin) -> sa_layer_norm(+ h) -> ffn (lin1, act, lin2, dropout)
    -> output_layer_norm(+ a), checked on a probe input against the block's own forward."""
    att, ffn = module.attention, module.ffn
    if not isinstance(getattr(att, "n_heads", None), int) or not isinstance(getattr(att, "dropout", None), nn.Dropout):
        raise _NoMatch("attention has no n_heads / dropout of the DistilBERT layout")
    if getattr(ffn, "chunk_size_feed_forward", 0) or not isinstance(getattr(ffn, "dropout", None), nn.Dropout):
        raise _NoMatch("FFN chunking or no FFN dropout")
    for m in (att, ffn, *att.children(), *ffn.children(), module.sa_layer_norm, module.output_layer_norm):
        if "forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks:
            raise _NoMatch(f"{type(m).__name__} has hooks or an instance forward that a fused path would skip")
    extra = [n for n, _ in module.named_children()
             if n not in ("attention", "sa_layer_norm", "ffn", "output_layer_norm")]
    if extra:
        raise _NoMatch(f"has {', '.join(extra)} besides attention / sa_layer_norm / ffn / output_layer_norm")
    try:
        # after (hidden_states, mask): 4.x's (head_mask, output_attentions), which its Transformer passes
        # positionally; 5.x has only **kwargs
        params = list(inspect.signature(type(module).forward).parameters.values())[3:]
    except (TypeError, ValueError):
        raise _NoMatch("its forward's signature cannot be read") from None
    arg_names = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
    approximate = _gelu_approximate(ffn.activation) if fuse_gelu else None
    patch = _Patch("block", backend, approximate=approximate, scale=float(getattr(att, "scaling", None) or
                   (att.q_lin.out_features // att.n_heads) ** -0.5), fused_norms=fused_norms, arg_names=arg_names)
    device, dtype = _param_device_dtype(att.q_lin)
    if device.type != "meta":
        gen = torch.Generator().manual_seed(0)
        h = _randn(gen, (2, 3, att.q_lin.in_features), device, dtype)
        mask = torch.ones(2, 3, dtype=torch.bool, device=device)
        mask[1, 2] = False
        hf_mask = torch.zeros(2, 1, 3, 3, device=device, dtype=dtype).masked_fill(~mask[:, None, None, :],
                                                                                  torch.finfo(dtype).min)
        with _probe_mode(module):
            try:
                want = type(module).forward(module, h, hf_mask)
            except RuntimeError:
                # transformers 4.x's eager attention takes the [B, S] mask (1 = real) and cannot view a 4-D one
                want = type(module).forward(module, h, mask.to(dtype))
            if isinstance(want, (tuple, list)):  # 4.x: (hidden_states,)
                patch = dataclasses.replace(patch, tuple_output=True)
                want = want[0]
            got = _block_step(module, h, mask[:, None, None, :], None, dataclasses.replace(patch, backend="torch"))
        _check_close(got, want, "the DistilBERT block (attention, add & norm, FFN, add & norm)")
    return patch


def _is_embeddings_candidate(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "word_embeddings", None), nn.Embedding)
            and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm))


def _match_embeddings(module: nn.Module, backend: str | None) -> _Patch:
    """word + position + token type embeddings -> LayerNorm -> dropout, checked on probe ids (with
    padding tokens, so RoBERTa's position rule shows) against the module's own forward."""
    allowed = {"word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm", "dropout"}
    extra = [n for n, _ in module.named_children() if n not in allowed]
    if extra:
        raise _NoMatch(f"has {', '.join(extra)} besides word / position / token type embeddings, LayerNorm, dropout")
    for n in allowed - {"dropout", "LayerNorm"}:
        child = getattr(module, n, None)
        if child is not None and not _plain(child, nn.Embedding):
            raise _NoMatch(f"{n} is a {type(child).__name__} with its own forward or hooks, not an Embedding")
    if not _plain(module.LayerNorm, nn.LayerNorm) or not isinstance(getattr(module, "dropout", None), nn.Dropout):
        raise _NoMatch("its LayerNorm has a custom forward or hooks, or there is no dropout")
    try:
        names = tuple(list(inspect.signature(type(module).forward).parameters)[1:])
    except (TypeError, ValueError):
        raise _NoMatch("its forward's signature cannot be read") from None
    if "input_ids" not in names:
        raise _NoMatch("its forward takes no input_ids")
    # RoBERTa family's position ids from padding_idx: a staticmethod in transformers 5.x, a function of
    # the class's file in 4.x. The probe below checks that the module really uses it.
    rule = getattr(module, "create_position_ids_from_input_ids", None)
    if rule is None and getattr(module, "padding_idx", None) is not None:
        rule = getattr(sys.modules.get(type(module).__module__), "create_position_ids_from_input_ids", None)
    patch = _Patch("embedding_layer_norm", backend, arg_names=names, position_rule=rule)
    device, dtype = _param_device_dtype(module.word_embeddings)
    if device.type != "meta":
        word = module.word_embeddings
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, word.num_embeddings, (2, 4), generator=gen)
        if word.padding_idx is not None:
            ids[1, 2:] = word.padding_idx
        ids = ids.to(device)
        with _probe_mode(module):
            want = type(module).forward(module, input_ids=ids)
            module.__dict__[_MARK] = dataclasses.replace(patch, backend="torch")
            try:
                got = _embeddings_forward(module, input_ids=ids)
            finally:
                del module.__dict__[_MARK]
        _check_close(got, want, "LayerNorm(word + position + token type embeddings)")
    return patch


def _is_encoder_candidate(module: nn.Module) -> bool:
    """BertModel and family (embeddings + encoder.layer [+ pooler]) or DistilBertModel (embeddings +
    transformer.layer)."""
    if not _is_embeddings_candidate(getattr(module, "embeddings", None)):
        return False
    return any(isinstance(getattr(getattr(module, n, None), "layer", None), nn.ModuleList)
               for n in ("encoder", "transformer"))


def _match_encoder(module: nn.Module, backend: str | None, padding_free: bool) -> _Patch:
    """The whole encoder model: every layer a BERT layer (self-attention the fused path covers,
    attention.output, intermediate, output) or a DistilBERT block; checked on a padded probe batch
    against the model's own forward (real tokens and pooled output)."""
    config = getattr(module, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise _NoMatch("decoder / cross-attention model")
    layers_name = "encoder" if isinstance(getattr(getattr(module, "encoder", None), "layer", None), nn.ModuleList) \
        else "transformer"
    allowed = {"embeddings", layers_name, "pooler", "embeddings_project"}
    extra = [n for n, _ in module.named_children() if n not in allowed]
    if extra:
        raise _NoMatch(f"has {', '.join(extra)} besides embeddings / {layers_name} / pooler")
    layers = list(getattr(module, layers_name).layer)
    step = "block" if layers and all(_is_block_candidate(l) for l in layers) else "bert"
    for i, layer in enumerate(layers):
        if step == "block":
            continue
        parts = [getattr(layer, "attention", None), getattr(getattr(layer, "attention", None), "output", None),
                 getattr(layer, "intermediate", None), getattr(layer, "output", None)]
        if any(p is None for p in parts) or getattr(layer, "crossattention", None) is not None:
            raise _NoMatch(f"layer {i} is not attention.self / attention.output / intermediate / output")
        if getattr(layer, "chunk_size_feed_forward", 0):
            raise _NoMatch(f"layer {i} chunks its feed-forward")
        if not _is_attention_candidate(layer.attention.self) or \
                not isinstance(getattr(layer.attention.self, "num_attention_heads", None), int):
            raise _NoMatch(f"layer {i}'s attention has no query / key / value / num_attention_heads")
        try:
            _attention_layout(layer.attention.self)
        except _NoMatch as e:
            raise _NoMatch(f"layer {i}'s attention: {e}") from None
    patch = _Patch("encoder", backend, padding_free=padding_free, layers=layers_name, step=step)
    device, dtype = _param_device_dtype(module.embeddings.word_embeddings)
    if device.type == "meta":
        raise _NoMatch("meta parameters: the probe that checks the model's structure cannot run")
    word = module.embeddings.word_embeddings
    pad = word.padding_idx if word.padding_idx is not None else 0
    ids = torch.randint(0, word.num_embeddings, (2, 4), generator=torch.Generator().manual_seed(0))
    ids = torch.where(ids == pad, (pad + 1) % word.num_embeddings, ids)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1, 2:] = 0
    ids, mask = torch.where(mask.bool(), ids, pad).to(device), mask.to(device)
    with _probe_mode(module):
        want = type(module).forward(module, input_ids=ids, attention_mask=mask)
        if not hasattr(want, "last_hidden_state") or not dataclasses.is_dataclass(want):
            raise _NoMatch("its forward does not return a ModelOutput with last_hidden_state")
        fields = {f.name for f in dataclasses.fields(want)}
        patch = dataclasses.replace(patch, output_cls=type(want), pooled="pooler_output" in fields)
        module.__dict__[_MARK] = dataclasses.replace(patch, backend="torch")
        try:
            got = _encoder_forward(module, input_ids=ids, attention_mask=mask)
        except Exception as e:  # a layout this loop does not know: leave the model as it is
            raise _NoMatch(f"the packed encoder failed on a probe batch ({type(e).__name__}: {e})") from None
        finally:
            del module.__dict__[_MARK]
    real = mask.bool()
    _check_close(got.last_hidden_state[real], want.last_hidden_state[real], "the model's hidden states at real tokens")
    if getattr(want, "pooler_output", None) is not None:
        _check_close(got.pooler_output, want.pooler_output, "the model's pooled output")
    return patch


# ---------------------------------------------------------------- patching
def _patch(module: nn.Module, patch: _Patch) -> None:
    setattr(module, _MARK, patch)
    module.forward = types.MethodType(_FORWARDS[patch.kind], module)


def _unpatch(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    if fwd is not None and not (getattr(fwd, "__func__", None) in _FORWARDS.values() and fwd.__self__ is module):
        logger.warning("bertkern.restore: %s.forward was overridden after optimize(); left as it is",
                       type(module).__name__)
        return False
    module.__dict__.pop("forward", None)
    module.__dict__.pop(_MARK, None)
    return True


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _check_args(model: Any, backend: str | None, ops: Any) -> tuple[str, ...]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"bertkern.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(ops, str):
        ops = (ops,)
    ops = tuple(ops)
    unknown = [o for o in ops if o not in KNOWN_OPS]
    if unknown:
        raise ValueError(f"bertkern.optimize: unknown op(s) {unknown}; choose from {KNOWN_OPS}")
    if backend not in (None, "auto", *_backend.BACKENDS):
        raise ValueError(
            f"bertkern.optimize: backend must be None, 'auto' or one of {_backend.BACKENDS}, got {backend!r}")
    device = _model_device(model)
    if backend not in (None, "auto") and device is not None and device.type != "meta":
        why = _backend.unavailable_reason(backend, device)
        if why is not None:
            raise RuntimeError(f"bertkern.optimize: backend={backend!r} is unavailable for this model: {why}")
    return ops


# bertkern.models: module type name -> (op, config flag)
_BERTKERN_FLAGS = {
    "BertIntermediate": ("bias_gelu", "fused_bias_gelu"),
    "BertSelfOutput": ("add_layer_norm", "fused_layer_norm"),  # BertOutput subclasses it
    "BertSelfAttention": ("attention", "fused_attention"),  # ("masked_softmax", "fused_softmax") without "attention"
    "BertEmbeddings": ("embedding_layer_norm", "fused_embeddings"),
    "BertModel": ("padding_free", "padding_free"),  # a container: its children get their own flags
}


def _optimize_bertkern(report: OptimizeReport, name: str, module: nn.Module, padding_free: bool,
                       slower: str | None) -> str | None:
    """Set the fused flag for a bertkern.models module. Returns None if the module is not one of
    bertkern.models, "self" for a container, "subtree" for a module whose flag covers its children."""
    from bertkern.models import bert as bk

    for type_name, (op, flag) in _BERTKERN_FLAGS.items():
        if isinstance(module, getattr(bk, type_name)):
            break
    else:
        return "self" if type(module).__module__ == bk.__name__ else None
    type_name, config = type(module).__name__, module.config
    if op == "attention" and "attention" not in report.ops:
        op, flag = "masked_softmax", "fused_softmax"
    scope = "self" if op == "padding_free" else "subtree"
    requested = ("attention" in report.ops and padding_free) if op == "padding_free" else op in report.ops
    if not requested:
        report.left_alone.append(LeftAlone(name, op, type_name, "not requested"))
    elif slower and op in _SLOWER_UNDER_AUTO:
        report.left_alone.append(LeftAlone(name, op, type_name, slower))
    else:
        saved = config.__dict__.setdefault(_SAVED_FLAGS, {})
        if flag not in saved:
            saved[flag] = getattr(config, flag)
            if not getattr(config, flag):
                report._undo.append(("flag", config, flag, False))
            setattr(config, flag, True)
        report.replaced.append(Replaced(name, op, type_name, f"config.{flag}=True"))
    return scope


def _report_leftovers(report: OptimizeReport, model: nn.Module, covered: set[int]) -> None:
    """Report LayerNorms, GELU activations and attention modules that no swap covers, with why."""
    for parent_name, parent in model.named_modules():
        if id(parent) in covered:
            continue
        for child_name, child in parent.named_children():
            if id(child) in covered:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            where = f"{type(parent).__name__}.forward"
            if isinstance(child, nn.LayerNorm):
                if hasattr(parent, "word_embeddings"):
                    reason = ("not requested" if "embedding_layer_norm" not in report.ops else
                              "HF embeddings are not swapped (their position / token-type id rules differ per "
                              "architecture)")
                    report.left_alone.append(LeftAlone(name, "embedding_layer_norm", type(parent).__name__, reason))
                else:
                    report.left_alone.append(LeftAlone(
                        name, "add_layer_norm", type(parent).__name__,
                        f"LayerNorm applied in {where}, not a dense -> dropout -> + residual -> LayerNorm block"))
            elif _gelu_approximate(child) is not None:
                report.left_alone.append(LeftAlone(
                    name, "bias_gelu", type(parent).__name__,
                    f"GELU applied in {where}, not a dense -> GELU block"))
            elif "attention" in type(child).__name__.lower() and sum(
                isinstance(c, nn.Linear) for c in child.children()
            ) >= 3:
                report.left_alone.append(LeftAlone(
                    name, "masked_softmax", type(child).__name__,
                    "attention layout not recognised (expects query / key / value Linear children)"))
                covered.update(id(m) for m in child.modules())


# model -> the OptimizeReport of its latest optimize(); weak keys: a model that goes away takes its
# entry with it (the report holds the model weakly too).
_REPORTS: "weakref.WeakKeyDictionary[nn.Module, OptimizeReport]" = weakref.WeakKeyDictionary()


def _unwrap(model: Any) -> Any:
    """The module inside a torch.compile wrapper (OptimizedModule keeps it as `_orig_mod`)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def optimize_report(model: nn.Module) -> OptimizeReport | None:
    """The report of the latest `bertkern.optimize` of `model` (or of the model inside a
    torch.compile wrapper); None if it was never optimized, was restored since, or is a copy
    (reports do not travel with deep copies)."""
    return _REPORTS.get(_unwrap(model))


# Ops left alone where auto's path for them is slower than HF's own modules (module docstring; attention
# is not: auto runs torch's own kernels there, from one QKV GEMM).
_SLOWER_UNDER_AUTO = ("bias_gelu", "add_layer_norm", "embedding_layer_norm", "masked_softmax")
_CPU_REASON = ("CPU model with backend auto: no bertkern CPU path beats HF's own module here (the torch "
               "reference ops are slower), so it runs as before; optimize again after .to('cuda')")
_TRITON_REASON = ("GPU model with backend auto and no usable bertkern._C: the Triton kernels, called eagerly, "
                  "are slower than HF's own module (their launch cost), so it runs as before; pass "
                  "backend='triton' for CUDA graphs or torch.compile, or build bertkern._C")


def _slower_under_auto(model: nn.Module, backend: str | None) -> str | None:
    """Why the row ops are left alone (auto's path for them is slower than HF's modules), or None."""
    device = _model_device(model)
    if (backend or os.environ.get("BERTKERN_BACKEND") or "auto") != "auto" or device is None:
        return None
    if device.type == "cpu":
        return _CPU_REASON
    if device.type == "cuda" and _backend.auto_backend(device) != "cuda":
        return _TRITON_REASON
    return None


def _find_kind(module: nn.Module, ops: tuple[str, ...]) -> str | None:
    if _is_encoder_candidate(module):
        return "padding_free"
    if _is_block_candidate(module):
        return "block"
    if _is_embeddings_candidate(module):
        return "embedding_layer_norm"
    if _is_attention_candidate(module):
        return "masked_softmax" if "masked_softmax" in ops and "attention" not in ops else "attention"
    if _is_add_norm_candidate(module):
        return "add_layer_norm"
    if _intermediate_activation(module) is not None:
        return "bias_gelu"
    return None


_DETAIL = {
    "masked_softmax": "eager attention path",
    "padding_free": "unpad once after the embeddings, every layer on the packed real tokens (attention_varlen), "
                    "repad once (zeros at padded positions); without padding: no mask at all; under "
                    "torch.compile: one graph break reads the lengths, fixed shapes per (token capacity, "
                    "max_seqlen) bucket (fullgraph=True: the padded path)",
    "embedding_layer_norm": "word + position + token type + LayerNorm in one op",
}


def optimize(
    model: nn.Module,
    *,
    backend: str | None = None,
    ops: tuple[str, ...] | list[str] = DEFAULT_OPS,
    padding_free: bool = True,
    inplace: bool = True,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, OptimizeReport]:
    """Swap bertkern's fused ops into `model` (see the module docstring) and return the model.

    backend: passed to every op call (None: the op decides per call from $BERTKERN_BACKEND, else auto).
        With auto on a CPU model, or on a GPU without a usable bertkern._C, the modules whose fused op
        is slower there than HF's own are left alone (reported); attention and the padding-free encoder
        are swapped (torch's own attention kernels there).
    ops: which ops to swap in, of "attention" (self-attention from one QKV GEMM, any attn_implementation),
        "bias_gelu", "add_layer_norm", "embedding_layer_norm", and "masked_softmax" (the softmax of
        eager attention only; used when "attention" is not requested). Ops not yet in bertkern.ops are
        reported as skipped.
    padding_free: True (default): an encoder model called with a [B, S] attention_mask that has padding
        runs its layers on the packed real tokens and returns zeros at padded positions (needs
        "attention"). False: the padded layout, fused attention under the mask.
    inplace: True (default) patches `model` itself and returns it; False patches and returns a deep
        copy, leaving `model` as it is.
    return_report: return (model, OptimizeReport) instead of the model alone.

    The report (`str(report)` is a readable summary) is logged at INFO on the "bertkern.optimize"
    logger and stays reachable as `bertkern.optimize_report(model)`. Compile the result as usual:
    `torch.compile(bertkern.optimize(model))` (any mode) stays padding-free, with one graph break before
    the encoder that picks the packed shapes on the host; with fullgraph=True the encoder runs padded.
    """
    ops = _check_args(model, backend, ops)
    if not isinstance(padding_free, bool):
        raise TypeError(f"bertkern.optimize: padding_free must be True or False, got {padding_free!r}")
    if not inplace:
        model = copy.deepcopy(model)
    report = OptimizeReport(model_type=type(model).__name__, backend=backend, ops=ops,
                            _model_ref=weakref.ref(model))
    slower = _slower_under_auto(model, backend)
    covered: set[int] = set()

    for name, module in model.named_modules():
        if id(module) in covered:
            continue
        bertkern_module = _optimize_bertkern(report, name, module, padding_free, slower)
        if bertkern_module is not None:
            covered.update(id(m) for m in (module.modules() if bertkern_module == "subtree" else (module,)))
            continue
        kind = _find_kind(module, ops)
        if kind is None:
            continue
        # The encoder patch runs the layers itself but calls their (patched) parts: its children stay open.
        covered.update(id(m) for m in ((module,) if kind == "padding_free" else module.modules()))
        type_name = type(module).__name__
        requested = ("attention" in ops and padding_free) if kind == "padding_free" else \
            ("attention" in ops if kind == "block" else kind in ops)
        if _MARK in module.__dict__:
            report.left_alone.append(LeftAlone(name, kind, type_name, "already optimized"))
            continue
        if not requested:
            why = "padding_free=False" if kind == "padding_free" and "attention" in ops else "not requested"
            report.left_alone.append(LeftAlone(name, kind, type_name, why))
            continue
        if "forward" in module.__dict__:
            report.left_alone.append(LeftAlone(name, kind, type_name,
                                               "forward already overridden on the instance (accelerate hook, ...)"))
            continue
        try:
            if kind == "padding_free":
                patch = _match_encoder(module, backend, padding_free)
            elif kind == "block":
                fused = not slower and "add_layer_norm" in ops
                gelu = not slower and "bias_gelu" in ops
                patch = _match_block(module, backend, fused, gelu)
            elif kind == "embedding_layer_norm":
                patch = _match_embeddings(module, backend)
            elif kind == "attention":
                patch = _match_attention(module, backend)
            elif kind == "masked_softmax":
                patch = _match_self_attention(module, backend)
            elif kind == "add_layer_norm":
                patch = _match_add_norm(module, backend)
            else:
                patch = _match_intermediate(module, _intermediate_activation(module), backend)
        except _NoMatch as e:
            report.left_alone.append(LeftAlone(name, kind, type_name, str(e)))
            continue
        if slower and kind in _SLOWER_UNDER_AUTO:
            report.left_alone.append(LeftAlone(name, kind, type_name, slower))
            continue
        _patch(module, patch)
        report._undo.append(("module", weakref.ref(module)))
        report.replaced.append(Replaced(name, kind, type_name, _detail(module, patch)))

    _report_leftovers(report, model, covered)
    logger.info("%s", report)
    _REPORTS[model] = report
    return (model, report) if return_report else model


def _detail(module: nn.Module, patch: _Patch) -> str:
    if patch.kind == "bias_gelu":
        return f"approximate={patch.approximate!r}"
    if patch.kind == "attention":
        impl = _attn_implementation(module)
        return (f"one QKV GEMM + bertkern.ops.attention, in place of attn_implementation={impl!r}"
                if impl else "one QKV GEMM + bertkern.ops.attention")
    if patch.kind == "block":
        fused = ["attention (one QKV GEMM)"] + (["add & norm x2"] if patch.fused_norms else []) + \
            ([f"bias_gelu({patch.approximate!r})"] if patch.approximate else [])
        return "fused: " + ", ".join(fused)
    return _DETAIL.get("padding_free" if patch.kind == "encoder" else patch.kind, "")


def restore(model: nn.Module) -> list[str]:
    """Undo every bertkern swap in `model`: the modules' class forwards and the bertkern.models flags
    come back exactly as they were, and optimize_report(model) becomes None. Returns the qualified
    names of the modules restored (for bertkern.models, the module owning the config whose flags
    were put back)."""
    model = _unwrap(model)
    _REPORTS.pop(model, None)
    restored = []
    for name, module in model.named_modules():
        if _MARK in module.__dict__ and _unpatch(module):
            restored.append(name)
        config = getattr(module, "config", None)
        saved = getattr(config, "__dict__", {}).pop(_SAVED_FLAGS, None) if config is not None else None
        if saved:
            for flag, value in saved.items():
                setattr(config, flag, value)
            restored.append(name)
    return restored


def _undo(report: OptimizeReport) -> None:
    for entry in reversed(report._undo):
        if entry[0] == "module":
            module = entry[1]()
            if module is not None and _MARK in module.__dict__:
                _unpatch(module)
        else:
            _, config, flag, value = entry
            setattr(config, flag, value)
            saved = config.__dict__.get(_SAVED_FLAGS, {})
            saved.pop(flag, None)
            if not saved:
                config.__dict__.pop(_SAVED_FLAGS, None)
    report._undo.clear()


@contextlib.contextmanager
def optimized(model: nn.Module, **kwargs: Any) -> Iterator[Any]:
    """`with bertkern.optimized(model):` optimizes `model` in place (the arguments of optimize;
    `as` gives what optimize returns: the model, or (model, report) with return_report=True) and
    undoes exactly what this call did on exit."""
    if kwargs.get("inplace", True) is False:
        raise ValueError("bertkern.optimized: inplace=False makes no sense here (use bertkern.optimize)")
    result = optimize(model, **kwargs)
    report = result[1] if kwargs.get("return_report") else optimize_report(model)
    try:
        yield result
    finally:
        _undo(report)
        if _REPORTS.get(model) is report:
            del _REPORTS[model]
