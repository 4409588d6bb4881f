"""What backend="auto" runs for attention and attention_varlen: one table, and torch's own kernels.

    choice = choose("attention", q, dropout_p)   # "triton", "cuda", "sdpa", "varlen_attn" or "torch"
    print(format_table())                         # the table, as `bertkern info` shows it

The table is keyed by (device arch, dtype, head-dim bucket, sequence bucket) and gives one choice per
op. Candidates: bertkern's Triton and CUDA kernels, torch's `scaled_dot_product_attention` ("sdpa";
for attention_varlen: the packed tokens gathered into [B, max_seqlen] blocks, SDPA with a key-padding
mask, scattered back) and `torch.nn.attention.varlen.varlen_attn` ("varlen_attn", FlashAttention on
packed tokens; fp16 / bf16 on sm_80+, no dropout).

GPU rows, from the first timings (H200, torch 2.11, fp16, 2026-11-26; README): torch's kernels are
the fastest there. Forward, 32 x 12 heads x 512, D = 64, 60% fill: SDPA 0.112 ms, bertkern Triton
0.131 ms, bertkern CUDA 0.572 ms. End to end, BERT-base inference under optimize() was host-bound on
that machine, and torch's public `varlen_attn` lost to bertkern's CUDA kernels there (0.62-0.91x
against 1.09-1.29x over HF's SDPA model) for a host reason: it is a Python custom op (tens of
microseconds of dispatch per call). So for inference (no gradient, not tracing) auto calls the ATen
FlashAttention kernel that `varlen_attn` ends in directly, one C++ op like bertkern's own; with a
gradient it calls `varlen_attn` (its autograd). Padded attention goes to SDPA (a C++ op). Dropout
runs SDPA (varlen_attn has none). Not yet timed end to end with this change: the next GPU run's
bert suite says whether the table holds. On CPU, torch's SDPA (a fused flash kernel) beats the eager
reference ops by far.

A choice that cannot run an input (dropout for varlen_attn, a dtype or head dim a kernel lacks,
varlen_attn missing in this torch) moves down the row's fallback order.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bertkern._utils import needs_grad, varlen_index

# Buckets: head dim <= 64 / <= 128 / larger; sequence (S, or max_seqlen) <= 128 / <= 512 / longer.
HEAD_BUCKETS = (64, 128)
SEQ_BUCKETS = (128, 512)

# (arch, dtype name, head bucket, seq bucket) -> {op: choice}; "*" matches anything. The first
# matching row wins. Static until GPU timings exist (see the module docstring).
TABLE: list[tuple[tuple[str, str, str, str], dict[str, str]]] = [
    (("cpu", "*", "*", "*"), {"attention": "sdpa", "attention_varlen": "sdpa"}),
    (("sm_80+", "float16", "*", "*"), {"attention": "sdpa", "attention_varlen": "varlen_attn"}),
    (("sm_80+", "bfloat16", "*", "*"), {"attention": "sdpa", "attention_varlen": "varlen_attn"}),
    (("*", "*", "*", "*"), {"attention": "sdpa", "attention_varlen": "sdpa"}),
]
_WHY = "GPU rows from H200 kernel timings: torch's flash / SDPA kernels 1.2-5x faster (module docstring)"

# What to try after a choice that cannot run an input (Triton's launches cost more host time than
# torch's kernels: it is never an automatic fallback).
FALLBACK = {"varlen_attn": "sdpa", "cuda": "varlen_attn", "triton": "sdpa", "sdpa": "torch"}


def _arch(device: torch.device) -> str:
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else device.type


@functools.cache  # once per GPU: every attention call asks
def _cuda_arch(index: int) -> str:
    major, _ = torch.cuda.get_device_capability(index)
    return "sm_80+" if major >= 8 else f"sm_{major}x"


def _bucket(n: int, edges) -> str:
    for e in edges:
        if n <= e:
            return f"<={e}"
    return f">{edges[-1]}"


def _matches(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern == value


def lookup(op: str, arch: str, dtype: torch.dtype, head_dim: int, seq: int) -> str:
    key = (arch, str(dtype).removeprefix("torch."), _bucket(head_dim, HEAD_BUCKETS), _bucket(seq, SEQ_BUCKETS))
    for pattern, choice in TABLE:
        if all(_matches(p, v) for p, v in zip(pattern, key)):
            return choice[op]
    return "torch"


def _can_run(choice: str, op: str, q: torch.Tensor, dropout_p: float) -> bool:
    from bertkern import backend as _backend
    from bertkern.ops import attention as _attn

    if choice == "torch":
        return True
    if choice == "sdpa":
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if choice == "varlen_attn":
        return (op == "attention_varlen" and dropout_p == 0.0 and q.device.type == "cuda"
                and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
                and _varlen_attn() is not None and _arch(q.device) == "sm_80+")
    if choice == "cuda" and (_attn.cuda_unsupported(q) is not None or dropout_p > 0.0):
        return False  # dropout: training, not measured yet with the CUDA kernels (module docstring)
    return _backend.unavailable_reason(choice, q.device) is None and _attn.kernel_unsupported(q) is None


def choose(op: str, q: torch.Tensor, dropout_p: float, seq: int | None = None) -> str:
    """The auto choice for one call: the table's entry for q (seq = S or max_seqlen), moved down the
    fallback order until it can run this input."""
    seq = q.shape[-2] if seq is None else seq
    choice = lookup(op, _arch(q.device), q.dtype, q.shape[-1], seq)
    while not _can_run(choice, op, q, dropout_p):
        choice = FALLBACK.get(choice, "torch")
    return choice


def table() -> list[dict[str, str]]:
    """The table as rows (for `bertkern info` and the benchmark suite)."""
    rows = []
    for (arch, dtype, head, seq), choice in TABLE:
        rows.append({"arch": arch, "dtype": dtype, "head_dim": head, "seq": seq, **choice, "why": _WHY})
    return rows


def format_table() -> str:
    lines = ["attention backend='auto' (first matching row wins; " + _WHY + "):",
             f"  {'arch':<8} {'dtype':<9} {'head_dim':<9} {'seq':<6} {'attention':<10} attention_varlen"]
    for r in table():
        lines.append(f"  {r['arch']:<8} {r['dtype']:<9} {r['head_dim']:<9} {r['seq']:<6} {r['attention']:<10} "
                     f"{r['attention_varlen']}")
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
