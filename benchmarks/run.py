"""Run bertkern's benchmark suites: per-op kernels, end-to-end BERT inference, a BERT training step.

    python benchmarks/run.py [--suite ops,bert,train] [--ops bias_gelu,...] [--dtype fp16,bf16] [--quick]
                             [--shapes 32x128,16x512] [--providers NAME,...] [--skip-providers NAME,...]
                             [--models bert-base,...] [--fills 1.0,0.6] [--budget-s S] [--out DIR]
    python benchmarks/run.py --update-readme     # README.md's results block from benchmarks/results/LATEST.md
                                                 # (between <!-- results:start --> and <!-- results:end -->)
    bertkern bench [same arguments]

Suites (run in this order; default: all):
- ops:   every benchmarks/bench_<op>.py (or --ops): GB/s and % of copy bandwidth vs eager and torch.compile
- bert:  benchmarks/bench_bert.py: BERT-base/-large and MiniLM inference latency and throughput
- train: benchmarks/bench_train.py: a BERT-base fine-tuning step (bf16 autocast, AdamW): tokens/s, peak memory

With a CUDA GPU: every provider is checked against a float64 reference before it is timed; results go
to <out>/<gpu>/<name>.json|.md|.csv(|.png) and <out>/LATEST.md (default out: benchmarks/results),
each naming the GPU, driver, torch, triton, CUDA, commit and date. --budget-s is shared among the
suites (ops 35%, bert 45%, train 20% of what is left when each starts); within a suite the most
important cases run first and the rest are listed as not run.
Without one: the honest CPU mode: correctness only (ops at small sizes, Triton under TRITON_INTERPRET=1;
tiny BERT configs and MiniLM through each backend), written under <out>/cpu/ (git-ignored), then the
latest committed GPU results. No timings.
--shapes: op cases whose shape starts with the sizes given (bias_gelu 32768x3072, softmax 32x12x512);
for bert and train the batch x seq cells to run. --providers / --skip-providers: provider names of any
selected suite (ops: eager, compile, triton, cuda; see bench_bert.py and bench_train.py for theirs).
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
from benchmarks import model_suite as ms  # noqa: E402

import torch  # noqa: E402

SUITES = ("ops", "bert", "train")
BUDGET_SHARE = {"ops": 0.35, "bert": 0.45, "train": 0.20}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", nargs="+", default=None,
                   help="suites to run: ops, bert, train (default: all; with --ops: ops); comma lists work")
    p.add_argument("--ops", nargs="+", default=None, help="ops to run (default: every bench_<op>.py); comma lists work")
    p.add_argument("--dtype", nargs="+", default=None,
                   help="dtypes to keep: fp16, bf16, fp32 (default: each suite's own; train always uses bf16 autocast)")
    p.add_argument("--quick", action="store_true", help="a few cases per suite, shorter timing (a smoke test)")
    p.add_argument("--shapes", nargs="+", default=None, help="sizes joined by x, e.g. 32x128,16x512 (see above)")
    p.add_argument("--providers", nargs="+", default=None, help="providers to run (default: all)")
    p.add_argument("--skip-providers", nargs="+", default=None, help="providers to leave out, e.g. compile-max-autotune")
    p.add_argument("--models", nargs="+", default=None, help="bert/train models: bert-base, bert-large, minilm")
    p.add_argument("--fills", nargs="+", default=None, help="bert: padding fills to run, 1.0 (full) and/or 0.6")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget for the timed runs, shared among the suites; cases past it are listed as not run")
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR, help="results root (default: benchmarks/results)")
    p.add_argument("--warmup-ms", type=float, default=None, help="ops: do_bench warm-up per measurement (default 25, quick 10)")
    p.add_argument("--rep-ms", type=float, default=None, help="ops: do_bench repetition time per measurement (default 100, quick 40)")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite README.md's results block from <out>/LATEST.md and exit (benchmarks/readme_table.py)")
    p.add_argument("--readme", type=Path, default=harness.ROOT / "README.md", help="the README --update-readme rewrites")
    args = p.parse_args(argv)
    args.ops = ms.parse_list(args.ops)
    # Naming ops without naming suites means the ops suite alone (python benchmarks/bench_<op>.py does that).
    args.suite = ms.parse_list(args.suite) or (["ops"] if args.ops else list(SUITES))
    args.providers = ms.parse_list(args.providers)
    args.skip_providers = ms.parse_list(args.skip_providers)
    args.models = ms.parse_list(args.models)
    return args


def _check_args(args, specs) -> None:
    """ValueError for names no selected suite knows."""
    unknown = [s for s in args.suite if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; have {list(SUITES)}")
    args.shapes = ms.parse_shapes(args.shapes)
    args.fills = [float(f) for f in ms.parse_list(args.fills) or []] or None
    if args.fills and any(not 0.0 < f <= 1.0 for f in args.fills):
        raise ValueError("--fills must be in (0, 1]")
    known = set()
    if "ops" in args.suite:
        known |= set(OP_PROVIDERS) | {p for s in specs for p in s.extra_providers}
    if "bert" in args.suite:
        from benchmarks import bench_bert

        known |= set(bench_bert.PROVIDER_NAMES)
    if "train" in args.suite:
        from benchmarks import bench_train

        known |= set(bench_train.PROVIDER_NAMES)
    for opt in ("providers", "skip_providers"):
        bad = [n for n in getattr(args, opt) or [] if n not in known and n.split("[")[0] not in known]
        if bad:
            raise ValueError(f"unknown provider(s) {bad} for suite(s) {', '.join(args.suite)}; have {sorted(known)}")
    if args.models:
        bad = [m for m in args.models if m not in ms.ARCH]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; have {sorted(ms.ARCH)}")


def _select(providers, args):
    """Providers named by --providers (a bare name also selects its [backend] variants), less --skip-providers."""
    def named(p, names):
        return names is not None and (p.name in names or p.name.split("[")[0] in names)

    return [p for p in providers if (args.providers is None or named(p, args.providers)) and not named(p, args.skip_providers)]


OP_PROVIDERS = ("eager", "compile", "torch", "triton", "cuda")  # torch: the CPU mode's reference backend


def _op_filter(args, specs) -> set[str] | None:
    """The op providers --providers / --skip-providers leave (None: all of them)."""
    every = set(OP_PROVIDERS) | {p for s in specs for p in s.extra_providers}
    names = every if args.providers is None else every & set(args.providers)
    names = names - set(args.skip_providers or ())
    return None if names == every else names


def _bert_cells(args, dtypes):
    from benchmarks import bench_bert

    return bench_bert.cells(args.quick, models=args.models, dtypes=dtypes,
                            shapes=[s[:2] for s in args.shapes] if args.shapes else None, fills=args.fills)


# ----------------------------------------------------------------------------- with a GPU
def run_ops(specs, args, dtypes, device, env, deadline, warmup, rep, log) -> int:
    copy_bw = harness.copy_bandwidth(device)
    log(f"copy bandwidth (the 100% line): {copy_bw['gbs']:.0f} GB/s")
    settings = {"quick": args.quick, "budget_s": args.budget_s,
                "dtypes": None if dtypes is None else [harness.dtype_name(d) for d in dtypes]}
    status = 0
    only = _op_filter(args, specs)
    for i, spec in enumerate(specs):
        cases = [c for c in spec.cases(args.quick) if (dtypes is None or c.dtype in dtypes)
                 and ms.shape_matches(c.shape.values(), args.shapes)]
        # Each op gets an equal share of what is left, so a slow op cannot starve the ones after it.
        op_deadline = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(specs) - i)
        log(f"\n== {spec.name}: {len(cases)} cases ==")
        doc = harness.run_op(spec, cases, device, copy_bw=copy_bw, deadline=op_deadline, warmup_ms=warmup, rep_ms=rep,
                             settings=settings, log=log, env=env, only=only,
                             partial_json=args.out / env["gpu_slug"] / f"{spec.name}.json")
        paths = harness.write_op_results(doc, args.out)
        bad = [f"{p} {e['status']} on {harness.Case.from_dict(r['case']).label}: {e.get('reason', '')}"
               for r in doc["results"] for p, e in r.get("providers", {}).items() if e["status"] in ("WRONG", "error")]
        bad += [f"{harness.Case.from_dict(r['case']).label}: {r['not_run']}"
                for r in doc["results"] if r.get("not_run", "").startswith(harness.HARNESS_ERROR)]
        for line in bad:
            log("  " + line)
        out_of_time = sum(r.get("not_run") == "time budget spent" for r in doc["results"])
        if out_of_time:
            log(f"  {out_of_time} of {len(cases)} cases not run: the time budget was spent")
        log("  wrote " + ", ".join(harness.rel_path(p) for p in paths))
        status = status or (1 if bad else 0)
    return status


def run_model_suite(name, args, dtypes, device, env, deadline, log) -> int:
    """The bert or train suite on the GPU: run, write <out>/<gpu>/<name>.*, list failures and what did not run."""
    from benchmarks import bench_bert, bench_train

    mod = {"bert": bench_bert, "train": bench_train}[name]
    budget = ms.Budget(None if deadline is None else max(0.0, deadline - time.monotonic()))
    providers = _select(mod.gpu_providers(), args)
    if name == "bert":
        cells = _bert_cells(args, dtypes)
    else:
        cells = bench_train.cells(args.quick, models=args.models, shapes=[s[:2] for s in args.shapes] if args.shapes else None)
    log(f"\n== {name}: {len(cells)} cells x {len(providers)} providers "
        f"({', '.join(p.name for p in providers)}) ==")
    settings = {"quick": args.quick, "budget_s": None if deadline is None else round(budget.left())}
    doc = mod.run(device, cells, providers, budget=budget, log=log, env=env, settings=settings,
                  partial_json=args.out / env["gpu_slug"] / f"{name}.json")
    paths = mod.write_results(doc, args.out)
    bad, missing = mod.failures(doc), mod.not_run(doc)
    for line in bad:
        log("  FAIL: " + line)
    if missing:
        log(f"  not run ({len(missing)}): " + "; ".join(missing))
    log("  wrote " + ", ".join(harness.rel_path(p) for p in paths))
    return 1 if bad else 0


def run_gpu(args, specs, dtypes, import_errors, log) -> int:
    device = torch.device("cuda", torch.cuda.current_device())
    warmup = args.warmup_ms if args.warmup_ms is not None else (10 if args.quick else 25)
    rep = args.rep_ms if args.rep_ms is not None else (40 if args.quick else 100)
    start = time.monotonic()
    env = harness.environment(device)
    log(f"bertkern benchmarks ({', '.join(args.suite)}): {harness.env_line(env)}")
    status = int(bool(import_errors))
    suites = [s for s in SUITES if s in args.suite]
    for i, suite in enumerate(suites):
        deadline = None
        if args.budget_s is not None:
            left = start + args.budget_s - time.monotonic()
            share = BUDGET_SHARE[suite] / sum(BUDGET_SHARE[s] for s in suites[i:])
            deadline = time.monotonic() + max(0.0, left) * share
        try:
            if suite == "ops":
                rc = run_ops(specs, args, dtypes, device, env, deadline, warmup, rep, log)
            else:
                rc = run_model_suite(suite, args, dtypes, device, env, deadline, log)
        except Exception as e:  # one suite's crash must not cost the others
            log(f"FAIL: suite {suite} raised {harness._short_exc(e)}")
            rc = 1
        status = status or rc
    latest = harness.write_latest(args.out)
    if latest is not None:
        log(f"\nwrote {harness.rel_path(latest)} ({time.monotonic() - start:.0f} s in all):\n")
        log(latest.read_text())
    return status


# ----------------------------------------------------------------------------- without a GPU
def run_cpu(args, specs, dtypes, import_errors, log) -> int:
    from benchmarks import bench_bert, bench_train

    t0 = time.monotonic()
    status = int(bool(import_errors))
    checked = failed = 0
    folder = args.out / "cpu"
    env = harness.environment(torch.device("cpu"))
    if "ops" in args.suite:  # prints its own header
        status = harness.honest_cpu_mode(specs, args.out, quick=args.quick, dtypes=dtypes, log=log,
                                         only=_op_filter(args, specs), show_latest=False) or status
    else:
        log(f"bertkern benchmarks, CPU mode: {harness.env_line(env)}")
        log(f"{harness.NO_CUDA_LINE}: checking correctness only.\n")
    for name, mod in (("bert", bench_bert), ("train", bench_train)):
        if name not in args.suite:
            continue
        log(f"== {name}: correctness through each backend on the CPU (no timings) ...")
        s0 = time.monotonic()
        providers = _select(mod.cpu_providers(), args)
        if name == "bert":
            models = [m for m in (args.models or (("tiny",) if args.quick else ("tiny", "minilm")))]
            doc = mod.cpu_check(models=models, providers=providers, log=log)
        else:
            doc = mod.cpu_check(models=args.models or ("tiny",), providers=providers, log=log)
        doc["env"] = env
        report = mod.render_cpu_report(doc)
        log(report)
        n, bad = mod.cpu_counts(doc)
        checked, failed = checked + n, failed + bad
        harness.save_json(doc, folder / f"{name}_check.json")
        (folder / f"{name}_check.md").write_text(f"CPU correctness check ({name}): {harness.env_line(env)}\n\n```\n{report}```\n")
        log(f"{name}: {n - bad} of {n} checks PASS, {bad} FAIL ({time.monotonic() - s0:.1f} s); "
            f"report in {harness.rel_path(folder / f'{name}_check.md')}\n")
        status = status or (1 if bad else 0)
    log(f"CPU mode done in {time.monotonic() - t0:.1f} s: "
        + ("every check passed." if status == 0 else "SOME CHECKS FAILED (exit status 1)."))
    latest = args.out / "LATEST.md"
    if not latest.exists():
        latest = harness.RESULTS_DIR / "LATEST.md"
    log("")
    log(f"{harness.NO_CUDA_LINE}. Latest committed GPU results:")
    log(latest.read_text() if latest.exists() else
        f"(no GPU results have been committed yet: {harness.rel_path(latest)} is absent)")
    return status


def cuda_available() -> bool:
    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log = lambda s="": print(s, flush=True)  # noqa: E731
    if args.update_readme:
        from benchmarks import readme_table

        return readme_table.main(["--readme", str(args.readme), "--latest", str(args.out / "LATEST.md")])
    import_errors: list[str] = []
    try:
        specs = harness.discover(args.ops, import_errors) if "ops" in args.suite else []
        dtypes = harness.parse_dtypes(args.dtype)
        _check_args(args, specs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for err in import_errors:  # a broken op must not hide the others; it still fails the run
        log(f"FAIL: {err}")
    if not cuda_available():
        return run_cpu(args, specs, dtypes, import_errors, log)
    return run_gpu(args, specs, dtypes, import_errors, log)


if __name__ == "__main__":
    sys.exit(main())
