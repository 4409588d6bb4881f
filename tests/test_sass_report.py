"""The static performance report (benchmarks/sass_report.py) in CI: its budgets hold, nothing spills,
and the committed report is the current code's.

- From the committed benchmarks/results/static/report.json (every kernel, sm_90 and sm_80): every
  check the code does not meet must be listed in sass_report.KNOWN_GAPS ("over target"); any other
  miss (a spill, an attention loop over its issue ratio, a row kernel over its per-element budget or
  under 4 CTAs/SM) fails. A listed gap that is met now fails too: take it out, so the met target
  becomes a budget.
- Live: a few hot kernels (sass_report.CI_CASES) are compiled for sm_90 here (Triton's ptxas, no
  GPU; ~1 minute) and must match the committed rows, so a kernel change without a regenerated report
  fails: run `python benchmarks/sass_report.py` and commit benchmarks/results/static/.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a package at the repo root

from benchmarks import sass_report  # noqa: E402

REPORT = ROOT / "benchmarks" / "results" / "static" / "report.json"


def _rows():
    return json.loads(REPORT.read_text())["rows"]


def test_report_is_committed_and_covers_both_archs():
    rows = _rows()
    archs = {r.get("arch") for r in rows if r["backend"] == "triton"}
    assert archs == {"sm_90", "sm_80"}, archs
    ids = {r["id"] for r in rows if r["backend"] == "triton"}
    assert ids == {sass_report.case_id(c) for c in sass_report.cases()}, "report.json is stale: rerun sass_report.py"
    assert not [r for r in rows if "error" in r and r["backend"] == "triton"], "a kernel did not compile"


def test_budgets_hold():
    unexpected, stale = sass_report.gaps(_rows())
    assert not unexpected, "over target and not in KNOWN_GAPS:\n" + "\n".join(map(str, unexpected))
    assert not stale, "KNOWN_GAPS lists checks that are met now (remove them):\n" + "\n".join(map(str, stale))


def test_no_spills_in_triton_kernels():
    spills = [(r["id"], r["kernel"], r["stack"]) for r in _rows() if r["backend"] == "triton" and r.get("stack")]
    assert not spills, spills


def test_live_compile_matches_committed_report(tmp_path):
    from bertkern.triton.compile_check import toolchain_missing

    if reason := toolchain_missing():
        pytest.skip(f"cannot compile Triton kernels for an NVIDIA target here: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    only = "^(" + "|".join(map(re.escape, sass_report.CI_CASES)) + ")$"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_report.py"), "--arch", "90", "--only", only,
                        "--json", "--no-cuda"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    live = json.loads(p.stdout.strip().splitlines()[-1])
    assert {r["id"] for r in live} == set(sass_report.CI_CASES)
    committed = {(r["id"], r["kernel"]): r for r in _rows()}
    for r in live:
        c = committed[(r["id"], r["kernel"])]
        got = (r["registers"], r["stack"], r["shared"], r["hot"]["instructions"], r["hot"]["mufu"])
        want = (c["registers"], c["stack"], c["shared"], c["hot"]["instructions"], c["hot"]["mufu"])
        assert got == want, (f"{r['id']} {r['kernel']}: compiled (regs, stack, shared, loop instr, MUFU) {got} != "
                             f"committed {want}: rerun python benchmarks/sass_report.py")
    unexpected, _ = sass_report.gaps(live)
    assert not unexpected, unexpected
