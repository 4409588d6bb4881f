"""bertkern's benchmarks: one harness (harness.py), one declarative file per op (bench_<op>.py), run.py.

A package so that `benchmarks.harness` can never be mistaken for tests/harness.py, and so that pytest
imports benchmarks/conftest.py and test_bench_ops.py under their own package names.
"""
