"""Swap bertkern's fused ops into an existing model, in place, and back.

    model = bertkern.optimize(model)              # HF BERT / RoBERTa / ELECTRA / XLM-R / CamemBERT ...
    compiled = torch.compile(model, fullgraph=True)  # optional: the fused ops trace without breaks
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
anything with the same blocks) and bertkern.models. DistilBERT's blocks do not have this layout (the
residual add and LayerNorm live in TransformerBlock.forward): it is left alone and reported.

Blocks are found by structure, not by class name, and each candidate is checked by running its own
forward once on a small random input (on a private generator: the global RNG is not touched) against
the computation bertkern will substitute. Only blocks that pass are swapped:

- add & norm (BertSelfOutput / BertOutput and family): children `dense` (Linear), `dropout`
  (Dropout) and one LayerNorm, forward (hidden_states, input_tensor) ->
  LayerNorm(dropout(dense(hidden_states)) + input_tensor). Fused: `ops.add_layer_norm` with the
  dense bias, the LayerNorm's own eps, and the dropout's own p in training mode.
- intermediate (BertIntermediate and family): `dense` + a GELU-type `intermediate_act_fn`, forward
  act(dense(h)). Fused: `ops.bias_gelu` ("gelu" -> exact erf, "gelu_new" / "gelu_pytorch_tanh" /
  nn.GELU("tanh") -> "tanh"). Other activations are left alone and reported.
- self-attention (BertSelfAttention and family): `query` / `key` / `value` Linears, HF's eager
  attention path. Fused: the softmax goes through `ops.masked_softmax` with HF's additive mask as
  given. Only when the model runs attn_implementation="eager" (the config is read on every call; any
  other implementation, a KV cache or cross-attention inputs go to the original forward). Models on
  "sdpa" / "flash_attention_2" keep their attention, which is reported.

A swap sets `forward` on the module instance (a bound method of a function in this module) and
records what it did in `module._bertkern_patch`; the class, the parameters (same objects) and the
state dict are untouched, and `restore` deletes the instance attribute so the class's forward is
back. Modules whose `forward` is already overridden on the instance (accelerate hooks, another
tool) are left alone. On `bertkern.models` models the config's `fused_*` flags are set instead
(shared by every module of that config) and restored by `restore`.

Ops missing from `bertkern.ops` (checked when optimize is called) are reported as
"skipped: op not available"; which backend runs is decided by the op at each call (`backend=`,
else $BERTKERN_BACKEND, else auto).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bertkern import backend as _backend
from bertkern import ops as _ops

logger = logging.getLogger(__name__)

DEFAULT_OPS = ("bias_gelu", "add_layer_norm", "masked_softmax")
KNOWN_OPS = ("bias_gelu", "add_layer_norm", "masked_softmax", "embedding_layer_norm")

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
    approximate: str = "none"  # bias_gelu
    norm: str = "LayerNorm"  # add_layer_norm: the LayerNorm child's name
    scale: float = 1.0  # masked_softmax: the attention's scaling


def _intermediate_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """gelu(dense(h)): the matmul without its bias, then bias + GELU in one op."""
    patch = self._bertkern_patch
    x = F.linear(hidden_states, self.dense.weight)
    bias = self.dense.bias
    if bias is not None and bias.dtype != x.dtype:  # autocast: the matmul ran in lower precision
        bias = bias.to(x.dtype)
    return _ops.bias_gelu(x, bias, approximate=patch.approximate, backend=patch.backend)


def _add_norm_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """LayerNorm(dropout(dense(h)) + input_tensor): the matmul without its bias, then bias + dropout +
    residual + LayerNorm in one op. eps and p are read from the modules at every call."""
    patch = self._bertkern_patch
    norm = getattr(self, patch.norm)
    dropout = self.dropout
    p = dropout.p if dropout.training else 0.0
    x = F.linear(hidden_states, self.dense.weight)
    return _ops.add_layer_norm(
        x, input_tensor, norm.weight, norm.bias, norm.eps, x_bias=self.dense.bias, dropout_p=p, backend=patch.backend
    )


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


def _match_self_attention(module: nn.Module, backend: str | None) -> _Patch:
    """HF's BERT-family self-attention on the eager path (transformers 4.x and 5.x)."""
    config = getattr(module, "config", None)
    if _is_cross_attention(module):
        raise _NoMatch("cross-attention")
    if getattr(module, "is_causal", False) or getattr(module, "is_decoder", False) or getattr(config, "is_decoder", False):
        raise _NoMatch("decoder (causal) attention")
    impl = _attn_implementation(module)
    if impl is None:
        raise _NoMatch("no HF config with an _attn_implementation, and not an eager *SelfAttention class")
    if impl != "eager":
        raise _NoMatch(f"uses attn_implementation={impl!r} ({type(module).__name__}; already a fused attention); "
                       "bertkern fuses the eager path only: load with attn_implementation='eager' to use "
                       "masked_softmax")
    head = getattr(module, "attention_head_size", None)
    if not isinstance(head, int) or not isinstance(getattr(module, "dropout", None), nn.Dropout):
        raise _NoMatch("no attention_head_size / dropout attributes of the BERT layout")
    if not isinstance(module.query, nn.Linear):
        raise _NoMatch(f"query is a {type(module.query).__name__}, not a Linear")
    position = getattr(module, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise _NoMatch(f"position_embedding_type={position!r}: relative position scores the fused path would skip")
    extra = [n for n, _ in module.named_children() if n not in ("query", "key", "value", "dropout")]
    extra += list(module._parameters)
    if extra:
        # The probe below could miss them with small weights (relative position embeddings at
        # initialisation shift the scores by ~1e-4), so anything beyond q / k / v / dropout is refused.
        raise _NoMatch(f"has {', '.join(extra)} besides query / key / value / dropout (relative positions, "
                       "rotary, ...), which the fused path would skip")
    scale = float(getattr(module, "scaling", head**-0.5))
    device, dtype = _param_device_dtype(module.query)
    if device.type != "meta":
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
        # The fused forward returns (output, weights) like transformers 5.x; an attention returning
        # anything else (4.x returns (output,) without output_attentions) keeps its own forward.
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise _NoMatch("its forward does not return (output, attention weights) as transformers 5.x "
                           "eager attention does")
        _check_close(out[0], want, "softmax(q k^T * scaling + mask) v")
        _check_close(out[1], probs, "the attention weights softmax(q k^T * scaling + mask)")
    return _Patch("masked_softmax", backend, scale=scale)


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


def op_available(name: str) -> bool:
    """Whether bertkern.ops has the public function `name` (ops land one by one)."""
    fn = getattr(_ops, name, None)
    return callable(fn) and not isinstance(fn, types.ModuleType)


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
    "BertSelfAttention": ("masked_softmax", "fused_softmax"),
    "BertEmbeddings": ("embedding_layer_norm", "fused_embeddings"),
}


def _optimize_bertkern(report: OptimizeReport, name: str, module: nn.Module, available: dict) -> str | None:
    """Set the fused flag for a bertkern.models module. Returns None if the module is not one of
    bertkern.models, "self" for a container, "subtree" for a module whose flag covers its children."""
    from bertkern.models import bert as bk

    for type_name, (op, flag) in _BERTKERN_FLAGS.items():
        if isinstance(module, getattr(bk, type_name)):
            break
    else:
        return "self" if type(module).__module__ == bk.__name__ else None
    type_name, config = type(module).__name__, module.config
    if op not in report.ops:
        report.left_alone.append(LeftAlone(name, op, type_name, "not requested"))
        return "subtree"
    if not available[op]:
        report.left_alone.append(LeftAlone(name, op, type_name, f"skipped: op not available (bertkern.ops.{op})"))
        return "subtree"
    saved = config.__dict__.setdefault(_SAVED_FLAGS, {})
    if flag not in saved:
        saved[flag] = getattr(config, flag)
        if not getattr(config, flag):
            report._undo.append(("flag", config, flag, False))
        setattr(config, flag, True)
    report.replaced.append(Replaced(name, op, type_name, f"config.{flag}=True"))
    return "subtree"


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


def optimize(
    model: nn.Module,
    *,
    backend: str | None = None,
    ops: tuple[str, ...] | list[str] = DEFAULT_OPS,
    inplace: bool = True,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, OptimizeReport]:
    """Swap bertkern's fused ops into `model` (see the module docstring) and return the model.

    backend: passed to every op call (None: the op decides per call from $BERTKERN_BACKEND, else auto).
        Not applicable to bertkern.models models, whose flags call the ops with the default backend.
    ops: which ops to swap in, of "bias_gelu", "add_layer_norm", "masked_softmax",
        "embedding_layer_norm" (bertkern.models only). Ops not yet in bertkern.ops are reported as skipped.
    inplace: True (default) patches `model` itself and returns it; False patches and returns a deep
        copy, leaving `model` as it is.
    return_report: return (model, OptimizeReport) instead of the model alone.

    The report (`str(report)` is a readable summary) is logged at INFO on the "bertkern.optimize"
    logger and stays reachable as `bertkern.optimize_report(model)`. Compile the result as usual:
    `torch.compile(bertkern.optimize(model), fullgraph=True)`.
    """
    ops = _check_args(model, backend, ops)
    if not inplace:
        model = copy.deepcopy(model)
    report = OptimizeReport(model_type=type(model).__name__, backend=backend, ops=ops,
                            _model_ref=weakref.ref(model))
    available = {op: op_available(op) for op in ops}
    covered: set[int] = set()

    for name, module in model.named_modules():
        if id(module) in covered:
            continue
        bertkern_module = _optimize_bertkern(report, name, module, available)
        if bertkern_module is not None:
            covered.update(id(m) for m in (module.modules() if bertkern_module == "subtree" else (module,)))
            continue
        if _is_attention_candidate(module):
            kind = "masked_softmax"
        elif _is_add_norm_candidate(module):
            kind = "add_layer_norm"
        elif _intermediate_activation(module) is not None:
            kind = "bias_gelu"
        else:
            continue
        covered.update(id(m) for m in module.modules())
        type_name = type(module).__name__
        if _MARK in module.__dict__:
            report.left_alone.append(LeftAlone(name, kind, type_name, "already optimized"))
            continue
        if kind not in ops:
            report.left_alone.append(LeftAlone(name, kind, type_name, "not requested"))
            continue
        if not available[kind]:
            reason = f"skipped: op not available (bertkern.ops.{kind})"
            report.left_alone.append(LeftAlone(name, kind, type_name, reason))
            continue
        if "forward" in module.__dict__:
            report.left_alone.append(LeftAlone(name, kind, type_name,
                                               "forward already overridden on the instance (accelerate hook, ...)"))
            continue
        try:
            if kind == "masked_softmax":
                patch = _match_self_attention(module, backend)
            elif kind == "add_layer_norm":
                patch = _match_add_norm(module, backend)
            else:
                patch = _match_intermediate(module, _intermediate_activation(module), backend)
        except _NoMatch as e:
            report.left_alone.append(LeftAlone(name, kind, type_name, str(e)))
            continue
        _patch(module, patch)
        report._undo.append(("module", weakref.ref(module)))
        detail = {"bias_gelu": f"approximate={patch.approximate!r}", "masked_softmax": "eager attention path"}
        report.replaced.append(Replaced(name, kind, type_name, detail.get(kind, "")))

    _report_leftovers(report, model, covered)
    logger.info("%s", report)
    _REPORTS[model] = report
    return (model, report) if return_report else model


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
