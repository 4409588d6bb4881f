"""What every suite shares: arguments, the environment, the timers, a time budget, and the one writer
of results. A suite's results are one JSON document: {"suite", "env", "settings", "providers", "baseline",
"table_keys", ..., "results": [{"case", "providers": {name: {"status", "errors", "ms", ...}}} or {"case", "not_run"}]}.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Without a GPU the Triton backend runs on CPU tensors through the interpreter; the variable must be
# set before triton is imported (torch._dynamo imports it: `bertkern bench` starts afresh when bertkern has).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS_DIR = ROOT / "benchmarks" / "results"
SCHEMA = 2
HARNESS_ERROR = "harness error"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
ENV_COLUMNS = ("gpu", "cpu", "driver", "torch", "triton", "cuda", "commit", "dirty", "date")


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


def short_exc(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"[:500]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def parse_list(items) -> list[str] | None:
    """['a,b', 'c'] -> ['a', 'b', 'c']; None / empty -> None."""
    out = [x.strip() for item in items or [] for x in str(item).split(",") if x.strip()]
    return out or None


def parse_dtypes(names) -> list[torch.dtype] | None:
    out = []
    for name in parse_list(names) or []:
        dtype = DTYPES.get(name.lower(), getattr(torch, name.lower(), None))  # torch's names too: half, bfloat16
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"unknown dtype {name!r}; use one of fp16, bf16, fp32, fp64")
        out.append(dtype)
    return out or None


def parse_shapes(items) -> list[tuple[int, ...]] | None:
    """['32x128,16x512'] -> [(32, 128), (16, 512)]; ValueError on anything else."""
    out = []
    for s in parse_list(items) or []:
        try:
            dims = tuple(int(d) for d in s.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad shape {s!r}: write sizes joined by 'x', e.g. 32x128") from None
        if any(d < 1 for d in dims):
            raise ValueError(f"bad shape {s!r}: sizes must be positive")
        out.append(dims)
    return out or None


def fill_lengths(batch: int, seq: int, fill: float, seed: int = 0) -> list[int]:
    """Lengths with mean ~fill x seq: all `seq` at fill 1, else spread over [(2 fill - 1) seq, seq], shuffled."""
    if fill >= 1.0:
        return [seq] * batch
    lo = max(1, round((2 * fill - 1) * seq))
    lengths = [max(1, min(seq, round(lo + (seq - lo) * (i + 0.5) / batch))) for i in range(batch)]
    return [lengths[i] for i in torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).tolist()]


def verdict(errors: dict, reasons: list[str | None], **extra) -> dict:
    """A provider's entry from the correctness gate: ok, or WRONG with its reasons."""
    reason = "; ".join(r for r in reasons if r)
    return {"status": "WRONG" if reason else "ok", "errors": errors, **extra} | ({"reason": reason} if reason else {})


# ----------------------------------------------------------------------------- time budget
class Budget:
    """A wall-clock deadline plus learned cost estimates (seconds) for what is left to run."""

    def __init__(self, seconds: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.deadline = None if seconds is None else clock() + seconds
        self.learned: dict[Any, float] = {}

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def allows(self, cost_s: float) -> bool:
        return self.left() >= cost_s

    def estimate(self, key, prior: float) -> float:
        return self.learned.get(key, prior)

    def learn(self, key, seconds: float) -> None:
        self.learned[key] = seconds

    def why_not(self, cost_s: float) -> str:
        return f"time budget: needs ~{cost_s:.0f} s, {max(self.left(), 0):.0f} s left"


# ----------------------------------------------------------------------------- timers
def time_op(step: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) ms of one op call: triton.testing.do_bench (CUDA events, L2 flushed per rep)."""
    from triton.testing import do_bench

    return tuple(do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median"))


def time_graph(make_step: Callable[[], Callable[[], Any]], rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) ms of one call replayed from a CUDA graph: the kernels' time without the host's.
    triton.testing.do_bench_cudagraph's method, but 3-10 replays (not 10 x rep_ms), and make_step() runs on
    the capture stream: autograd runs a backward on its forward's stream, and a capture admits no other."""
    stream = torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def ms(fn, n: int = 1) -> float:
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n

    try:
        stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the current stream
        with torch.cuda.stream(stream):
            step = make_step()
            step()  # outside the capture: Triton compiles, the allocator caches
            graph, calls = torch.cuda.CUDAGraph(), max(1, int(rep_ms / max(ms(step, 5), 1e-3)))
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(calls):
                    step()
            replays = min(10, max(3, int(rep_ms / max(ms(graph.replay), 1e-3))))  # the first replay uploads it
            times = [ms(graph.replay) / calls for _ in range(replays)]
    except Exception:
        from bertkern.cuda_graphs import end_rng_capture

        end_rng_capture()  # else every later torch.randn on the GPU fails
        raise
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def time_interleaved(steps: dict[str, Callable[[], Any]], rounds: int = 10, block_s: float = 0.1, min_rounds: int = 5,
                     sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """The providers of one cell in alternating rounds (a block of calls each, the order reversed every
    other round), so that a slow period of the host hits them alike (timed one after another, the same H100
    cell read 8.5 ms in one run, 5.3 in the next). Each gets ~rounds x block_s s; calls longer than a block
    get fewer rounds (>= min_rounds). name -> {"ms" (median round), "ms_p20", "ms_p80", "rounds",
    "calls_per_block"}, or the exception its step raised."""
    out: dict[str, Any] = {}
    per_call = {}
    for name, step in steps.items():  # ~block_s / 2 of calls (a warm-up too) to size the blocks
        try:
            n, t0 = 0, clock()
            while n < 1 or clock() - t0 < block_s / 2:
                step()
                sync()
                n += 1
            per_call[name] = max((clock() - t0) / n, 1e-9)
        except Exception as e:
            out[name] = e
    if not per_call:
        return out
    total_s = rounds * block_s
    n_rounds = min(rounds, max(min_rounds, int(total_s / max(per_call.values()))))
    number = {name: max(1, round(total_s / n_rounds / t)) for name, t in per_call.items()}
    times: dict[str, list[float]] = {name: [] for name in number}
    for r in range(n_rounds):
        order = [name for name in number if name not in out]
        for name in order if r % 2 == 0 else order[::-1]:
            try:
                sync()
                t0 = clock()
                for _ in range(number[name]):
                    steps[name]()
                sync()
                times[name].append((clock() - t0) / number[name] * 1e3)
            except Exception as e:
                out[name] = e
    for name, ts in times.items():
        if name not in out:
            q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
            out[name] = {"ms": statistics.median(ts), "ms_p20": q[1], "ms_p80": q[7], "rounds": n_rounds,
                         "calls_per_block": number[name]}
    return out


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- environment
def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> tuple[str, bool | None]:
    """(short commit, dirty) ignoring benchmarks/results/; $BERTKERN_COMMIT / $BERTKERN_DIRTY win (no .git)."""
    if os.environ.get("BERTKERN_COMMIT"):
        dirty = os.environ.get("BERTKERN_DIRTY")
        return os.environ["BERTKERN_COMMIT"], (None if dirty is None else dirty == "1")
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"])
    return commit or "unknown", (None if status is None or commit is None else bool(status))


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' -> 'rtx4090' ($BERTKERN_GPU_SLUG wins)."""
    if os.environ.get("BERTKERN_GPU_SLUG"):
        return os.environ["BERTKERN_GPU_SLUG"]
    brands = {"nvidia", "geforce", "tesla", "quadro"}
    tokens = [t for t in re.split(r"[\s\-_/]+", name.lower()) if t and t not in brands]
    if tokens[:1] in (["rtx"], ["gtx"]) and len(tokens) > 1:
        tokens = [tokens[0] + tokens[1]]
    return re.sub(r"[^a-z0-9]", "", tokens[0]) if tokens else "gpu"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions, device, commit and date; nothing that names the host."""
    commit, dirty = git_state()
    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit, "dirty": dirty,
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": device.type, "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"unavailable ({type(e).__name__})"
    try:
        from bertkern import backend as _backend

        env["bertkern_C"] = "built" if _backend.cuda_extension_status()[0] else "not built"
    except Exception as e:  # bertkern itself broken: the providers will say more
        env["bertkern_C"] = f"unknown ({type(e).__name__})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_slug=gpu_slug(p.name), capability=f"{p.major}.{p.minor}",
                   sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), l2_bytes=getattr(p, "L2_cache_size", 0) or 50 * 2**20,
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                                "-i", str(device.index or 0)]))
    else:
        env.update(gpu=None, gpu_slug="cpu", triton_interpret=os.environ.get("TRITON_INTERPRET"))
    return env


def env_line(env: dict) -> str:
    dirty = {True: " (dirty)", False: "", None: " (dirty: unknown)"}[env.get("dirty")]
    where = (f"{env['gpu']}, driver {env.get('driver') or '?'}" if env.get("gpu") else
             f"CPU only: {env.get('cpu')}, {env.get('cores')} cores, {env.get('threads')} torch threads")
    return (f"{where}; torch {env['torch']}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
            f"Python {env['python']}; "
            f"bertkern {env['commit']}{dirty}, bertkern._C {env.get('bertkern_C')}; {env['date']}")


def rel_path(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


# ----------------------------------------------------------------------------- the one writer
def finish(doc: dict) -> dict:
    """Speed-ups over the baseline provider, per case (where both were timed)."""
    for r in doc["results"]:
        for suffix in ("", "_graph"):  # called eagerly, replayed from a CUDA graph
            base = r.get("providers", {}).get(doc["baseline"], {}).get("ms" + suffix)
            for e in r.get("providers", {}).values():
                if base and e.get("ms" + suffix):
                    e["speedup" + suffix] = base / e["ms" + suffix]
    return doc


def cell_text(e: dict | None) -> str:
    """A table cell: median ms · the rates measured · speed-up over the baseline; or the status."""
    if e is None:
        return "-"
    if e["status"] != "ok":
        return e["status"] if e["status"] == "skipped" else f"**{e['status']}**"
    if e.get("ms") is None:
        return "PASS (untimed)"
    parts = [f"{e['ms']:.4g} ms"]
    parts += [f"{e['gbs']:.0f} GB/s · {e['pct_copy']:.0f}%"] if e.get("gbs") else []
    parts += [f"{e['tokens_per_s'] / 1e3:.1f}k tok/s"] if e.get("tokens_per_s") and not e.get("gbs") else []
    parts += [f"{e['tflops']:.3g} TFLOP/s"] if e.get("tflops") else []
    parts += [f"{e['peak_mem_gib']:.2f} GiB"] if e.get("peak_mem_gib") is not None else []
    text = " · ".join(parts) + (f" · {e['speedup']:.2f}×" if e.get("speedup") else "")
    if e.get("ms_graph"):  # the same call replayed from a CUDA graph: the kernels' time alone
        text += (f" (graph: {e['ms_graph']:.4g} ms · {e['pct_copy_graph']:.0f}%"
                 + (f" · {e['speedup_graph']:.2f}×" if e.get("speedup_graph") else "") + ")")
    elif e.get("graph_error"):
        text += " (graph: error)"
    return text


def case_label(case: dict, keys=None) -> str:
    return " ".join(f"{k}={case[k]}" for k in keys or case if case.get(k) is not None)


def _groups(doc: dict, ran_only: bool = False) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for r in doc["results"]:
        if not (ran_only and "not_run" in r):
            groups.setdefault(tuple(r["case"].get(k) for k in doc["table_keys"]), []).append(r)
    return groups


def failures(doc: dict) -> list[str]:
    out = [f"{p} {e['status']} on {case_label(r['case'])}: {e.get('reason', '')}"
           for r in doc["results"] for p, e in r.get("providers", {}).items() if e["status"] in ("WRONG", "error")]
    return out + [f"{case_label(r['case'])}: {r['not_run']}" for r in doc["results"]
                  if r.get("not_run", "").startswith(HARNESS_ERROR)]


def not_run(doc: dict) -> list[str]:
    return [f"{case_label(r['case'])}: {r['not_run']}" for r in doc["results"] if "not_run" in r]


def render_markdown(doc: dict) -> str:
    env, providers, keys = doc["env"], doc["providers"], doc["table_keys"]
    where = env.get("gpu") or f"CPU only ({env.get('cpu')})"
    lines = [f"# {doc['title']}: {where}", "", f"{env_line(env)}.", ""]
    if doc.get("copy_bandwidth"):
        cb = doc["copy_bandwidth"]
        lines += [f"Copy bandwidth measured in the same run (the 100% line): **{cb['gbs']:.0f} GB/s** "
                  f"({cb['bytes'] / 1e9:.2f} GB read + written in {cb['ms']:.3f} ms).", ""]
    if doc.get("timing"):
        t = doc["timing"]
        lines += [f"Timing: {t['method']}." + (f" Spread of the rounds, (p80 - p20) / median over every provider "
                                               f"and cell: {t['spread']}." if t.get("spread") else ""), ""]
    lines += [f"Each cell: median time · rates · speed-up over {doc['baseline']}. WRONG = failed the correctness "
              "gate (not timed); error = raised. Settings: " + ", ".join(f"{k} {v}" for k, v in doc["settings"].items())
              + ".", "", "Providers:"] + [f"- {p}: {doc['describe'].get(p, '')}" for p in providers]
    lines += [f"- {k}: {v}" for k, v in doc.get("notes", {}).items()]
    for group, rows in _groups(doc).items():
        row_keys = [k for k in rows[0]["case"] if k not in keys]
        lines += ["", "## " + case_label(dict(zip(keys, group))), "", "| " + " | ".join(row_keys + providers) + " |",
                  "|" + "---:|" * len(row_keys) + "---|" * len(providers)]
        for r in rows:
            cells = ([f"not run ({r['not_run']})"] + [""] * (len(providers) - 1) if "not_run" in r
                     else [cell_text(r["providers"].get(p)) for p in providers])
            lines.append("| " + " | ".join([str(r["case"][k]) for k in row_keys] + cells) + " |")
    lines += ["", "## Correctness gate (worst error / tolerance over every case checked)", "",
              "| provider | checked | PASS | WRONG/error | worst err/tol |", "|---|---:|---:|---:|---:|"]
    for p in providers:
        es = [r["providers"][p] for r in doc["results"] if r.get("providers", {}).get(p, {}).get("status") not in
              (None, "skipped")]
        ratios = [o["err"] / o["tol"] for e in es for o in (e.get("errors") or {}).values()
                  if o.get("err") is not None and o.get("tol")]
        if es:
            passed, bad = sum(e["status"] == "ok" for e in es), sum(e["status"] in ("WRONG", "error") for e in es)
            lines.append(f"| {p} | {len(es)} | {passed} | {bad} | {f'{max(ratios):.2f}' if ratios else '-'} |")
    skipped: dict[str, set] = {}
    no_graph: dict[str, set] = {}  # timed, but its capture failed: the eager time only
    for r in doc["results"]:
        for p, e in r.get("providers", {}).items():
            if e["status"] == "skipped":
                skipped.setdefault(p, set()).add(e["reason"])
            if e.get("graph_error"):
                no_graph.setdefault(p, set()).add(e["graph_error"])
    for title, why in (("Skipped:", skipped), ("No graph time (the capture failed):", no_graph)):
        lines += ["", title] + [f"- {p}: {'; '.join(sorted(rs))}" for p, rs in why.items()] if why else []
    lines += ["", "Failures:"] + [f"- {b}" for b in failures(doc)] if failures(doc) else []
    lines += ["", "Not run:"] + [f"- {m}" for m in not_run(doc)] if not_run(doc) else []
    return "\n".join(lines) + "\n"


def csv_rows(doc: dict) -> list[dict]:
    """One row per (case, provider), the environment in every row."""
    env = {f"env_{k}": doc["env"].get(k) for k in ENV_COLUMNS}
    rows = []
    for r in doc["results"]:
        base = {"suite": doc["suite"], **r["case"]}
        if "not_run" in r:
            rows.append({**base, "provider": "", "status": "not run", "reason": r["not_run"], **env})
        for p, e in r.get("providers", {}).items():
            worst = max((e.get("errors") or {}).values(), default={},
                        key=lambda o: (o.get("err") or 0) / (o.get("tol") or 1))
            rows.append({**base, "provider": p, **{k: v for k, v in e.items() if isinstance(v, (int, float, str))},
                         **{k: worst.get(k) for k in ("err", "eager_err", "tol")}, **env})
    return rows


def plot(doc: dict, path: Path) -> bool:
    """y_key against x_key, a line per provider, a panel per other sizes; only with matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    x, y = doc["x_key"], doc["y_key"]
    panels: dict[tuple, list] = {}
    for r in doc["results"]:
        if "not_run" not in r:
            panels.setdefault(tuple((k, v) for k, v in r["case"].items() if k != x), []).append(r)
    panels = {k: v for k, v in panels.items() if any(e.get(y) for r in v for e in r["providers"].values())}
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (key, rows) in zip(axes.flat, panels.items()):
        for p in doc["providers"]:
            pts = sorted((r["case"][x], r["providers"][p][y]) for r in rows if r["providers"].get(p, {}).get(y))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        if doc.get("copy_bandwidth") and y == "gbs":
            ax.axhline(doc["copy_bandwidth"]["gbs"], ls="--", c="gray", lw=1, label="copy")
        ax.set_xscale("log", base=2)
        ax.set_title(" ".join(f"{k}={v}" for k, v in key), fontsize=8)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{doc['title']} on {doc['env'].get('gpu') or 'CPU'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def save_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def write_results(doc: dict, folder: Path) -> list[Path]:
    """<folder>/<name>.json, .md, .csv (and .png): the whole report of one suite or op."""
    stem = Path(folder) / doc["name"]
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".csv")]
    save_json(doc, paths[0])
    paths[1].write_text(render_markdown(doc))
    rows = csv_rows(doc)
    with open(paths[2], "w", newline="") as f:  # the header: every key, in first-seen order; None -> ""
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        w.writeheader()
        w.writerows(rows)
    try:  # a plotting problem must not cost the numbers
        if plot(doc, stem.with_suffix(".png")):
            paths.append(stem.with_suffix(".png"))
    except Exception as e:
        print(f"warning: no plot for {doc['name']}: {short_exc(e)}", file=sys.stderr)
    return paths


def _geomean(xs):
    xs = [x for x in xs if x]
    return statistics.geometric_mean(xs) if xs else None


def render_latest(docs: list[dict]) -> str:
    """LATEST.md: per GPU, suite and table, each provider's geometric-mean speed-up over the baseline."""
    lines = ["# Latest GPU benchmark results", "", "Written by `bertkern bench` (benchmarks/run.py). Each cell: "
             "geometric-mean speed-up over the baseline across the sizes run (the number of sizes), called eagerly "
             "(the host's cost per call included) and, for ops, replayed from a CUDA graph (the kernels alone); "
             "WRONG = failed the correctness gate."]
    for d in sorted(docs, key=lambda d: (d["env"].get("gpu") or "", d["name"])):
        providers = [p for p in d["providers"] if p != d["baseline"]]
        lines += ["", f"## {d['title']}, {d['env'].get('gpu')}", "",
                  f"{env_line(d['env'])}; baseline {d['baseline']}; tables in "
                  f"`benchmarks/results/{d['env'].get('gpu_slug')}/{d['name']}.md`", "",
                  "| " + " | ".join(d["table_keys"] + providers) + " |",
                  "|" + "---|" * (len(d["table_keys"]) + len(providers))]
        for group, rows in _groups(d, ran_only=True).items():
            cells = []
            for p in providers:
                es = [r["providers"].get(p, {}) for r in rows]
                bad = sum(e.get("status") in ("WRONG", "error") for e in es)
                g = _geomean([e.get("speedup") for e in es])
                gg = _geomean([e.get("speedup_graph") for e in es])
                cells.append(f"**{bad} WRONG/error**" if bad else "-" if g is None else
                             f"{g:.2f}× ({sum(bool(e.get('speedup')) for e in es)})"
                             + (f", graph {gg:.2f}×" if gg else ""))
            lines.append("| " + " | ".join([str(v) for v in group] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_latest(out_root: Path) -> Path | None:
    """LATEST.md from every <gpu>/*.json under out_root (runs without a GPU, such as cpu/, excluded)."""
    docs = []
    for p in sorted(Path(out_root).glob("*/*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if d.get("env", {}).get("gpu") and d.get("schema") == SCHEMA:
            docs.append(d)
    if not docs:
        return None
    path = Path(out_root) / "LATEST.md"
    path.write_text(render_latest(docs))
    return path


START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme: Path, latest: Path) -> str:
    """README's lines between the markers := LATEST.md (title dropped, headings one level down)."""
    if not Path(latest).is_file():
        raise FileNotFoundError(f"{latest} does not exist: run the benchmarks on a GPU first (bertkern bench)")
    text = Path(readme).read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(END) < text.index(START):
        raise ValueError(f"{readme} needs exactly one {START} line followed by one {END} line")
    body = [("#" + s if re.match(r"#{1,5}\s", s) else s) for s in Path(latest).read_text().strip().splitlines()[1:]]
    note = "<!-- generated by `bertkern bench --update-readme` from benchmarks/results/LATEST.md -->"
    block = note + "\n" + "\n".join(body).strip()
    new = text[: text.index(START) + len(START)] + "\n" + block + "\n" + text[text.index(END):]
    if new == text:
        return f"{readme} is up to date with {latest}"
    Path(readme).write_text(new)
    return f"rewrote the results block of {readme} from {latest}"
