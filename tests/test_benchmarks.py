"""The benchmarks (benchmarks/) on the CPU: byte counts, the op case lists (a budget measures BERT's
sizes first) and input copies, the correctness gate, the CLI (API op names, --help, bad arguments),
the CPU mode's one screen, the results files (JSON, CSV, Markdown, LATEST.md, the README block), the
model suites' cells, budget and gate on a tiny config, the interleaved timing rounds on a fake clock,
and their GPU code path driven with fake timers. The GPU timing itself runs on a GPU machine
(benchmarks/gpu_check.sh)."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a package at the repo root

from benchmarks import common, models, ops, run  # noqa: E402
from benchmarks.bench_bias_gelu import BIAS_GELU  # noqa: E402

CPU = torch.device("cpu")


def case(direction="fwd", dtype=torch.float16, rows=32768, n=3072, **options):
    return ops.Case(direction, dtype, {"rows": rows, "intermediate": n}, options)


def fake_timer(calls: list):
    """Runs the step twice (the rotation must cycle) and returns made-up times."""
    def timer(step):
        calls.append(step)
        step()
        step()
        return 0.5, 0.4, 0.6

    return timer


def test_bytes_moved_bias_gelu():
    # DESIGN.md's floor: fp16 32768 x 3072 reads x and bias and writes y: 403 MB.
    assert BIAS_GELU.bytes_moved(case("fwd")) == (2 * 32768 * 3072 + 3072) * 2 == 402_659_328
    assert BIAS_GELU.bytes_moved(case("bwd")) == (3 * 32768 * 3072 + 2 * 3072) * 2  # dy, x, bias in; dx, dbias out
    assert BIAS_GELU.bytes_moved(case("fwd", torch.float32, 128, 1536)) == (2 * 128 * 1536 + 1536) * 4


def test_ops_take_the_api_names_and_the_old_ones():
    assert [s.name for s in ops.discover()] == list(ops.OPS)
    assert [s.name for s in ops.discover(["layer_norm", "softmax", "attention_varlen"])] == [
        "add_layer_norm", "masked_softmax", "attention_varlen"]
    import bertkern.ops

    assert set(ops.OPS) == set(bertkern.ops.__all__)  # one name per op, the API's
    with pytest.raises(ValueError, match="no_such_op"):
        ops.discover(["no_such_op"])


def _tokens(case: ops.Case) -> int:
    shape = case.shape
    return shape.get("rows") or shape.get("tokens") or shape["batch"] * shape["seq"]


@pytest.mark.parametrize("spec", ops.discover(), ids=lambda s: s.name)
def test_a_budget_measures_bert_sizes_first_and_the_smallest_later(spec):
    """A time budget cuts the tail of the case list: it must start at BERT's sizes (batch 32 x seq
    128 / 512), not at a launch-bound tiny one; --quick runs BERT's sizes only."""
    full, quick = spec.cases(False), spec.cases(True)
    assert _tokens(full[0]) in ops.BERT_TOKENS and all(_tokens(c) in ops.BERT_TOKENS for c in quick)
    smallest = min(range(len(full)), key=lambda i: spec.bytes_moved(full[i]))
    assert all(i < smallest for i, c in enumerate(full) if _tokens(c) in ops.BERT_TOKENS)


def test_budget_order():
    shapes = [{"rows": r, "hidden": n} for n in (768, 1024, 384) for r in (128, 4096, 16384, 65536)]
    assert [(s["rows"], s["hidden"]) for s in ops.budget_order(shapes, "rows", "hidden")] == [
        (4096, 768), (16384, 768), (4096, 1024), (16384, 1024),  # BERT-base, -large
        (65536, 1024), (65536, 768), (65536, 384), (16384, 384), (4096, 384), (128, 1024), (128, 768), (128, 384)]


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("l2_copies", [0.1, 2.5])
def test_prepare_makes_the_rotation_count_of_copies(direction, l2_copies):
    """ops.rotations copies, each with its output gradients; one copy (a case larger than twice the L2,
    which failed with an IndexError) included."""
    spec = ops.discover(["attention"])[0]
    case = next(c for c in spec.cpu_cases(True) if c.direction == direction)
    one = ops.prepare(spec, case, torch.device("cpu"))
    l2 = max(1, int(l2_copies * one.copies[0].nbytes()))
    prep = ops.prepare(spec, case, torch.device("cpu"), l2)
    assert len(prep.copies) == ops.rotations(prep.nbytes, l2, one.copies[0].nbytes(), 1 << 34)
    assert (len(prep.copies) > 1) == (l2_copies > 1)
    assert all(len(c.grad_outs) == (direction != "fwd") for c in prep.copies)


def test_rotations_exceed_l2():
    l2 = 50 * 2**20
    assert ops.rotations(2**20, l2, 2**20, 1 << 40) == 100  # ceil(2 x L2 / bytes)
    assert ops.rotations(500 * 2**20, l2, 500 * 2**20, 1 << 40) == 1
    assert ops.rotations(2**20, l2, 2**20, 12 * 2**20) == 1  # never more than a quarter of free memory


def test_gpu_slug():
    assert common.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert common.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert common.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_gate_flags_wrong_provider_and_never_times_it(direction):
    def wrong(x, bias, approximate="none"):
        return F.gelu(x + bias * 1.05, approximate=approximate)

    def nan(x, bias, approximate="none"):
        return F.gelu(x + bias, approximate=approximate) * float("nan")

    def raises(x, bias, approximate="none"):
        raise RuntimeError("kernel launch failed")

    def no_bias_grad(x, bias, approximate="none"):  # forgets dbias: its backward must not pass
        return F.gelu(x + bias.detach(), approximate=approximate)

    provs = {"eager": lambda c, d: BIAS_GELU.eager,
             **{f.__name__: (lambda f: lambda c, d: f)(f) for f in (wrong, nan, raises, no_bias_grad)},
             "unavailable": lambda c, d: (_ for _ in ()).throw(common.Skip("not built here"))}
    calls = []
    r = ops.run_case(BIAS_GELU, case(direction, rows=64, n=256), provs, CPU, 100.0, 1 << 20, fake_timer(calls))
    p = common.finish({"baseline": "eager", "results": [r]})["results"][0]["providers"]
    assert p["eager"]["status"] == "ok" and p["eager"]["ms"] == 0.5 and p["eager"]["speedup"] == 1.0
    assert p["wrong"]["status"] == "WRONG" and "max error" in p["wrong"]["reason"]
    assert p["nan"]["status"] == "WRONG" and "NaN" in p["nan"]["reason"]
    assert p["raises"]["status"] == "error" and "kernel launch failed" in p["raises"]["reason"]
    assert p["no_bias_grad"]["status"] == ("ok" if direction == "fwd" else "error")
    assert p["unavailable"] == {"status": "skipped", "reason": "not built here"}
    assert all("ms" not in p[n] for n in ("wrong", "nan", "raises", "unavailable"))
    assert len(calls) == 1 + (direction == "fwd")  # eager (and no_bias_grad's right forward) only
    assert r["rotations"] > 1  # 1 MiB "L2": inputs are rotated


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_graph_timing_is_reported_beside_the_eager_one(direction):
    """With a graph timer each timed provider, backward included, also gets the replayed time (the kernels
    alone) and its rates; a step that cannot be captured keeps its eager time and says so. The graph
    timer builds the steps itself: a backward's forward must run on its capture stream."""
    forwards = []

    def counted(x, bias, approximate="none"):
        forwards.append(1)
        return BIAS_GELU.eager(x, bias, approximate)

    provs = {"eager": lambda c, d: counted, "other": lambda c, d: counted}
    replays = iter([0.25, RuntimeError("operation not permitted when stream is capturing")])

    def graph_timer(make_step):
        before = len(forwards)
        make_step()()
        assert len(forwards) - before == (direction == "bwd") * r_copies[0] + (direction == "fwd")
        t = next(replays)
        if isinstance(t, Exception):
            raise t
        return t, t, t

    r_copies = [len(ops.prepare(BIAS_GELU, case(direction, rows=64, n=256), CPU, 1 << 20).copies)]
    r = ops.run_case(BIAS_GELU, case(direction, rows=64, n=256), provs, CPU, 100.0, 1 << 20, fake_timer([]),
                     graph_timer)
    p = common.finish({"baseline": "eager", "results": [r]})["results"][0]["providers"]
    assert p["eager"]["ms_graph"] == 0.25 and p["eager"]["speedup_graph"] == 1.0 and p["eager"]["wall_s"] >= 0
    assert p["eager"]["gbs_graph"] == pytest.approx(r["bytes"] / 0.25 / 1e6) == pytest.approx(p["eager"]["gbs"] * 2)
    assert p["eager"]["pct_copy_graph"] == pytest.approx(100 * r["bytes"] / 0.25 / 1e6 / 100.0)
    assert "(graph: 0.25 ms" in common.cell_text(p["eager"])
    assert p["other"]["ms"] == 0.5 and "ms_graph" not in p["other"] and "capturing" in p["other"]["graph_error"]
    assert common.cell_text(p["other"]).endswith("(graph: error)")
    md = common.render_markdown({**ops.new_doc(BIAS_GELU, provs, common.environment(CPU), {}, []), "results": [r]})
    assert "No graph time (the capture failed):\n- other: RuntimeError: operation not permitted" in md


def test_time_graph_builds_the_steps_on_its_capture_stream(monkeypatch):
    """common.time_graph on a fake CUDA (a clock the events read): the steps are made and warmed up on the
    stream that captures them, ~rep_ms of calls (by the eager estimate) go into one graph, and the replays
    give the GPU's time per call, not the host's."""
    now, current, seen = [0.0], [None], {}

    class Graph:
        calls = 0

        def replay(self):
            now[0] += 0.01 * self.calls  # 10 µs of GPU time per call

    @contextlib.contextmanager
    def on(stream):
        old, current[0] = current[0], stream
        yield
        current[0] = old

    @contextlib.contextmanager
    def capture(graph, stream):
        seen["capture stream"], seen["capturing"] = stream, graph
        with on(stream):
            yield
        seen["capturing"] = None

    class Event:
        def __init__(self, enable_timing):
            pass

        def record(self):
            self.at = now[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    class Stream:
        def wait_stream(self, other):
            pass

    def step():
        if seen.get("capturing"):
            seen["capturing"].calls += 1
        else:
            now[0] += 0.05  # 50 µs of host time per eager call

    def make_step():
        seen["made on"] = current[0]
        return step

    for name, value in {"Stream": Stream, "Event": Event, "CUDAGraph": Graph, "graph": capture, "stream": on,
                        "current_stream": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    ms, lo, hi = common.time_graph(make_step, rep_ms=40)
    assert isinstance(seen["made on"], Stream) and seen["capture stream"] is seen["made on"]
    assert (ms, lo, hi) == pytest.approx((0.01, 0.01, 0.01))  # ~800 calls (40 ms / 50 µs) a replay


def test_a_budget_runs_compile_only_where_it_fits_beside_the_first_cases(monkeypatch):
    """Under a deadline `compile` is skipped (with the reason) while the op's share, less the time of its
    leading cases (BERT-base, every direction and dtype), cannot hold a compile; without one it always runs."""
    monkeypatch.setattr(ops, "providers", lambda spec, gpu: {"eager": lambda c, d: BIAS_GELU.eager,
                                                             "compile": lambda c, d: BIAS_GELU.eager})
    cases = [case(d, dt, 64, 256) for dt in (torch.float16, torch.bfloat16) for d in ("fwd", "bwd")] + [case(rows=32)]
    assert ops.leading(cases) == 4 and ops.leading([]) == 0
    copy_bw = {"bytes": 2, "ms": 1.0, "gbs": 100.0}

    def statuses(deadline_s):
        deadline = None if deadline_s is None else ops.time.monotonic() + deadline_s
        doc = ops.run_op(BIAS_GELU, cases, CPU, copy_bw=copy_bw, env=common.environment(CPU), deadline=deadline,
                         log=lambda s: None, timer=fake_timer([]))
        return [r["providers"]["compile"] for r in doc["results"]]

    assert all(e["status"] == "ok" for e in statuses(None))
    tight = statuses(ops.COMPILE_PRIOR_S + 4 * ops.CASE_PRIOR_S - 1)  # the prior does not fit beside 4 cases
    assert tight[0] == {"status": "skipped", "reason": "time budget: no room for torch.compile (~10 s a case) beside "
                        "the other providers and the op's first cases"}
    assert tight[1]["status"] == "ok"  # the first case's time learned: seconds less than the priors
    assert all(e["status"] == "ok" for e in statuses(ops.COMPILE_PRIOR_S + 4 * ops.CASE_PRIOR_S + 5))


@pytest.mark.parametrize("spec", ops.discover(), ids=lambda s: s.name)
def test_the_leading_cases_are_bert_base_in_each_direction_and_dtype(spec):
    """What a tight budget measures first in every op: one BERT-base size, forward and backward, fp16 and bf16."""
    full = spec.cases(False)
    assert ops.leading(full) >= 4 and _tokens(full[0]) in ops.BERT_TOKENS
    assert {(c.direction != "fwd", c.dtype) for c in full[:4]} == {(b, d) for b in (False, True)
                                                                   for d in (torch.float16, torch.bfloat16)}


def test_gate_passes_bertkern_backends_on_cpu():
    doc = ops.check_cpu(BIAS_GELU, quick=True, dtypes=[torch.bfloat16])
    status = {p: {r["providers"][p]["status"] for r in doc["results"]} for p in doc["providers"]}
    assert status["torch"] == {"ok"} and status["cuda"] == {"skipped"}  # CPU tensors
    # Triton runs on CPU tensors only under TRITON_INTERPRET=1, which tests/conftest.py sets without a GPU.
    assert status["triton"] == ({"skipped"} if torch.cuda.is_available() else {"ok"})
    assert run._tally(doc).startswith("torch PASS 4/4 · triton")


@pytest.mark.parametrize("argv", [["--suite", "nope"], ["--suite", "bert", "--providers", "no-such-provider"],
                                  ["--ops", "no_such_op"], ["--fills", "1.5"], ["--dtype", "fp8"],
                                  ["--shapes", "32xa"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert run.main(argv, prog="bertkern bench") == 2
    assert "bertkern bench: error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode")
def test_bertkern_bench_command_checks_triton_on_the_cpu(tmp_path):
    """`bertkern bench` as a user types it, TRITON_INTERPRET unset: `import bertkern` imports triton
    before benchmarks/common.py could set the variable, and every Triton check after the first failed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "bertkern", "bench", "--ops", "bias_gelu", "--quick", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "triton PASS 8/8" in p.stdout, p.stdout


@pytest.mark.parametrize("argv0,prog", [("/venv/bin/bertkern", "bertkern bench"),
                                        ("bertkern/__main__.py", "bertkern bench"),
                                        ("benchmarks/run.py", "benchmarks/run.py")])
def test_help_is_self_contained(argv0, prog, monkeypatch, capsys):
    """--help names the command as it was called and lists what it refers to (ops, providers, models)."""
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as e:
        run.main()
    text = capsys.readouterr().out
    assert e.value.code == 0 and text.startswith(f"usage: {prog} ")
    for name in [*ops.OPS, "layer_norm", "softmax", "hf-varlen", "optimize", "compile", "minilm", "--update-readme"]:
        assert name in text
    assert "bench_" not in text and "above" not in text


def test_op_suite_gpu_path_and_results_files(tmp_path):
    """run_op (the GPU path) with a fake timer, then every file the run writes, LATEST.md and the README block."""
    env = {**common.environment(CPU), "gpu": "NVIDIA H100 80GB HBM3", "gpu_slug": "h100"}
    cases = [case("fwd", torch.float32, 37, 200), case("bwd", torch.float32, 37, 200)]
    copy_bw = {"bytes": 2, "ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0, "gbs": 100.0}
    lines = []
    doc = ops.run_op(BIAS_GELU, cases, CPU, copy_bw=copy_bw, env=env, only={"eager", "triton", "cuda"},
                     log=lines.append, timer=fake_timer([]), partial_json=tmp_path / "h100" / "bias_gelu.json")
    assert len(lines) == 2 and lines[0].startswith("[1/2] bias_gelu fwd float32")  # progress, one line per case
    e = doc["results"][0]["providers"]["triton" if not torch.cuda.is_available() else "eager"]
    assert e["status"] == "ok" and e["gbs"] == doc["results"][0]["bytes"] / 0.5 / 1e6 and e["pct_copy"] == e["gbs"]
    paths = common.write_results(doc, tmp_path / "h100")
    assert {p.suffix for p in paths} >= {".json", ".md", ".csv"}
    md = (tmp_path / "h100" / "bias_gelu.md").read_text()
    assert "H100" in md and "100% line" in md and "skipped" in md and "GB/s" in md
    rows = list(csv.DictReader(open(tmp_path / "h100" / "bias_gelu.csv")))
    assert len(rows) == 2 * 3 and {r["env_gpu"] for r in rows} == {"NVIDIA H100 80GB HBM3"}
    common.save_json({**doc, "env": common.environment(CPU)}, tmp_path / "epyc-2core" / "bias_gelu.json")
    latest = common.write_latest(tmp_path)  # GPU runs only: not the committed CPU one in epyc-2core/
    assert "bias_gelu" in latest.read_text() and "| fwd | float32 | 1.00× (1) | - |" in latest.read_text()
    assert "CPU only" not in latest.read_text() and ", None" not in latest.read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{common.START}\nold\n{common.END}\ntail\n")
    common.update_readme(readme, latest)
    text = readme.read_text()
    assert "old" not in text and "### bias_gelu" in text and text.endswith(f"{common.END}\ntail\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="results:start"):
        common.update_readme(readme, latest)


def test_model_cells():
    train = models.cells("train")
    assert train[0].key and {(c.batch, c.seq, c.fill) for c in train} == {
        (b, s, f) for b in (1, 8, 32) for s in (128, 512) for f in (1.0, 0.6)}  # issue 11's grid
    bert = models.cells("bert")
    assert [c.key for c in bert[:3]] == [True] * 3 and len(bert) == len(set(bert))
    assert {(c.batch, c.seq, c.fill) for c in bert if c.model == "bert-base" and c.dtype == torch.float16} >= {
        (b, s, f) for b in (1, 8, 32) for s in (128, 512) for f in (1.0, 0.6)}
    assert [c.model for c in models.cells("bert", quick=True)] == ["bert-base"] * 3 + ["minilm", "bert-large"]
    asked = models.cells("bert", models=["minilm"], dtypes=[torch.float32], shapes=[(8, 128)])
    assert [(c.model, c.dtype, c.batch, c.seq, c.fill) for c in asked] == [
        ("minilm", torch.float32, 8, 128, f) for f in (1.0, 0.6)]


def test_fill_lengths_and_flops():
    assert common.fill_lengths(4, 128, 1.0) == [128] * 4
    lengths = common.fill_lengths(32, 512, 0.6)
    assert abs(sum(lengths) / (32 * 512) - 0.6) < 0.01 and min(lengths) >= 0.2 * 512 - 8 and max(lengths) <= 512
    cfg = type("C", (), {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12})
    assert models.forward_flops(cfg, 1, 128) == 12 * (8 * 128 * 768**2 + 4 * 128 * 768 * 3072 + 4 * 128 * 128 * 768)


def test_budget():
    now = [0.0]
    b = common.Budget(100, clock=lambda: now[0])
    assert b.allows(50) and b.estimate("x", 3.0) == 3.0
    b.learn("x", 7.0)
    now[0] = 95
    assert b.estimate("x", 3.0) == 7.0 and not b.allows(7.0) and "5 s left" in b.why_not(7.0)
    assert common.Budget().left() == float("inf")


def _wrong(scale=1.05, raises=False):
    def build(g):
        model = g.base

        def fn(i, m):
            if raises:
                raise RuntimeError("kernel launch failed")
            return models.output(model(input_ids=i, attention_mask=m), g.head) * scale

        return model, fn, None

    return models.Provider("wrong" if not raises else "raises", "", build)


def fake_rounds(calls: list):
    """A stand-in for common.time_interleaved: runs each step once and returns made-up times."""
    def timer(steps, sync, rounds, block_s):
        calls.append(list(steps))
        for step in steps.values():
            step()
        return {n: {"ms": 0.5, "ms_p20": 0.4, "ms_p80": 0.6, "rounds": rounds, "calls_per_block": 3} for n in steps}

    return timer


def test_bert_cell_checks_then_times_only_right_providers(tmp_path):
    provs = models.providers("bert", ["hf-eager", "hf-sdpa", "optimize", "bk-model", "hf-varlen"])
    provs += [_wrong(), _wrong(raises=True)]
    calls, lines = [], []
    doc = models.run("bert", CPU, [models.Cell("tiny", torch.float32, 3, 16, 0.6)], provs, timer=fake_rounds(calls),
                     timing={"rounds": 4, "block_s": 0.1}, log=lines.append, partial_json=tmp_path / "bert.json")
    p = doc["results"][0]["providers"]
    for name in ("hf-eager", "hf-sdpa", "optimize", "bk-model"):
        assert p[name]["status"] == "ok" and p[name]["ms"] == 0.5 and p[name]["speedup"] == 1.0, (name, p[name])
        assert p[name]["rounds"] == 4 and p[name]["ms_p80"] == 0.6 and p[name]["first_call_s"] >= 0
    assert p["hf-varlen"] == {"status": "skipped", "reason": "needs a CUDA GPU"}
    assert p["wrong"]["status"] == "WRONG" and "ms" not in p["wrong"]
    assert p["raises"]["status"] == "error" and "kernel launch failed" in p["raises"]["reason"]
    assert calls == [["hf-eager", "hf-sdpa", "optimize", "bk-model"]]  # the right ones, together, after the checks
    assert doc["baseline"] == "hf-sdpa" and "optimize (tiny)" in doc["notes"]
    assert "in 4 rounds" in doc["timing"]["method"] and doc["timing"]["block_s"] == 0.1
    assert doc["timing"]["spread"].startswith("median 40.0%, worst 40.0% (")
    assert json.loads((tmp_path / "bert.json").read_text())["results"][0]["providers"]["raises"]["status"] == "error"
    assert lines[0].startswith("[1/1") and len(lines) == 1 + len(provs) + 1 + 4  # progress: checks, then timings
    md = common.render_markdown(doc)
    assert "Timing: the providers of a cell side by side in 4 rounds" in md and "Spread of the rounds" in md


def _fake_host(slow_from: float, slow_to: float):
    """A clock, and steps that advance it by their cost (3x while the host is slow), logging each call."""
    now, log = [0.0], []

    def step(name, ms, fail_after=None):
        def call():
            if fail_after is not None and log.count(name) >= fail_after:
                raise RuntimeError("illegal memory access")
            now[0] += ms / 1e3 * (3.0 if slow_from <= now[0] < slow_to else 1.0)
            log.append(name)

        return call

    return (lambda: now[0]), step, log


def test_interleaved_rounds_spread_host_drift_over_every_provider():
    """Three providers, the host 3x slower for a while: timed one after another, the one timed then would
    read 3x; in alternating rounds the slow period costs every provider the same few rounds, and the
    median over rounds is each one's true time."""
    clock, step, log = _fake_host(1.5, 2.2)
    got = common.time_interleaved({"a": step("a", 10), "b": step("b", 10), "c": step("c", 20)}, rounds=10,
                                  block_s=0.1, clock=clock)
    assert {n: r["ms"] for n, r in got.items()} == pytest.approx({"a": 10, "b": 10, "c": 20})
    assert {n: r["calls_per_block"] for n, r in got.items()} == {"a": 10, "b": 10, "c": 5}
    assert all(r["rounds"] == 10 and r["ms_p20"] <= r["ms"] <= r["ms_p80"] for r in got.values())
    assert got["a"]["ms_p80"] > 10  # the slow rounds are in the spread, not the median
    runs = "".join(n for i, n in enumerate(log) if i == 0 or log[i - 1] != n)  # "cc" of "abc" + "cba" is one run
    assert runs == "abc" + "a" + "bcba" * 5  # warm-up and sizing, then 10 rounds, every other one reversed


def test_interleaved_rounds_keep_the_time_per_provider():
    """Calls longer than a block: fewer rounds (at least min_rounds), the same ~rounds x block_s each."""
    clock, step, log = _fake_host(0, 0)
    got = common.time_interleaved({"fast": step("fast", 1), "slow": step("slow", 250)}, rounds=10, block_s=0.1,
                                  clock=clock)
    assert got["slow"]["rounds"] == got["fast"]["rounds"] == 5 and got["slow"]["calls_per_block"] == 1
    assert got["fast"]["calls_per_block"] == 200 and got["slow"]["ms"] == pytest.approx(250)
    one = common.time_interleaved({"x": step("x", 1)}, rounds=1, block_s=0.1, clock=clock)["x"]
    assert one["rounds"] == 1 and one["ms"] == one["ms_p20"] == one["ms_p80"] == pytest.approx(1)


def test_interleaved_rounds_drop_a_provider_that_raises():
    clock, step, log = _fake_host(0, 0)
    got = common.time_interleaved({"ok": step("ok", 10), "bad": step("bad", 10, fail_after=12),
                                   "dead": step("dead", 10, fail_after=0)}, rounds=4, block_s=0.1, clock=clock)
    assert got["ok"]["ms"] == pytest.approx(10) and got["ok"]["rounds"] == 4
    assert isinstance(got["bad"], RuntimeError) and isinstance(got["dead"], RuntimeError)
    assert log.count("bad") == 12 and "dead" not in log


def test_bert_budget_lists_what_did_not_run():
    doc = models.run("bert", CPU, [models.Cell("tiny", torch.float32, 2, 8)], models.providers("bert", ["hf-eager"]),
                     budget=common.Budget(0), log=lambda s: None)
    assert common.not_run(doc) == ["model=tiny dtype=float32 batch=2 seq=8 fill=1.0: time budget spent"]


def test_train_cell_checks_gradients():
    provs = models.providers("train", ["hf-eager", "optimize-torch"]) + [_wrong(1.5)]
    doc = models.run("train", CPU, [models.Cell("tiny", torch.bfloat16, 3, 16, 0.6)], provs, log=lambda s: None)
    p = doc["results"][0]["providers"]
    assert p["hf-eager"]["status"] == "ok" and p["optimize-torch"]["status"] == "ok", p
    assert p["wrong"]["status"] == "WRONG" and "grads: max error" in p["wrong"]["reason"]
    assert p["hf-eager"]["errors"]["grads"]["err"] <= p["hf-eager"]["errors"]["grads"]["tol"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU mode")
def test_cpu_mode_prints_one_screen(tmp_path, capsys):
    rc = run.main(["--suite", "ops,bert", "--ops", "bias_gelu", "--quick", "--models", "tiny", "--shapes", "2x16",
                   "--fills", "0.6", "--out", str(tmp_path)], prog="bertkern bench")
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out) <= 24, out
    assert any(line.strip().startswith("bias_gelu") and "torch PASS" in line for line in out)
    assert any("speed-up over hf-sdpa" in line for line in out) and any("(1.00x)" in line for line in out)
    assert any("full report" in line for line in out) and any("latest GPU results" in line for line in out)
    assert (tmp_path / "cpu" / "report.md").exists() and (tmp_path / "cpu" / "bias_gelu.json").exists()


def test_gpu_check_script_syntax_and_suites():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert all(s in script.read_text() for s in ("bench ops", "bench bert", "bench train", "--suite", "results.tgz",
                                                 "tests/test_compute_sanitizer.py"))


@pytest.mark.parametrize("train", [False, True])
def test_host_profile_reports_each_provider(tmp_path, train):
    from benchmarks import host_profile

    argv = ["--model", "tiny", "--batch", "2", "--seq", "16", "--fill", "0.6", "--calls", "2",
            "--providers", "hf-sdpa", "optimize", "optimize-cuda", "--out", str(tmp_path)] + ["--train"] * train
    assert host_profile.main(argv) == 0
    text = (tmp_path / "cpu" / ("host_profile_train.md" if train else "host_profile.md")).read_text()
    # --train profiles the train suite's step: a backward and an AdamW step
    assert ("`Optimizer.step#AdamW.step`" in text) == train and ("run_backward" in text) == train
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert float(rows["hf-sdpa"].split("|")[2]) > 0 and float(rows["optimize"].split("|")[3]) > 0
    assert rows["optimize-cuda"].split("|")[2].strip().startswith("Skip: ")  # one that cannot run says why
    assert "## optimize: the" in text and "`aten::" in text
    # the cProfile rows name Python functions by file:line (which ones lead depends on the host's timing)
    assert "with the most self time (cProfile)" in text and re.search(r"`\w+\.py:\d+\(\w+\)`", text)


def test_hf_varlen_provider_matches_the_padded_model(monkeypatch):
    """The torch-only padding-free baseline's plumbing (unpad, HF layers on real tokens, repad), with
    varlen_attn (CUDA only) replaced by per-sequence SDPA."""
    import torch.nn.attention.varlen as varlen

    def per_sequence(q, k, v, cu_q, cu_k, max_q, max_k):
        cu = cu_q.tolist()
        return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                          for a, b in zip(cu, cu[1:])])

    monkeypatch.setattr(varlen, "varlen_attn", per_sequence)
    for head in ("base", "cls"):
        model = models.build_hf("tiny", head, CPU, attn="sdpa")[0].eval()
        ids, mask, _ = models.make_batch(models.Cell("tiny", torch.float32, 3, 16, 0.6), model.config, CPU)
        with torch.no_grad():
            got = models.hf_varlen(model, head)(ids, mask)
            want = models.output(model(input_ids=ids, attention_mask=mask), head)
        real = mask.bool() if head == "base" else slice(None)
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_compile_is_offered_on_cpu():
    """torch.compile is a provider wherever it runs, the CPU included (not "needs a CUDA GPU"); running it
    here takes ~40 s of compiling, so that is left to `bertkern bench --providers compile` by hand."""
    assert "compile" in ops.providers(BIAS_GELU, gpu=False)
    assert [p.needs_cuda for p in models.PROVIDERS if p.name == "compile"] == [False]


def test_gpu_run_end_to_end_with_fake_timers(tmp_path, monkeypatch, capsys):
    """run.py's GPU path (suites in order, results files, LATEST.md) on the CPU with fake timers."""
    monkeypatch.setattr(ops, "copy_bandwidth", lambda device: {"bytes": 2, "ms": 1.0, "gbs": 100.0})
    monkeypatch.setattr(common, "time_op", lambda step, warmup, rep: (step(), 0.5, 0.4, 0.6)[1:])
    monkeypatch.setattr(common, "time_interleaved", lambda steps, sync, rounds, block_s: {
        n: {"ms": 2.0, "ms_p20": 1.5, "ms_p80": 2.5, "rounds": rounds} for n in steps})
    env = common.environment(CPU)
    monkeypatch.setattr(common, "environment", lambda device: {**env, "gpu": "Fake GPU", "gpu_slug": "fake"})
    for argv in (["--ops", "layer_norm", "--budget-s", "30", "--dtype", "fp16", "--shapes", "4096x768", "--providers",
                  "eager"],
                 ["--suite", "bert", "--providers", "hf-eager,hf-sdpa", "--models", "tiny", "--shapes", "2x16",
                  "--fills", "1.0"]):
        args = run.parse_args([*argv, "--out", str(tmp_path)], "bertkern bench")
        assert run.run_gpu(args, ops.discover(args.ops) if args.ops else [], print, device=CPU) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth (the 100% line): 100 GB/s" in out and "[1/4] add_layer_norm fwd float16 rows=4096" in out
    settings = json.loads((tmp_path / "fake" / "add_layer_norm.json").read_text())["settings"]
    assert (settings["warmup_ms"], settings["rep_ms"]) == (10, 40)  # a small budget times as --quick does
    assert {p.name for p in (tmp_path / "fake").iterdir()} >= {"add_layer_norm.json", "add_layer_norm.md", "bert.json",
                                                               "bert.csv"}
    latest = (tmp_path / "LATEST.md").read_text()
    assert "## add_layer_norm, Fake GPU" in latest and "## BERT inference, Fake GPU" in latest
    assert "1.00× (1)" in latest


def _attention_doc(name, cases):
    """A results document of the attention suite: cases = [(seq, {provider: ms or None (failed)})]."""
    results = []
    for seq, times in cases:
        provs = {p: ({"status": "ok", "ms": ms + 1.0, "ms_graph": ms} if ms is not None else {"status": "WRONG"})
                 for p, ms in times.items()}
        results.append({"case": {"direction": "fwd", "dtype": "float16", "batch": 8, "heads": 12, "seq": seq,
                                 "head_dim": 64, "fill": 0.6}, "providers": provs})
    results.append({"case": {"direction": "fwd+bwd", "dtype": "float16", "batch": 8, "heads": 12, "seq": 128,
                             "head_dim": 64, "fill": 0.6}, "providers": {"cuda": {"status": "ok", "ms": 0.001}}})
    return {"name": name, "env": {"capability": "9.0"}, "results": results}  # as common.environment writes it


def test_auto_table_picks_the_fastest_correct_candidate_per_bucket(tmp_path, monkeypatch):
    docs = [_attention_doc("attention", [(128, {"sdpa": 0.2, "triton": 0.1, "cuda": None, "eager": 0.01}),
                                         (96, {"sdpa": 0.2, "triton": 0.15, "cuda": 0.05}),
                                         (512, {"sdpa": 0.3, "triton": 0.5, "cuda": 0.6})]),
            _attention_doc("attention_varlen", [(512, {"torch-varlen": 0.4, "triton": 0.3, "cuda": 0.9})]),
            _attention_doc("bias_gelu", [(128, {"cuda": 0.01, "triton": 0.02})])]
    rows = ops.auto_table(docs)
    by_seq = {r["seq"]: r for r in rows}
    assert set(by_seq) == {"<=128", "<=512"} and all(r["arch"] == "sm_90" and r["head_dim"] == "<=64" for r in rows)
    # <=128: cuda failed one case, so it is out; of sdpa and triton (graph times), triton; eager is no candidate.
    assert by_seq["<=128"]["attention"] == "triton" and "attention_varlen" not in by_seq["<=128"]
    assert by_seq["<=512"]["attention"] == "sdpa" and by_seq["<=512"]["attention_varlen"] == "triton"
    assert "triton 0.25" in by_seq["<=128"]["why"]
    # run.py writes them to the results folder, and into the package with --update-auto-table.
    from bertkern.ops import attention_auto

    monkeypatch.setattr(attention_auto, "MEASURED_FILE", tmp_path / "pkg" / "attention_auto.json")
    args = run.parse_args(["--suite", "ops", "--update-auto-table", "--out", str(tmp_path)], "bertkern bench")
    env = {"gpu": "Fake GPU", "gpu_slug": "fake", "date": "today", "commit": "abc"}
    run._write_auto_table(docs, args, env, print)
    for path in (tmp_path / "fake" / "attention_auto.json", tmp_path / "pkg" / "attention_auto.json"):
        assert attention_auto.load_measured(path) == rows
