"""Where an eager forward spends its host time, per provider of the bert suite: the time for the call to
return (host: a forward's launches fit in the queue) beside the time until the GPU is done, and the ops
that cost the host most. A small BERT called eagerly is host-bound on an H100. Writes
OUT/<gpu or cpu>/host_profile.md. With --ops, the same per op, direction and backend instead, at each
op's first quick case (the H100 run had the Triton backwards 3-5x slower than the CUDA ones eagerly, and
no graph time to say whether the kernel or the host is the cause): OUT/<gpu or cpu>/host_profile_ops.md.

    python benchmarks/host_profile.py --model bert-base --batch 1 --providers hf-sdpa optimize optimize-cuda
    python benchmarks/host_profile.py --ops bias_gelu add_layer_norm
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, models, ops  # noqa: E402

import torch  # noqa: E402

TOP = 12


def host_and_total(step, sync, calls: int) -> tuple[float, float]:
    """Median ms for `step()` to return, and until the device is done."""
    host, total = [], []
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        sync()
        host.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(total)


def top_ops(step, sync, calls: int) -> tuple[float, list[tuple[str, int, float, float]]]:
    """Host µs per call inside ops (profiled), and (op, calls, host µs, device µs) per call of the TOP ops
    by host time, then of the TOP by device time (the kernels; on a GPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * torch.cuda.is_available()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            step()
        sync()
    events = prof.key_averages()
    row = lambda e: (e.key, round(e.count / calls), e.self_cpu_time_total / calls,  # noqa: E731
                     getattr(e, "self_device_time_total", 0) / calls)
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    by_device = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:TOP]
    by_device = [e for e in by_device if getattr(e, "self_device_time_total", 0) > 0 and e not in by_host]
    return sum(e.self_cpu_time_total for e in events) / calls, [row(e) for e in by_host + by_device]


def profile_rows(name: str, step, sync, calls: int, lines: list, tops: list) -> None:
    """One table row (host ms, total ms, host share) and the step's top ops, after a warm-up."""
    for _ in range(3):  # Triton compiles, caches, the allocator
        step()
    host, total = host_and_total(step, sync, calls)
    lines.append(f"| {name} | {host:.3f} | {total:.3f} | {host / total:.0%} |")
    tops.append((name, top_ops(step, sync, max(3, calls // 4))))
    print(lines[-1], flush=True)


def op_steps(names, device):
    """(label, step or the reason it cannot run) per op, direction and provider (not compile) at the op's
    first quick case of each direction (on a CPU: its first small case)."""
    gpu = device.type == "cuda"
    for spec in ops.discover(names):
        cases = spec.cases(True) if gpu else spec.cpu_cases(True)
        for case in [next(c for c in cases if c.direction == d) for d in ("fwd", "bwd")]:
            prep = ops.prepare(spec, case, device)
            for prov, factory in ops.providers(spec, gpu).items():
                label = f"{spec.name} {case.label} · {prov}"
                if prov == "compile":
                    continue
                try:
                    yield label, ops.make_step(spec, case, factory(case, device), prep.copies[0])
                except Exception as e:  # a backend not built here: say so, go on
                    yield label, common.short_exc(e)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=list(models.ARCH))
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--fill", type=float, default=1.0)
    p.add_argument("--providers", nargs="+", default=["hf-sdpa", "optimize", "optimize-cuda", "optimize-triton"])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--ops", nargs="+", help="profile these ops' kernels (fwd and bwd, each backend) instead of a model")
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = common.DTYPES[a.dtype] if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    env = common.environment(device)
    lines = [f"# Host time of an eager {'op call' if a.ops else 'forward'}", "", common.env_line(env), "",
             "| provider | host ms (call returns) | total ms (device done) | host share |", "|---|---:|---:|---:|"]
    tops = []
    if a.ops:
        for label, step in op_steps(a.ops, device):
            if isinstance(step, str):
                lines.append(f"| {label} | {step} | | |")
            else:
                profile_rows(label, step, sync, a.calls, lines, tops)
        return write(a, env, device, lines, tops, "host_profile_ops.md")
    cell = models.Cell(a.model, dtype, a.batch, a.seq, a.fill)
    g = models.Group("bert", a.model, dtype, device)
    ids, mask, _ = models.make_batch(cell, g.config, device)
    lines[0] += f": {cell.label}"
    for prov in models.providers("bert", a.providers, cpu=device.type != "cuda"):
        if prov.graphs:  # a graph replay has no host work per layer to profile
            lines.append(f"| {prov.name} | not profiled: a CUDA-graph provider | | |")
            continue
        try:
            model, fn, _ = prov.build(g)
        except Exception as e:  # e.g. optimize-cuda without _C: say so, go on
            lines.append(f"| {prov.name} | {common.short_exc(e)} | | |")
            continue
        profile_rows(prov.name, torch.no_grad()(lambda: fn(ids, mask)), sync, a.calls, lines, tops)
        del model, fn
        common.free_memory(device)
    return write(a, env, device, lines, tops, "host_profile.md")


def write(a, env, device, lines: list, tops: list, name: str) -> int:
    for label, (in_ops, rows) in tops:
        lines += ["", f"## {label}: the {TOP} ops with the most host (self CPU) time per call, then the kernels "
                  "with the most device time", "", f"Host time inside ops (profiled): {in_ops / 1e3:.3f} ms per call; "
                  "the rest of the call is Python outside any op.", "", "| op | calls | host µs | device µs |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{op}` | {n} | {us:.1f} | {dev:.1f} |" for op, n, us, dev in rows]
    folder = Path(a.out) / (common.gpu_slug(env["gpu"]) if device.type == "cuda" else "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines) + "\n")
    print(f"written: {folder / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
