"""pytest-benchmark entry: every op's quick cases x providers (all cases with BERTKERN_BENCH_FULL=1).

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Each test first gates the provider against float64 (a WRONG one fails, untimed), then times its step
with the device synchronized inside the timed call, on inputs rotated past the L2 as in run.py.
pytest-benchmark's numbers are host wall-clock, launch latency included; `bertkern bench` (do_bench)
writes benchmarks/results/. Skipped without a CUDA GPU or without pytest-benchmark. The checks of the
case lists and of the input copies run on CPU too.
"""
import importlib.util
import itertools
import os

import pytest
import torch

from benchmarks import common, ops

GPU = torch.cuda.is_available()
QUICK = os.environ.get("BERTKERN_BENCH_FULL") != "1"
CASES = [(spec, case, name) for spec in ops.discover() for case in spec.cases(QUICK)
         for name in ops.providers(spec, gpu=True)] if GPU else []
IDS = [f"{s.name}-{c.label.replace(' ', '-')}-{p}" for s, c, p in CASES]


# ---------------------------------------------------------------- CPU: case lists and input copies
def tokens(case: ops.Case) -> int:
    shape = case.shape
    return shape.get("rows") or shape.get("tokens") or shape["batch"] * shape["seq"]


@pytest.mark.parametrize("spec", ops.discover(), ids=lambda s: s.name)
def test_a_budget_measures_bert_sizes_first_and_the_smallest_later(spec):
    """A time budget cuts the tail of the case list: it must start at BERT's sizes (batch 32 x seq
    128 / 512), not at a launch-bound tiny one; --quick runs BERT's sizes only."""
    full, quick = spec.cases(False), spec.cases(True)
    assert tokens(full[0]) in ops.BERT_TOKENS and all(tokens(c) in ops.BERT_TOKENS for c in quick)
    smallest = min(range(len(full)), key=lambda i: spec.bytes_moved(full[i]))
    assert all(i < smallest for i, c in enumerate(full) if tokens(c) in ops.BERT_TOKENS)


def test_budget_order():
    shapes = [{"rows": r, "hidden": n} for n in (768, 1024, 384) for r in (128, 4096, 16384, 65536)]
    assert [(s["rows"], s["hidden"]) for s in ops.budget_order(shapes, "rows", "hidden")] == [
        (4096, 768), (16384, 768), (4096, 1024), (16384, 1024),  # BERT-base, -large
        (65536, 1024), (65536, 768), (65536, 384), (16384, 384), (4096, 384), (128, 1024), (128, 768), (128, 384)]


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("l2_copies", [0.1, 2.5])
def test_prepare_makes_the_rotation_count_of_copies(direction, l2_copies):
    """ops.rotations copies, each with its output gradients; one copy (a case larger than twice the L2,
    which failed with an IndexError) included."""
    spec = ops.discover(["attention"])[0]
    case = next(c for c in spec.cpu_cases(True) if c.direction == direction)
    one = ops.prepare(spec, case, torch.device("cpu"))
    l2 = max(1, int(l2_copies * one.copies[0].nbytes()))
    prep = ops.prepare(spec, case, torch.device("cpu"), l2)
    assert len(prep.copies) == ops.rotations(prep.nbytes, l2, one.copies[0].nbytes(), 1 << 34)
    assert (len(prep.copies) > 1) == (l2_copies > 1)
    assert all(len(c.grad_outs) == (direction != "fwd") for c in prep.copies)


# ---------------------------------------------------------------- GPU: pytest-benchmark
@pytest.mark.skipif(not (GPU and importlib.util.find_spec("pytest_benchmark")),
                    reason="benchmarks need a CUDA GPU and pytest-benchmark (without a GPU, `bertkern bench` "
                    "checks correctness)")
@pytest.mark.parametrize("spec,case,provider", CASES, ids=IDS)
def test_op(benchmark, spec, case, provider):
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        fn = ops.providers(spec, gpu=True)[provider](case, device)
    except common.Skip as s:
        pytest.skip(str(s))
    prep = ops.prepare(spec, case, device, torch.cuda.get_device_properties(device).L2_cache_size)
    entry = ops.check(spec, case, fn, prep, device)
    if entry["status"] != "ok":
        pytest.fail(f"{provider} is {entry['status']} on {case.label}: {entry.get('reason', '')}")
    steps = itertools.cycle([ops.make_step(spec, case, fn, c) for c in prep.copies])

    def timed():
        next(steps)()
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=case.to_dict(), bytes=prep.nbytes, rotations=len(prep.copies))
    benchmark.pedantic(timed, warmup_rounds=5, rounds=50, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["gbs"] = prep.nbytes / stats.median / 1e9
