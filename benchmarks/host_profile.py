"""Where an eager forward (--train: a fine-tuning step, as the train suite times it) spends its host
time, per provider of the bert (train) suite: the time for the call to return (host: its launches fit in
the queue) beside the time until the GPU is done, the providers called in turn so that a noisy host drifts
on all of them alike; then the ops, and the Python functions outside them, that cost the host most. A
small BERT called eagerly is host-bound on an H100. Writes OUT/<gpu or cpu>/host_profile[_train].md. (Per
op, the ops suite's eager and graph-replay times tell kernel from host.)

    python benchmarks/host_profile.py --model bert-base --batch 1 --providers hf-sdpa optimize optimize-cuda
    python benchmarks/host_profile.py --train --model bert-base
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, models  # noqa: E402

import torch  # noqa: E402

TOP = 12


def host_and_total(steps: dict, sync, calls: int) -> dict[str, tuple[float, float]]:
    """Per step, median ms for `step()` to return and until the device is done; the steps called in turn."""
    times = {name: ([], []) for name in steps}
    for _ in range(calls):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            sync()
            times[name][0].append(t1 - t0)
            times[name][1].append(time.perf_counter() - t0)
    return {name: (1e3 * statistics.median(h), 1e3 * statistics.median(t)) for name, (h, t) in times.items()}


def top_python(step, calls: int) -> list[tuple[str, int, float]]:
    """(function, calls, self µs) per call of the TOP Python functions by self time (cProfile)."""
    prof = cProfile.Profile()
    prof.runcall(lambda: [step() for _ in range(calls)])
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: kv[1][2], reverse=True)[:TOP]
    return [(f"{Path(f).name}:{line}({fn})" if line else fn, round(nc / calls), 1e6 * tt / calls)
            for (f, line, fn), (_, nc, tt, _, _) in rows]


def top_ops(step, sync, calls: int) -> tuple[float, list[tuple[str, int, float, float]]]:
    """Host µs per call inside ops (profiled), and (op, calls, host µs, device µs) per call of the TOP ops
    by host time, then of the TOP by device time (the kernels; on a GPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * torch.cuda.is_available()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            step()
        sync()
    events = prof.key_averages()
    device_us = lambda e: getattr(e, "self_device_time_total", 0)  # noqa: E731
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    by_device = [e for e in sorted(events, key=device_us, reverse=True)[:TOP] if device_us(e) > 0 and e not in by_host]
    return (sum(e.self_cpu_time_total for e in events) / calls,
            [(e.key, round(e.count / calls), e.self_cpu_time_total / calls, device_us(e) / calls)
             for e in by_host + by_device])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=list(models.ARCH))
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16; --train: bf16 autocast")
    p.add_argument("--train", action="store_true", help="a fine-tuning step (autocast, AdamW) instead of a forward")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--fill", type=float, default=1.0)
    p.add_argument("--providers", nargs="+", default=["hf-sdpa", "optimize", "optimize-cuda", "optimize-triton"])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    suite = "train" if a.train else "bert"
    default = "bf16" if a.train else "fp16" if device.type == "cuda" else "fp32"  # train: the autocast dtype
    dtype = common.DTYPES[a.dtype or default]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    env = common.environment(device)
    cell = models.Cell(a.model, dtype, a.batch, a.seq, a.fill)
    g = models.Group(suite, a.model, dtype, device)
    ids, mask, _ = models.make_batch(cell, g.config, device)
    ctx = {"ids": ids, "mask": mask, "labels": torch.arange(a.batch, device=device) % g.config.num_labels}
    what = "fine-tuning step (autocast, AdamW)" if a.train else "forward"
    lines = [f"# Host time of an eager {what}: {cell.label}", "", common.env_line(env), "",
             "| provider | host ms (call returns) | total ms (device done) | host share |", "|---|---:|---:|---:|"]
    steps, rows = {}, {}
    for prov in models.providers(suite, a.providers, cpu=device.type != "cuda"):
        if prov.graphs:  # a graph replay has no host work per layer to profile
            rows[prov.name] = f"| {prov.name} | not profiled: a CUDA-graph provider | | |"
            continue
        try:
            model, fn, _ = prov.build(g)  # every provider's model at once: small models
        except Exception as e:  # e.g. optimize-cuda without _C: say so, go on
            rows[prov.name] = f"| {prov.name} | {common.short_exc(e)} | | |"
            continue
        steps[prov.name] = models.step_fn(g, cell, model, fn, ctx)
        for _ in range(3):  # Triton compiles, caches, the allocator
            steps[prov.name]()
    for name, (host, total) in host_and_total(steps, sync, a.calls).items():
        rows[name] = f"| {name} | {host:.3f} | {total:.3f} | {host / total:.0%} |"
        print(rows[name], flush=True)
    lines += list(rows.values())
    for name, step in steps.items():
        in_ops, ops = top_ops(step, sync, max(3, a.calls // 4))
        lines += ["", f"## {name}: the {TOP} ops with the most host (self CPU) time per call, then the kernels "
                  "with the most device time", "", f"Host time inside ops (profiled): {in_ops / 1e3:.3f} ms per call; "
                  "the rest of the call is Python outside any op.", "", "| op | calls | host µs | device µs |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{op}` | {n} | {us:.1f} | {dev:.1f} |" for op, n, us, dev in ops]
        lines += ["", "The Python functions and built-ins with the most self time (cProfile):", "",
                  "| function | calls | self µs |", "|---|---:|---:|"]
        lines += [f"| `{fn}` | {n} | {us:.1f} |" for fn, n, us in top_python(step, max(3, a.calls // 4))]
    folder = Path(a.out) / env["gpu_slug"]  # "cpu" without a GPU
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("host_profile_train.md" if a.train else "host_profile.md")
    path.write_text("\n".join(lines) + "\n")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
