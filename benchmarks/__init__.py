"""bertkern's benchmarks (`bertkern bench` = run.py): common.py (arguments, environment, timers, the one
writer), ops.py + bench_<module>.py (one OpSpec per op), models.py (the bert and train suites). A package
so that `benchmarks.common` is never mistaken for a test helper, and pytest imports test_bench_ops.py by
its name."""
