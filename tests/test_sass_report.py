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


def test_live_compile_matches_committed_report(triton_compile_cache):
    from bertkern.triton.compile_check import toolchain_missing

    if reason := toolchain_missing():
        pytest.skip(f"cannot compile Triton kernels for an NVIDIA target here: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(triton_compile_cache)  # test_triton_compile's kernels, if it ran first
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


def test_cuda_attention_model_and_targets():
    """The CUDA attention kernels' tiles come from their template arguments (csrc/attention.cu's
    fwd::key_tile, bwd::tile) and their issue ratio is checked on sm_90 for fp16, D = 64, no dropout:
    1.2 for the forward without a mask or with a per-key one, 1.5 with any 4-D mask, 1.3 for the
    backward; a miss is a gap keyed (arch, kernel, check), the spill (arch, kernel) as before."""
    t = sass_report.cuda_attention_tiles("void bertkern::attn::attention_fwd_kernel<__half, 64, 1, false>(P)")
    assert (t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_D"], t["model"]) == (128, 64, 64, "cuda_fwd")
    assert sass_report.cuda_attention_tiles("attention_fwd_kernel<__half, 64, 0, true>(P)")["BLOCK_N"] == 32
    assert sass_report.cuda_attention_tiles("attention_fwd_kernel<__half, 64, 2, true>(P)")["BLOCK_N"] == 64
    assert sass_report.cuda_attention_tiles("attention_fwd_kernel<__half, 128, 0, false>(P)")["BLOCK_N"] == 32
    t = sass_report.cuda_attention_tiles("void bertkern::attn::attention_bwd_kernel<__half, 64, 2, false>(P)")
    assert (t["BLOCK_M"], t["BLOCK_N"], t["model"], t["mask"]) == (64, 64, "cuda_bwd", 2)
    assert sass_report.cuda_attention_tiles("attention_bwd_delta_kernel<__half>(P)") is None

    def row(kernel, instructions, mufu, arch="sm_90", stack=0):
        return {"backend": "cuda", "arch": arch, "kernel": f"void bertkern::attn::{kernel}(bertkern::attn::Params)",
                "stack": stack, "hot": {"instructions": instructions, "mufu": mufu, "mma": 0}}

    # forward, 128 x 64 x 64: tensor 512 cycles, MUFU 68 x 32 x 4 / 16 = 544
    ok = sass_report.cuda_checks(row("attention_fwd_kernel<__half, 64, 0, false>", 652, 68))
    assert ok["issue_ratio"] == (1.199, 1.2, True)
    assert not sass_report.cuda_checks(row("attention_fwd_kernel<__half, 64, 1, false>", 700, 68))["issue_ratio"][2]
    assert sass_report.cuda_checks(row("attention_fwd_kernel<__half, 64, 2, false>", 816, 68))["issue_ratio"][1] == 1.5
    # backward, 64 x 64 x 64 x 5 GEMMs: tensor 640 cycles
    assert sass_report.cuda_checks(row("attention_bwd_kernel<__half, 64, 1, false>", 832, 32))["issue_ratio"] == \
        (1.3, 1.3, True)
    # no target: dropout, bf16, other head dims, sm_80 (the spill is checked everywhere)
    for r in (row("attention_fwd_kernel<__half, 64, 0, true>", 9999, 68),
              row("attention_fwd_kernel<__nv_bfloat16, 64, 0, false>", 9999, 68),
              row("attention_fwd_kernel<__half, 128, 0, false>", 9999, 68),
              row("attention_fwd_kernel<__half, 64, 0, false>", 9999, 68, arch="sm_80", stack=8)):
        assert set(sass_report.cuda_checks(r)) == {"spill"}
    bad = row("attention_bwd_kernel<__half, 64, 1, false>", 9999, 32)
    bad["id"] = "x"
    unexpected, _ = sass_report.gaps([{**bad, "kernel": bad["kernel"].replace("64, 1", "64, 7")},
                                      row("attention_fwd_kernel<__half, 64, 0, false>", 9999, 68, "sm_80", 8)])
    assert unexpected == [("sm_80", "attn::attention_fwd_kernel<__half, 64, 0, false>")]
