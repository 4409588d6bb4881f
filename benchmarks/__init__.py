"""bertkern's benchmarks (`bertkern bench` = run.py); a package, so that pytest imports test_bench_ops.py
by its name and `benchmarks.common` is never mistaken for a test helper."""
