"""A BERT-base fine-tuning step: BertForSequenceClassification (random weights, 2 labels, dropout
0.1 as in fine-tuning), forward + cross-entropy + backward + AdamW step, under bf16 autocast with
float32 weights (AMP). Reported: median step time, tokens/s, model TFLOP/s (3 x the forward's matmul
FLOPs) and peak memory (torch.cuda.max_memory_allocated during the steps, less what was allocated
before the provider's model was built: its weights, gradients, optimizer state and activations).

    python benchmarks/run.py --suite train [--quick] [--shapes 32x128,16x512] [--providers hf-eager,compile]
    python benchmarks/bench_train.py [same arguments]

Providers: hf-eager (attn_implementation="eager"; the baseline), hf-sdpa, optimize-triton and
optimize-cuda (bertkern.optimize(hf-eager, backend=...): fused softmax + dropout, bias + GELU,
bias + dropout + residual + LayerNorm, forward and backward), compile (torch.compile(hf-sdpa,
dynamic=False): compiled once for the check, once more for the timed steps, see below) and
bk-model (bertkern.models.BertForSequenceClassification with every fused-path flag on).

Correctness before timing: dropout is random, so the check runs one forward + backward on the first
8 sequences with every dropout probability set to 0 (and put back afterwards), and compares the loss and every parameter
gradient against the float64 model (no autocast) by the 2x-of-eager rule, eager being hf-eager
under the same autocast; the cosine of the whole gradient vector against float64 is reported.
Without a CUDA GPU: the same check on a tiny config on the CPU (bf16 autocast, as on the GPU), plus
one AdamW step that must leave every parameter finite; no timings.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `bertkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402  (first: sets TRITON_INTERPRET=1 without a GPU)
from benchmarks import model_suite as ms  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SUITE = "train"
SHAPES = ((32, 128), (16, 512), (128, 128), (32, 512))  # run order; a time budget cuts from the end
QUICK_SHAPES = ((32, 128), (16, 512))
AMP_DTYPE = torch.bfloat16
LR = 2e-5
MIN_CELL_S = 10.0
CHECK_BATCH = 8
TIMING_PRIOR_S = 5.0


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    batch: int
    seq: int
    amp: torch.dtype | None = AMP_DTYPE  # None: float32, no autocast

    @property
    def label(self) -> str:
        return f"{self.model} train {'fp32' if self.amp is None else ms.SHORT_DTYPE[self.amp] + ' autocast'} " \
               f"{self.batch}x{self.seq}"

    def to_dict(self) -> dict:
        return {"model": self.model, "batch": self.batch, "seq": self.seq,
                "amp": None if self.amp is None else harness.dtype_name(self.amp)}

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["model"], d["batch"], d["seq"], None if d.get("amp") is None else getattr(torch, d["amp"]))


def cells(quick: bool = False, models=None, shapes=None) -> list[Cell]:
    return [Cell(m, b, s) for m in (models or ("bert-base",)) for b, s in (shapes or (QUICK_SHAPES if quick else SHAPES))]


def train_flops(config, batch: int, seq: int) -> int:
    from benchmarks.bench_bert import forward_flops

    return 3 * forward_flops(config, batch, seq)


# ----------------------------------------------------------------------------- providers
@dataclasses.dataclass
class Provider:
    name: str
    describe: str
    # (base model, device) -> (module whose parameters train, fn(ids, mask) -> logits); Skip if it cannot run
    make: Callable[..., tuple[torch.nn.Module, Callable]]
    needs_cuda: bool = False
    setup_prior_s: float = 5.0  # check + first timed step: a compile for compile


def _logits_fn(model):
    return lambda i, m: ms.first_output(model(input_ids=i, attention_mask=m), "logits")


def _hf(attn: str):
    def make(base, device):
        model = copy.deepcopy(base) if attn == "eager" else ms.with_attention(base, attn)
        return model, _logits_fn(model)

    return make


def _optimize(backend: str | None):
    def make(base, device):
        from bertkern import backend as _backend

        why = _backend.unavailable_reason(backend, device) if backend else None
        if why:
            raise harness.Skip(why)
        model, counts = ms.optimize_model(copy.deepcopy(base), backend)
        make.note = "replaced " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        return model, _logits_fn(model)

    return make


def _compile(base, device):
    ms.raise_recompile_limit()
    model = ms.with_attention(base, "sdpa")
    return model, _logits_fn(torch.compile(model, dynamic=False))


def _bk(backend: str | None):
    def make(base, device):
        if backend:
            from bertkern import backend as _backend

            why = _backend.unavailable_reason(backend, device)
            if why:
                raise harness.Skip(why)
        from bertkern.models import BertForSequenceClassification

        flags = ms.bertkern_flags()
        make.note = "flags " + ", ".join(flags)
        model = BertForSequenceClassification.from_hf(base, **flags).to(device).train()

        def fn(i, m):
            with ms.backend_env(backend):
                return ms.first_output(model(i, attention_mask=m), "logits")

        return model, fn

    return make


def gpu_providers() -> list[Provider]:
    return [
        Provider("hf-eager", "HF BertForSequenceClassification, attn_implementation=\"eager\" (baseline)", _hf("eager")),
        Provider("hf-sdpa", "HF BertForSequenceClassification, attn_implementation=\"sdpa\"", _hf("sdpa")),
        Provider("optimize-triton", "bertkern.optimize(hf-eager, backend=\"triton\")", _optimize("triton")),
        Provider("optimize-cuda", "bertkern.optimize(hf-eager, backend=\"cuda\")", _optimize("cuda")),
        Provider("compile", "torch.compile(hf-sdpa, dynamic=False) (optimizer step not compiled)", _compile,
                 needs_cuda=True, setup_prior_s=150.0),
        Provider("bk-model", "bertkern.models.BertForSequenceClassification, every fused flag on, auto backend",
                 _bk(None)),
    ]


def cpu_providers() -> list[Provider]:
    out = [p for p in gpu_providers() if p.name in ("hf-eager", "hf-sdpa")]
    out += [Provider(f"optimize-{b}", f"bertkern.optimize(hf-eager, backend=\"{b}\")", _optimize(b))
            for b in ("torch", "triton", "cuda")]
    out += [Provider(f"bk-model[{b}]", f"bertkern.models.BertForSequenceClassification, BERTKERN_BACKEND={b}", _bk(b))
            for b in ("torch", "triton")]
    out += [p for p in gpu_providers() if p.needs_cuda]
    return out


PROVIDER_NAMES = tuple(dict.fromkeys([p.name for p in gpu_providers()] + [p.name for p in cpu_providers()]))


def select(providers, only=None, skip=None):
    return [p for p in providers if (only is None or p.name in only) and not (skip and p.name in skip)]


# ----------------------------------------------------------------------------- one step
def set_dropout(model: torch.nn.Module, p: float | None, saved: dict | None = None) -> dict:
    """Set every nn.Dropout's probability to p (or back to the saved values); returns the old ones."""
    old = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            old[name] = m.p
            m.p = saved[name] if saved is not None else p
    return old


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def _param_name(name: str) -> str:
    return name.removeprefix("_orig_mod.")


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32 (float64 for the reference model)."""
    return F.cross_entropy(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), labels)


def loss_and_grads(model, fn, ids, mask, labels, device, amp) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward + backward (no optimizer step): (loss, {parameter name: gradient})."""
    model.zero_grad(set_to_none=True)
    with _autocast(device, amp):
        logits = fn(ids, mask)
    loss = _loss(logits, labels)
    loss.backward()
    grads = {_param_name(n): p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def make_step(model, fn, opt, ids, mask, labels, device, amp) -> Callable[[], None]:
    def step():
        with _autocast(device, amp):
            logits = fn(ids, mask)
        loss = _loss(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _adamw(params, device):
    try:
        return torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    except (TypeError, RuntimeError):
        return torch.optim.AdamW(params, lr=LR)


def run_cell(cell: Cell, base: torch.nn.Module, providers: list[Provider], budget: ms.Budget, timer: Callable | None,
             log=print, progress: Callable[[dict], None] | None = None) -> dict:
    """Check every provider's loss and gradients (dropout off) against float64 and eager, then time
    the right ones' training steps (dropout on) with timer(step) -> (median, p20, p80) ms; None:
    check only, plus one AdamW step that must leave the parameters finite."""
    device = next(base.parameters()).device
    cfg = base.config
    seed = zlib.crc32(cell.label.encode())
    ids, mask, lengths = ms.make_batch(cell.batch, cell.seq, 1.0, cfg.vocab_size, cfg.pad_token_id or 0, device, seed)
    labels = torch.randint(0, cfg.num_labels, (cell.batch,), generator=torch.Generator().manual_seed(seed)).to(device)
    # The check runs on the first CHECK_BATCH sequences (a float64 BERT at 32x512 would need tens of GB);
    # compile recompiles for it, but it recompiles anyway once dropout is back on.
    k = min(cell.batch, CHECK_BATCH)
    cids, cmask, clabels = ids[:k], mask[:k], labels[:k]
    ref_model = copy.deepcopy(base).double()
    set_dropout(ref_model, 0.0)
    ref_loss, ref_grads = loss_and_grads(ref_model, _logits_fn(ref_model), cids, cmask, clabels, device, None)
    del ref_model
    eager_model = copy.deepcopy(base)
    set_dropout(eager_model, 0.0)
    eager_loss, eager_grads = loss_and_grads(eager_model, _logits_fn(eager_model), cids, cmask, clabels, device, cell.amp)
    del eager_model
    ms.free_memory(device)
    flops = train_flops(cfg, cell.batch, cell.seq)
    out = {"cell": cell.to_dict(), "tokens": cell.batch * cell.seq, "flops": flops, "ref_loss": ref_loss, "check_batch": k,
           "providers": {}, "notes": {}}
    for p in providers:
        t_start = time.monotonic()
        if p.needs_cuda and device.type != "cuda":
            out["providers"][p.name] = {"status": "skipped", "reason": "needs a CUDA GPU"}
            continue
        cost = budget.estimate((p.name, "setup"), p.setup_prior_s) + budget.estimate((p.name, "timing"), TIMING_PRIOR_S)
        if not budget.allows(cost):
            out["providers"][p.name] = {"status": "skipped", "reason": budget.why_not(cost), "budget": True}
            log(f"  {p.name:<18} skipped: {budget.why_not(cost)}")
            continue
        mem0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model = opt = None
        try:
            model, fn = p.make(base, device)
            if getattr(p.make, "note", None):
                out["notes"][p.name] = p.make.note
            model.train()
            saved = set_dropout(model, 0.0)
            t0 = time.monotonic()
            loss, grads = loss_and_grads(model, fn, cids, cmask, clabels, device, cell.amp)
            first_call = time.monotonic() - t0
            entry = ms.judge_grads(loss, grads, eager_loss, eager_grads, ref_loss, ref_grads, cell.amp)
            entry.update(loss=loss, first_call_s=round(first_call, 3))
            del grads
            model.zero_grad(set_to_none=True)
            set_dropout(model, None, saved)
            if entry["status"] == "ok":
                opt = _adamw(model.parameters(), device)
                step = make_step(model, fn, opt, ids, mask, labels, device, cell.amp)
                t0 = time.monotonic()
                if timer is None:  # CPU: one real step (dropout on) must leave every parameter finite
                    step()
                    if not all(torch.isfinite(q).all() for q in model.parameters()):
                        entry.update(status="WRONG", reason="an AdamW step left non-finite parameters")
                else:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    ms_, lo, hi = timer(step)
                    entry.update(ms=ms_, ms_p20=lo, ms_p80=hi, tokens_per_s=out["tokens"] / ms_ * 1e3,
                                 seq_per_s=cell.batch / ms_ * 1e3, tflops=flops / ms_ / 1e9)
                    if device.type == "cuda":
                        entry["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - mem0) / 2**30
                budget.learn((p.name, "timing"), time.monotonic() - t0 + 0.5)
            budget.learn((p.name, "setup"), first_call)
        except harness.Skip as s:
            entry = {"status": "skipped", "reason": str(s)}
        except Exception as e:
            entry = {"status": "error", "reason": harness._short_exc(e)}
        del model, opt
        ms.free_memory(device)
        out["providers"][p.name] = entry
        log("  " + provider_line(p.name, entry, time.monotonic() - t_start))
        if progress is not None:  # the document so far, in case the run is killed mid-cell
            progress(out)
    base_ms = out["providers"].get("hf-eager", {}).get("ms")
    for entry in out["providers"].values():
        if base_ms and entry.get("ms"):
            entry["speedup"] = base_ms / entry["ms"]
    return out


def provider_line(name: str, e: dict, seconds: float) -> str:
    if e["status"] == "skipped":
        return f"{name:<18} skipped: {e['reason']}"
    if e["status"] == "error":
        return f"{name:<18} ERROR: {e['reason']}"
    check = (f"grad err {ms.fmt(e.get('err'))} <= {ms.fmt(e.get('tol'))}, loss err {ms.fmt(e.get('loss_err'))}, "
             f"grad cos {ms.fmt(e.get('grad_cosine'), '.6f')}")
    if e["status"] == "WRONG":
        return f"{name:<18} WRONG ({e['reason']}): not timed"
    if "ms" not in e:
        return f"{name:<18} PASS  ({check})"
    mem = f" {e['peak_mem_gib']:.2f} GiB" if e.get("peak_mem_gib") is not None else ""
    sp = f" {e['speedup']:.2f}x" if e.get("speedup") else ""
    return (f"{name:<18} {e['ms']:9.2f} ms/step {e['tokens_per_s']:10.0f} tok/s {e['tflops']:6.1f} TFLOP/s{mem}{sp}  "
            f"({check}; {seconds:.0f} s)")


# ----------------------------------------------------------------------------- the suite on a GPU
def run(device: torch.device, cell_list: list[Cell], providers: list[Provider], *, budget: ms.Budget,
        timer: Callable | None = None, log=print, env: dict | None = None, settings: dict | None = None,
        partial_json: Path | None = None) -> dict:
    if timer is None and device.type == "cuda":
        timer = lambda step: ms.time_cuda(step, warmup_ms=100, rep_ms=500, min_reps=8)  # noqa: E731
    doc = {"schema": harness.SCHEMA, "suite": SUITE, "env": env or harness.environment(device),
           "settings": {"timer": "CUDA events per step, steps back to back, median", "optimizer": f"AdamW lr {LR}",
                        "amp": harness.dtype_name(AMP_DTYPE), **(settings or {})},
           "providers": [p.name for p in providers], "provider_describe": {p.name: p.describe for p in providers},
           "models": {}, "cells": []}
    bases: dict[str, Any] = {}
    t0 = time.monotonic()
    for n, cell in enumerate(cell_list):
        if budget.left() < MIN_CELL_S:
            doc["cells"].append({"cell": cell.to_dict(), "not_run": "time budget spent"})
            if partial_json is not None:
                harness.save_json(doc, partial_json)
            continue
        log(f"[{n + 1}/{len(cell_list)} {time.monotonic() - t0:4.0f} s, "
            f"{'no limit' if math.isinf(budget.left()) else f'{budget.left():.0f} s left'}] {cell.label}")
        try:
            if cell.model not in bases:
                bases.clear()
                ms.free_memory(device)
                model, weights = ms.build_hf(cell.model, head="cls", device=device)
                bases[cell.model] = model.train()
                doc["models"][cell.model] = {"weights": weights, "hidden_size": model.config.hidden_size,
                                             "num_hidden_layers": model.config.num_hidden_layers}
            r = run_cell(cell, bases[cell.model], providers, budget, timer, log, progress=None if partial_json is None else (
                lambda partial: harness.save_json({**doc, "cells": doc["cells"] + [partial]}, partial_json)))
        except Exception as e:
            r = {"cell": cell.to_dict(), "not_run": f"{harness.HARNESS_ERROR}: {harness._short_exc(e)}"}
            log(f"  {r['not_run']}")
            ms.free_memory(device)
        doc["cells"].append(r)
        if partial_json is not None:
            harness.save_json(doc, partial_json)
    bases.clear()
    ms.free_memory(device)
    return doc


def failures(doc: dict) -> list[str]:
    return ms.failures(doc, lambda c: Cell.from_dict(c).label)


def not_run(doc: dict) -> list[str]:
    return ms.not_run(doc, lambda c: Cell.from_dict(c).label)


# ----------------------------------------------------------------------------- results files
def csv_rows(doc: dict) -> list[dict]:
    rows = []
    env = ms.env_columns(doc["env"])
    for r in doc["cells"]:
        c = r["cell"]
        base = {"suite": SUITE, "model": c["model"], "amp": c["amp"], "batch": c["batch"], "seq": c["seq"]}
        if "not_run" in r:
            rows.append({**base, "provider": "", "status": "not run", "reason": r["not_run"], **env})
            continue
        for p, e in r["providers"].items():
            rows.append({**base, "provider": p, "status": e["status"], "ms_per_step": e.get("ms"),
                         "ms_p20": e.get("ms_p20"), "ms_p80": e.get("ms_p80"), "tokens_per_s": e.get("tokens_per_s"),
                         "tflops": e.get("tflops"), "peak_mem_gib": e.get("peak_mem_gib"),
                         "speedup_vs_hf_eager": e.get("speedup"), "loss_err": e.get("loss_err"),
                         "grad_err_vs_fp64": e.get("err"), "eager_grad_err_vs_fp64": e.get("eager_err"),
                         "tol": e.get("tol"), "grad_cosine_vs_fp64": e.get("grad_cosine"),
                         "first_call_s": e.get("first_call_s"), "reason": e.get("reason", ""), **env})
    return rows


def _cell_text(e: dict | None) -> str:
    if e is None or e.get("status") != "ok" or e.get("tokens_per_s") is None:
        return ms.speedup_cell(e)
    s = f"{e['tokens_per_s'] / 1e3:.1f}k tok/s"
    if e.get("peak_mem_gib") is not None:
        s += f" · {e['peak_mem_gib']:.1f} GiB"
    return s + (f" · {e['speedup']:.2f}×" if e.get("speedup") else "")


def render_markdown(doc: dict) -> str:
    env, providers = doc["env"], doc["providers"]
    lines = [f"# BERT fine-tuning step: {env.get('gpu') or 'no GPU'}", "", f"{harness.env_line(env)}.", "",
             "Each cell: tokens/s · peak memory · speed-up over hf-eager. " + ", ".join(
                 f"{k} {v}" for k, v in doc["settings"].items()) + ".", "", "Providers:"]
    lines += [f"- {p}: {doc['provider_describe'].get(p, '')}" for p in providers]
    lines += [f"- {m}: {v['weights']}" for m, v in doc["models"].items()]
    lines += ["", "| model | batch x seq | " + " | ".join(providers) + " |", "|---|---:|" + "---|" * len(providers)]
    for r in doc["cells"]:
        c = r["cell"]
        head = f"| {c['model']} | {c['batch']}x{c['seq']} | "
        if "not_run" in r:
            lines.append(head + f"not run ({r['not_run']})" + " |" * len(providers))
        else:
            lines.append(head + " | ".join(_cell_text(r["providers"].get(p)) for p in providers) + " |")
    lines += ["", "Step time (median ms) and the check (gradient error vs float64 / tolerance; gradient cosine):", "",
              "| model | batch x seq | provider | ms/step | TFLOP/s | grad err / tol | grad cosine | result |",
              "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in doc["cells"]:
        c = r["cell"]
        for p, e in r.get("providers", {}).items():
            if e["status"] == "skipped":
                continue
            ratio = e["err"] / e["tol"] if e.get("err") is not None and e.get("tol") else None
            lines.append(f"| {c['model']} | {c['batch']}x{c['seq']} | {p} | {ms.fmt(e.get('ms'), '.2f')} | "
                         f"{ms.fmt(e.get('tflops'), '.1f')} | {ms.fmt(ratio, '.2f')} | {ms.fmt(e.get('grad_cosine'), '.6f')} | "
                         f"{e['status']} |")
    notes = {p: n for r in doc["cells"] for p, n in r.get("notes", {}).items()}
    if notes:
        lines += ["", "Notes:"] + [f"- {p}: {n}" for p, n in notes.items()]
    skipped = {}
    for r in doc["cells"]:
        for p, e in r.get("providers", {}).items():
            if e["status"] == "skipped" and not e.get("budget"):
                skipped.setdefault(p, set()).add(e["reason"])
    if skipped:
        lines += ["", "Skipped providers:"] + [f"- {p}: {'; '.join(sorted(rs))}" for p, rs in skipped.items()]
    bad, missing = failures(doc), not_run(doc)
    if bad:
        lines += ["", "Failures:"] + [f"- {b}" for b in bad]
    if missing:
        lines += ["", f"Not run ({len(missing)}):"] + [f"- {m}" for m in missing]
    return "\n".join(lines) + "\n"


def render_latest_section(docs: list[dict]) -> list[str]:
    lines = []
    for doc in docs:
        providers, env = doc["providers"], doc["env"]
        lines += ["", f"## BERT fine-tuning step (bf16 autocast, AdamW), {env.get('gpu')}", "",
                  f"- {harness.env_line(env)}",
                  f"- cell: tokens/s · peak memory · speed-up over hf-eager; `benchmarks/results/{env.get('gpu_slug')}/train.md`",
                  "", "| model | batch x seq | " + " | ".join(providers) + " |", "|---|---:|" + "---|" * len(providers)]
        for r in doc["cells"]:
            if "not_run" not in r:
                c = r["cell"]
                lines.append(f"| {c['model']} | {c['batch']}x{c['seq']} | "
                             + " | ".join(_cell_text(r["providers"].get(p)) for p in providers) + " |")
        missing = not_run(doc)
        if missing:
            lines += ["", f"Not run: {len(missing)} (listed in train.md)."]
    return lines


def plot(doc: dict, folder: Path) -> list[Path]:
    """train.png: tokens/s and peak memory per provider, a group of bars per cell."""
    plt = ms.matplotlib_pyplot()
    ran = [r for r in doc["cells"] if "not_run" not in r]
    if plt is None or not ran:
        return []
    providers = [p for p in doc["providers"] if any(r["providers"].get(p, {}).get("tokens_per_s") for r in ran)]
    if not providers:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(providers)
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_mem_gib", "peak memory (GiB)")):
        for j, p in enumerate(providers):
            ax.bar([i + j * width for i in range(len(ran))], [r["providers"].get(p, {}).get(key) or 0 for r in ran],
                   width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ran))])
        ax.set_xticklabels([f"{r['cell']['batch']}x{r['cell']['seq']}" for r in ran])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"BERT fine-tuning step on {doc['env'].get('gpu')}")
    fig.tight_layout()
    path = folder / "train.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def write_results(doc: dict, out_root: Path) -> list[Path]:
    folder = Path(out_root) / doc["env"]["gpu_slug"]
    paths = [folder / "train.json", folder / "train.md", folder / "train.csv"]
    harness.save_json(doc, paths[0])
    paths[1].write_text(render_markdown(doc))
    ms.write_csv(csv_rows(doc), paths[2])
    try:
        paths += plot(doc, folder)
    except Exception as e:
        print(f"warning: no train plot: {harness._short_exc(e)}", file=sys.stderr)
    return paths


# ----------------------------------------------------------------------------- honest CPU mode
def cpu_check(models=("tiny",), amps=(torch.bfloat16,), providers=None, log=print) -> dict:
    """Each provider that can run on the CPU: loss + gradients (dropout off) vs float64 and eager,
    under bf16 autocast as on the GPU (amps=(None,) for float32), then one AdamW step (dropout on).
    No timings."""
    device = torch.device("cpu")
    providers = cpu_providers() if providers is None else providers
    doc = {"schema": harness.SCHEMA, "suite": SUITE, "mode": "cpu-correctness", "providers": [p.name for p in providers],
           "models": {}, "cells": []}
    for model in models:
        try:
            base, weights = ms.build_hf(model, head="cls", device=device)
            doc["models"][model] = {"weights": weights}
        except Exception as e:
            doc["cells"].append({"cell": Cell(model, 3, 16).to_dict(),
                                 "not_run": f"{harness.HARNESS_ERROR}: {harness._short_exc(e)}"})
            continue
        for amp in amps:
            cell = Cell(model, 3, 16, amp)
            try:
                r = run_cell(cell, base.train(), providers, ms.Budget(), None, log=lambda s: None)
            except Exception as e:
                r = {"cell": cell.to_dict(), "not_run": f"{harness.HARNESS_ERROR}: {harness._short_exc(e)}"}
            doc["cells"].append(r)
    return doc


def render_cpu_report(doc: dict) -> str:
    lines = []
    for r in doc["cells"]:
        c = Cell.from_dict(r["cell"])
        lines.append(f"== train: {c.model} BertForSequenceClassification, {'float32' if c.amp is None else 'bf16 autocast'}, "
                     f"batch {c.batch} x seq {c.seq}: loss + gradients (dropout off) vs float64 and HF eager, "
                     f"then one AdamW step ==")
        if "not_run" in r:
            lines += [f"FAIL: {r['not_run']}", ""]
            continue
        lines.append(f"{'provider':<18} {'loss err':>9} {'grad err':>9} {'eager err':>9} {'tol':>9} {'grad cos':>9}  result")
        for p, e in r["providers"].items():
            if e["status"] == "skipped":
                lines.append(f"{p:<18} skipped: {e['reason']}")
                continue
            status = {"ok": "PASS", "WRONG": "FAIL", "error": "FAIL"}[e["status"]]
            lines.append(f"{p:<18} {ms.fmt(e.get('loss_err'), '.2e'):>9} {ms.fmt(e.get('err'), '.2e'):>9} "
                         f"{ms.fmt(e.get('eager_err'), '.2e'):>9} {ms.fmt(e.get('tol'), '.2e'):>9} "
                         f"{ms.fmt(e.get('grad_cosine'), '.6f'):>9}  {status}"
                         + (f": {e['reason']}" if e["status"] != "ok" else ""))
        lines.append("")
    return "\n".join(lines)


cpu_counts = ms.cpu_counts


if __name__ == "__main__":
    from benchmarks import run as _run

    sys.exit(_run.main(["--suite", SUITE, *sys.argv[1:]]))
