"""pytest-benchmark entry (`pytest benchmarks/ --benchmark-only`): every op's quick cases x providers (all
with BERTKERN_BENCH_FULL=1), each gated against float64 first, then timed in host wall-clock (synchronized
per call) on inputs rotated past the L2. Skipped without a CUDA GPU or pytest-benchmark.
"""
import importlib.util
import math
import os

import pytest
import torch

from benchmarks import ops

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
    """ops.run_case's gate, then its timer: pytest-benchmark's rounds, synchronized per call."""
    def timer(step):
        benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), warmup_rounds=5, rounds=50, iterations=1)
        ms = benchmark.stats.stats.median * 1e3 if benchmark.stats else math.nan  # nan: --benchmark-disable
        return ms, ms, ms

    device = torch.device("cuda", torch.cuda.current_device())
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    provs = {provider: ops.providers(spec, gpu=True)[provider]}
    r = ops.run_case(spec, case, provs, device, math.inf, l2, timer)  # no copy bandwidth measured: pct_copy 0
    e = r["providers"][provider]
    if e["status"] == "skipped":
        pytest.skip(e["reason"])
    if e["status"] != "ok":
        pytest.fail(f"{provider} is {e['status']} on {case.label}: {e.get('reason', '')}")
    benchmark.extra_info.update(case=case.to_dict(), bytes=r["bytes"], rotations=r["rotations"], gbs=e["gbs"])
