"""The one benchmark harness every op uses.

An op is described once, declaratively, by an `OpSpec` in `benchmarks/bench_<op>.py`: how to make
inputs for a case, the eager PyTorch composition users would write, the accurate reference, the
bertkern op, and the bytes the op must move. From that the harness derives everything else:

- providers: `eager`, `compile` (torch.compile of the eager function), and one per bertkern backend
  (`triton`, `cuda`); a provider that cannot run here is recorded as skipped, with the reason;
- a correctness gate before any timing: each provider's output against a float64 reference, by the
  project's rule (error <= 2 x eager's error + a small floor; NaN never passes). A wrong kernel is
  recorded as WRONG and never timed;
- timing on CUDA: `triton.testing.do_bench` (median, with its L2 flush before every repetition) over
  input copies rotated so that the working set is at least twice the L2; backward timed on
  precomputed forward graphs (retain_graph), so only the backward is in the number;
- the 100% line: a large device-to-device copy measured in the same run (bytes read + written / time);
- results: JSON (every number and the environment) + Markdown (+ a PNG if matplotlib is there) under
  `benchmarks/results/<gpu-slug>/<op>.*`, and `benchmarks/results/LATEST.md`, a summary over all ops;
- an honest CPU mode for machines with no CUDA GPU: correctness of every backend at small sizes (the
  Triton backend under TRITON_INTERPRET=1), a tiny BertModel with its fused paths on vs off, no timings.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Without a GPU the Triton backend runs on CPU tensors through the interpreter; the variable must be
# set before any @triton.jit kernel module (bertkern.triton.*) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bertkern.testing import check_2x  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
BENCH_DIR = ROOT / "benchmarks"
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32",
                  "float64": "fp64", "double": "fp64"}
DEFAULT_L2_BYTES = 50 * 2**20  # H100; read off the device when there is one
COPY_BYTES = 1 << 30  # per buffer for the copy-bandwidth line: far larger than any L2
SCHEMA = 1
NO_CUDA_LINE = "timings need a CUDA GPU; none seen here"
# benchmarks/bench_<name>.py files that are whole-model suites (run.py --suite), not op specs
MODEL_SUITES = ("bert", "train")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtypes(names) -> list[torch.dtype] | None:
    """['fp16,bf16'] / ['float16', 'bf16'] -> dtypes; None or empty -> None (no filter)."""
    out = []
    for item in names or []:
        for name in filter(None, item.split(",")):
            key = _DTYPE_ALIASES.get(name.lower(), name.lower())
            if key not in DTYPES:
                raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
            out.append(DTYPES[key])
    return out or None


# ----------------------------------------------------------------------------- cases and ops
@dataclasses.dataclass
class Case:
    """One benchmark point: op, direction ("fwd", "bwd" or "fwd+bwd"), dtype, shape (+ non-shape options)."""

    op: str
    direction: str
    dtype: torch.dtype
    shape: dict[str, int]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")

    @property
    def label(self) -> str:
        parts = [self.op, self.direction, dtype_name(self.dtype)]
        parts += [f"{k}={v}" for k, v in self.shape.items()] + [f"{k}={v}" for k, v in self.options.items()]
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {"op": self.op, "direction": self.direction, "dtype": dtype_name(self.dtype),
                "shape": dict(self.shape), "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(d["op"], d["direction"], getattr(torch, d["dtype"]), dict(d["shape"]), dict(d.get("options", {})))


def grid(op: str, directions, dtypes, shapes, options=({},)) -> list[Case]:
    """Every combination, in the order given (shapes outermost): the order cases run in."""
    return [Case(op, d, dt, dict(s), dict(o)) for s in shapes for o in options for dt in dtypes for d in directions]


@dataclasses.dataclass
class OpSpec:
    """Everything the harness needs to know about one op. See benchmarks/bench_bias_gelu.py."""

    name: str
    # (case, device) -> dict of named input tensors (random, never zeros)
    make_inputs: Callable[[Case, torch.device], dict[str, torch.Tensor]]
    # the plain PyTorch composition users write today: fn(**inputs, **case.options)
    eager: Callable[..., Any]
    # the accurate definition, called on float64 copies of the inputs
    reference: Callable[..., Any]
    # backend name -> the bertkern callable, fn(**inputs, **case.options)
    kernel: Callable[[str], Callable[..., Any]]
    # the fewest bytes the case must move: each input read once, each output written once
    bytes_moved: Callable[[Case], int]
    # quick -> the GPU cases, in the order they run (most important first: a time budget cuts the tail)
    cases: Callable[[bool], list[Case]]
    # quick -> small cases for the CPU correctness check
    cpu_cases: Callable[[bool], list[Case]]
    grad_inputs: tuple[str, ...] = ()  # inputs that get gradients in "bwd"
    output_names: tuple[str, ...] = ("y",)
    x_key: str = "rows"  # the shape key on the x axis of plots
    backends: tuple[str, ...] = ("triton", "cuda")  # bertkern backends timed on the GPU
    extra_providers: dict[str, Callable] = dataclasses.field(default_factory=dict)  # name -> factory(case, device)
    # optional: the useful FLOPs of a case; timed providers then also report TFLOP/s (compute-bound ops)
    flops: Callable[[Case], int] | None = None
    # optional: inputs -> bool mask, broadcasting to every checked output, of the positions that count
    # (e.g. the real tokens of a padded batch): the gate compares only there, output gradients are 0 elsewhere
    valid: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None

    def checked_names(self, direction: str) -> tuple[str, ...]:
        grads = tuple("d" + n for n in self.grad_inputs)
        return {"fwd": self.output_names, "bwd": grads, "fwd+bwd": self.output_names + grads}[direction]


def discover(names=None, errors: list[str] | None = None) -> list[OpSpec]:
    """The SPEC of every benchmarks/bench_<op>.py (or of the named ops), in file-name order.
    A module that fails to import raises, or, given an `errors` list, is described there and left out."""
    found = {p.stem.removeprefix("bench_"): p.stem for p in sorted(BENCH_DIR.glob("bench_*.py"))
             if p.stem.removeprefix("bench_") not in MODEL_SUITES}
    wanted = list(found) if not names else names
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise ValueError(f"no benchmark for {unknown}; have {sorted(found)}")
    specs = []
    for n in wanted:
        try:
            specs.append(importlib.import_module(f"benchmarks.{found[n]}").SPEC)
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"benchmarks/{found[n]}.py could not be imported: {_short_exc(e)}")
    return specs


# ----------------------------------------------------------------------------- providers
class Skip(Exception):
    """A provider that cannot run here; the message says why."""


def eager_provider(spec: OpSpec) -> Callable:
    return lambda case, device: spec.eager


def compile_provider(spec: OpSpec) -> Callable:
    def factory(case, device):
        if device.type != "cuda":
            raise Skip("torch.compile is timed on CUDA only")
        import torch._dynamo

        # A fresh cache per case: with dynamic=False every shape recompiles, and past dynamo's
        # recompile limit it would silently fall back to eager.
        torch._dynamo.reset()
        return torch.compile(spec.eager, dynamic=False)

    return factory


def backend_provider(spec: OpSpec, backend: str) -> Callable:
    def factory(case, device):
        from bertkern import backend as _backend

        why = _backend.unavailable_reason(backend, device)
        if why is not None:
            raise Skip(why)
        return spec.kernel(backend)

    return factory


def gpu_providers(spec: OpSpec) -> dict[str, Callable]:
    providers = {"eager": eager_provider(spec), "compile": compile_provider(spec)}
    providers.update({b: backend_provider(spec, b) for b in spec.backends})
    providers.update(spec.extra_providers)
    return providers


def cpu_providers(spec: OpSpec) -> dict[str, Callable]:
    """CPU mode checks bertkern's own backends (eager is the baseline of the error rule)."""
    return {b: backend_provider(spec, b) for b in ("torch",) + tuple(spec.backends)}


# ----------------------------------------------------------------------------- running one case
@dataclasses.dataclass
class Copy:
    """One set of inputs for a case (and the output gradients used by its backward)."""

    inputs: dict[str, torch.Tensor]
    grad_outs: tuple[torch.Tensor, ...] = ()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.inputs.values()) + list(self.grad_outs))

    def double(self) -> "Copy":
        up = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
        return Copy({k: up(v) for k, v in self.inputs.items()}, tuple(up(g) for g in self.grad_outs))


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(o for o in out if o is not None)


def make_step(spec: OpSpec, case: Case, fn: Callable, copy: Copy) -> Callable[[], tuple]:
    """A no-argument callable doing exactly the work that is timed for `case.direction` on `copy`,
    returning the outputs to check. For "bwd" the forward runs here, once, and is not timed."""
    opts = case.options
    if case.direction == "fwd":
        return lambda: _as_tuple(fn(**copy.inputs, **opts))
    leaves = {k: (v.detach().requires_grad_() if k in spec.grad_inputs else v) for k, v in copy.inputs.items()}
    wrt = [leaves[n] for n in spec.grad_inputs]
    if case.direction == "bwd":
        outs = _as_tuple(fn(**leaves, **opts))
        return lambda: tuple(torch.autograd.grad(outs, wrt, copy.grad_outs, retain_graph=True))

    def fwd_bwd():
        outs = _as_tuple(fn(**leaves, **opts))
        return tuple(o.detach() for o in outs) + tuple(torch.autograd.grad(outs, wrt, copy.grad_outs))

    return fwd_bwd


def make_copies(spec: OpSpec, case: Case, device: torch.device, count: int) -> list[Copy]:
    """`count` independent random input sets; output gradients shaped like eager's outputs."""
    copies = [Copy(spec.make_inputs(case, device)) for _ in range(count)]
    if copies and case.direction != "fwd":
        with torch.no_grad():
            shapes = [(o.shape, o.dtype) for o in _as_tuple(spec.eager(**copies[0].inputs, **case.options))]
        for c in copies:
            c.grad_outs = tuple(torch.randn(s, device=device, dtype=torch.float32).to(dt) for s, dt in shapes)
            if spec.valid is not None:
                c.grad_outs = tuple(torch.where(spec.valid(c.inputs), g, 0) for g in c.grad_outs)
    return copies


def reference_outputs(spec: OpSpec, case: Case, copy: Copy) -> tuple[torch.Tensor, ...]:
    """The float64 truth for the outputs checked in `case.direction`."""
    with torch.enable_grad():
        return tuple(o.detach() for o in make_step(spec, case, spec.reference, copy.double())())


def check_outputs(names, outs, ref64, eager) -> dict:
    """bertkern.testing's rule on every output, the floor scaled by max(1, |ref64|) so that outputs far
    from 1 (dbias summed over 64k rows) get the same few ulps of slack.
    Returns {"ok", "reason", "outputs": {name: errors}}."""
    if len(outs) != len(names):
        return {"ok": False, "reason": f"{len(outs)} outputs, expected {len(names)} ({', '.join(names)})", "outputs": {}}
    checks = {name: check_2x(out, ref, ea, name, scale_floor=True) for name, out, ref, ea in zip(names, outs, ref64, eager)}
    return {"ok": all(c.ok for c in checks.values()), "reason": "; ".join(c.reason for c in checks.values() if c.reason),
            "outputs": {name: c.to_dict() for name, c in checks.items() if "!= eager's" not in c.reason}}


def _poison(device: torch.device, nbytes: int) -> None:
    """Leave NaNs where the caching allocator will hand out the next blocks, so unwritten outputs show."""
    if device.type == "cuda":
        n = min(max(256 << 20, 2 * nbytes), 4 << 30) // 4
        torch.empty(n, dtype=torch.float32, device=device).fill_(float("nan"))


# ----------------------------------------------------------------------------- timing
def bench_ms(step: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of one call of `step`, with CUDA events and an
    L2 flush before every repetition: triton.testing.do_bench when triton imports, else the same by hand."""
    q = [0.5, 0.2, 0.8]
    try:
        from triton.testing import do_bench
    except Exception:  # no triton on this GPU machine: the same method, by hand
        do_bench = None
    if do_bench is not None:
        return tuple(do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=q, return_mode="median"))
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        flush.zero_()
        step()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3 / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        step()
    n = max(1, int(rep_ms / est))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        flush.zero_()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in events])
    return tuple(torch.quantile(times, torch.tensor(q)).tolist())


def rotating(steps: list[Callable]) -> Callable:
    """One callable that runs the next input copy's step on each call."""
    if len(steps) == 1:
        return steps[0]
    cycle = itertools.cycle(steps)
    return lambda: next(cycle)()


def rotations(case_bytes: int, l2_bytes: int, copy_bytes: int, free_bytes: int, cap: int = 1000) -> int:
    """ceil(2 x L2 / bytes) input copies, so that cycling through them never runs out of L2; fewer if
    they would take more than a quarter of the free device memory."""
    want = max(1, math.ceil(2 * l2_bytes / max(case_bytes, 1)))
    fits = max(1, free_bytes // 4 // max(3 * copy_bytes, 1))  # x3: the graph a backward copy keeps
    return int(min(want, fits, cap))


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, warmup_ms=25, rep_ms=200) -> dict:
    """The 100% line: a large device-to-device copy, bytes read + bytes written over time."""
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    ms, lo, hi = bench_ms(lambda: dst.copy_(src), warmup_ms, rep_ms)
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": 2 * nbytes, "ms": ms, "ms_p20": lo, "ms_p80": hi, "gbs": 2 * nbytes / ms / 1e6}


def l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def _short_exc(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"[:500]


@dataclasses.dataclass
class Prepared:
    """A case ready to check and time: its input copies, the float64 truth and eager's outputs (first copy)."""

    nbytes: int
    copies: list[Copy]
    ref64: tuple[torch.Tensor, ...]
    eager: tuple[torch.Tensor, ...]


def prepare_case(spec: OpSpec, case: Case, device: torch.device, l2: int | None = None) -> Prepared:
    """Seeded random inputs: one copy, or (given the L2 size) enough copies to rotate through."""
    torch.manual_seed(zlib.crc32(case.label.encode()))
    nbytes = spec.bytes_moved(case)
    copies = make_copies(spec, case, device, 1)
    if l2 is not None:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 34
        copies += make_copies(spec, case, device, rotations(nbytes, l2, copies[0].nbytes(), free) - 1)
    ref64 = reference_outputs(spec, case, copies[0])
    eager = tuple(o.detach() for o in make_step(spec, case, spec.eager, copies[0])())
    return Prepared(nbytes, copies, ref64, eager)


def check_provider(spec: OpSpec, case: Case, fn: Callable, prep: Prepared, device: torch.device) -> dict:
    """Run one provider once on the first copy and apply the error rule: {"status": ok/WRONG/error, ...}."""
    _poison(device, prep.nbytes)
    try:
        outs = tuple(o.detach() for o in make_step(spec, case, fn, prep.copies[0])())
    except Exception as e:
        return {"status": "error", "reason": _short_exc(e)}
    ref64, eager = prep.ref64, prep.eager
    if spec.valid is not None:  # compare only the positions that count
        keep = spec.valid(prep.copies[0].inputs)
        outs, ref64, eager = (tuple(torch.where(keep, t, 0) for t in ts) for ts in (outs, ref64, eager))
    verdict = check_outputs(spec.checked_names(case.direction), outs, ref64, eager)
    entry = {"status": "ok" if verdict["ok"] else "WRONG", "errors": verdict["outputs"]}
    if not verdict["ok"]:
        entry["reason"] = verdict["reason"]
    return entry


def run_case(spec: OpSpec, case: Case, providers: dict, device: torch.device, copy_gbs: float,
             l2: int, warmup_ms: float, rep_ms: float, timer: Callable | None = bench_ms) -> dict:
    """Check every provider on one case, then time the ones that are right with
    timer(step, warmup_ms, rep_ms) -> (median, p20, p80) ms (None: check only). A JSON-ready dict."""
    prep = prepare_case(spec, case, device, l2 if timer is not None else None)
    out = {"case": case.to_dict(), "bytes": prep.nbytes, "rotations": len(prep.copies), "providers": {}}
    for name, factory in providers.items():
        try:
            fn = factory(case, device)
        except Skip as s:
            out["providers"][name] = {"status": "skipped", "reason": str(s)}
            continue
        except Exception as e:
            out["providers"][name] = {"status": "error", "reason": _short_exc(e)}
            continue
        entry = check_provider(spec, case, fn, prep, device)
        if entry["status"] == "ok" and timer is not None:
            try:
                ms, lo, hi = timer(rotating([make_step(spec, case, fn, c) for c in prep.copies]), warmup_ms, rep_ms)
                gbs = prep.nbytes / ms / 1e6
                entry.update(ms=ms, ms_p20=lo, ms_p80=hi, gbs=gbs, pct_copy=100 * gbs / copy_gbs)
                if spec.flops is not None:
                    entry["tflops"] = spec.flops(case) / ms / 1e9
            except Exception as e:
                entry = {"status": "error", "reason": "timing: " + _short_exc(e), "errors": entry["errors"]}
        out["providers"][name] = entry
    eager_ms = out["providers"].get("eager", {}).get("ms")
    for entry in out["providers"].values():
        if eager_ms and entry.get("ms"):
            entry["speedup_vs_eager"] = eager_ms / entry["ms"]
    del prep
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- environment
def _run(cmd: list[str], cwd=None) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> tuple[str, bool | None]:
    """(short commit, dirty) of the repo, ignoring benchmarks/results/. BERTKERN_COMMIT (and
    BERTKERN_DIRTY=0/1) override it, for machines that get the tree without its .git."""
    if os.environ.get("BERTKERN_COMMIT"):
        dirty = os.environ.get("BERTKERN_DIRTY")
        return os.environ["BERTKERN_COMMIT"], (None if dirty is None else dirty == "1")
    commit = _run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT)
    if commit is None:
        return "unknown", None
    status = _run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"], cwd=ROOT)
    return commit, (None if status is None else bool(status))


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' -> 'rtx4090' ($BERTKERN_GPU_SLUG wins)."""
    if os.environ.get("BERTKERN_GPU_SLUG"):
        return os.environ["BERTKERN_GPU_SLUG"]
    tokens = [t for t in re.split(r"[\s\-_/]+", name.lower()) if t and t not in {"nvidia", "geforce", "tesla", "quadro"}]
    if not tokens:
        return "gpu"
    if tokens[0] in {"rtx", "gtx"} and len(tokens) > 1:
        return re.sub(r"[^a-z0-9]", "", tokens[0] + tokens[1])
    return re.sub(r"[^a-z0-9]", "", tokens[0]) or "gpu"


def environment(device: torch.device) -> dict:
    """Versions, GPU, commit and date; nothing that names the host."""
    commit, dirty = git_state()
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "bertkern_C": None,
        "device": device.type,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"unavailable ({type(e).__name__})"
    try:
        from bertkern import backend as _backend

        built, why = _backend.cuda_extension_status()
        env["bertkern_C"] = "built" if built else "not built"
    except Exception as e:  # bertkern itself broken: record it, the providers will say more
        env["bertkern_C"] = f"unknown ({type(e).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_slug=gpu_slug(props.name),
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_bytes=l2_bytes(device),
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(device.index or 0)]),
        )
    else:
        env.update(gpu=None, gpu_slug="cpu", triton_interpret=os.environ.get("TRITON_INTERPRET"))
    return env


def env_line(env: dict) -> str:
    dirty = {True: " (dirty)", False: "", None: " (dirty: unknown)"}[env.get("dirty")]
    gpu = env.get("gpu") or "no GPU"
    extra = f", driver {env.get('driver') or '?'}" if env.get("gpu") else ""
    return (f"{gpu}{extra}; torch {env['torch']}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
            f"Python {env['python']}; bertkern {env['commit']}{dirty}, bertkern._C {env.get('bertkern_C')}; {env['date']}")


# ----------------------------------------------------------------------------- one op on the GPU
HARNESS_ERROR = "harness error"


def run_op(spec: OpSpec, cases: list[Case], device: torch.device, *, copy_bw: dict, deadline: float | None = None,
           warmup_ms: float = 25, rep_ms: float = 100, settings: dict | None = None, log=print,
           timer: Callable = bench_ms, env: dict | None = None, partial_json: Path | None = None,
           only: set[str] | None = None) -> dict:
    """Every case of one op (those past `deadline`, a time.monotonic() value, are listed as not run).
    The document so far is saved to `partial_json` after each case, so a killed run keeps what it measured.
    `timer` is replaceable so that tests can drive this path on the CPU. `only`: the providers to run
    (None: all); the correctness gate's eager baseline is computed either way."""
    providers = {k: v for k, v in gpu_providers(spec).items() if only is None or k in only}
    l2 = l2_bytes(device) if device.type == "cuda" else 0  # no cache to defeat off the GPU: one copy
    doc = {
        "schema": SCHEMA,
        "op": spec.name,
        "env": env or environment(device),
        "copy_bandwidth": copy_bw,
        "settings": {"warmup_ms": warmup_ms, "rep_ms": rep_ms, "timer": "triton.testing.do_bench median, L2 flushed per rep",
                     "rotation": "ceil(2 x L2 / bytes) input copies", **(settings or {})},
        "x_key": spec.x_key,
        "providers": list(providers),
        "results": [],
    }
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            doc["results"].append({"case": case.to_dict(), "bytes": spec.bytes_moved(case), "not_run": "time budget spent"})
            continue
        try:
            r = run_case(spec, case, providers, device, copy_bw["gbs"], l2, warmup_ms, rep_ms, timer)
        except Exception as e:  # inputs or reference failed (out of memory, say): record it, go on
            r = {"case": case.to_dict(), "bytes": spec.bytes_moved(case), "not_run": f"{HARNESS_ERROR}: {_short_exc(e)}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        doc["results"].append(r)
        log(case_line(r))
        if partial_json is not None:
            save_json(doc, partial_json)
    return doc


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry["status"] == "skipped":
        return "skipped"
    if entry["status"] != "ok":
        return f"**{entry['status']}**"
    s = f"{entry['ms']:.4f} ms · {entry['gbs']:.0f} GB/s · {entry['pct_copy']:.0f}%"
    if "tflops" in entry:
        s += f" · {entry['tflops']:.0f} TFLOP/s"
    return s + (f" · {entry['speedup_vs_eager']:.2f}×" if "speedup_vs_eager" in entry else "")


def case_line(r: dict) -> str:
    c = Case.from_dict(r["case"])
    if "not_run" in r:
        return f"{c.label}: not run ({r['not_run']})"
    parts = [f"{n} {_cell(e).replace('**', '')}" for n, e in r["providers"].items()]
    return f"{c.label} ({r['bytes'] / 1e6:.1f} MB): " + " | ".join(parts)


def _group_key(case: dict) -> tuple:
    return (case["direction"], case["dtype"], tuple(sorted(case["options"].items())))


def render_op_markdown(doc: dict) -> str:
    """The Markdown report of one op's JSON document."""
    env, providers = doc["env"], doc["providers"]
    cb = doc["copy_bandwidth"]
    lines = [
        f"# {doc['op']}: {env.get('gpu')}",
        "",
        f"{env_line(env)}.",
        "",
        f"Copy bandwidth measured in the same run (the 100% line): **{cb['gbs']:.0f} GB/s** "
        f"({cb['bytes'] / 1e9:.2f} GB read + written in {cb['ms']:.3f} ms).",
        "",
        "Each cell: median time · GB/s (the bytes the op must move / time) · % of copy bandwidth · speedup over eager. "
        "WRONG = failed the correctness gate (not timed); error = raised. Settings: "
        + ", ".join(f"{k} {v}" for k, v in doc["settings"].items()) + ".",
    ]
    groups: dict[tuple, list] = {}
    for r in doc["results"]:
        groups.setdefault(_group_key(r["case"]), []).append(r)
    notes = []
    for (direction, dtype, opts), rows in groups.items():
        shape_keys = list(rows[0]["case"]["shape"])
        title = f"{direction}, {dtype}" + "".join(f", {k}={v}" for k, v in opts)
        lines += ["", f"## {title}", "", "| " + " | ".join(shape_keys + ["MB"] + providers) + " |",
                  "|" + "---:|" * (len(shape_keys) + 1) + "---|" * len(providers)]
        for r in sorted(rows, key=lambda r: tuple(r["case"]["shape"].values())):
            shape = [str(v) for v in r["case"]["shape"].values()]
            if "not_run" in r:
                cells = [f"not run ({r['not_run']})"] + [""] * (len(providers) - 1)
            else:
                cells = [_cell(r["providers"].get(p)) for p in providers]
                for p, e in r["providers"].items():
                    if e["status"] in ("WRONG", "error"):
                        notes.append(f"- {p}, {title}, {' x '.join(shape)}: {e['status']}: {e.get('reason', '')}")
            lines.append("| " + " | ".join(shape + [f"{r['bytes'] / 1e6:.1f}"] + cells) + " |")
    skipped = {}
    for r in doc["results"]:
        for p, e in r.get("providers", {}).items():
            if e["status"] == "skipped":
                skipped.setdefault(p, set()).add(e["reason"])
    if skipped:
        lines += ["", "Skipped providers:"] + [f"- {p}: {'; '.join(sorted(rs))}" for p, rs in skipped.items()]
    if notes:
        lines += ["", "Failures:"] + notes
    return "\n".join(lines) + "\n"


def save_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def plot(doc: dict, path: Path) -> bool:
    """GB/s against the x key, one panel per (direction, dtype, other shape keys), a line per provider.
    Only if matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    x_key = doc.get("x_key", "rows")
    panels: dict[tuple, list] = {}
    for r in doc["results"]:
        if "not_run" in r or x_key not in r["case"]["shape"]:
            continue
        direction, dtype, opts = _group_key(r["case"])
        rest = opts + tuple((k, v) for k, v in r["case"]["shape"].items() if k != x_key)
        panels.setdefault((direction, dtype) + rest, []).append(r)
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    order = lambda kv: (DIRECTIONS.index(kv[0][0]), str(kv[0][1:]))  # noqa: E731  (fwd panels first)
    for ax, (key, rows) in zip(axes.flat, sorted(panels.items(), key=order)):
        rows.sort(key=lambda r: r["case"]["shape"][x_key])
        for p in doc["providers"]:
            pts = [(r["case"]["shape"][x_key], r["providers"][p]["gbs"]) for r in rows
                   if r["providers"].get(p, {}).get("status") == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.axhline(doc["copy_bandwidth"]["gbs"], ls="--", c="gray", lw=1, label="copy")
        ax.set_xscale("log", base=2)
        ax.set_title(", ".join(key[:2]) + "".join(f", {k}={v}" for k, v in key[2:]), fontsize=9)
        ax.set_xlabel(x_key)
        ax.set_ylabel("GB/s")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{doc['op']} on {doc['env'].get('gpu')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def op_csv_rows(doc: dict) -> list[dict]:
    """One row per (case, provider) of an op document, with the environment in every row."""
    env = {f"env_{k}": doc["env"].get(k) for k in ("gpu", "driver", "torch", "triton", "cuda", "commit", "dirty", "date")}
    rows = []
    for r in doc["results"]:
        c = r["case"]
        base = {"op": doc["op"], "direction": c["direction"], "dtype": c["dtype"],
                "shape": "x".join(str(v) for v in c["shape"].values()),
                **{f"shape_{k}": v for k, v in c["shape"].items()}, **{f"opt_{k}": v for k, v in c["options"].items()},
                "bytes": r.get("bytes")}
        if "not_run" in r:
            rows.append({**base, "provider": "", "status": "not run", "reason": r["not_run"], **env})
            continue
        for p, e in r["providers"].items():
            errs = [o for o in (e.get("errors") or {}).values()]
            worst = max(errs, key=lambda o: (o.get("err") or 0) / (o.get("tol") or 1), default={})
            row = {**base, "provider": p, "status": e["status"], "ms": e.get("ms"), "ms_p20": e.get("ms_p20"),
                   "ms_p80": e.get("ms_p80"), "gbs": e.get("gbs"), "pct_copy": e.get("pct_copy"),
                   "speedup_vs_eager": e.get("speedup_vs_eager")}
            row.update({k: v for k, v in e.items() if k not in row and isinstance(v, (int, float))})  # e.g. a FLOP rate
            rows.append({**row, "err_vs_fp64": worst.get("err"), "eager_err_vs_fp64": worst.get("eager_err"),
                         "tol": worst.get("tol"), "reason": e.get("reason", ""), **env})
    return rows


def plot_speedup(doc: dict, path: Path) -> bool:
    """Bars: geometric-mean speed-up over eager per provider, a group per (direction, dtype, options)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    groups: dict[tuple, list] = {}
    for r in doc["results"]:
        if "not_run" not in r:
            groups.setdefault(_group_key(r["case"]), []).append(r)
    providers = [p for p in doc["providers"] if p != "eager"]
    sp = {(g, p): _geomean([r["providers"][p]["speedup_vs_eager"] for r in rows
                            if "speedup_vs_eager" in r["providers"].get(p, {})])
          for g, rows in groups.items() for p in providers}
    providers = [p for p in providers if any(sp[(g, p)] for g in groups)]
    if not providers:
        return False
    fig, ax = plt.subplots(figsize=(2 + 1.5 * len(groups), 4))
    width = 0.8 / len(providers)
    keys = list(groups)
    for j, p in enumerate(providers):
        ax.bar([i + j * width for i in range(len(keys))], [sp[(g, p)] or 0 for g in keys], width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{g[0]} {g[1]}" + "".join(f"\n{k}={v}" for k, v in g[2]) for g in keys], fontsize=8)
    ax.axhline(1.0, c="gray", lw=1, ls="--")
    ax.set_ylabel("geomean speed-up over eager")
    ax.set_title(f"{doc['op']} on {doc['env'].get('gpu')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_op_results(doc: dict, out_root: Path) -> list[Path]:
    from benchmarks.model_suite import write_csv

    folder = Path(out_root) / doc["env"]["gpu_slug"]
    paths = [folder / f"{doc['op']}.json", folder / f"{doc['op']}.md", folder / f"{doc['op']}.csv"]
    save_json(doc, paths[0])
    paths[1].write_text(render_op_markdown(doc))
    write_csv(op_csv_rows(doc), paths[2])
    try:  # a plotting problem must not cost the numbers
        if plot(doc, folder / f"{doc['op']}.png"):
            paths.append(folder / f"{doc['op']}.png")
        if plot_speedup(doc, folder / f"{doc['op']}_speedup.png"):
            paths.append(folder / f"{doc['op']}_speedup.png")
    except Exception as e:
        print(f"warning: no plot for {doc['op']}: {_short_exc(e)}", file=sys.stderr)
    return paths


def _geomean(xs):
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def render_latest(docs: list[dict]) -> str:
    """A summary of every op's latest results, per GPU, for the README."""
    lines = ["# Latest GPU benchmark results", "",
             "Written by `python benchmarks/run.py`; full tables per op in `benchmarks/results/<gpu>/<op>.md`. "
             "Each cell: % of the measured copy bandwidth at the largest case · geometric-mean speedup over "
             "eager across all sizes of that row (WRONG = failed the correctness gate)."]
    by_gpu: dict[str, list] = {}
    for d in docs:
        by_gpu.setdefault(d["env"].get("gpu") or "?", []).append(d)
    for gpu, gdocs in sorted(by_gpu.items()):
        providers = list(dict.fromkeys(p for d in gdocs for p in d["providers"]))
        lines += ["", f"## {gpu}", ""]
        lines += [f"- {d['op']}: {env_line(d['env'])}; copy {d['copy_bandwidth']['gbs']:.0f} GB/s" for d in gdocs]
        lines += ["", "| op | direction | dtype | largest case | " + " | ".join(providers) + " |",
                  "|---|---|---|---|" + "---|" * len(providers)]
        for d in sorted(gdocs, key=lambda d: d["op"]):
            groups: dict[tuple, list] = {}
            for r in d["results"]:
                if "not_run" not in r:
                    groups.setdefault(_group_key(r["case"]), []).append(r)
            for (direction, dtype, opts), rows in groups.items():
                big = max(rows, key=lambda r: r["bytes"])
                cells = []
                for p in providers:
                    wrong = sum(r["providers"].get(p, {}).get("status") in ("WRONG", "error") for r in rows)
                    e = big["providers"].get(p, {})
                    sp = _geomean([r["providers"][p]["speedup_vs_eager"] for r in rows
                                   if "speedup_vs_eager" in r["providers"].get(p, {})])
                    if wrong:
                        cells.append(f"**WRONG/error in {wrong} of {len(rows)}**")
                    elif e.get("status") == "ok":
                        cells.append(f"{e['pct_copy']:.0f}%" + (f" · {sp:.2f}×" if sp else ""))
                    else:
                        cells.append(e.get("status", "-"))
                shape = "x".join(str(v) for v in big["case"]["shape"].values())
                name = d["op"] + "".join(f" {k}={v}" for k, v in opts)
                lines.append(f"| {name} | {direction} | {dtype} | {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_latest(out_root: Path) -> Path | None:
    """LATEST.md from every <gpu>/<op>.json under out_root (the CPU folder excluded), followed by the
    model suites' sections (<gpu>/bert.json, <gpu>/train.json: see MODEL_SUITES)."""
    out_root = Path(out_root)
    docs, suites = [], {s: [] for s in MODEL_SUITES}
    for p in sorted(out_root.glob("*/*.json")):
        if p.parent.name == "cpu":
            continue
        try:
            d = load_json(p)
        except (OSError, ValueError):
            continue
        if d.get("schema") == SCHEMA and d.get("suite") in suites and "cells" in d:
            suites[d["suite"]].append(d)
        elif d.get("schema") == SCHEMA and "results" in d:
            docs.append(d)
    if not docs and not any(suites.values()):
        return None
    text = render_latest(docs) if docs else ("# Latest GPU benchmark results\n\nWritten by `python benchmarks/run.py`; "
                                             "full tables in `benchmarks/results/<gpu>/`.\n")
    for suite, sdocs in suites.items():
        if sdocs:
            text += "\n".join(importlib.import_module(f"benchmarks.bench_{suite}").render_latest_section(sdocs)) + "\n"
    path = out_root / "LATEST.md"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- honest CPU mode
def check_op_cpu(spec: OpSpec, cases: list[Case], only: set[str] | None = None) -> list[dict]:
    """Each bertkern backend (those in `only`, if given) against float64 and eager on small CPU inputs
    (run_case, untimed). One row per (case, backend), status PASS / FAIL / skipped."""
    rows = []
    providers = {k: v for k, v in cpu_providers(spec).items() if only is None or k in only}
    for case in cases:
        r = run_case(spec, case, providers, torch.device("cpu"), 0.0, 0, 0, 0, timer=None)
        for name, entry in r["providers"].items():
            status = {"ok": "PASS", "WRONG": "FAIL", "error": "FAIL", "skipped": "skipped"}[entry["status"]]
            rows.append({"case": r["case"], "backend": name, **entry, "status": status})
    return rows


def _model_run(model, ids, mask, grad_out, backend):
    """(last hidden state, {param name: grad}) of one forward + backward, with BERTKERN_BACKEND=backend
    for the call (the model's ops pick their backend from it)."""
    old = os.environ.get("BERTKERN_BACKEND")
    os.environ["BERTKERN_BACKEND"] = backend
    try:
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        (hidden * grad_out.to(hidden.dtype)).sum().backward()
        return hidden.detach(), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        if old is None:
            os.environ.pop("BERTKERN_BACKEND", None)
        else:
            os.environ["BERTKERN_BACKEND"] = old


_MISSING_OP = re.compile(r"module 'bertkern\.ops' has no attribute '(\w+)'")


def check_model_cpu(backends=("torch", "triton", "cuda"), quick=False) -> tuple[list[dict], str | None]:
    """A tiny random bertkern BertModel in float32 on the CPU, each fused flag alone and all of them
    together (quick: together only; and bertkern.optimize once it exists), through each backend, against the unfused model
    in float64: last hidden state and every parameter gradient, by the 2x-of-eager rule (eager = the
    unfused float32 model). A flag whose op is not in bertkern.ops yet is reported as skipped.
    Returns (rows, reason the whole check was skipped or None)."""
    import copy

    try:
        from bertkern.models import BertConfig, BertModel
    except ImportError as e:
        return [], f"bertkern.models cannot be imported yet ({e})"
    import bertkern
    from bertkern import backend as _backend

    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1 if quick else 2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    flags = [f.name for f in dataclasses.fields(cfg) if f.name.startswith("fused_")]
    torch.manual_seed(0)
    plain = BertModel(cfg).eval()
    # Quick: all flags together only (a smoke test); else each flag alone too, to say which one breaks.
    variants = ([] if quick and len(flags) > 1 else [(f, [f]) for f in flags])
    variants += [("all fused_* flags", flags)] if len(flags) > 1 else []
    if hasattr(bertkern, "optimize"):
        variants.append(("bertkern.optimize", None))

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0  # padding in the second sequence
    grad_out = torch.randn(2, 16, cfg.hidden_size, generator=g, dtype=torch.float64)
    ref_out, ref_grads = _model_run(copy.deepcopy(plain).double(), ids, mask, grad_out, "torch")
    base_out, base_grads = _model_run(plain, ids, mask, grad_out, "torch")

    def judge(out, grads) -> tuple[dict, list[str]]:
        # The whole-model floor of bertkern.testing (float32 through whole layers), scaled by max(1, |ref|).
        checks = {"output": check_2x(out, ref_out, base_out, "output", floor="model", scale_floor=True)}
        got = [n for n in ref_grads if grads.get(n) is not None]
        checks["param grads"] = check_2x([grads[n] for n in got], [ref_grads[n] for n in got],
                                         [base_grads[n] for n in got], "param grads", floor="model", scale_floor=True)
        errs = {k: {"err": c.err, "eager_err": c.eager_err} for k, c in checks.items()}
        bad = ["some parameters got no gradient"] if len(got) < len(ref_grads) else []
        return errs, bad + [c.reason for c in checks.values() if c.reason]

    rows = []
    for vname, on in variants:
        for backend in backends:
            row = {"variant": vname, "backend": backend}
            why = _backend.unavailable_reason(backend, torch.device("cpu"))
            if why:
                rows.append({**row, "status": "skipped", "reason": why})
                continue
            model = copy.deepcopy(plain)
            try:
                if on is None:
                    swapped = bertkern.optimize(model, backend=backend)
                    model = swapped if isinstance(swapped, torch.nn.Module) else model
                else:
                    for f in on:  # flags are read at forward time
                        setattr(model.config, f, True)
                out, grads = _model_run(model, ids, mask, grad_out, backend)
            except AttributeError as e:
                missing = _MISSING_OP.search(str(e))
                if missing is None:
                    rows.append({**row, "status": "FAIL", "reason": _short_exc(e)})
                else:
                    rows.append({**row, "status": "skipped", "reason": f"bertkern.ops.{missing.group(1)} is not written yet"})
                continue
            except Exception as e:
                rows.append({**row, "status": "FAIL", "reason": _short_exc(e)})
                continue
            errs, bad = judge(out, grads)
            rows.append({**row, "status": "FAIL" if bad else "PASS", "reason": "; ".join(bad), "errors": errs})
    return rows, None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def _skipped_footer(rows: list[dict], what: str) -> list[str]:
    """One line per (backend, reason) instead of one per skipped row."""
    groups: dict[tuple, int] = {}
    for r in rows:
        if r["status"] == "skipped":
            groups[(r["backend"], r["reason"])] = groups.get((r["backend"], r["reason"]), 0) + 1
    return [f"skipped: {b} ({n} {what}): {why}" for (b, why), n in groups.items()]


def _tally(rows: list[dict]) -> str:
    per: dict[str, list] = {}
    for r in rows:
        per.setdefault(r["backend"], []).append(r["status"])
    parts = []
    for b, st in per.items():
        ran = [s for s in st if s != "skipped"]
        parts.append(f"{b} {ran.count('PASS')}/{len(ran)} PASS" if ran else f"{b} skipped")
    return ", ".join(parts)


def render_cpu_report(op_rows: dict[str, list[dict]], model_rows: list[dict], model_skip: str | None) -> str:
    lines = []
    for op, rows in op_rows.items():
        lines += [f"== {op}: correctness on CPU, small sizes (triton under TRITON_INTERPRET=1): {_tally(rows)} ==",
                  f"{'case':<56} {'backend':<7} {'output':<6} {'err vs f64':>10} {'eager err':>10} "
                  f"{'|out-eager|':>11} {'tol':>9}  result"]
        for r in rows:
            if r["status"] == "skipped":
                continue
            label = Case.from_dict(r["case"]).label.removeprefix(op + " ")
            for i, (name, e) in enumerate((r.get("errors") or {"-": {}}).items()):
                lines.append(f"{label if i == 0 else '':<56} {r['backend'] if i == 0 else '':<7} {name:<6} "
                             f"{_fmt(e.get('err')):>10} {_fmt(e.get('eager_err')):>10} {_fmt(e.get('vs_eager')):>11} "
                             f"{_fmt(e.get('tol')):>9}  {r['status'] if i == 0 else ''}")
            if r["status"] == "FAIL":
                lines.append(f"    FAIL: {r.get('reason', '')}")
        lines += _skipped_footer(rows, "cases") + [""]
    lines.append("== model: tiny random BertModel (float32), fused paths on, vs the unfused model in float64"
                 + (f": {_tally(model_rows)} ==" if model_rows else " =="))
    if model_skip:
        lines.append(f"skipped: {model_skip}")
    for r in model_rows:
        if r["status"] == "skipped" and r["variant"] != "bertkern.optimize" and "not written yet" in r["reason"]:
            lines.append(f"{r['variant']:<22} {r['backend']:<7} skipped: {r['reason']}")
        elif r["status"] != "skipped":
            errs = ", ".join(f"{k} err {_fmt(v['err'])} (unfused {_fmt(v['eager_err'])})" for k, v in r.get("errors", {}).items())
            lines.append(f"{r['variant']:<22} {r['backend']:<7} {r['status']:<5} {r.get('reason') or errs}")
    lines += _skipped_footer([r for r in model_rows if "not written yet" not in r.get("reason", "")], "model checks")
    return "\n".join(lines) + "\n"


def honest_cpu_mode(specs: list[OpSpec], out_root: Path, *, quick: bool = False, dtypes=None,
                    latest: Path = RESULTS_DIR / "LATEST.md", log=print, only: set[str] | None = None,
                    show_latest: bool = True) -> int:
    """Correctness of every op and backend (and the model) at small sizes, no timings. Exit status.
    only: the backends to check (None: all); show_latest=False leaves printing LATEST.md to the
    caller (run.py, after its other suites)."""
    t0 = time.monotonic()
    env = environment(torch.device("cpu"))
    log(f"bertkern benchmarks, CPU mode: {env_line(env)}")
    log(f"{NO_CUDA_LINE}: checking correctness only (every backend against a float64 reference and eager).")
    log("")
    op_rows = {}
    for spec in specs:
        cases = [c for c in spec.cpu_cases(quick) if dtypes is None or c.dtype in dtypes]
        op_rows[spec.name] = check_op_cpu(spec, cases, only)
    model_rows, model_skip = check_model_cpu(quick=quick)
    report = render_cpu_report(op_rows, model_rows, model_skip)
    log(report)
    fails = [r for rows in op_rows.values() for r in rows if r["status"] == "FAIL"]
    fails += [r for r in model_rows if r["status"] == "FAIL"]
    checked = sum(r["status"] != "skipped" for rows in op_rows.values() for r in rows) + sum(
        r["status"] != "skipped" for r in model_rows)
    folder = Path(out_root) / "cpu"
    save_json({"schema": SCHEMA, "mode": "cpu-correctness", "env": env, "ops": op_rows,
               "model": {"rows": model_rows, "skipped": model_skip}}, folder / "check.json")
    (folder / "check.md").write_text(f"CPU correctness check: {env_line(env)}\n\n```\n{report}```\n")
    log(f"{checked - len(fails)} of {checked} checks PASS, {len(fails)} FAIL ({time.monotonic() - t0:.1f} s); "
        f"report in {rel_path(folder / 'check.md')}")
    if show_latest:
        log("")
        log(NO_CUDA_LINE + ". Latest committed GPU results:")
        log(latest.read_text() if latest.exists() else f"(no GPU results have been committed yet: {rel_path(latest)} is absent)")
    return 1 if fails else 0


def rel_path(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)
