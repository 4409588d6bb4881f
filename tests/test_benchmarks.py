"""The benchmark harness (benchmarks/), on the CPU: byte counts, the correctness gate, the honest CPU
mode, and the results files. Fast: the GPU timing itself is exercised only on a GPU machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a package at the repo root

from benchmarks import harness, run  # noqa: E402
from benchmarks.bench_bias_gelu import SPEC as BIAS_GELU  # noqa: E402
from harness import ATOL_FLOOR  # noqa: E402  (tests/harness.py)

CPU = torch.device("cpu")
FAKE_COPY = {"bytes": 2, "ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0, "gbs": 100.0}


def case(direction="fwd", dtype=torch.float16, rows=32768, n=3072, **options):
    return harness.Case("bias_gelu", direction, dtype, {"rows": rows, "intermediate": n}, options)


def fake_timer(calls: list):
    """Runs the step like a timer would (twice: the rotation must cycle) and returns made-up times."""

    def timer(step, warmup_ms, rep_ms):
        calls.append(step)
        step()
        step()
        return 0.5, 0.4, 0.6

    return timer


def test_bytes_moved_bias_gelu():
    m, n = 32768, 3072
    # DESIGN.md's floor: fp16 32768 x 3072 reads x and bias and writes y: 403 MB.
    assert BIAS_GELU.bytes_moved(case("fwd")) == (2 * m * n + n) * 2 == 402_659_328
    assert BIAS_GELU.bytes_moved(case("bwd")) == (3 * m * n + 2 * n) * 2  # dy, x, bias in; dx, dbias out
    assert BIAS_GELU.bytes_moved(case("fwd+bwd")) == (5 * m * n + 3 * n) * 2
    assert BIAS_GELU.bytes_moved(case("fwd", torch.bfloat16, 128, 1536)) == (2 * 128 * 1536 + 1536) * 2
    assert BIAS_GELU.bytes_moved(case("fwd", torch.float32, 128, 1536)) == (2 * 128 * 1536 + 1536) * 4


def test_case_grid_and_discovery():
    cases = BIAS_GELU.cases(False)
    assert len(cases) == 7 * 3 * 2 * 2
    assert {c.shape["rows"] for c in cases} == {128, 512, 2048, 8192, 16384, 32768, 65536}
    assert {c.shape["intermediate"] for c in cases} == {1536, 3072, 4096}
    assert {c.dtype for c in cases} == {torch.float16, torch.bfloat16}
    assert {c.direction for c in cases} == {"fwd", "bwd"}
    assert cases[0].shape["intermediate"] == 3072  # BERT-base first: a time budget cuts the rest
    assert "bias_gelu" in [s.name for s in harness.discover()]
    with pytest.raises(ValueError):
        harness.discover(["no_such_op"])
    assert harness.parse_dtypes(["fp16,bfloat16"]) == [torch.float16, torch.bfloat16]


def test_floor_matches_tests_harness():
    assert harness.ATOL_FLOOR == ATOL_FLOOR


def test_rotations_exceed_l2():
    l2 = 50 * 2**20
    assert harness.rotations(2**20, l2, 2**20, 1 << 40) == 100  # ceil(2 x L2 / bytes)
    assert harness.rotations(500 * 2**20, l2, 500 * 2**20, 1 << 40) == 1
    assert harness.rotations(2**20, l2, 2**20, 12 * 2**20) == 1  # never more than a quarter of free memory


def test_gpu_slug():
    assert harness.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert harness.gpu_slug("NVIDIA H200") == "h200"
    assert harness.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert harness.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx4090"


def _providers(**extra):
    return {"eager": harness.eager_provider(BIAS_GELU), **{k: (lambda f: lambda c, d: f)(f) for k, f in extra.items()}}


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_gate_flags_wrong_provider_and_never_times_it(direction):
    def off_by_a_bit(x, bias, approximate="none"):
        return F.gelu(x + bias * 1.05, approximate=approximate)

    def nan(x, bias, approximate="none"):
        return F.gelu(x + bias, approximate=approximate) * float("nan")

    def raises(x, bias, approximate="none"):
        raise RuntimeError("kernel launch failed")

    def no_bias_grad(x, bias, approximate="none"):  # forgets dbias: its backward must not pass
        return F.gelu(x + bias.detach(), approximate=approximate)

    providers = _providers(wrong=off_by_a_bit, nan=nan, raises=raises, no_bias_grad=no_bias_grad)
    providers["unavailable"] = lambda c, d: (_ for _ in ()).throw(harness.Skip("not built here"))
    calls = []
    r = harness.run_case(BIAS_GELU, case(direction, rows=64, n=256), providers, CPU, 100.0, 1 << 20, 0, 0,
                         timer=fake_timer(calls))
    p = r["providers"]
    assert p["eager"]["status"] == "ok" and p["eager"]["ms"] == 0.5 and p["eager"]["speedup_vs_eager"] == 1.0
    assert p["wrong"]["status"] == "WRONG" and "max error" in p["wrong"]["reason"]
    assert p["nan"]["status"] == "WRONG" and "NaN" in p["nan"]["reason"]
    assert p["raises"]["status"] == "error" and "kernel launch failed" in p["raises"]["reason"]
    assert p["no_bias_grad"]["status"] == ("ok" if direction == "fwd" else "error")
    assert p["unavailable"] == {"status": "skipped", "reason": "not built here"}
    for name in ("wrong", "nan", "raises", "unavailable"):
        assert "ms" not in p[name], f"{name} was timed"
    assert len(calls) == 1 + (direction == "fwd")  # eager (and no_bias_grad's correct forward) only
    assert r["rotations"] > 1  # 1 MiB "L2": inputs are rotated


def test_gate_passes_bertkern_backends_on_cpu():
    rows = harness.check_op_cpu(BIAS_GELU, [case("bwd", torch.bfloat16, 37, 200, approximate="tanh")])
    status = {r["backend"]: r["status"] for r in rows}
    assert status["torch"] == "PASS"
    # Triton runs on CPU tensors only under TRITON_INTERPRET=1, which tests/conftest.py sets without a GPU.
    assert status["triton"] == ("skipped" if torch.cuda.is_available() else "PASS")
    assert status["cuda"] == "skipped"  # CPU tensors


@pytest.mark.skipif(torch.cuda.is_available(), reason="run.py times on a GPU; this is the no-GPU mode")
def test_honest_cpu_mode_runs_standalone_and_says_no_timings(tmp_path):
    """A fresh process, as `python benchmarks/bench_bias_gelu.py` runs: it must set TRITON_INTERPRET itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BERTKERN_BACKEND")}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bias_gelu.py"), "--quick", "--dtype", "fp32",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert harness.NO_CUDA_LINE in p.stdout
    assert "Latest committed GPU results" in p.stdout
    assert "bias_gelu" in p.stdout and "triton 4/4 PASS" in p.stdout and " 0 FAIL" in p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cpu"]  # writes nothing outside the ignored cpu/ folder
    doc = harness.load_json(tmp_path / "cpu" / "check.json")
    assert {r["backend"]: r["status"] for r in doc["ops"]["bias_gelu"]}["triton"] == "PASS"


def test_bad_arguments_exit_2(capsys):
    assert run.main(["--ops", "no_such_op"]) == 2
    assert run.main(["--dtype", "fp8"]) == 2


def test_results_round_trip(tmp_path):
    calls = []
    cases = [case(d, dt, r, 200) for r in (16, 48) for dt in (torch.float16, torch.bfloat16) for d in ("fwd", "bwd")]
    doc = harness.run_op(BIAS_GELU, cases, CPU, copy_bw=FAKE_COPY, timer=fake_timer(calls), log=lambda s: None)
    doc["env"].update(gpu="NVIDIA H100 80GB HBM3", gpu_slug="h100")  # as a GPU run records it
    doc["results"].append({"case": case("fwd", rows=65536).to_dict(), "bytes": 1, "not_run": "time budget spent"})
    paths = harness.write_op_results(doc, tmp_path)
    assert paths[:2] == [tmp_path / "h100" / "bias_gelu.json", tmp_path / "h100" / "bias_gelu.md"]
    loaded = harness.load_json(paths[0])
    assert loaded == doc
    assert harness.render_op_markdown(loaded) == paths[1].read_text()
    assert [harness.Case.from_dict(r["case"]) for r in loaded["results"][:-1]] == cases
    md = paths[1].read_text()
    assert "| 16 | 200 |" in md and "0.5000 ms" in md and "not run (time budget spent)" in md
    assert "compile: torch.compile is timed on CUDA only" in md  # skipped providers say why
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "check.json").write_text("{}")  # the CPU folder never feeds LATEST.md
    latest = harness.write_latest(tmp_path)
    text = latest.read_text()
    assert latest == tmp_path / "LATEST.md" and "## NVIDIA H100 80GB HBM3" in text and "| bias_gelu | bwd | bfloat16 | 48x200 |" in text


def test_run_py_gpu_branch_on_cpu(tmp_path, monkeypatch, capsys):
    """run.py's GPU path end to end (environment, copy line, per-op files, LATEST.md, exit status),
    with the device, the copy measurement and the timer replaced so that it runs here."""
    real_run_op, real_env = harness.run_op, harness.environment
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(harness, "environment", lambda device: {
        **real_env(CPU), "gpu": "NVIDIA H100 80GB HBM3", "gpu_slug": "h100"})
    monkeypatch.setattr(harness, "copy_bandwidth", lambda device: FAKE_COPY)
    monkeypatch.setattr(harness, "run_op", lambda spec, cases, device, **kw: real_run_op(
        spec, cases, CPU, **{**kw, "timer": fake_timer([])}))
    monkeypatch.setattr(BIAS_GELU, "cases", lambda quick: [case(d, rows=16, n=200) for d in ("fwd", "bwd")])
    assert run.main(["--ops", "bias_gelu", "--out", str(tmp_path), "--budget-s", "600"]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth (the 100% line): 100 GB/s" in out and "LATEST.md" in out
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*") if p.suffix != ".png")
    assert written == ["LATEST.md", "h100/bias_gelu.json", "h100/bias_gelu.md"]
    doc = harness.load_json(tmp_path / "h100" / "bias_gelu.json")
    assert [r["providers"]["eager"]["status"] for r in doc["results"]] == ["ok", "ok"]
    assert doc["settings"]["budget_s"] == 600
