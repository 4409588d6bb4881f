"""End-to-end BERT inference: median latency (ms), sequences/s, real tokens/s and model TFLOP/s of
BERT-base and BERT-large (random weights) and all-MiniLM-L6-v2 (its real weights, offline), over
batch {1, 8, 32, 128} x seq {128, 384, 512}, fp16 and bf16, with every sequence full or with 60%
fill (lengths spread over 20%..100% of seq, padding after).

    python benchmarks/run.py --suite bert [--quick] [--models bert-base] [--dtype fp16] [--shapes 32x128,16x512]
                             [--fills 1.0,0.6] [--providers hf-eager,bk-model] [--budget-s S]
    python benchmarks/bench_bert.py [same arguments]

Providers (each a Hugging Face `BertModel` with the same weights, or built from it):
- hf-eager: attn_implementation="eager" (the baseline of speed-ups and of the correctness rule)
- hf-sdpa: attn_implementation="sdpa" (the transformers default)
- compile, compile-max-autotune: torch.compile(hf-sdpa model, dynamic=False[, mode="max-autotune"]);
  one compile per shape (its time is recorded); max-autotune takes minutes: the time budget skips it
  when it cannot fit, and --skip-providers compile-max-autotune leaves it out
- optimize-triton, optimize-cuda: bertkern.optimize(hf-eager model, backend=...)
- optimize-sdpa: bertkern.optimize(hf-sdpa model) (fused LayerNorm / GELU, SDPA attention kept)
- bk-model: bertkern.models.BertModel.from_hf(...) with every fused-path flag its config has
  (fused_*, padding_free), default backend
- bk-model+graphs: bk-model without padding_free (not graph-capturable), replayed from a CUDA graph
  per shape through bertkern.cuda_graphs.CUDAGraphRunner

Correctness before timing, per cell and provider: see benchmarks/model_suite.py (2x-of-eager rule
against float64 over real tokens; WRONG providers are not timed and make the run exit 1).
Most important cells first (BERT-base fp16 32x128, 16x512 at 60% fill, 1x128); a time budget cuts
the tail, and what was not run is listed. Without a CUDA GPU: a correctness check of every provider
that can run on the CPU on a tiny config and on MiniLM, no timings.
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

SUITE = "bert"
MODELS = ("bert-base", "minilm", "bert-large")
BATCHES = (32, 1, 8, 128)  # run order within a (model, dtype): a time budget cuts from the end
SEQS = (128, 512, 384)
FILLS = (1.0, 0.6)
DTYPES = (torch.float16, torch.bfloat16)
# (model, dtype) groups in run order after the key cells
GROUP_ORDER = (("bert-base", torch.float16), ("minilm", torch.float16), ("bert-base", torch.bfloat16),
               ("bert-large", torch.float16), ("minilm", torch.bfloat16), ("bert-large", torch.bfloat16))
MIN_CELL_S = 5.0  # below this much budget no new cell starts
TIMING_PRIOR_S = 3.0  # check + timing of one provider on one cell, before anything is measured


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    dtype: torch.dtype
    batch: int
    seq: int
    fill: float = 1.0
    key: bool = False

    @property
    def label(self) -> str:
        return f"{self.model} {ms.SHORT_DTYPE[self.dtype]} {self.batch}x{self.seq} " + (
            "full" if self.fill >= 1.0 else f"{round(100 * self.fill)}% fill")

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": harness.dtype_name(self.dtype), "batch": self.batch, "seq": self.seq,
                "fill": self.fill, "key": self.key}

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["model"], getattr(torch, d["dtype"]), d["batch"], d["seq"], d["fill"], d.get("key", False))


KEY_CELLS = (Cell("bert-base", torch.float16, 32, 128, 1.0, True), Cell("bert-base", torch.float16, 16, 512, 0.6, True),
             Cell("bert-base", torch.float16, 1, 128, 1.0, True))
QUICK_EXTRA = (Cell("minilm", torch.float16, 32, 128, 1.0), Cell("bert-large", torch.float16, 32, 128, 1.0))


def cells(quick: bool = False, models=None, dtypes=None, shapes=None, fills=None) -> list[Cell]:
    """The cells in run order. With `shapes` ([(batch, seq)]): every (model, dtype, shape, fill)
    asked for (models default: bert-base; dtypes: fp16; fills: both). Else the key cells first, then
    (quick) MiniLM and BERT-large at 32x128, or (full) the whole grid group by group."""
    fills = tuple(fills) if fills else FILLS
    if shapes:
        keys = {(c.model, c.dtype, c.batch, c.seq, c.fill) for c in KEY_CELLS}
        out = [Cell(m, dt, s[0], s[1], f, (m, dt, s[0], s[1], f) in keys)
               for m in (models or ("bert-base",)) for dt in (dtypes or (torch.float16,))
               for s in shapes for f in fills]
        return [c for c in out if c.key] + [c for c in out if not c.key]
    keep = lambda c: ((models is None or c.model in models) and (dtypes is None or c.dtype in dtypes)  # noqa: E731
                      and (c.fill in fills))
    out = [c for c in KEY_CELLS if keep(c)]
    if quick:
        return out + [c for c in QUICK_EXTRA if keep(c)]
    seen = {(c.model, c.dtype, c.batch, c.seq, c.fill) for c in out}
    for model, dtype in GROUP_ORDER:
        for fill in fills:
            for seq in SEQS:
                for batch in BATCHES:
                    c = Cell(model, dtype, batch, seq, fill)
                    if keep(c) and (model, dtype, batch, seq, fill) not in seen:
                        out.append(c)
    return out


def forward_flops(config, batch: int, seq: int) -> int:
    """Matmul FLOPs of one forward over the padded batch: per layer QKV + output projections
    (8 T h^2), the feed-forward (4 T h i) and attention scores + context (4 B S^2 h), T = B x S."""
    h, i, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    t = batch * seq
    return n_layers * (8 * t * h * h + 4 * t * h * i + 4 * batch * seq * seq * h)


# ----------------------------------------------------------------------------- providers
class Group:
    """One (model, dtype) on one device: the HF eager model in that dtype, its float64 twin (the
    reference), and whatever the providers build from them (cache), freed together."""

    def __init__(self, model: str, dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device
        base, self.weights = ms.build_hf(model, device=device)
        self.ref = copy.deepcopy(base).double().eval()
        self.base = base.to(dtype).eval()
        self.config = self.base.config
        self.cache: dict[Any, Any] = {}
        self.notes: dict[str, str] = {}

    def get(self, key, make: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def sdpa(self):
        return self.get("sdpa", lambda: ms.with_attention(self.base, "sdpa").eval())

    def close(self) -> None:
        self.cache.clear()
        self.base = self.ref = None
        if self.device.type == "cuda":
            import torch._dynamo

            torch._dynamo.reset()
        ms.free_memory(self.device)


@dataclasses.dataclass
class Provider:
    name: str
    describe: str
    # (group, cell, ids, mask) -> fn(ids, mask) -> last hidden state [B, S, H]; raises Skip if it cannot run here
    make: Callable[..., Callable]
    needs_cuda: bool = False
    setup_prior_s: float = 5.0  # the first call of the provider in a group (a compile, a capture)


def _hf_call(model):
    return lambda i, m: model(input_ids=i, attention_mask=m).last_hidden_state


def _hf_eager(g, cell, ids, mask):
    return _hf_call(g.base)


def _hf_sdpa(g, cell, ids, mask):
    return _hf_call(g.sdpa())


def _compile(mode: str | None):
    def make(g, cell, ids, mask):
        ms.raise_recompile_limit()
        # A model of its own per mode: max-autotune's CUDA graphs must not share the one plain compile runs.
        compiled = g.get(("compile", mode), lambda: torch.compile(ms.with_attention(g.base, "sdpa").eval(), mode=mode,
                                                                  dynamic=False))
        return _hf_call(compiled)

    return make


def _available(backend: str | None, device: torch.device) -> None:
    from bertkern import backend as _backend

    why = _backend.unavailable_reason(backend, device) if backend not in (None, "auto") else None
    if why:
        raise harness.Skip(why)


def _optimize(backend: str | None, attn: str = "eager"):
    def make(g, cell, ids, mask):
        _available(backend, g.device)

        def build():
            src = g.base if attn == "eager" else g.sdpa()
            model, counts = ms.optimize_model(copy.deepcopy(src), backend)
            g.notes[name] = "replaced " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            return model.eval()

        name = "optimize-" + (backend or attn)
        return _hf_call(g.get(("optimize", backend, attn), build))

    return make


def _bk_model(g, graph_safe: bool = False):
    """bertkern.models.BertModel with g.base's weights and every fused flag on; graph_safe: without
    padding_free (its unpadding has data-dependent shapes, which a CUDA graph cannot hold)."""
    name = "bk-model+graphs" if graph_safe else "bk-model"

    def build():
        from bertkern.models import BertModel

        flags = ms.bertkern_flags()
        if graph_safe:
            flags.pop("padding_free", None)
        g.notes[name] = "flags " + ", ".join(flags) if flags else "no fused flags in bertkern.models.BertConfig"
        return BertModel.from_hf(g.base, **flags).to(device=g.device, dtype=g.dtype).eval()

    return g.get(name, build)


def _bk(backend: str | None):
    def make(g, cell, ids, mask):
        _available(backend, g.device)
        model = _bk_model(g)

        def fn(i, m):
            with ms.backend_env(backend):
                return ms.first_output(model(i, attention_mask=m))

        return fn

    return make


def _bk_graphs(g, cell, ids, mask):
    model = _bk_model(g, graph_safe=True)
    g.cache.pop("graph", None)  # one captured shape at a time
    ms.free_memory(g.device)
    runner, source = ms.cuda_graph_runner(model, ids, mask)
    g.cache["graph"] = runner
    g.notes["bk-model+graphs"] = g.notes["bk-model+graphs"].split("; ")[0] + f"; {source}"
    return runner


def gpu_providers() -> list[Provider]:
    """In run order within a cell: the compiles last, so that a tight budget skips them, not bertkern's."""
    return [
        Provider("hf-eager", "Hugging Face BertModel, attn_implementation=\"eager\" (baseline)", _hf_eager),
        Provider("hf-sdpa", "Hugging Face BertModel, attn_implementation=\"sdpa\"", _hf_sdpa),
        Provider("optimize-triton", "bertkern.optimize(hf-eager, backend=\"triton\")", _optimize("triton")),
        Provider("optimize-cuda", "bertkern.optimize(hf-eager, backend=\"cuda\")", _optimize("cuda")),
        Provider("optimize-sdpa", "bertkern.optimize(hf-sdpa) (auto backend; SDPA attention kept)",
                 _optimize(None, "sdpa")),
        Provider("bk-model", "bertkern.models.BertModel, every fused flag on, auto backend", _bk(None)),
        Provider("bk-model+graphs", "bk-model (less padding_free) replayed from a CUDA graph per shape "
                 "(bertkern.cuda_graphs.CUDAGraphRunner)", _bk_graphs,
                 needs_cuda=True, setup_prior_s=10.0),
        Provider("compile", "torch.compile(hf-sdpa, dynamic=False), one compile per shape", _compile(None),
                 needs_cuda=True, setup_prior_s=90.0),
        Provider("compile-max-autotune", "torch.compile(hf-sdpa, mode=\"max-autotune\", dynamic=False)",
                 _compile("max-autotune"), needs_cuda=True, setup_prior_s=400.0),
    ]


def cpu_providers() -> list[Provider]:
    """What the CPU correctness check runs: each bertkern path through each backend that can run on
    CPU tensors (Triton under TRITON_INTERPRET=1); the CUDA-only providers are listed as skipped."""
    out = [p for p in gpu_providers() if p.name in ("hf-eager", "hf-sdpa")]
    out += [Provider(f"optimize-{b}", f"bertkern.optimize(hf-eager, backend=\"{b}\")", _optimize(b))
            for b in ("torch", "triton", "cuda")]
    out += [Provider("optimize-sdpa", "bertkern.optimize(hf-sdpa)", _optimize(None, "sdpa"))]
    out += [Provider(f"bk-model[{b}]", f"bertkern.models.BertModel, fused flags on, BERTKERN_BACKEND={b}", _bk(b))
            for b in ("torch", "triton")]
    out += [p for p in gpu_providers() if p.needs_cuda]
    return out


PROVIDER_NAMES = tuple(dict.fromkeys([p.name for p in gpu_providers()] + [p.name for p in cpu_providers()]))


def select(providers: list[Provider], only=None, skip=None) -> list[Provider]:
    return [p for p in providers if (only is None or p.name in only) and not (skip and p.name in skip)]


# ----------------------------------------------------------------------------- one cell
def run_cell(cell: Cell, g: Group, providers: list[Provider], budget: ms.Budget, timer: Callable | None,
             log=print, progress: Callable[[dict], None] | None = None) -> dict:
    """Check every provider on one cell against float64 (and eager), then time the ones that are
    right with timer(step) -> (median, p20, p80) ms (None: check only). A JSON-ready dict, also
    handed to `progress` after each provider."""
    device = g.device
    cfg = g.config
    seed = zlib.crc32(cell.label.encode())
    ids, mask, lengths = ms.make_batch(cell.batch, min(cell.seq, cfg.max_position_embeddings), cell.fill,
                                       cfg.vocab_size, cfg.pad_token_id or 0, device, seed)
    rows = ms.check_rows(lengths)
    with torch.no_grad():
        ref = g.ref(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
        eager = g.base(input_ids=ids, attention_mask=mask).last_hidden_state
    flops = forward_flops(cfg, cell.batch, ids.shape[1])
    out = {"cell": cell.to_dict(), "real_tokens": sum(lengths), "flops": flops, "ref_rows": rows, "providers": {}}
    for p in providers:
        t_start = time.monotonic()
        if p.needs_cuda and device.type != "cuda":
            out["providers"][p.name] = {"status": "skipped", "reason": "needs a CUDA GPU"}
            continue
        setup_key = (p.name, cell.model, harness.dtype_name(cell.dtype))
        cost = budget.estimate(setup_key, p.setup_prior_s) + budget.estimate(("timing", cell.label), TIMING_PRIOR_S)
        if not budget.allows(cost):
            out["providers"][p.name] = {"status": "skipped", "reason": budget.why_not(cost), "budget": True}
            log(f"  {p.name:<21} skipped: {budget.why_not(cost)}")
            continue
        try:
            t0 = time.monotonic()  # first call = building (a capture) + the first call (a compile)
            with torch.no_grad():  # a CUDA graph capture inside must not record autograd
                fn = p.make(g, cell, ids, mask)
            with torch.no_grad():
                got = fn(ids, mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_call = time.monotonic() - t0
            budget.learn(setup_key, first_call)
            entry = ms.judge_hidden(got, eager, ref, mask, rows, cell.dtype)
            del got
        except harness.Skip as s:
            out["providers"][p.name] = {"status": "skipped", "reason": str(s)}
            log(f"  {p.name:<21} skipped: {s}")
            continue
        except Exception as e:
            out["providers"][p.name] = {"status": "error", "reason": harness._short_exc(e)}
            log(f"  {p.name:<21} ERROR: {harness._short_exc(e)}")
            ms.free_memory(device)
            continue
        entry["first_call_s"] = round(first_call, 3)
        if entry["status"] == "ok" and timer is not None:
            def step(fn=fn):
                with torch.no_grad():
                    return fn(ids, mask)

            t0 = time.monotonic()
            try:
                ms_, lo, hi = timer(step)
                entry.update(ms=ms_, ms_p20=lo, ms_p80=hi, seq_per_s=cell.batch / ms_ * 1e3,
                             tokens_per_s=sum(lengths) / ms_ * 1e3, tflops=flops / ms_ / 1e9)
            except Exception as e:
                entry = {"status": "error", "reason": "timing: " + harness._short_exc(e),
                         **{k: v for k, v in entry.items() if k not in ("status", "reason")}}
            budget.learn(("timing", cell.label), max(budget.estimate(("timing", cell.label), 0.0),
                                                     time.monotonic() - t0 + 0.5))
        out["providers"][p.name] = entry
        log("  " + provider_line(p.name, entry, time.monotonic() - t_start))
        if progress is not None:
            progress(out)
    base_ms = out["providers"].get("hf-eager", {}).get("ms")
    for entry in out["providers"].values():
        if base_ms and entry.get("ms"):
            entry["speedup"] = base_ms / entry["ms"]
    return out


def provider_line(name: str, e: dict, seconds: float) -> str:
    if e["status"] == "skipped":
        return f"{name:<21} skipped: {e['reason']}"
    if e["status"] == "error":
        return f"{name:<21} ERROR: {e['reason']}"
    check = f"err {ms.fmt(e.get('err'))} <= {ms.fmt(e.get('tol'))}, cos {ms.fmt(e.get('cosine_min'), '.6f')}"
    if e["status"] == "WRONG":
        return f"{name:<21} WRONG ({e['reason']}; cos {ms.fmt(e.get('cosine_min'), '.6f')}): not timed"
    if "ms" not in e:
        return f"{name:<21} PASS  ({check})"
    sp = f" {e['speedup']:.2f}x" if e.get("speedup") else ""
    return (f"{name:<21} {e['ms']:9.3f} ms {e['seq_per_s']:10.1f} seq/s {e['tflops']:7.1f} TFLOP/s{sp}  "
            f"({check}; first call {e['first_call_s']:.1f} s; {seconds:.0f} s)")


# ----------------------------------------------------------------------------- the suite on a GPU
def run(device: torch.device, cell_list: list[Cell], providers: list[Provider], *, budget: ms.Budget,
        timer: Callable | None = ms.time_cuda, log=print, env: dict | None = None, settings: dict | None = None,
        partial_json: Path | None = None) -> dict:
    """Every cell in order (a group's models are built once, freed when the next group starts);
    cells past the budget are listed as not run. The document is saved to `partial_json` after each
    cell, so a run killed by its time limit keeps what it measured."""
    doc = {"schema": harness.SCHEMA, "suite": SUITE, "env": env or harness.environment(device),
           "settings": {"timer": "CUDA events per call, calls back to back, median; L2 not flushed",
                        **(settings or {})},
           "providers": [p.name for p in providers], "provider_describe": {p.name: p.describe for p in providers},
           "models": {}, "notes": {}, "cells": []}
    group: Group | None = None
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
            if group is None or (group.model, group.dtype) != (cell.model, cell.dtype):
                if group is not None:
                    group.close()
                group = None
                group = Group(cell.model, cell.dtype, device)
                doc["models"][cell.model] = {"weights": group.weights, **{
                    k: getattr(group.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                          "intermediate_size", "vocab_size")}}
            r = run_cell(cell, group, providers, budget, timer, log, progress=None if partial_json is None else (
                lambda partial: harness.save_json({**doc, "cells": doc["cells"] + [partial]}, partial_json)))
            for k, v in group.notes.items():
                doc["notes"].setdefault(f"{cell.model} {ms.SHORT_DTYPE[cell.dtype]}", {})[k] = v
        except Exception as e:  # building the models or the reference failed (out of memory, say)
            r = {"cell": cell.to_dict(), "not_run": f"{harness.HARNESS_ERROR}: {harness._short_exc(e)}"}
            log(f"  {r['not_run']}")
            if group is not None:
                group.close()
            group = None
        doc["cells"].append(r)
        if partial_json is not None:
            harness.save_json(doc, partial_json)
    if group is not None:
        group.close()
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
        base = {"suite": SUITE, "model": c["model"], "dtype": c["dtype"], "batch": c["batch"], "seq": c["seq"],
                "fill": c["fill"], "key_cell": c.get("key", False)}
        if "not_run" in r:
            rows.append({**base, "provider": "", "status": "not run", "reason": r["not_run"], **env})
            continue
        for p, e in r["providers"].items():
            rows.append({**base, "provider": p, "status": e["status"], "ms": e.get("ms"), "ms_p20": e.get("ms_p20"),
                         "ms_p80": e.get("ms_p80"), "seq_per_s": e.get("seq_per_s"), "tokens_per_s": e.get("tokens_per_s"),
                         "tflops": e.get("tflops"), "speedup_vs_hf_eager": e.get("speedup"), "real_tokens": r["real_tokens"],
                         "flops": r["flops"], "err_vs_fp64": e.get("err"), "eager_err_vs_fp64": e.get("eager_err"),
                         "tol": e.get("tol"), "max_abs_vs_eager": e.get("vs_eager"), "cosine_min": e.get("cosine_min"),
                         "first_call_s": e.get("first_call_s"), "reason": e.get("reason", ""), **env})
    return rows


def _fill(f: float) -> str:
    return "full" if f >= 1.0 else f"{round(100 * f)}%"


def render_markdown(doc: dict) -> str:
    env, providers = doc["env"], doc["providers"]
    lines = [f"# BERT inference: {env.get('gpu') or 'no GPU'}", "", f"{harness.env_line(env)}.", "",
             "Each cell: median latency · speed-up over hf-eager (sequences/s, tokens/s, TFLOP/s and the errors "
             "are in bert.csv / bert.json). WRONG = failed the correctness gate (not timed); error = raised. "
             "Timer: " + doc["settings"].get("timer", "") + ".", "", "Models:"]
    lines += [f"- {m}: {v['weights']}; hidden {v['hidden_size']}, {v['num_hidden_layers']} layers, "
              f"{v['num_attention_heads']} heads, intermediate {v['intermediate_size']}" for m, v in doc["models"].items()]
    lines += ["", "Providers:"] + [f"- {p}: {doc['provider_describe'].get(p, '')}" for p in providers]
    for grp, notes in doc.get("notes", {}).items():
        lines += [f"- {grp}: " + "; ".join(f"{k}: {v}" for k, v in notes.items())]
    groups: dict[tuple, list] = {}
    for r in doc["cells"]:
        groups.setdefault((r["cell"]["model"], r["cell"]["dtype"]), []).append(r)
    for (model, dtype), rs in groups.items():
        lines += ["", f"## {model}, {dtype}", "", "| batch x seq | fill | " + " | ".join(providers) + " |",
                  "|---:|---:|" + "---|" * len(providers)]
        for r in rs:
            c = r["cell"]
            head = f"| {c['batch']}x{c['seq']}{' (key)' if c.get('key') else ''} | {_fill(c['fill'])} | "
            if "not_run" in r:
                lines.append(head + f"not run ({r['not_run']})" + " |" * len(providers))
            else:
                lines.append(head + " | ".join(ms.speedup_cell(r["providers"].get(p)) for p in providers) + " |")
        ran = [r for r in rs if "not_run" not in r]
        if ran:
            lines += ["", "Sequences/s:", "", "| batch x seq | fill | " + " | ".join(providers) + " |",
                      "|---:|---:|" + "---|" * len(providers)]
            for r in ran:
                c = r["cell"]
                cells_ = [f"{r['providers'][p]['seq_per_s']:.1f}" if r["providers"].get(p, {}).get("seq_per_s") else "-"
                          for p in providers]
                lines.append(f"| {c['batch']}x{c['seq']} | {_fill(c['fill'])} | " + " | ".join(cells_) + " |")
    lines += ["", "## Correctness (every cell run: error vs float64 / tolerance, worst; cosine vs eager, lowest)", "",
              "| provider | checked | PASS | WRONG/error | worst err/tol | lowest cosine |", "|---|---:|---:|---:|---:|---:|"]
    for p in providers:
        es = [r["providers"][p] for r in doc["cells"] if p in r.get("providers", {})]
        checked = [e for e in es if e["status"] != "skipped"]
        if not checked:
            continue
        ratios = [e["err"] / e["tol"] for e in checked if e.get("err") is not None and e.get("tol")]
        coss = [e["cosine_min"] for e in checked if e.get("cosine_min") is not None]
        lines.append(f"| {p} | {len(checked)} | {sum(e['status'] == 'ok' for e in checked)} | "
                     f"{sum(e['status'] in ('WRONG', 'error') for e in checked)} | "
                     f"{ms.fmt(max(ratios) if ratios else None, '.2f')} | {ms.fmt(min(coss) if coss else None, '.6f')} |")
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


def _geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def render_latest_section(docs: list[dict]) -> list[str]:
    """LATEST.md lines: per GPU, the key cells with every provider, then the geometric-mean speed-up
    over hf-eager of every (model, dtype, fill) run."""
    lines = []
    for doc in docs:
        providers, env = doc["providers"], doc["env"]
        lines += ["", f"## BERT inference, {env.get('gpu')}", "", f"- {harness.env_line(env)}",
                  "- cell: median latency · speed-up over hf-eager; full tables in "
                  f"`benchmarks/results/{env.get('gpu_slug')}/bert.md`", "",
                  "| model | dtype | batch x seq | fill | " + " | ".join(providers) + " |",
                  "|---|---|---:|---:|" + "---|" * len(providers)]
        ran = [r for r in doc["cells"] if "not_run" not in r]
        for r in [r for r in ran if r["cell"].get("key")] or ran[:3]:
            c = r["cell"]
            lines.append(f"| {c['model']} | {c['dtype']} | {c['batch']}x{c['seq']} | {_fill(c['fill'])} | "
                         + " | ".join(ms.speedup_cell(r["providers"].get(p)) for p in providers) + " |")
        groups: dict[tuple, list] = {}
        for r in ran:
            groups.setdefault((r["cell"]["model"], r["cell"]["dtype"], _fill(r["cell"]["fill"])), []).append(r)
        if groups:
            lines += ["", "Geometric-mean speed-up over hf-eager, all cells run (cells):", "",
                      "| model | dtype | fill | cells | " + " | ".join(providers) + " |",
                      "|---|---|---:|---:|" + "---|" * len(providers)]
            for (model, dtype, fill), rs in groups.items():
                cells_ = []
                for p in providers:
                    es = [r["providers"].get(p, {}) for r in rs]
                    if any(e.get("status") in ("WRONG", "error") for e in es):
                        cells_.append("**WRONG/error**")
                    else:
                        g = _geomean([e.get("speedup") for e in es])
                        cells_.append("-" if g is None else f"{g:.2f}× ({sum(bool(e.get('speedup')) for e in es)})")
                lines.append(f"| {model} | {dtype} | {fill} | {len(rs)} | " + " | ".join(cells_) + " |")
        missing = not_run(doc)
        if missing:
            lines += ["", f"Not run: {len(missing)} (listed in bert.md)."]
    return lines


def plot(doc: dict, folder: Path) -> list[Path]:
    """bert.png: TFLOP/s against batch, a line per provider, a panel per (model, dtype, seq, fill);
    bert_speedup.png: speed-up over hf-eager on the key cells. Only where matplotlib is installed."""
    plt = ms.matplotlib_pyplot()
    if plt is None:
        return []
    paths = []
    panels: dict[tuple, list] = {}
    for r in doc["cells"]:
        if "not_run" not in r:
            c = r["cell"]
            panels.setdefault((c["model"], c["dtype"], c["seq"], _fill(c["fill"])), []).append(r)
    if panels:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
        for ax, (key, rs) in zip(axes.flat, panels.items()):
            rs.sort(key=lambda r: r["cell"]["batch"])
            for p in doc["providers"]:
                pts = [(r["cell"]["batch"], r["providers"][p]["tflops"]) for r in rs
                       if r["providers"].get(p, {}).get("tflops")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{key[0]} {key[1]} seq {key[2]} {key[3]}", fontsize=9)
            ax.set_xlabel("batch")
            ax.set_ylabel("model TFLOP/s")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"BERT inference on {doc['env'].get('gpu')}")
        fig.tight_layout()
        paths.append(folder / "bert.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    key = [r for r in doc["cells"] if "not_run" not in r and r["cell"].get("key")]
    if key:
        providers = [p for p in doc["providers"] if any(r["providers"].get(p, {}).get("speedup") for r in key)]
        fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(key) * max(1, len(providers)) / 4, 4))
        width = 0.8 / max(1, len(providers))
        for j, p in enumerate(providers):
            ax.bar([i + j * width for i in range(len(key))],
                   [r["providers"].get(p, {}).get("speedup") or 0 for r in key], width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(key))])
        ax.set_xticklabels([Cell.from_dict(r["cell"]).label for r in key], fontsize=8)
        ax.axhline(1.0, c="gray", lw=1, ls="--")
        ax.set_ylabel("speed-up over hf-eager")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(folder / "bert_speedup.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_results(doc: dict, out_root: Path) -> list[Path]:
    folder = Path(out_root) / doc["env"]["gpu_slug"]
    paths = [folder / "bert.json", folder / "bert.md", folder / "bert.csv"]
    harness.save_json(doc, paths[0])
    paths[1].write_text(render_markdown(doc))
    ms.write_csv(csv_rows(doc), paths[2])
    try:  # a plotting problem must not cost the numbers
        paths += plot(doc, folder)
    except Exception as e:
        print(f"warning: no bert plots: {harness._short_exc(e)}", file=sys.stderr)
    return paths


# ----------------------------------------------------------------------------- honest CPU mode
CPU_MODELS = {"tiny": (3, 16), "minilm": (2, 24)}  # model -> (batch, seq) of the check


def cpu_check(models=("tiny", "minilm"), providers: list[Provider] | None = None, log=print) -> dict:
    """Every provider that can run on the CPU, on a padded float32 batch of each model, by the rule
    of model_suite (no timings). A JSON-ready dict with "cells" like a GPU document's."""
    device = torch.device("cpu")
    providers = cpu_providers() if providers is None else providers
    doc = {"schema": harness.SCHEMA, "suite": SUITE, "mode": "cpu-correctness", "providers": [p.name for p in providers],
           "models": {}, "notes": {}, "cells": []}
    for model in models:
        batch, seq = CPU_MODELS.get(model, (2, 16))
        cell = Cell(model, torch.float32, batch, seq, 0.6)
        try:
            g = Group(model, torch.float32, device)
            doc["models"][model] = {"weights": g.weights}
            r = run_cell(cell, g, providers, ms.Budget(), None, log=lambda s: None)
            doc["notes"][model] = dict(g.notes)
            g.close()
        except Exception as e:
            r = {"cell": cell.to_dict(), "not_run": f"{harness.HARNESS_ERROR}: {harness._short_exc(e)}"}
        doc["cells"].append(r)
    return doc


def render_cpu_report(doc: dict) -> str:
    lines = []
    for r in doc["cells"]:
        c = r["cell"]
        title = (f"== bert: {c['model']} ({doc['models'].get(c['model'], {}).get('weights', '?')}), float32, "
                 f"batch {c['batch']} x seq {c['seq']} padded, each provider vs HF eager and float64 ==")
        lines.append(title)
        if "not_run" in r:
            lines += [f"FAIL: {r['not_run']}", ""]
            continue
        lines.append(f"{'provider':<22} {'err vs f64':>10} {'eager err':>10} {'tol':>9} {'|out-eager|':>11} "
                     f"{'cosine':>9}  result")
        for p, e in r["providers"].items():
            if e["status"] == "skipped":
                lines.append(f"{p:<22} skipped: {e['reason']}")
                continue
            status = {"ok": "PASS", "WRONG": "FAIL", "error": "FAIL"}[e["status"]]
            lines.append(f"{p:<22} {ms.fmt(e.get('err'), '.2e'):>10} {ms.fmt(e.get('eager_err'), '.2e'):>10} "
                         f"{ms.fmt(e.get('tol'), '.2e'):>9} {ms.fmt(e.get('vs_eager'), '.2e'):>11} "
                         f"{ms.fmt(e.get('cosine_min'), '.6f'):>9}  {status}"
                         + (f": {e['reason']}" if e["status"] != "ok" else ""))
        notes = doc["notes"].get(c["model"], {})
        lines += [f"  {k}: {v}" for k, v in notes.items()] + [""]
    return "\n".join(lines)


cpu_counts = ms.cpu_counts


if __name__ == "__main__":
    from benchmarks import run as _run

    sys.exit(_run.main(["--suite", SUITE, *sys.argv[1:]]))
