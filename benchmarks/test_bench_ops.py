"""pytest-benchmark entry (`pytest benchmarks/ --benchmark-only`): every op's quick cases x providers (all
with BERTKERN_BENCH_FULL=1), each gated against float64 first, then timed in host wall-clock (synchronized
per call) on inputs rotated past the L2. Skipped without a CUDA GPU or pytest-benchmark.
"""
import importlib.util
import os

import pytest
import torch

from benchmarks import common, ops

GPU = torch.cuda.is_available()
QUICK = os.environ.get("BERTKERN_BENCH_FULL") != "1"
CASES = [(spec, case, name) for spec in ops.discover() for case in spec.cases(QUICK)
         for name in ops.providers(spec, gpu=True)] if GPU else []
IDS = [f"{s.name}-{c.label.replace(' ', '-')}-{p}" for s, c, p in CASES]


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
    step = ops.cycled([ops.make_step(spec, case, fn, c) for c in prep.copies])

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=case.to_dict(), bytes=prep.nbytes, rotations=len(prep.copies))
    benchmark.pedantic(timed, warmup_rounds=5, rounds=50, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["gbs"] = prep.nbytes / stats.median / 1e9
