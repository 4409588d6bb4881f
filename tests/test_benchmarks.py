"""The benchmarks (benchmarks/), on the CPU: byte counts, the correctness gate, the honest CPU mode,
the results files (JSON, Markdown, CSV, LATEST.md, the README block), suite and provider selection,
the time budget, and the model suites (bench_bert.py, bench_train.py) on a tiny config, their GPU code
path driven on the CPU with a fake timer. Fast: the GPU timing itself is exercised only on a GPU machine
(benchmarks/gpu_check.sh)."""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
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
    assert run.main(["--suite", "ops", "--ops", "bias_gelu", "--out", str(tmp_path), "--budget-s", "600"]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth (the 100% line): 100 GB/s" in out and "LATEST.md" in out
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*") if p.suffix != ".png")
    assert written == ["LATEST.md", "h100/bias_gelu.csv", "h100/bias_gelu.json", "h100/bias_gelu.md"]
    header, *lines = (tmp_path / "h100" / "bias_gelu.csv").read_text().splitlines()
    assert header.startswith("op,direction,dtype,shape,") and "env_gpu" in header and "env_commit" in header
    assert len(lines) == 2 * 4  # 2 cases x (eager, compile, triton, cuda)
    doc = harness.load_json(tmp_path / "h100" / "bias_gelu.json")
    assert [r["providers"]["eager"]["status"] for r in doc["results"]] == ["ok", "ok"]
    assert doc["settings"]["budget_s"] == 600


# ----------------------------------------------------------------------------- suites: bert, train
from benchmarks import bench_bert, bench_train, model_suite as ms, readme_table  # noqa: E402

FAKE_ENV = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_slug": "h100", "driver": "580.00"}


def fake_model_timer(calls: list):
    def timer(step):
        calls.append(step)
        step()
        return 2.0, 1.9, 2.1

    return timer


def _bert_provider(name, scale=1.0, raises=False):
    """A test provider: HF eager times `scale` (1.0: right; else WRONG), or one that raises."""
    def make(g, cell, ids, mask):
        if raises:
            raise RuntimeError("kernel launch failed")
        return lambda i, m: g.base(input_ids=i, attention_mask=m).last_hidden_state * scale

    return bench_bert.Provider(name, "test provider", make)


def test_suites_are_not_op_specs():
    names = [s.name for s in harness.discover()]
    assert "bert" not in names and "train" not in names and "bias_gelu" in names


@pytest.mark.parametrize("argv", [["--suite", "nope"], ["--suite", "bert", "--providers", "no-such-provider"],
                                  ["--suite", "ops", "--providers", "hf-eager"],  # a bert name, not an ops one
                                  ["--shapes", "32by128"], ["--fills", "1.5"], ["--models", "gpt2"]])
def test_bad_suite_arguments_exit_2(argv, capsys):
    assert run.main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_suite_and_provider_selection():
    args = run.parse_args(["--suite", "bert,train", "--providers", "hf-eager,bk-model", "--skip-providers", "compile",
                           "--shapes", "32x128", "16x512"])
    run._check_args(args, [])
    assert args.suite == ["bert", "train"] and args.shapes == [(32, 128), (16, 512)]
    assert [p.name for p in run._select(bench_bert.cpu_providers(), args)] == ["hf-eager", "bk-model[torch]", "bk-model[triton]"]
    assert [p.name for p in run._select(bench_bert.gpu_providers(), args)] == ["hf-eager", "bk-model"]
    args = run.parse_args(["--skip-providers", "compile-max-autotune"])
    run._check_args(args, harness.discover())
    assert args.suite == list(run.SUITES)
    assert "compile-max-autotune" not in [p.name for p in run._select(bench_bert.gpu_providers(), args)]
    assert run._op_filter(args, harness.discover()) is None
    assert run._op_filter(run.parse_args(["--providers", "eager,triton"]), []) == {"eager", "triton"}
    assert run._op_filter(run.parse_args(["--skip-providers", "compile"]), []) == {"eager", "torch", "triton", "cuda"}
    assert ms.shape_matches((32768, 3072), [(32768,)]) and not ms.shape_matches((2048, 3072), [(32768,)])


def test_bert_cells_key_first_and_grid():
    full = bench_bert.cells(False)
    key = [(c.model, ms.SHORT_DTYPE[c.dtype], c.batch, c.seq, c.fill) for c in full[:3]]
    assert key == [("bert-base", "fp16", 32, 128, 1.0), ("bert-base", "fp16", 16, 512, 0.6), ("bert-base", "fp16", 1, 128, 1.0)]
    assert all(c.key for c in full[:3]) and not any(c.key for c in full[3:])
    # 3 models x 2 dtypes x 4 batches x 3 seqs x 2 fills, plus 16x512 (a key cell outside the grid)
    assert len(full) == len(set(full)) == 3 * 2 * 4 * 3 * 2 + 1
    rest = full[3:3 + 22]  # the BERT-base fp16 grid less the two key cells in it
    assert {c.model for c in rest} == {"bert-base"} and {c.dtype for c in rest} == {torch.float16}
    assert full[3 + 22].model == "minilm"
    quick = bench_bert.cells(True)
    assert quick[:3] == full[:3] and {c.model for c in quick} == {"bert-base", "minilm", "bert-large"} and len(quick) == 5
    only = bench_bert.cells(False, models=["minilm"], dtypes=[torch.bfloat16], fills=[1.0])
    assert len(only) == 12 and {(c.model, c.dtype, c.fill) for c in only} == {("minilm", torch.bfloat16, 1.0)}
    asked = bench_bert.cells(False, shapes=[(16, 512), (4, 64)])
    assert [(c.batch, c.seq, c.fill, c.key) for c in asked] == [(16, 512, 0.6, True), (16, 512, 1.0, False),
                                                                  (4, 64, 1.0, False), (4, 64, 0.6, False)]
    assert [(c.batch, c.seq) for c in bench_train.cells(True)] == [(32, 128), (16, 512)]


def test_fill_lengths_and_flops():
    assert ms.fill_lengths(4, 128, 1.0) == [128] * 4
    lengths = ms.fill_lengths(32, 512, 0.6)
    assert abs(sum(lengths) / (32 * 512) - 0.6) < 0.01 and min(lengths) >= 0.2 * 512 - 8 and max(lengths) <= 512
    assert ms.fill_lengths(1, 512, 0.6) == [round(0.6 * 512)]
    ids, mask, lengths = ms.make_batch(3, 16, 0.6, 99, 0, CPU)
    assert mask.sum(1).tolist() == lengths and bool((ids[mask.bool()] != 0).all()) and bool((ids[~mask.bool()] == 0).all())
    cfg = ms.hf_config("bert-base")
    # BERT-base forward at 1 x 128: 12 x (8 x 128 x 768^2 + 4 x 128 x 768 x 3072 + 4 x 128^2 x 768) = 22.5 GFLOP
    assert bench_bert.forward_flops(cfg, 1, 128) == 12 * (8 * 128 * 768**2 + 4 * 128 * 768 * 3072 + 4 * 128 * 128 * 768)
    assert bench_train.train_flops(cfg, 1, 128) == 3 * bench_bert.forward_flops(cfg, 1, 128)


def test_budget_logic():
    now = [0.0]
    b = ms.Budget(100, clock=lambda: now[0])
    assert b.allows(90) and not b.allows(101) and not b.spent()
    assert b.estimate("compile", 90) == 90
    b.learn("compile", 12.5)
    assert b.estimate("compile", 90) == 12.5
    now[0] = 95
    assert not b.allows(12.5) and b.why_not(12.5) == "time budget: needs ~12 s, 5 s left"
    now[0] = 101
    assert b.spent() and b.left() < 0
    assert ms.Budget().allows(1e9) and not ms.Budget().spent()


def test_judge_hidden_rule():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    eager = (ref + 1e-3 * torch.randn_like(ref)).half()
    ok = ms.judge_hidden(eager.clone(), eager, ref, mask, [0, 1], torch.float16)
    assert ok["status"] == "ok" and ok["vs_eager"] == 0 and ok["cosine_min"] > 0.999999
    off = eager.clone()
    off[1, 0] += 0.5  # a real token, far past 2 x eager's error
    assert ms.judge_hidden(off, eager, ref, mask, [0, 1], torch.float16)["status"] == "WRONG"
    pad = eager.clone()
    pad[1, 3] = float("nan")  # padding positions are not judged
    assert ms.judge_hidden(pad, eager, ref, mask, [0, 1], torch.float16)["status"] == "ok"
    nan = eager.clone()
    nan[0, 0, 0] = float("nan")
    assert ms.judge_hidden(nan, eager, ref, mask, [0, 1], torch.float16)["reason"] == "NaN in the output"


def test_bert_cell_checks_then_times_only_right_providers():
    cpu_names = ("hf-eager", "optimize-torch", "optimize-triton", "optimize-cuda", "bk-model[torch]", "compile")
    providers = [p for p in bench_bert.cpu_providers() if p.name in cpu_names]
    providers += [_bert_provider("wrong", 1.05), _bert_provider("raises", raises=True)]
    g = bench_bert.Group("tiny", torch.float32, CPU)
    calls = []
    r = bench_bert.run_cell(bench_bert.Cell("tiny", torch.float32, 3, 16, 0.6), g, providers, ms.Budget(),
                            fake_model_timer(calls), log=lambda s: None)
    p = r["providers"]
    right = ("hf-eager", "optimize-torch", "bk-model[torch]")
    if torch.cuda.is_available():  # Triton runs on CPU tensors only under the interpreter (no GPU)
        assert p["optimize-triton"]["status"] == "skipped"
    else:
        right += ("optimize-triton",)
    for name in right:
        assert p[name]["status"] == "ok", (name, p[name])
        assert p[name]["ms"] == 2.0 and p[name]["seq_per_s"] == 1500 and p[name]["speedup"] == 1.0
        assert p[name]["cosine_min"] > 0.99999
    assert p["optimize-cuda"]["status"] == "skipped" and "CUDA tensors" in p["optimize-cuda"]["reason"]
    assert p["compile"] == {"status": "skipped", "reason": "needs a CUDA GPU"}
    assert p["wrong"]["status"] == "WRONG" and "ms" not in p["wrong"]
    assert p["raises"]["status"] == "error" and "kernel launch failed" in p["raises"]["reason"]
    assert len(calls) == len(right)  # only the right ones were timed
    assert r["real_tokens"] == sum(ms.fill_lengths(3, 16, 0.6, 0)) or r["real_tokens"] < 48
    assert "optimize-torch" in g.notes and g.notes["bk-model"].startswith("flags fused_")
    g.close()


def test_bert_budget_skips_and_lists_what_did_not_run(tmp_path):
    now = [0.0]
    budget = ms.Budget(60, clock=lambda: now[0])
    slow = dataclasses.replace(_bert_provider("slow-compile"), setup_prior_s=300.0)
    cells = [bench_bert.Cell("tiny", torch.float32, 2, 16, 1.0, True), bench_bert.Cell("tiny", torch.float32, 2, 32)]

    def timer(step):
        step()
        now[0] += 58  # the first cell spends the budget
        return 1.0, 1.0, 1.0

    doc = bench_bert.run(CPU, cells, [_bert_provider("hf-eager"), slow], budget=budget, timer=timer,
                         log=lambda s: None, env={**harness.environment(CPU), **FAKE_ENV},
                         partial_json=tmp_path / "h100" / "bert.json")
    first = doc["cells"][0]["providers"]
    assert first["hf-eager"]["ms"] == 1.0
    assert first["slow-compile"]["status"] == "skipped" and first["slow-compile"]["budget"]
    assert doc["cells"][1] == {"cell": cells[1].to_dict(), "not_run": "time budget spent"}
    assert bench_bert.not_run(doc) == ["tiny fp32 2x32 full: time budget spent", "tiny fp32 2x16 full: slow-compile (time budget)"]
    assert bench_bert.failures(doc) == []
    assert harness.load_json(tmp_path / "h100" / "bert.json") == json.loads(json.dumps(doc))  # saved as it went


def test_bert_results_files_and_latest(tmp_path):
    providers = [p for p in bench_bert.cpu_providers() if p.name in ("hf-eager", "hf-sdpa", "compile")]
    providers.append(_bert_provider("wrong", 1.05))
    cells = [bench_bert.Cell("tiny", torch.float32, 2, 16, 1.0, True), bench_bert.Cell("tiny", torch.float32, 4, 16, 0.6)]
    doc = bench_bert.run(CPU, cells, providers, budget=ms.Budget(), timer=fake_model_timer([]), log=lambda s: None,
                         env={**harness.environment(CPU), **FAKE_ENV})
    paths = bench_bert.write_results(doc, tmp_path)
    assert paths[:3] == [tmp_path / "h100" / f"bert.{x}" for x in ("json", "md", "csv")]
    md = paths[1].read_text()
    assert "# BERT inference: NVIDIA H100 80GB HBM3" in md and "driver 580.00" in md and "| 2x16 (key) | full |" in md
    assert "2.000 ms · 1.00×" in md and "**WRONG**" in md and "compile: needs a CUDA GPU" in md and "Failures:" in md
    rows = list(csv.DictReader(paths[2].open()))
    assert len(rows) == 2 * 4 and {r["env_gpu"] for r in rows} == {"NVIDIA H100 80GB HBM3"}
    assert {r["provider"]: r["status"] for r in rows[:4]} == {"hf-eager": "ok", "hf-sdpa": "ok", "compile": "skipped",
                                                              "wrong": "WRONG"}
    assert float(rows[0]["seq_per_s"]) == 1000.0 and rows[0]["env_commit"]
    assert bench_bert.failures(doc) and all(f.startswith("wrong WRONG") for f in bench_bert.failures(doc))
    tdoc = bench_train.run(CPU, [bench_train.Cell("tiny", 2, 16)],
                           [p for p in bench_train.cpu_providers() if p.name in ("hf-eager", "optimize-torch")],
                           budget=ms.Budget(), timer=fake_model_timer([]), log=lambda s: None,
                           env={**harness.environment(CPU), **FAKE_ENV})
    tpaths = bench_train.write_results(tdoc, tmp_path)
    assert "tokens/s" in tpaths[1].read_text() and len(list(csv.DictReader(tpaths[2].open()))) == 2
    assert tdoc["cells"][0]["providers"]["optimize-torch"]["tokens_per_s"] == 2 * 16 / 2.0 * 1e3
    text = harness.write_latest(tmp_path).read_text()
    assert "## BERT inference, NVIDIA H100 80GB HBM3" in text and "| tiny | float32 | 2x16 | full |" in text
    assert "## BERT fine-tuning step" in text and "WRONG/error" in text


def test_train_cell_checks_gradients():
    base, _ = ms.build_hf("tiny", head="cls")

    def scaled_logits(base_, device):  # the right loss at the start, wrong gradients
        model = copy.deepcopy(base_)
        return model, lambda i, m: model(input_ids=i, attention_mask=m).logits * 1.3

    providers = [p for p in bench_train.cpu_providers() if p.name in ("hf-eager", "optimize-torch", "compile")]
    providers.append(bench_train.Provider("wrong", "test", scaled_logits))
    r = bench_train.run_cell(bench_train.Cell("tiny", 3, 16), base.train(), providers, ms.Budget(), None, log=lambda s: None)
    p = r["providers"]
    assert p["hf-eager"]["status"] == "ok" and p["optimize-torch"]["status"] == "ok", p
    assert p["optimize-torch"]["grad_cosine"] > 0.9999
    assert p["compile"]["reason"] == "needs a CUDA GPU"
    assert p["wrong"]["status"] == "WRONG" and "error" in p["wrong"]["reason"]
    assert all(q.grad is None for q in base.parameters())  # the base model is never trained


def test_cpu_mode_of_model_suites(tmp_path, capsys, monkeypatch):
    """run.py without a GPU, bert + train suites on the tiny config: correctness only, exit status, files."""
    if torch.cuda.is_available():
        pytest.skip("the CPU mode runs without a GPU")
    argv = ["--suite", "bert,train", "--quick", "--providers", "hf-eager,optimize,compile", "--out", str(tmp_path)]
    bert_p = [p for p in bench_bert.cpu_providers() if p.name in ("hf-eager", "optimize-torch", "compile")]
    train_p = [p for p in bench_train.cpu_providers() if p.name in ("hf-eager", "optimize-torch")]
    monkeypatch.setattr(bench_bert, "cpu_providers", lambda: list(bert_p))
    monkeypatch.setattr(bench_train, "cpu_providers", lambda: list(train_p))
    with pytest.raises(ValueError):  # "optimize" is not a provider name
        run._check_args(run.parse_args(argv), [])
    argv[4] = "hf-eager,optimize-torch,compile"
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert harness.NO_CUDA_LINE in out and "Latest committed GPU results" in out
    assert "bert: 2 of 2 checks PASS, 0 FAIL" in out and "train: 2 of 2 checks PASS, 0 FAIL" in out
    assert "compile                skipped: needs a CUDA GPU" in out
    assert sorted(p.name for p in (tmp_path / "cpu").iterdir()) == ["bert_check.json", "bert_check.md",
                                                                    "train_check.json", "train_check.md"]
    monkeypatch.setattr(bench_bert, "cpu_providers", lambda: [_bert_provider("hf-eager"), _bert_provider("wrong", 1.05)])
    assert run.main(["--suite", "bert", "--quick", "--out", str(tmp_path)]) == 1  # a FAIL fails the run
    assert "FAIL" in capsys.readouterr().out



def test_run_py_gpu_branch_model_suites_on_cpu(tmp_path, monkeypatch, capsys):
    """run.py's GPU path for --suite bert,train (budget split, files, LATEST.md, exit status), with the
    device and the timer replaced and the tiny config so that it runs here."""
    real_env = harness.environment
    monkeypatch.setattr(run, "cuda_available", lambda: True)  # for run.py's choice only (AdamW asks torch too)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(harness, "environment", lambda device: {**real_env(CPU), **FAKE_ENV})
    seen = {}
    for mod in (bench_bert, bench_train):
        real_run = mod.run
        chosen = [p for p in mod.cpu_providers() if p.name in ("hf-eager", "optimize-torch")]
        monkeypatch.setattr(mod, "gpu_providers", lambda chosen=chosen: list(chosen))

        def fake_run(device, cells, providers, real_run=real_run, mod=mod, **kw):
            seen[mod.SUITE] = kw["budget"].left()
            return real_run(CPU, cells, providers, **{**kw, "timer": fake_model_timer([])})

        monkeypatch.setattr(mod, "run", fake_run)
    monkeypatch.setattr(bench_bert, "cells", lambda quick, **kw: [bench_bert.Cell("tiny", torch.float32, 2, 16, 1.0, True)])
    monkeypatch.setattr(bench_train, "cells", lambda quick, **kw: [bench_train.Cell("tiny", 2, 16)])
    assert run.main(["--suite", "bert,train", "--out", str(tmp_path), "--budget-s", "650"]) == 0
    out = capsys.readouterr().out
    assert "== bert: 1 cells x 2 providers" in out and "== train: 1 cells x 2 providers" in out
    assert 650 * 0.45 / 0.65 - 5 < seen["bert"] <= 650 * 0.45 / 0.65 and seen["train"] > 150  # bert 45 : train 20
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*") if p.suffix != ".png")
    assert written == ["LATEST.md"] + [f"h100/{s}.{x}" for s in ("bert", "train") for x in ("csv", "json", "md")]
    assert "## BERT inference" in out and "## BERT fine-tuning step" in out  # LATEST.md printed last


def test_readme_table_rewrites_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    latest = tmp_path / "LATEST.md"
    readme.write_text("# proj\n\n## Latest GPU results\n\n" + readme_table.START + "\nold numbers\n"
                      + readme_table.END + "\n\n## After\n\nkept\n")
    latest.write_text("# Latest GPU benchmark results\n\nintro\n\n## NVIDIA H100\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    changed, _ = readme_table.rewrite(readme, latest)
    text = readme.read_text()
    assert changed and "old numbers" not in text and "# Latest GPU benchmark results" not in text
    assert "### NVIDIA H100" in text and "| 1 | 2 |" in text and "intro" in text
    assert text.startswith("# proj\n\n## Latest GPU results\n\n" + readme_table.START + "\n")
    assert text.endswith(readme_table.END + "\n\n## After\n\nkept\n")
    assert readme_table.rewrite(readme, latest) == (False, f"{readme} is up to date with {latest}")
    assert readme_table.main(["--readme", str(readme), "--latest", str(latest), "--check"]) == 0
    latest.write_text(latest.read_text() + "\nnew line\n")
    assert readme_table.main(["--readme", str(readme), "--latest", str(latest), "--check"]) == 1
    assert run.main(["--update-readme", "--readme", str(readme), "--out", str(tmp_path)]) == 0
    assert "new line" in readme.read_text()
    readme.write_text("no markers here\n")
    assert readme_table.main(["--readme", str(readme), "--latest", str(latest)]) == 2
    assert readme.read_text() == "no markers here\n"
    assert readme_table.main(["--readme", str(readme), "--latest", str(tmp_path / "absent.md")]) == 2


def test_write_csv_union_of_columns(tmp_path):
    path = ms.write_csv([{"a": 1, "b": None}, {"a": 2, "c": "x,y"}], tmp_path / "t.csv")
    assert path.read_text().splitlines() == ["a,b,c", "1,,", '2,,"x,y"']


def test_gpu_check_script_syntax_and_suites():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for s in ("bench ops", "bench bert", "bench train", "--suite", "results.tgz"):
        assert s in text


def test_cuda_graph_adapter_uses_bertkern_runner(monkeypatch):
    """bk-model+graphs goes through bertkern.cuda_graphs.CUDAGraphRunner with the cell's shape as its
    one bucket, on a model without padding_free (a stand-in runner here: capturing needs a GPU)."""
    import bertkern.cuda_graphs as cg

    made = []

    class FakeRunner:
        def __init__(self, model, *, buckets, **kw):
            made.append((model, buckets))
            self.model, self.captures = model, 1

        def __call__(self, input_ids=None, attention_mask=None):
            return self.model(input_ids, attention_mask=attention_mask)

    monkeypatch.setattr(cg, "CUDAGraphRunner", FakeRunner)
    g = bench_bert.Group("tiny", torch.float32, CPU)
    ids, mask, lengths = ms.make_batch(2, 16, 0.6, 99, 0, CPU)
    with torch.no_grad():
        fn = bench_bert._bk_graphs(g, None, ids, mask)
        out = fn(ids, mask)
        eager = g.base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert made[0][1] == [(2, 16)] and not getattr(made[0][0].config, "padding_free", False)
    assert ms.judge_hidden(out, eager, eager.double(), mask, [0, 1], torch.float32)["vs_eager"] < 1e-5
    assert "CUDAGraphRunner" in g.notes["bk-model+graphs"] and g.notes["bk-model+graphs"].startswith("flags ")
    g.close()
