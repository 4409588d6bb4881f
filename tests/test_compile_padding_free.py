"""torch.compile(bertkern.optimize(model)) runs the padding-free encoder: an eager prologue (one
deliberate graph break) reads the real lengths on the host and picks the (token capacity, max_seqlen)
bucket with bertkern.cuda_graphs.choose_packed_shapes; the graph after it packs with fixed shapes
(bertkern.padding.unpad_static). On CPU: which bertkern ops the compiled graphs hold and that those
graphs ran, the 2x rule against a float64 copy, equality with the uncompiled optimized model, at most
one recompile per bucket, fullgraph=True (padded path), mark_dynamic, and Inductor's
mode="reduce-overhead" (no CUDA graphs on CPU); on a GPU (`gpu` marker) reduce-overhead with CUDA graphs.

Compiles cost seconds (aot_eager) to a minute (Inductor) here: models are tiny and compiles few."""
from __future__ import annotations

import copy
import importlib
import os
from contextlib import nullcontext

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import bertkern  # noqa: E402
from bertkern import testing  # noqa: E402
from bertkern.cuda_graphs import DEFAULT_SEQ_LENS, choose_packed_shapes  # noqa: E402
from test_optimize import padded_batch, tiny  # noqa: E402

cuda_graphs = importlib.import_module("bertkern.cuda_graphs")
STEPS = cuda_graphs.CAPACITY_STEPS
LENGTHS = [7, 4, 1, 0]  # full, padded, a single real token, fully padded


class GraphRecorder:
    """A torch.compile backend: keeps every FX graph Dynamo hands over (before AOT autograd, so
    bertkern's custom ops appear by name), compiles it with `inner`, and counts the calls of each."""

    def __init__(self, inner: str = "aot_eager"):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(inner)
        self.graphs: list[torch.fx.GraphModule] = []
        self.calls: list[int] = []

    @property
    def frame_count(self) -> int:
        return len(self.graphs)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        index = len(self.graphs)
        self.graphs.append(gm)
        self.calls.append(0)
        compiled = self.inner(gm, example_inputs)

        def run(*args):
            self.calls[index] += 1
            return compiled(*args)

        return run

    @staticmethod
    def bertkern_ops(gm: torch.fx.GraphModule) -> list[str]:
        """The torch.ops.bertkern.* calls of a graph, by op name, in order."""
        names = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
        return [name.split(".")[1] for name in names if name.startswith("bertkern.")]  # packet or overload

    def ran(self, prefix: str = "attention") -> list[str]:
        """The bertkern ops named prefix* of every graph called since `clear_calls` (once per graph)."""
        return [op for gm, n in zip(self.graphs, self.calls) if n for op in self.bertkern_ops(gm)
                if op.startswith(prefix)]

    def clear_calls(self) -> None:
        self.calls = [0] * len(self.calls)


@pytest.fixture
def buckets(monkeypatch):
    """The (capacity, max_seqlen) buckets the compile prologue picked, one per call (the spy runs
    eagerly, inside the prologue, never traced)."""
    picked = []

    def spy(*args, **kwargs):
        picked.append(choose_packed_shapes(*args, **kwargs))
        return picked[-1]

    monkeypatch.setattr(cuda_graphs, "choose_packed_shapes", spy)
    return picked


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch_of(model, lengths, seq=None):
    """A right-padded batch of these real lengths, [len(lengths), seq or the longest]."""
    ids, mask = padded_batch(model, lengths)
    if seq is not None and seq > ids.shape[1]:
        pad = seq - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=model.config.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, pad))
    return ids, mask


def real(out, mask) -> list[torch.Tensor]:
    """last_hidden_state at real tokens, pooled / head outputs of rows with a real token."""
    rows = mask.bool().any(1)
    got = []
    for v in out.values():
        if isinstance(v, torch.Tensor):
            got.append(v[mask.bool()] if v.shape[:2] == mask.shape else v[rows])
    return got


def assert_same(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], torch.Tensor):
            torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------- the compile prologue's buckets
def test_capacity_steps_per_octave():
    """Token capacities (CUDAGraphRunner's and the compile prologue's): k steps per power of two (at
    least 8 tokens each), so a ~60% full 8 x 128 batch packs 640 rows, not the 1024 of the next power
    of two (= the padded batch)."""
    assert STEPS == 4
    lengths = [77] * 8  # 616 of 1024
    assert choose_packed_shapes(lengths, 8, 128, DEFAULT_SEQ_LENS, 1) == (1024, 128)
    assert choose_packed_shapes(lengths, 8, 128, DEFAULT_SEQ_LENS) == (640, 128)
    for total, want in ((1, 16), (16, 16), (17, 24), (25, 32), (33, 40), (100, 112), (129, 160), (500, 512)):
        assert choose_packed_shapes([total], 1, 512, [512], 4) == (want, 512), total
    for total in range(0, 2049):  # every capacity holds its tokens and wastes at most ~1/k
        capacity = choose_packed_shapes([total], 1, 2048, [2048], 4)[0]
        assert total <= capacity <= max(16, total + max(8, total // 4)), (total, capacity)
    with pytest.raises(ValueError, match="steps_per_octave"):
        choose_packed_shapes([1], 1, 8, [8], 0)


# ---------------------------------------------------------------- the packed path, compiled
def test_compiled_model_runs_padding_free_one_graph_per_bucket(buckets):
    """BertModel, torch backend, aot_eager (Dynamo's guards and fake-tensor tracing, without C++
    codegen): the compiled graph holds attention_varlen (never the padded attention) and runs; outputs
    within the 2x rule against float64 and equal to the uncompiled optimized model; zeros at padding;
    a new (capacity, max_seqlen) bucket compiles at most once, a seen one never, and each call's
    bucket is read from its own mask (never stale)."""
    base = tiny("bert")
    ref64 = copy.deepcopy(base).double()
    optimized = bertkern.optimize(copy.deepcopy(base), backend="torch")
    recorder = GraphRecorder()
    compiled = torch.compile(optimized, backend=recorder)
    assert bertkern.optimize_report(compiled).replaced_names("padding_free") == [""]  # through the wrapper
    assert "torch.compile" in str(bertkern.optimize_report(compiled))

    seen: dict = {}
    steps = [  # (lengths, seq): the bucket each should land in
        (LENGTHS, None),  # 12 real tokens of 28: (16, 7)
        ([6, 5, 2, 0], 7),  # other lengths, same bucket: no recompile
        ([0, 0, 0, 0], 7),  # every row padded: still (16, 7)
        ([7, 7, 7, 7], None),  # no padding: no packing (its own graph)
        ([7, 7, 7, 7], None),
        ([7, 7, 7, 1], None),  # 22 tokens: capacity 24
        ([7, 7, 6, 1], None),
        ([20, 3, 0, 0], None),  # a longer batch: (24, 20)
        ([12, 11, 2, 1], 20),  # (32, 16)
        (LENGTHS, None),  # the first bucket again
    ]
    with torch.no_grad():
        for lengths, seq in steps:
            ids, mask = batch_of(base, lengths, seq)
            B, S = mask.shape
            padded = bool((mask == 0).any())
            key = (B, S, choose_packed_shapes(lengths, B, S, DEFAULT_SEQ_LENS, STEPS) if padded else None)
            frames, n_buckets = recorder.frame_count, len(buckets)
            recorder.clear_calls()
            got = compiled(input_ids=ids, attention_mask=mask)
            want = optimized(input_ids=ids, attention_mask=mask)
            new = recorder.frame_count - frames
            assert new <= (0 if key in seen else 1), f"{lengths}: {new} graphs compiled for bucket {key}"
            seen[key] = True
            if padded:
                assert buckets[n_buckets:] == [key[2]], "the prologue must pick this call's own bucket"
                capacity, max_seqlen = key[2]
                assert sum(lengths) <= capacity <= B * S and max(lengths) <= max_seqlen <= S
                assert recorder.ran() == ["attention_varlen"] * 2, recorder.ran()  # both layers packed
                assert not got.last_hidden_state[~mask.bool()].any()  # zeros at padding
            else:
                assert len(buckets) == n_buckets
                assert recorder.ran() == ["attention"] * 2  # no padding: no packing, no mask
            assert_same(got, want)
            if lengths == LENGTHS:  # a 1-token row and a fully padded row
                eager = real(base(input_ids=ids, attention_mask=mask), mask)
                ref = real(ref64(input_ids=ids, attention_mask=mask), mask)
                testing.assert_close_2x(real(got, mask), ref, eager, "compiled padding-free", floor="model")
    # Far fewer graphs than calls; Dynamo's automatic dynamic shapes may merge buckets into one graph.
    assert recorder.frame_count <= len(seen)


@pytest.mark.parametrize("no_breaks", ["fullgraph", "error_on_graph_break"])
def test_fullgraph_runs_the_padded_path(no_breaks):
    """fullgraph=True (or torch._dynamo.error_on_graph_break(True)) allows no graph break, so the
    prologue cannot run: the padded path (bool mask, one graph, no recompile per padding pattern),
    documented, never an error; outputs equal at real tokens."""
    base = tiny("bert-seqcls")
    optimized = bertkern.optimize(copy.deepcopy(base), backend="torch")
    recorder = GraphRecorder()
    compiled = torch.compile(optimized, backend=recorder, fullgraph=no_breaks == "fullgraph")
    strict = torch._dynamo.error_on_graph_break(True) if no_breaks == "error_on_graph_break" else nullcontext()
    with torch.no_grad(), strict:
        for lengths in (LENGTHS, [3, 7, 2, 5]):
            ids, mask = batch_of(base, lengths)
            got, want = compiled(input_ids=ids, attention_mask=mask), base(input_ids=ids, attention_mask=mask)
            rows = mask.bool().any(1)
            torch.testing.assert_close(got.logits[rows], want.logits[rows], rtol=1e-5, atol=1e-5)
    assert recorder.frame_count == 1
    assert recorder.bertkern_ops(recorder.graphs[0]).count("attention") == 2
    assert "attention_varlen" not in recorder.bertkern_ops(recorder.graphs[0])


def test_mark_dynamic_lengths_share_a_bucket(buckets):
    """mark_dynamic on the sequence dim: batches of other lengths in the same (capacity, max_seqlen)
    bucket reuse the graph."""
    base = tiny("roberta")  # position ids from padding_idx, in the graph after the break
    optimized = bertkern.optimize(copy.deepcopy(base), backend="torch")
    recorder = GraphRecorder()
    compiled = torch.compile(optimized, backend=recorder)
    frames = None
    with torch.no_grad():
        for seq, lengths in ((18, [9, 5, 1]), (20, [12, 3, 0])):
            ids, mask = batch_of(base, lengths, seq)
            torch._dynamo.mark_dynamic(ids, 1)
            torch._dynamo.mark_dynamic(mask, 1)
            recorder.clear_calls()
            got = compiled(input_ids=ids, attention_mask=mask)
            assert "attention_varlen" in recorder.ran()
            rows = mask.bool().any(1)
            torch.testing.assert_close(got.logits[rows], optimized(input_ids=ids, attention_mask=mask).logits[rows],
                                       rtol=1e-5, atol=1e-5)
            frames = recorder.frame_count if frames is None else frames
    assert buckets == [(16, 16), (16, 16)]
    assert recorder.frame_count == frames, f"{recorder.frame_count - frames} recompiles for a second length"


def test_reduce_overhead_on_cpu_inductor(buckets):
    """mode="reduce-overhead" through Inductor (C++ codegen with g++; no CUDA graphs on CPU): the
    default backend (CPU auto: torch's SDPA over the packed blocks), head logits within the 2x rule
    and equal to the uncompiled optimized model; a second batch of the same bucket does not
    recompile."""
    from torch._dynamo.utils import counters

    base = tiny("bert-seqcls")
    ref64 = copy.deepcopy(base).double()
    optimized = bertkern.optimize(copy.deepcopy(base))
    compiled = torch.compile(optimized, mode="reduce-overhead")
    counters.clear()
    with torch.no_grad():
        for lengths in (LENGTHS, [5, 7, 3, 0]):
            ids, mask = batch_of(base, lengths)
            got = compiled(input_ids=ids, attention_mask=mask)
            graphs = counters["stats"]["unique_graphs"]
            assert_same(got, optimized(input_ids=ids, attention_mask=mask))
            testing.assert_close_2x(real(got, mask), real(ref64(input_ids=ids, attention_mask=mask), mask),
                                    real(base(input_ids=ids, attention_mask=mask), mask), "logits", floor="model")
    assert buckets == [(16, 7), (16, 7)]
    assert counters["stats"]["unique_graphs"] == graphs  # the second batch reused the graphs
    breaks = [why for why in counters["graph_break"] if "bertkern padding-free" in why]
    assert breaks, dict(counters["graph_break"])  # the prologue's one deliberate break


# ---------------------------------------------------------------- GPU: CUDA graphs through compile
@pytest.mark.gpu
def test_reduce_overhead_cuda_graphs_padding_free(buckets):
    """mode="reduce-overhead" on CUDA (cudagraph trees) over the padding-free encoder, fp16, backend
    auto: two buckets, each warmed up, recorded and replayed; outputs within the 2x rule against a
    float64 copy and equal to the uncompiled optimized model within fp16 noise, zeros at padding,
    no graph skipped by cudagraphs, at most one recompile per bucket."""
    from torch._dynamo.utils import counters

    base = tiny("bert").cuda()
    ref64 = copy.deepcopy(base).double()
    eager = copy.deepcopy(base).half()
    optimized = bertkern.optimize(copy.deepcopy(base).half())
    compiled = torch.compile(optimized, mode="reduce-overhead")
    counters.clear()
    batches = [batch_of(base, LENGTHS), batch_of(base, [7, 7, 7, 1])]  # (16, 7) and (24, 7)
    graphs = []
    with torch.no_grad():
        for ids, mask in batches:
            ids, mask = ids.cuda(), mask.cuda()
            for _ in range(3):  # warm-up, record, replay
                out = compiled(input_ids=ids, attention_mask=mask)
                got = {k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}  # replays overwrite
            graphs.append(counters["stats"]["unique_graphs"])
            want = optimized(input_ids=ids, attention_mask=mask)
            for k, v in got.items():
                torch.testing.assert_close(v.float(), want[k].float(), rtol=2e-2, atol=2e-2)
            assert not got["last_hidden_state"][~mask.bool()].any()
            testing.assert_close_2x(real(got, mask), real(ref64(input_ids=ids, attention_mask=mask), mask),
                                    real(eager(input_ids=ids, attention_mask=mask), mask), "fp16", floor="model")
    assert buckets[0] == (16, 7) and buckets[-1] == (24, 7) and len(buckets) == 6
    assert graphs[1] - graphs[0] <= 1
    assert counters["inductor"]["cudagraph_skips"] == 0, "a graph ran without CUDA graphs"
