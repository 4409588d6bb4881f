"""The op suite. Each op is one `OpSpec` in benchmarks/bench_<bertkern.ops module>.py; from it this file
derives the providers (eager, compile, each backend, the spec's extras), the correctness gate before any
timing (bertkern.testing's rule against float64), the timing (do_bench over input copies rotated past the
L2, backward on retained forward graphs, and a CUDA-graph replay) and the 100% line (a 1 GiB copy).
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import time
import zlib
import functools
from typing import Any, Callable

from benchmarks import common
from benchmarks.common import Skip

import torch

import bertkern.ops
import bertkern.reference
from bertkern.testing import check_2x

# The API's names -> benchmarks/bench_<file>.py; the old bench names still work.
OPS = {"add_layer_norm": "layer_norm", "masked_softmax": "masked_softmax", "bias_gelu": "bias_gelu",
       "embedding_layer_norm": "layer_norm", "attention": "attention", "attention_varlen": "attention"}
ALIASES = {"layer_norm": "add_layer_norm", "softmax": "masked_softmax"}


@dataclasses.dataclass
class Case:
    """One benchmark point: direction ("fwd", "bwd", "fwd+bwd"), dtype, sizes, and non-size options."""

    direction: str
    dtype: torch.dtype
    shape: dict[str, int]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        sizes = [f"{k}={v}" for k, v in {**self.shape, **self.options}.items()]
        return " ".join([self.direction, common.dtype_name(self.dtype), *sizes])

    def to_dict(self) -> dict:
        return {"direction": self.direction, "dtype": common.dtype_name(self.dtype), **self.shape, **self.options}


def grid(directions, dtypes, shapes, options=({},)) -> list[Case]:
    """Every combination, shapes outermost: the order cases run in (a time budget cuts the tail)."""
    return [Case(d, dt, dict(s), dict(o)) for s in shapes for o in options for dt in dtypes for d in directions]


CPU_DTYPES = {True: (torch.float32, torch.bfloat16), False: (torch.float32, torch.float16, torch.bfloat16)}  # quick?
BERT_TOKENS = (4096, 16384)  # the tokens of a BERT batch: 32 x 128 and 32 x 512
ROWS = (128, 512, 2048, 4096, 8192, 16384, 32768, 65536)  # token counts of the row-wise ops


def budget_order(shapes: list[dict], tokens: str, width: str) -> list[dict]:
    """`shapes` (widths most important first) in the order a budget should measure them: BERT_TOKENS at the
    first two widths, then the rest from the largest to the smallest (launch-bound) size."""
    widths = list(dict.fromkeys(s[width] for s in shapes))

    def rank(s):
        w = widths.index(s[width])
        if s[tokens] in BERT_TOKENS and w < 2:
            return 0, w, BERT_TOKENS.index(s[tokens])
        return 1, -s[tokens] * s[width], w

    return sorted(shapes, key=rank)


@dataclasses.dataclass
class OpSpec:
    name: str
    make_inputs: Callable[[Case, torch.device], dict[str, torch.Tensor]]  # random, never zeros
    eager: Callable[..., Any]  # the plain PyTorch composition: eager(**inputs, **case.options)
    bytes_moved: Callable[[Case], int]  # each input read once, each output written once
    cases: Callable[[bool], list[Case]]  # quick -> GPU cases, most important first
    cpu_cases: Callable[[bool], list[Case]]  # quick -> small cases for the CPU check
    # the same on float64 copies of the inputs; default: bertkern.reference.<name>(**inputs, **options)
    reference: Callable[..., Any] | None = None
    # (backend, case, device) -> the bertkern call; default: bertkern.ops.<name>(**inputs, **options, backend=...)
    kernel: Callable[[str, Case, torch.device], Callable[..., Any]] | None = None
    grad_inputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ("y",)
    x_key: str = "rows"  # the size on the x axis of plots
    backends: tuple[str, ...] = ("triton", "cuda")
    extra_providers: dict[str, Callable] = dataclasses.field(default_factory=dict)  # name -> factory(case, device)
    flops: Callable[[Case], int] | None = None  # compute-bound ops also report TFLOP/s
    # inputs -> bool mask of the output positions that count (real tokens): gated there only
    valid: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None

    def __post_init__(self):
        self.reference = self.reference or getattr(bertkern.reference, self.name)
        self.kernel = self.kernel or (lambda b, case, device: functools.partial(getattr(bertkern.ops, self.name),
                                                                                backend=b))

    def checked_names(self, direction: str) -> tuple[str, ...]:
        grads = tuple("d" + n for n in self.grad_inputs)
        return {"fwd": self.output_names, "bwd": grads, "fwd+bwd": self.output_names + grads}[direction]


def discover(names=None, errors: list[str] | None = None) -> list[OpSpec]:
    """The specs of the named ops (default: all); an import failure raises, or goes to `errors`."""
    names = [ALIASES.get(n, n) for n in names or OPS]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; have {list(OPS)} (aliases: {ALIASES})")
    specs = []
    for n in dict.fromkeys(names):
        try:
            specs.append(getattr(importlib.import_module(f"benchmarks.bench_{OPS[n]}"), n.upper()))
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"benchmarks/bench_{OPS[n]}.py could not be imported: {common.short_exc(e)}")
    return specs


# ----------------------------------------------------------------------------- providers
def unavailable(backend: str, device: torch.device) -> None:
    from bertkern import backend as _backend

    why = _backend.unavailable_reason(backend, device)
    if why is not None:
        raise Skip(why)


def providers(spec: OpSpec, gpu: bool) -> dict[str, Callable]:
    """name -> factory(case, device) -> fn; on the CPU the bertkern backends and compile only."""
    def backend(b):
        def factory(case, device):
            unavailable(b, device)
            return spec.kernel(b, case, device)

        return factory

    def compiled(case, device):
        import torch._dynamo

        torch._dynamo.reset()  # dynamic=False recompiles per shape; past the recompile limit it would run eager
        return torch.compile(spec.eager, dynamic=False)

    if not gpu:
        return {"compile": compiled, **{b: backend(b) for b in ("torch",) + spec.backends}}
    return {"eager": lambda case, device: spec.eager, "compile": compiled, **{b: backend(b) for b in spec.backends},
            **spec.extra_providers}


# ----------------------------------------------------------------------------- one case
@dataclasses.dataclass
class Copy:
    """One set of inputs (and the output gradients a backward uses)."""

    inputs: dict[str, torch.Tensor]
    grad_outs: tuple[torch.Tensor, ...] = ()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.inputs.values(), *self.grad_outs])

    def double(self) -> "Copy":
        up = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
        return Copy({k: up(v) for k, v in self.inputs.items()}, tuple(map(up, self.grad_outs)))


def _tuple(out) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(o for o in out if o is not None)


def make_step(spec: OpSpec, case: Case, fn: Callable, copy: Copy) -> Callable[[], tuple]:
    """A call doing exactly the timed work of the case on `copy` ("bwd": the forward runs here, untimed)."""
    if case.direction == "fwd":
        return lambda: _tuple(fn(**copy.inputs, **case.options))
    leaves = {k: (v.detach().requires_grad_() if k in spec.grad_inputs else v) for k, v in copy.inputs.items()}
    wrt = [leaves[n] for n in spec.grad_inputs]
    if case.direction == "bwd":
        outs = _tuple(fn(**leaves, **case.options))
        return lambda: tuple(torch.autograd.grad(outs, wrt, copy.grad_outs, retain_graph=True))

    def fwd_bwd():
        outs = _tuple(fn(**leaves, **case.options))
        return tuple(o.detach() for o in outs) + tuple(torch.autograd.grad(outs, wrt, copy.grad_outs))

    return fwd_bwd


def rotations(case_bytes: int, l2_bytes: int, copy_bytes: int, free_bytes: int, cap: int = 1000) -> int:
    """ceil(2 x L2 / bytes) input copies, so that cycling through them never hits in L2; at most a quarter
    of the free memory (x3: the graph a backward copy keeps)."""
    want = max(1, math.ceil(2 * l2_bytes / max(case_bytes, 1)))
    return int(min(want, max(1, free_bytes // 4 // max(3 * copy_bytes, 1)), cap))


@dataclasses.dataclass
class Prepared:
    nbytes: int
    copies: list[Copy]
    ref64: tuple[torch.Tensor, ...]
    eager: tuple[torch.Tensor, ...]


def prepare(spec: OpSpec, case: Case, device: torch.device, l2: int = 0) -> Prepared:
    """Seeded inputs (enough copies to rotate past the L2), the float64 truth and eager's outputs."""
    torch.manual_seed(zlib.crc32(f"{spec.name} {case.label}".encode()))

    def copies(n):  # n may be 0: the first copy already rotates past the L2
        cs = [Copy(spec.make_inputs(case, device)) for _ in range(n)]
        if case.direction != "fwd" and cs:
            with torch.no_grad():
                outs = _tuple(spec.eager(**cs[0].inputs, **case.options))
            for c in cs:
                c.grad_outs = tuple(torch.randn(o.shape, device=device).to(o.dtype) for o in outs)
                if spec.valid is not None:
                    c.grad_outs = tuple(torch.where(spec.valid(c.inputs), g, 0) for g in c.grad_outs)
        return cs

    nbytes, cs = spec.bytes_moved(case), copies(1)
    if l2:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 34
        cs += copies(rotations(nbytes, l2, cs[0].nbytes(), free) - 1)
    with torch.enable_grad():
        ref64 = tuple(o.detach() for o in make_step(spec, case, spec.reference, cs[0].double())())
    eager = tuple(o.detach() for o in make_step(spec, case, spec.eager, cs[0])())
    return Prepared(nbytes, cs, ref64, eager)


def check(spec: OpSpec, case: Case, fn: Callable, prep: Prepared, device: torch.device) -> dict:
    """One call on the first copy, on NaN-filled fresh memory, judged by the 2x rule: {"status", "errors"}."""
    if device.type == "cuda":  # unwritten outputs then show as NaN
        torch.empty(min(max(256 << 20, 2 * prep.nbytes), 4 << 30) // 4, device=device).fill_(float("nan"))
    try:
        outs = tuple(o.detach() for o in make_step(spec, case, fn, prep.copies[0])())
    except Exception as e:
        return {"status": "error", "reason": common.short_exc(e)}
    names, ref64, eager = spec.checked_names(case.direction), prep.ref64, prep.eager
    if len(outs) != len(names):
        return {"status": "WRONG", "reason": f"{len(outs)} outputs, expected {len(names)} ({', '.join(names)})"}
    if spec.valid is not None:  # compare only the positions that count
        keep = spec.valid(prep.copies[0].inputs)
        outs, ref64, eager = (tuple(torch.where(keep, t, 0) for t in ts) for ts in (outs, ref64, eager))
    checks = {n: check_2x(o, r, e, n, scale_floor=True) for n, o, r, e in zip(names, outs, ref64, eager)}
    return common.verdict({n: c.to_dict() for n, c in checks.items()}, [c.reason for c in checks.values()])


def cycled(steps: list[Callable]) -> Callable[[], Any]:
    """A call that runs the next step in turn: the timers rotate through the input copies."""
    it = itertools.cycle(steps)
    return lambda: next(it)()


def run_case(spec: OpSpec, case: Case, provs: dict, device: torch.device, copy_gbs: float = 0.0, l2: int = 0,
             timer: Callable | None = None, graph_timer: Callable | None = None) -> dict:
    """Check every provider, then time the right ones: timer(step) and graph_timer(make_step) -> (median,
    p20, p80) ms. wall_s: each provider's seconds here (building, a compile, the gate, the timings)."""
    t_case = time.monotonic()
    prep = prepare(spec, case, device, l2 if timer else 0)
    out = {"case": case.to_dict(), "bytes": prep.nbytes, "rotations": len(prep.copies), "providers": {}}

    def rates(times, suffix=""):
        ms = times[0]
        r = {"ms": ms, "ms_p20": times[1], "ms_p80": times[2], "gbs": prep.nbytes / ms / 1e6,
             "pct_copy": 100 * prep.nbytes / ms / 1e6 / copy_gbs}
        r |= {"tflops": spec.flops(case) / ms / 1e9} if spec.flops is not None else {}
        return {k + suffix: v for k, v in r.items()}

    for name, factory in provs.items():
        t0 = time.monotonic()
        try:
            fn = factory(case, device)
        except Skip as s:
            out["providers"][name] = {"status": "skipped", "reason": str(s)}
            continue
        entry = check(spec, case, fn, prep, device)
        steps = lambda: cycled([make_step(spec, case, fn, c) for c in prep.copies])  # noqa: E731, B023
        if entry["status"] == "ok" and timer is not None:
            try:
                entry.update(rates(timer(steps())))
            except Exception as e:
                entry = {"status": "error", "reason": "timing: " + common.short_exc(e), "errors": entry["errors"]}
        # The steps are built anew by the graph timer, on its capture stream: a backward runs on its
        # forward's stream (the eager steps' forwards ran on the default stream, outside the capture).
        if entry["status"] == "ok" and graph_timer is not None and "ms" in entry:
            try:
                entry.update(rates(graph_timer(steps), "_graph"))
            except Exception as e:  # not capturable: the eager time stands
                entry["graph_error"] = common.short_exc(e)
        out["providers"][name] = entry | {"wall_s": round(time.monotonic() - t0, 2)}
    out["wall_s"] = round(time.monotonic() - t_case, 2)
    return out


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> dict:
    """The 100% line: a large device-to-device copy, bytes read + written over time."""
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    ms, lo, hi = common.time_op(lambda: dst.copy_(src), 25, 200)
    src = dst = None  # free the 2 GiB before the cache is emptied
    torch.cuda.empty_cache()
    return {"bytes": 2 * nbytes, "ms": ms, "ms_p20": lo, "ms_p80": hi, "gbs": 2 * nbytes / ms / 1e6}


def new_doc(spec: OpSpec, provs, env: dict, settings: dict, cases: list[Case]) -> dict:
    return {"schema": common.SCHEMA, "suite": "ops", "name": spec.name, "title": spec.name, "env": env,
            "settings": settings, "providers": list(provs), "baseline": "eager",
            "describe": {"eager": "the plain PyTorch composition", "compile": "torch.compile(eager, dynamic=False)",
                         **{b: f"bertkern.ops.{spec.name}(backend=\"{b}\")" for b in ("torch",) + spec.backends}},
            "table_keys": ["direction", "dtype"] + list(dict.fromkeys(k for c in cases for k in c.options)),
            "x_key": spec.x_key, "y_key": "gbs", "results": []}


# Under a deadline, `compile` (a compile per case: seconds, more than the other providers together) runs
# only where the op's share holds it beside the other providers' time for this case and the rest of the
# leading cases (BERT-base fwd and bwd in fp16 and bf16); these priors until a case has taught the costs.
COMPILE_PRIOR_S, CASE_PRIOR_S = 10.0, 2.0


def leading(cases: list[Case]) -> int:
    """How many cases share the first one's sizes and options (the case lists put them first)."""
    return len(list(itertools.takewhile(lambda c: (c.shape, c.options) == (cases[0].shape, cases[0].options), cases)))


def skip(why: str) -> Callable:
    def factory(case, device):
        raise Skip(why)

    return factory


def run_op(spec: OpSpec, cases: list[Case], device: torch.device, *, copy_bw: dict, env: dict,
           deadline: float | None = None, warmup_ms: float = 25, rep_ms: float = 100, settings: dict | None = None,
           only=None, log=print, timer: Callable | None = None, graph_timer: Callable | None = None,
           partial_json=None) -> dict:
    """Every case of one op on the GPU (those past `deadline` listed as not run), saved to `partial_json`
    after each, so a killed run keeps what it measured; `timer` replaces do_bench in tests."""
    provs = {k: v for k, v in providers(spec, gpu=True).items() if only is None or k in only}
    settings = {"warmup_ms": warmup_ms, "rep_ms": rep_ms,
                "timer": "triton.testing.do_bench median, L2 flushed per rep; graph: the same calls replayed from a "
                "CUDA graph (~rep_ms of calls captured once, the graph replayed 3-10 times, median)",
                "rotation": "ceil(2 x L2 / bytes) input copies", **(settings or {})}
    doc = new_doc(spec, provs, env, settings, cases)
    doc["copy_bandwidth"] = copy_bw
    if timer is None:
        timer = lambda step: common.time_op(step, warmup_ms, rep_ms)  # noqa: E731
        graph_timer = graph_timer or (lambda make_step: common.time_graph(make_step, rep_ms))
    l2 = env.get("l2_bytes", 0) if device.type == "cuda" else 0
    budget, lead = common.Budget(None if deadline is None else deadline - time.monotonic()), leading(cases)
    for n, case in enumerate(cases):
        r = {"case": case.to_dict(), "bytes": spec.bytes_moved(case), "not_run": "time budget spent"}
        if budget.left() > 0:
            now, compile_s = provs, budget.estimate("compile", COMPILE_PRIOR_S)
            others = budget.estimate("case", CASE_PRIOR_S) * max(1, lead - n)  # this case's, the first cases'
            if "compile" in provs and not budget.allows(compile_s + others):
                now = {**provs, "compile": skip(f"time budget: no room for torch.compile (~{compile_s:.0f} s a case) "
                                                "beside the other providers and the op's first cases")}
            try:
                r = run_case(spec, case, now, device, copy_bw["gbs"], l2, timer, graph_timer)
                compile_s = r["providers"].get("compile", {}).get("wall_s")
                budget.learn("case", r["wall_s"] - (compile_s or 0))
                if compile_s is not None:
                    budget.learn("compile", compile_s)
            except Exception as e:  # inputs or reference failed (out of memory, say): record it, go on
                r["not_run"] = f"{common.HARNESS_ERROR}: {common.short_exc(e)}"
            common.free_memory(device)
            cells = r.get("not_run") or " | ".join(f"{p} {common.cell_text(e)}" for p, e in r["providers"].items())
            log(f"[{n + 1}/{len(cases)}] {spec.name} {case.label} ({r['bytes'] / 1e6:.1f} MB, "
                f"{r.get('wall_s', 0):.1f} s): {cells}")
        doc["results"].append(r)
        if partial_json is not None:
            common.save_json(common.finish(doc), partial_json)
    note = smallest_case_note(doc)
    if note:
        doc["notes"] = {"smallest size (host overhead)": note}
    return common.finish(doc)


def smallest_case_note(doc: dict) -> str | None:
    """Each provider's time per call at the smallest size, beside its bytes' time at the copy bandwidth."""
    timed = [r for r in doc["results"] if any(e.get("ms") for e in r.get("providers", {}).values())]
    if not timed:
        return None
    r = min(timed, key=lambda r: r["bytes"])
    copy_us = r["bytes"] / doc["copy_bandwidth"]["gbs"] / 1e3
    per_call = " · ".join(f"{p} {e['ms'] * 1e3:.3g} µs" for p, e in r["providers"].items() if e.get("ms"))
    return (f"{common.case_label(r['case'])} ({r['bytes'] / 1e6:.2g} MB; {copy_us:.2g} µs at the copy bandwidth): "
            f"{per_call} per call. A call taking many times the copy's time is launch-bound: it measures the "
            "host's cost per call, not bandwidth")


def check_cpu(spec: OpSpec, quick: bool, dtypes=None, only=None) -> dict:
    """Each bertkern backend (and compile, if `only` names it) gated on small CPU inputs, untimed."""
    provs = {k: v for k, v in providers(spec, gpu=False).items() if (k != "compile" if only is None else k in only)}
    cases = [c for c in spec.cpu_cases(quick) if dtypes is None or c.dtype in dtypes]
    doc = new_doc(spec, provs, common.environment(torch.device("cpu")), {"mode": "CPU correctness, untimed"}, cases)
    doc["results"] = [run_case(spec, case, provs, torch.device("cpu")) for case in cases]
    return doc


# Bench providers that are candidates of attention's auto table, as its choices (bench "sdpa" under
# attention_varlen is SDPA on the padded batch, not auto's gather / SDPA / scatter: not a candidate).
AUTO_CANDIDATES = {"attention": {"sdpa": "sdpa", "triton": "triton", "cuda": "cuda"},
                   "attention_varlen": {"torch-varlen": "varlen_attn", "triton": "triton", "cuda": "cuda"}}


def auto_table(docs: list[dict]) -> list[dict]:
    """attention's auto rows (bertkern.ops.attention_auto): per (arch, dtype, head-dim and seq bucket), the
    candidate with the least forward time summed over the bucket's cases, among those right in all of
    them; graph-replay times where every candidate has one, else eager."""
    from bertkern.ops import attention_auto as auto

    totals: dict[tuple, dict[str, dict[str, list[float]]]] = {}  # key -> op -> choice -> [ms per case]
    for doc in docs:
        candidates = AUTO_CANDIDATES.get(doc["name"])
        cap = doc["env"].get("capability")
        if not candidates or not cap:
            continue
        arch = "sm_" + cap.replace(".", "")  # env's "9.0" -> attention_auto's key "sm_90"
        for r in doc["results"]:
            case, provs = r["case"], r.get("providers", {})
            if case["direction"] != "fwd" or not provs:
                continue
            key = (arch, case["dtype"], auto.bucket(case["head_dim"], auto.HEAD_BUCKETS),
                   auto.bucket(case["seq"], auto.SEQ_BUCKETS))
            ran = {c: provs[p] for p, c in candidates.items() if provs.get(p, {}).get("status") == "ok"}
            timer = "ms_graph" if ran and all(e.get("ms_graph") for e in ran.values()) else "ms"
            per_op = totals.setdefault(key, {}).setdefault(doc["name"], {c: [] for c in candidates.values()})
            for c in per_op:
                per_op[c].append(ran[c][timer] if c in ran else math.inf)
    rows = []
    for (arch, dtype, head, seq), per_op in sorted(totals.items()):
        row, why = {"arch": arch, "dtype": dtype, "head_dim": head, "seq": seq}, []
        for op, times in per_op.items():
            total = {c: sum(t) for c, t in times.items() if math.isfinite(sum(t))}
            if len(total) < 2:
                continue  # nothing to compare
            row[op] = min(total, key=total.get)
            why.append(f"{op} fwd ms over {len(next(iter(times.values())))} cases: "
                       + ", ".join(f"{c} {t:.3g}" for c, t in sorted(total.items(), key=lambda kv: kv[1])))
        if len(row) > 4:
            rows.append({**row, "why": "measured: " + "; ".join(why)})
    return rows
