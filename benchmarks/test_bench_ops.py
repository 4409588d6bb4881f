"""pytest-benchmark entry: every op's quick cases x providers (all cases with BERTKERN_BENCH_FULL=1).

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Each test first checks the provider against the float64 reference (a WRONG provider fails, it is not
timed), then times its step with the device synchronised inside the timed call, on inputs rotated past
the L2 as in benchmarks/run.py. pytest-benchmark's numbers are host wall-clock, launch latency included;
benchmarks/run.py (CUDA events, do_bench median) is the one that writes benchmarks/results/.
Skipped as a whole without a CUDA GPU or without pytest-benchmark.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA GPU (without one, `python benchmarks/run.py` checks correctness)",
                allow_module_level=True)

from benchmarks import harness  # noqa: E402

FULL = os.environ.get("BERTKERN_BENCH_FULL") == "1"


def _params():
    for spec in harness.discover():
        for case in spec.cases(not FULL):
            shape = "x".join(str(v) for v in case.shape.values())
            for provider in harness.gpu_providers(spec):
                yield pytest.param(spec, case, provider, id=f"{spec.name}-{case.direction}-{harness.dtype_name(case.dtype)}-{shape}-{provider}")


@pytest.mark.parametrize("spec,case,provider", list(_params()))
def test_op(benchmark, spec, case, provider):
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        fn = harness.gpu_providers(spec)[provider](case, device)
    except harness.Skip as s:
        pytest.skip(str(s))
    prep = harness.prepare_case(spec, case, device, harness.l2_bytes(device))
    entry = harness.check_provider(spec, case, fn, prep, device)
    if entry["status"] != "ok":
        pytest.fail(f"{provider} is {entry['status']} on {case.label}: {entry.get('reason', '')}")
    step = harness.rotating([harness.make_step(spec, case, fn, c) for c in prep.copies])

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=case.to_dict(), bytes=prep.nbytes, rotations=len(prep.copies))
    benchmark.pedantic(timed, warmup_rounds=5, rounds=50, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["gbs"] = prep.nbytes / stats.median / 1e9
