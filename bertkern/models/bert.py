"""A readable reference BERT encoder in plain PyTorch that loads Hugging Face checkpoints.

Module and parameter names follow HF's `BertModel` exactly (`embeddings.word_embeddings.weight`,
`encoder.layer.0.attention.self.query.weight`, ...), so an HF state dict loads with no renaming.

The `fused_*` flags of `BertConfig` route parts of the forward pass through `bertkern.ops`; the ops,
not the model, decide which backend runs. Flags are read at forward time, so flipping
`model.config.fused_bias_gelu` on a loaded model changes the path without touching any weights.

- `fused_attention`: one QKV GEMM (the query / key / value weights concatenated to [3 * hidden, hidden]
  at forward time, cached in inference; the parameters and state-dict names stay HF's), then
  `bertkern.ops.attention` on strided q / k / v views of its output (no copies), whose output is
  already laid out as [B, S, hidden].
- `padding_free`: with a [B, S] attention_mask, the embeddings' output is packed once
  (`bertkern.padding.unpad`), every layer runs on the real tokens only ([total, hidden], attention by
  `bertkern.ops.attention_varlen`), and the result is scattered back once (`repad`); padded positions
  of last_hidden_state are then 0. Without a 2-D mask the padded path runs.

Differences from HF, on purpose:
- Only the absolute-position encoder (no decoder, cross-attention, KV cache or relative positions).
- The padding mask is a boolean keep-mask and masked keys get exactly zero weight. A query whose
  keys are *all* masked (a fully padded sequence) gets zero attention output here, where HF's
  additive finfo.min mask gives it uniform attention. Real tokens are unaffected.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bertkern import nn as bk_nn
from bertkern import ops, padding, reference

# HF activation name -> the `approximate` argument of F.gelu / bertkern.ops.bias_gelu.
# gelu_new and gelu_pytorch_tanh are both the tanh approximation (HF writes them two ways).
_GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


# ---------------------------------------------------------------- config
@dataclass
class BertConfig:
    """Architecture hyper-parameters (HF names and defaults: BERT-base) plus the fused-path flags."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    initializer_range: float = 0.02
    num_labels: int = 2
    classifier_dropout: float | None = None
    # Fused paths (each calls one bertkern.ops op; the op picks the backend).
    fused_bias_gelu: bool = False
    fused_layer_norm: bool = False
    fused_embeddings: bool = False
    fused_softmax: bool = False
    fused_attention: bool = False
    # Run the encoder on packed real tokens (attention_varlen) instead of padded sequences.
    padding_free: bool = False

    def __post_init__(self) -> None:
        if self.hidden_act not in _GELU_APPROXIMATE:
            raise ValueError(
                f"BertConfig: hidden_act={self.hidden_act!r} is not supported; "
                f"use one of {sorted(_GELU_APPROXIMATE)}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig: hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def gelu_approximate(self) -> str:
        """"none" (exact erf GELU) or "tanh"."""
        return _GELU_APPROXIMATE[self.hidden_act]

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "BertConfig":
        """From an HF `BertConfig`, or a dict such as a loaded config.json. Fields we do not use are
        ignored; features this encoder does not implement raise a ValueError. `overrides` (e.g. the
        fused flags) replace the resulting fields."""
        d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            # RoBERTa & co. share the layout but not the position ids: loading them silently would be wrong.
            raise ValueError(f"BertConfig.from_hf: model_type={model_type!r} is not 'bert'")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("BertConfig.from_hf: decoder / cross-attention BERT is not supported (encoder only)")
        position_type = d.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"BertConfig.from_hf: position_embedding_type={position_type!r} is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        # HF stores the label count as id2label; num_labels is only a property there.
        if d.get("id2label"):
            kwargs["num_labels"] = len(d["id2label"])
        kwargs.update(overrides)
        return cls(**kwargs)


# ---------------------------------------------------------------- modules
class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    # Buffers that some checkpoints (HF 4.x) saved and others (HF 5.x) do not; we drop them on load.
    _OPTIONAL_BUFFERS = ("position_ids", "token_type_ids")

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Non-persistent, so it follows .to(device) but never appears in (or is required from) a state dict.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)
        self.register_load_state_dict_pre_hook(self._drop_optional_buffers)

    @classmethod
    def _drop_optional_buffers(cls, module, state_dict, prefix, *args) -> None:
        for name in cls._OPTIONAL_BUFFERS:
            state_dict.pop(prefix + name, None)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq = input_ids.shape
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        # Expanded views (no copies) so all three index tensors have input_ids' shape.
        if position_ids is None:
            position_ids = self.position_ids[:, :seq]
        position_ids = position_ids.expand(batch, seq)
        if token_type_ids is None:
            token_type_ids = torch.zeros((), dtype=torch.long, device=input_ids.device)
        token_type_ids = token_type_ids.expand(batch, seq)

        if self.config.fused_embeddings:
            x = ops.embedding_layer_norm(
                input_ids,
                position_ids,
                token_type_ids,
                self.word_embeddings.weight,
                self.position_embeddings.weight,
                self.token_type_embeddings.weight,
                self.LayerNorm.weight,
                self.LayerNorm.bias,
                self.LayerNorm.eps,
                padding_idx=self.word_embeddings.padding_idx,  # like nn.Embedding: no grad to the pad row
            )
        else:
            x = (
                self.word_embeddings(input_ids)
                + self.token_type_embeddings(token_type_ids)
                + self.position_embeddings(position_ids)
            )
            x = self.LayerNorm(x)
        return self.dropout(x)


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (the projections and the softmax; the output
    projection lives in BertSelfOutput, as in HF).

    `varlen=(cu_seqlens, max_seqlen)` means hidden_states are packed tokens [total, hidden] (the
    padding-free path); the mask is then unused."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_size
        h = config.hidden_size
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def _fused_forward(self, hidden_states, mask, varlen, dropout_p):
        return qkv_attention(self, self.query, self.key, self.value, self.num_attention_heads, hidden_states,
                             mask, varlen, dropout_p=dropout_p)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
        varlen: tuple[torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        if varlen is not None or self.config.fused_attention:
            return self._fused_forward(hidden_states, mask, varlen, self.dropout.p if self.training else 0.0)
        q = self._split_heads(self.query(hidden_states))  # [B, H, S, D]
        k = self._split_heads(self.key(hidden_states))
        v = self._split_heads(self.value(hidden_states))

        scores = q @ k.transpose(-1, -2)  # [B, H, S, S]; the 1/sqrt(d) scale is applied inside the softmax
        scale = 1.0 / math.sqrt(self.attention_head_size)
        p = self.dropout.p if self.training else 0.0
        if self.config.fused_softmax:
            probs = ops.masked_softmax(scores, mask, scale=scale, dropout_p=p)
        else:
            probs = reference.masked_softmax(scores, mask, scale=scale, dropout_p=p, training=self.training)

        context = probs @ v  # [B, H, S, D]
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, self.config.hidden_size)


class BertSelfOutput(nn.Module):
    """LayerNorm(dropout(dense(h)) + residual) after attention."""

    def __init__(self, config: BertConfig, in_features: int | None = None):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.config.fused_layer_norm:
            p = self.dropout.p if self.training else 0.0
            return bk_nn.linear_add_layer_norm(hidden_states, self.dense, residual, self.LayerNorm, p)
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, varlen=None) -> torch.Tensor:
        return self.output(self.self(hidden_states, mask, varlen), hidden_states)


class BertIntermediate(nn.Module):
    """GELU(dense(h)), hidden_size -> intermediate_size."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        approximate = self.config.gelu_approximate
        if self.config.fused_bias_gelu:
            return bk_nn.linear_bias_gelu(hidden_states, self.dense, approximate)
        return F.gelu(self.dense(hidden_states), approximate=approximate)


class BertOutput(BertSelfOutput):
    """LayerNorm(dropout(dense(h)) + residual) after the feed-forward, intermediate_size -> hidden_size.
    Same computation (and fused path) as BertSelfOutput, with a wider input."""

    def __init__(self, config: BertConfig):
        super().__init__(config, in_features=config.intermediate_size)


class BertLayer(nn.Module):
    """One encoder block: self-attention, then the feed-forward network, each with add & norm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, varlen=None) -> torch.Tensor:
        attended = self.attention(hidden_states, mask, varlen)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, varlen=None) -> torch.Tensor:
        """[B, S, hidden] with a mask, or packed [total, hidden] with varlen=(cu_seqlens, max_seqlen)."""
        for layer in self.layer:
            hidden_states = layer(hidden_states, mask, varlen)
        return hidden_states


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token, [CLS]))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


# ---------------------------------------------------------------- outputs
class BertModelOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, S, hidden]
    pooler_output: torch.Tensor | None  # [B, hidden]; None for a model built without a pooler


class SequenceClassifierOutput(NamedTuple):
    logits: torch.Tensor  # [B, num_labels]


# ---------------------------------------------------------------- loading HF checkpoints
_ENCODER_MODULES = ("embeddings", "encoder", "pooler")


def _read_checkpoint_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from an HF model directory: model.safetensors (possibly sharded with
    an index) or pytorch_model.bin."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(config_file) as f:
        config = json.load(f)

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    pt_bin = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single) or os.path.isfile(index):
        from safetensors.torch import load_file

        if os.path.isfile(single):
            shards = [single]
        else:
            with open(index) as f:
                shards = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        state_dict = {}
        for shard in shards:
            state_dict.update(load_file(shard, device="cpu"))
    elif os.path.isfile(pt_bin):
        state_dict = torch.load(pt_bin, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path!r}")
    return config, state_dict


def _read_hf_source(source: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from an HF PreTrainedModel or a checkpoint directory."""
    if isinstance(source, (str, os.PathLike)):
        return _read_checkpoint_dir(source)
    if isinstance(source, nn.Module) and hasattr(source, "config"):
        return source.config.to_dict(), source.state_dict()
    raise TypeError(
        f"from_hf expects an HF PreTrainedModel or a checkpoint directory, got {type(source).__name__}"
    )


def _canonical_key(key: str) -> str:
    # Checkpoints converted from the original TF BERT name the LayerNorm parameters gamma / beta.
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def _load_hf_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], encoder_prefix: str,
                        strict: bool) -> None:
    """Load HF-named weights into `model`, whose encoder lives under `encoder_prefix` ("" or "bert.").

    Encoder weights are accepted with or without a leading "bert."; weights of heads the model does
    not have (cls.predictions.*, a classifier when loading a BertModel, ...) are ignored. Unknown
    names inside the encoder, or any weight the model needs but the checkpoint lacks, raise a
    RuntimeError (missing weights only warn when strict=False and are then left as initialised).
    """
    own = model.state_dict()
    own_roots = {k.split(".")[0] for k in own}
    has_pooler = any(k.startswith(encoder_prefix + "pooler.") for k in own)
    optional_buffers = {"embeddings." + name for name in BertEmbeddings._OPTIONAL_BUFFERS}
    loaded: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        key = _canonical_key(key)
        base = key[len("bert.") :] if key.startswith("bert.") else key
        root = base.split(".")[0]
        if root in _ENCODER_MODULES:
            if base in optional_buffers or (root == "pooler" and not has_pooler):
                continue
            target = encoder_prefix + base
            if target in own:
                loaded[target] = value
            else:
                unexpected.append(key)  # a part of the encoder we do not implement: refuse to drop it silently
        elif key in own:
            loaded[key] = value  # a head we have, e.g. classifier.*
        elif root in own_roots:
            unexpected.append(key)
        # anything else is a head this model does not have: ignore it

    if unexpected:
        raise RuntimeError(
            f"{type(model).__name__}: the checkpoint has {len(unexpected)} encoder weight(s) this "
            f"model has no place for (a different architecture or config?): {sorted(unexpected)[:8]}"
        )
    missing = sorted(set(own) - set(loaded))
    if missing:
        message = (
            f"{type(model).__name__}: the checkpoint lacks {len(missing)} weight(s) the model "
            f"needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
        if strict:
            raise RuntimeError(message + " (pass strict=False to keep them at their initial values)")
        warnings.warn(message + "; they keep their initial values", stacklevel=3)
    model.load_state_dict(loaded, strict=False)


# ---------------------------------------------------------------- models
class _BertPreTrained(nn.Module):
    """Weight initialisation shared by the models (HF's: normal(0, initializer_range), zero biases)."""

    config: BertConfig

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BertModel(_BertPreTrained):
    """The BERT encoder: embeddings, `num_hidden_layers` encoder layers and (optionally) the pooler."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    @staticmethod
    def keep_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The [B, S] padding mask (1/0 or bool, nonzero = real token) as a boolean keep-mask
        [B, 1, 1, S] that broadcasts over heads and queries. 4-D masks (boolean keep-masks or
        additive float masks, as bertkern.ops accept them) pass through unchanged."""
        if attention_mask is None or attention_mask.dim() == 4:
            return attention_mask
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, seq] (or 4-D), got shape {tuple(attention_mask.shape)}")
        return attention_mask.bool()[:, None, None, :]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BertModelOutput:
        hidden = self.embeddings(input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        if self.config.padding_free and attention_mask is not None and attention_mask.dim() == 2:
            # Pack the real tokens once, run every layer on them, scatter back once.
            batch, seq = attention_mask.shape
            packed, indices, cu_seqlens, max_seqlen = padding.unpad(hidden, attention_mask)
            packed = self.encoder(packed, None, varlen=(cu_seqlens, max_seqlen))
            full = packed.shape[0] == batch * seq  # no padding: unpad left every token in place
            hidden = packed.view(batch, seq, -1) if full else padding.repad(packed, indices, batch, seq)
        else:
            mask = self.keep_mask(attention_mask)  # built once, shared by every layer
            hidden = self.encoder(hidden, mask)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BertModelOutput(hidden, pooled)

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load HF-named weights, with or without a "bert." prefix, ignoring heads (see from_hf)."""
        _load_hf_state_dict(self, state_dict, encoder_prefix="", strict=strict)

    @classmethod
    def from_hf(cls, source: Any, *, add_pooling_layer: bool | None = None, strict: bool = True,
                **flags: Any) -> "BertModel":
        """A BertModel with the weights of an HF model (BertModel or any BertFor*: its encoder is
        taken) or of a checkpoint directory (config.json + model.safetensors or pytorch_model.bin).

        `flags` set config fields, typically the fused paths (`fused_bias_gelu=True`, ...).
        `add_pooling_layer=None` keeps the pooler iff the checkpoint has one. The model comes back in
        float32 and eval mode; use `.to(dtype / device)` as with any module.
        """
        hf_config, state_dict = _read_hf_source(source)
        config = BertConfig.from_hf(hf_config, **flags)
        if add_pooling_layer is None:
            add_pooling_layer = any(k.startswith(("pooler.", "bert.pooler.")) for k in state_dict)
        model = cls(config, add_pooling_layer=add_pooling_layer).float()
        model.load_hf_state_dict(state_dict, strict=strict)
        return model.eval()


class BertForSequenceClassification(_BertPreTrained):
    """BertModel + dropout + a linear classifier over the pooled [CLS] output."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_weights(self.classifier)  # self.bert initialised itself

    # BertModel.forward's arguments (HF's names and order), passed through to self.bert.
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        return SequenceClassifierOutput(self.classifier(self.dropout(pooled)))

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        _load_hf_state_dict(self, state_dict, encoder_prefix="bert.", strict=strict)

    @classmethod
    def from_hf(cls, source: Any, *, strict: bool = True, **flags: Any) -> "BertForSequenceClassification":
        """Like BertModel.from_hf, from an HF BertForSequenceClassification or its checkpoint directory.
        A checkpoint without classifier weights (a bare encoder) is an error unless strict=False, which
        keeps a freshly initialised classifier (the usual start of fine-tuning)."""
        hf_config, state_dict = _read_hf_source(source)
        model = cls(BertConfig.from_hf(hf_config, **flags)).float()
        model.load_hf_state_dict(state_dict, strict=strict)
        return model.eval()


# ---------------------------------------------------------------- fused attention (shared with bertkern.optimize)
def qkv_params(owner: nn.Module, query: nn.Linear, key: nn.Linear,
               value: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [3 * out, in], bias [3 * out] or None): query, key, value stacked for one GEMM.
    Concatenated at each call (differentiable: the gradients reach the three Linear layers); in
    inference (no grad, not compiling) cached on `owner` until a parameter changes: the key holds each
    parameter's storage and version counter, which an optimizer step, load_state_dict or any in-place
    write bumps, so the cache is never stale."""
    weights = (query.weight, key.weight, value.weight)
    biases = (query.bias, key.bias, value.bias)
    params = weights + tuple(b for b in biases if b is not None)
    cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if cacheable:
        cache_key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cached = owner.__dict__.get("_qkv_cache")
        if cached is not None and cached[0] == cache_key:
            return cached[1]
    bias = None
    if any(b is not None for b in biases):  # a missing bias is a zero one
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)], 0)
    fused = torch.cat(weights, 0), bias
    if cacheable:
        owner.__dict__["_qkv_cache"] = (cache_key, fused)  # a plain attribute: never in the state dict
    return fused


def qkv_attention(
    owner: nn.Module,
    query: nn.Linear,
    key: nn.Linear,
    value: nn.Linear,
    heads: int,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None = None,
    varlen: tuple[torch.Tensor, int] | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Self-attention from one QKV GEMM: q, k and v are strided views of its output (no copies), read
    in place by bertkern.ops.attention ([B, S, hidden] in, or its [B * S, hidden] rows with seq_len=S,
    with a mask that broadcasts to [B, H, S, S]) or bertkern.ops.attention_varlen (packed [total,
    hidden] in, varlen=(cu_seqlens, max_seqlen)). Returns the heads merged back in the input's layout:
    [B, S, H * D], [B * S, H * D] or [total, H * D]."""
    weight, bias = qkv_params(owner, query, key, value)
    qkv = F.linear(hidden_states, weight, bias)  # one GEMM: [..., 3 * H * D]
    size = query.out_features // heads
    if varlen is not None:
        cu_seqlens, max_seqlen = varlen
        total = hidden_states.shape[0]
        q, k, v = qkv.view(total, 3, heads, size).unbind(1)  # [total, H, D] strided views
        out = ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale=scale, dropout_p=dropout_p, backend=backend)
        return out.reshape(total, heads * size)
    rows = hidden_states.dim() == 2
    if rows and seq_len is None:
        raise ValueError("qkv_attention: 2-D hidden_states need varlen (packed tokens) or seq_len (the rows of a "
                         f"[B, S, hidden] batch), got shape {list(hidden_states.shape)}")
    batch, seq = (hidden_states.shape[0] // seq_len, seq_len) if rows else hidden_states.shape[:2]
    q, k, v = qkv.view(batch, seq, 3, heads, size).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, S, D] views
    out = ops.attention(q, k, v, mask, scale=scale, dropout_p=dropout_p, backend=backend).transpose(1, 2)
    return out.reshape(batch * seq, heads * size) if rows else out.reshape(batch, seq, heads * size)
