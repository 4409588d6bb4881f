"""What backend="auto" runs for attention and attention_varlen: one table, and torch's own kernels.

    choice = choose("attention", q, dropout_p)   # "triton", "cuda", "sdpa", "varlen_attn" or "torch"
    print(format_table())                         # the table, as `bertkern info` shows it

The table is keyed by (device arch, dtype, head-dim bucket, sequence bucket) and gives one choice per
op: rows measured on a GPU first (attention_auto.json next to this file, written by `bertkern bench
--suite ops --update-auto-table` from the forward kernels' timings: the fastest correct candidate per
bucket), then the static rows below. Candidates: bertkern's Triton and CUDA kernels, torch's
`scaled_dot_product_attention` ("sdpa"; for attention_varlen: the packed tokens gathered into
[B, max_seqlen] blocks, SDPA with a key-padding mask, scattered back) and
`torch.nn.attention.varlen.varlen_attn` ("varlen_attn", FlashAttention on packed tokens; fp16 / bf16
on sm_80+, no dropout).

GPU rows. Kernel time (H100, torch 2.11, fp16, 32 x 12 heads x 512, D = 64, 60% fill, 2026-11-26):
padded forward SDPA 0.108 ms, bertkern Triton 0.126, bertkern CUDA 0.129; packed forward (with the
gather and scatter around it) torch's FlashAttention varlen 0.157, CUDA 0.157, Triton 0.158. So
padded attention goes to SDPA and packed inference to FlashAttention, called as the ATen op that
`varlen_attn` ends in (no gradient, not tracing): the public `varlen_attn` is a Python custom op, tens
of microseconds of dispatch per call, which lost end to end on a host-bound H200. With a gradient it
is `varlen_attn` (its autograd). Packed training with dropout (varlen_attn has none) runs bertkern's
CUDA kernels when built, else SDPA over gathered blocks (FALLBACK). On CPU, torch's SDPA (a fused
flash kernel) beats the eager reference ops by far.

Those are kernel times, which decide where the GPU is the bottleneck: inside a CUDA graph or
torch.compile, and when training. Called eagerly for inference, a BERT forward on an H100 is
host-bound (99% of MiniLM's 32 x 128 forward is host time), and there the host cost of a call
decides: torch dispatches SDPA to cuDNN at ~55 us of host time per call, bertkern's CUDA attention
costs ~12. End to end (H100, fp16, eager inference, optimize() with auto against backend="cuda",
ms): BERT-base 32x128 6.08 vs 5.19 and 5.70 vs 4.56, 1x128 7.39 vs 5.51 and 5.55 vs 4.47, 16x512 at
60% (packed) 9.74 vs 7.22 and 4.59 vs 4.28; BERT-large 32x128 11.90 vs 9.62 and 10.26 vs 9.03;
MiniLM 32x128 5.99 vs 6.11, 3.39 vs 2.77, 5.01 vs 3.96 (benchmarks/results/h100: bert.json,
bert_run2.md, host_profile.md). Auto was slower than HF's own SDPA model in 7 of those 11 cells,
backend="cuda" in 2 (MiniLM both times). So eager inference on sm_90 reads the EAGER rows first: the
CUDA kernels for padded attention up to S = 128 (where attention is at most ~6% of a layer's FLOPs,
so a slower kernel could cost little even when the GPU is the bottleneck) and for packed attention
up to 512 (the kernels' time equal to FlashAttention's, above).

A choice that cannot run an input (dropout for varlen_attn, a dtype or head dim a kernel lacks,
varlen_attn missing in this torch) moves down the row's fallback order.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from bertkern._utils import needs_grad, varlen_index

# Buckets: head dim <= 64 / <= 128 / larger; sequence (S, or max_seqlen) <= 128 / <= 512 / longer.
HEAD_BUCKETS = (64, 128)
SEQ_BUCKETS = (128, 512)

CHOICES = ("sdpa", "varlen_attn", "cuda", "triton", "torch")
# Rows measured on a GPU by the benchmark suite (`bertkern bench --suite ops --update-auto-table`
# writes this file from the attention timings; see benchmarks/ops.py auto_table). They come first.
MEASURED_FILE = Path(__file__).with_name("attention_auto.json")

# The static rows: {"arch", "dtype", "head_dim", "seq"} patterns ("*" matches anything, "sm_80+" any
# GPU of that arch or newer) and a choice per op. The first matching row that has the op wins.
_WHY = "H200 kernel timings: torch's flash / SDPA kernels 1.2-5x faster (module docstring)"
STATIC: list[dict[str, str]] = [
    {"arch": "cpu", "dtype": "*", "head_dim": "*", "seq": "*", "attention": "sdpa", "attention_varlen": "sdpa",
     "why": "torch's fused SDPA beats the eager reference on CPU"},
    {"arch": "sm_80+", "dtype": "float16", "head_dim": "*", "seq": "*", "attention": "sdpa",
     "attention_varlen": "varlen_attn", "why": _WHY},
    {"arch": "sm_80+", "dtype": "bfloat16", "head_dim": "*", "seq": "*", "attention": "sdpa",
     "attention_varlen": "varlen_attn", "why": _WHY},
    {"arch": "*", "dtype": "*", "head_dim": "*", "seq": "*", "attention": "sdpa", "attention_varlen": "sdpa",
     "why": "torch's SDPA runs every input"},
]


def load_measured(path: Path = MEASURED_FILE) -> list[dict[str, str]]:
    """The measured rows in `path` ([] when there is none), checked so that a bad file fails at import
    with its name rather than as a wrong choice later."""
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        bad = [f"{op}={r[op]!r}" for op in ("attention", "attention_varlen") if op in r and r[op] not in CHOICES]
        if not {"arch", "dtype", "head_dim", "seq"} <= set(r):
            bad.append("a key is missing")
        elif not re.fullmatch(r"\*|cpu|sm_\d+\+?", r["arch"]):
            bad.append(f"arch={r['arch']!r} (want sm_<major><minor>, as _cuda_arch gives)")
        if bad:
            raise ValueError(f"{path}: bad row {r} ({', '.join(bad)}); choices are {CHOICES}")
    return rows


# Eager inference on an H100 (module docstring): rows read before every other, only by such calls.
_WHY_EAGER = "eager inference is host-bound: measured end to end on an H100 (module docstring)"
EAGER: list[dict[str, str]] = [
    {"arch": "sm_90", "dtype": "*", "head_dim": "*", "seq": "<=128", "mode": "eager", "attention": "cuda",
     "attention_varlen": "cuda", "why": _WHY_EAGER},
    {"arch": "sm_90", "dtype": "*", "head_dim": "*", "seq": "<=512", "mode": "eager", "attention_varlen": "cuda",
     "why": _WHY_EAGER},
]

TABLE: list[dict[str, str]] = EAGER + load_measured() + STATIC

# What to try, in order, after a choice that cannot run an input (Triton's launches cost more host
# time than torch's kernels: it is never an automatic fallback). varlen_attn has no dropout: in training
# the CUDA kernels run packed tokens natively, where SDPA needs a gather to padded blocks and back
# (H100, BERT-base fine-tuning step 32 x 512 at 60% fill: 45.6 ms through them, 70.6 ms through SDPA).
FALLBACK = {"varlen_attn": ("cuda", "sdpa"), "cuda": ("varlen_attn", "sdpa"), "triton": ("sdpa",),
            "sdpa": ()}


def _arch(device: torch.device) -> str:
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else device.type


@functools.cache  # once per GPU: every attention call asks
def _cuda_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def bucket(n: int, edges) -> str:
    """The table's bucket of a size: "<=128", ">512" (the benchmark suite keys its measured rows by it)."""
    for e in edges:
        if n <= e:
            return f"<={e}"
    return f">{edges[-1]}"


def _matches(pattern: str, value: str) -> bool:
    if pattern.startswith("sm_") and pattern.endswith("+"):  # this arch or newer
        return value.startswith("sm_") and value[3:].isdigit() and int(value[3:]) >= int(pattern[3:-1])
    return pattern == "*" or pattern == value


def lookup(op: str, arch: str, dtype: torch.dtype, head_dim: int, seq: int, eager: bool = False) -> str:
    """The first row that has the op and matches; a row with a "mode" ("eager") matches only such calls."""
    key = (arch, str(dtype).removeprefix("torch."), bucket(head_dim, HEAD_BUCKETS), bucket(seq, SEQ_BUCKETS))
    modes = (None, "eager") if eager else (None,)
    for row in TABLE:
        if op in row and row.get("mode") in modes \
                and all(_matches(row[k], v) for k, v in zip(("arch", "dtype", "head_dim", "seq"), key)):
            return row[op]
    return "torch"


def eager_inference(q: torch.Tensor) -> bool:
    """A call on the GPU with no autograd, outside torch.compile and CUDA graph capture: the host's cost
    per call shows in its time (module docstring)."""
    return (q.device.type == "cuda" and not torch.compiler.is_compiling() and not needs_grad(q)
            and not torch.cuda.is_current_stream_capturing())


def _can_run(choice: str, op: str, q: torch.Tensor, dropout_p: float) -> bool:
    from bertkern import backend as _backend
    # Not `from bertkern.ops import attention`: that name is the function bertkern.ops re-exports.
    from bertkern.ops.attention import cuda_unsupported, kernel_unsupported

    if choice == "torch":
        return True
    if choice == "sdpa":
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if choice == "varlen_attn":
        return (op == "attention_varlen" and dropout_p == 0.0 and q.device.type == "cuda"
                and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
                and _varlen_attn() is not None and _matches("sm_80+", _arch(q.device)))
    if choice == "cuda" and cuda_unsupported(q) is not None:
        return False
    return _backend.unavailable_reason(choice, q.device) is None and kernel_unsupported(q) is None


def choose(op: str, q: torch.Tensor, dropout_p: float, seq: int | None = None) -> str:
    """The auto choice for one call: the table's entry for q (seq = S or max_seqlen), moved down the
    fallback order until it can run this input; eager inference reads the EAGER rows too. Cached per
    key: every layer of every forward asks, and the walk through the table cost 20-90 us of host time."""
    seq = q.shape[-2] if seq is None else seq
    eager = eager_inference(q)
    key = (op, q.device, q.dtype, q.shape[-1], bucket(seq, SEQ_BUCKETS), dropout_p == 0.0, eager)
    table, chosen = _CHOSEN.get(key, (None, None))
    if table is not TABLE:  # not asked yet, or asked of another table (a test may swap TABLE)
        choice = lookup(op, _arch(q.device), q.dtype, q.shape[-1], seq, eager)
        chosen = next(c for c in (choice, *FALLBACK.get(choice, ()), "torch") if _can_run(c, op, q, dropout_p))
        _CHOSEN[key] = (TABLE, chosen)
    return chosen


# choose()'s answers, with the table each came from. The key holds the rest of what lookup() and
# _can_run() read: the device, dtype, exact head dim, sequence bucket, whether there is dropout, and
# whether the call is eager inference.
_CHOSEN: dict[tuple, tuple[list, str]] = {}


def table() -> list[dict[str, str]]:
    """The table's rows in the order they are read: eager ones, measured ones, static ones (for `bertkern
    info` and the benchmark suite)."""
    return [dict(r) for r in TABLE]


def format_table() -> str:
    lines = ["attention backend='auto' (first matching row with the op wins; mode eager: eager inference only):",
             f"  {'arch':<8} {'dtype':<9} {'head_dim':<9} {'seq':<6} {'mode':<6} {'attention':<12} "
             f"{'attention_varlen':<17} why"]
    for r in table():
        lines.append(f"  {r['arch']:<8} {r['dtype']:<9} {r['head_dim']:<9} {r['seq']:<6} {r.get('mode', '*'):<6} "
                     f"{r.get('attention', '-'):<12} {r.get('attention_varlen', '-'):<17} {r.get('why', '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- torch's own kernels
@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def sdpa(q, k, v, mask, scale: float, dropout_p: float) -> torch.Tensor:
    """F.scaled_dot_product_attention with bertkern's mask conventions (bool True = attend, or an
    additive float mask in any dtype); fully masked queries give zeros as in bertkern's kernels."""
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen: int, scale: float, dropout_p: float) -> torch.Tensor:
    """Packed [total, H, D] attention as SDPA over [B, max_seqlen] blocks: gather, attend under a
    key-padding mask, scatter back. Differentiable through torch's autograd."""
    total = q.shape[0]
    if total == 0 or cu_seqlens.numel() < 2 or max_seqlen == 0:
        return torch.zeros_like(q)
    idx, valid = varlen_index(cu_seqlens, max_seqlen, total)  # [B, max_seqlen]
    blocks = [t[idx].transpose(1, 2) for t in (q, k, v)]  # [B, H, max_seqlen, D]
    out = sdpa(*blocks, valid[:, None, None, :], scale, dropout_p).transpose(1, 2)  # [B, max_seqlen, H, D]
    # Each packed token's (sequence, position), so the gather back has a static shape (no bool mask).
    cu = cu_seqlens.to(torch.int64)
    token = torch.arange(total, device=q.device)
    seq = torch.searchsorted(cu[1:], token, right=True)
    return out[seq, token - cu[seq]]


def varlen_attn(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    cu = cu_seqlens.to(torch.int32)
    if needs_grad(q, k, v) or torch.compiler.is_compiling():
        return _varlen_attn()(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)
    # Inference: the ATen kernel varlen_attn runs, without its Python custom-op dispatch (module docstring).
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, False, False, scale=scale)[0]
