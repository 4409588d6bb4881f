"""Run every op benchmark that exists (benchmarks/bench_<op>.py), or the ones named.

    python benchmarks/run.py [--ops bias_gelu,...] [--dtype fp16,bf16] [--quick] [--budget-s S] [--out DIR]

With a CUDA GPU: checks every provider against a float64 reference, times the ones that are right,
and writes <out>/<gpu>/<op>.json|.md(|.png) and <out>/LATEST.md (default out: benchmarks/results).
Without one: the honest CPU mode, correctness only, written under <out>/cpu/ (git-ignored).
Exit status: 0 when every check passed, 1 when a provider was WRONG or raised, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `bertkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402  (first: sets TRITON_INTERPRET=1 when there is no GPU)

import torch  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", default=None, help="ops to run (default: every bench_<op>.py); comma lists work")
    p.add_argument("--dtype", nargs="+", default=None, help="dtypes to keep: fp16, bf16, fp32 (default: each op's own)")
    p.add_argument("--quick", action="store_true", help="a few cases per op, shorter timing (a smoke test)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget for the timed cases, shared among the ops; cases past it are listed as not run")
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR, help="results root (default: benchmarks/results)")
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up per measurement (default 25, quick 10)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition time per measurement (default 100, quick 40)")
    args = p.parse_args(argv)
    args.ops = [o for item in args.ops for o in item.split(",") if o] if args.ops else None
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import_errors: list[str] = []
    try:
        specs = harness.discover(args.ops, import_errors)
        dtypes = harness.parse_dtypes(args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for err in import_errors:  # a broken op must not hide the others; it still fails the run
        print(f"FAIL: {err}", flush=True)
    if not torch.cuda.is_available():
        return harness.honest_cpu_mode(specs, args.out, quick=args.quick, dtypes=dtypes) or int(bool(import_errors))

    device = torch.device("cuda", torch.cuda.current_device())
    warmup = args.warmup_ms if args.warmup_ms is not None else (10 if args.quick else 25)
    rep = args.rep_ms if args.rep_ms is not None else (40 if args.quick else 100)
    start = time.monotonic()
    deadline = None if args.budget_s is None else start + args.budget_s
    env = harness.environment(device)
    print(f"bertkern benchmarks: {harness.env_line(env)}", flush=True)
    copy_bw = harness.copy_bandwidth(device)
    print(f"copy bandwidth (the 100% line): {copy_bw['gbs']:.0f} GB/s", flush=True)
    settings = {"quick": args.quick, "budget_s": args.budget_s,
                "dtypes": None if dtypes is None else [harness.dtype_name(d) for d in dtypes]}
    status = int(bool(import_errors))
    for i, spec in enumerate(specs):
        cases = [c for c in spec.cases(args.quick) if dtypes is None or c.dtype in dtypes]
        # Each op gets an equal share of what is left, so a slow op cannot starve the ones after it.
        op_deadline = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(specs) - i)
        print(f"\n== {spec.name}: {len(cases)} cases ==", flush=True)
        doc = harness.run_op(spec, cases, device, copy_bw=copy_bw, deadline=op_deadline, warmup_ms=warmup, rep_ms=rep,
                             settings=settings, log=lambda s: print(s, flush=True), env=env,
                             partial_json=args.out / env["gpu_slug"] / f"{spec.name}.json")
        paths = harness.write_op_results(doc, args.out)
        bad = [f"{p} {e['status']} on {harness.Case.from_dict(r['case']).label}: {e.get('reason', '')}"
               for r in doc["results"] for p, e in r.get("providers", {}).items() if e["status"] in ("WRONG", "error")]
        bad += [f"{harness.Case.from_dict(r['case']).label}: {r['not_run']}"
                for r in doc["results"] if r.get("not_run", "").startswith(harness.HARNESS_ERROR)]
        for line in bad:
            print("  " + line)
        out_of_time = sum(r.get("not_run") == "time budget spent" for r in doc["results"])
        if out_of_time:
            print(f"  {out_of_time} of {len(cases)} cases not run: the time budget was spent")
        print("  wrote " + ", ".join(harness.rel_path(p) for p in paths), flush=True)
        status = status or (1 if bad else 0)
    latest = harness.write_latest(args.out)
    if latest is not None:
        print(f"\nwrote {harness.rel_path(latest)} ({time.monotonic() - start:.0f} s in all):\n")
        print(latest.read_text())
    return status


if __name__ == "__main__":
    sys.exit(main())
