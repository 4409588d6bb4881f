"""attention: softmax(q k^T * scale + mask) v over [B, H, S, D] and its backward, over batch {32, 8, 64, 1}
x seq {512, 128, 384} x heads {12, 16}, head_dim 64, full or 60% filled. attention_varlen: the same batches
padding-free (packed [total, H, D]), against the same eager baseline (HF eager attention). Extra
providers: sdpa (the transformers default), torch-varlen (varlen_attn, CUDA only). Gated on the real query
rows only; TFLOP/s counts the real tokens' FLOPs.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from benchmarks.common import Skip, fill_lengths
from benchmarks.ops import CPU_DTYPES, Case, OpSpec, grid

import bertkern
from bertkern import padding, reference

FILLS = ({"fill": 0.6}, {"fill": 1.0})


def lengths(case: Case) -> list[int]:
    """The real lengths, the bert suite's: mean fill x seq."""
    return fill_lengths(case.shape["batch"], case.shape["seq"], case.options.get("fill", 1.0))


def make_inputs(case: Case, device):
    b, h, s, d = (case.shape[k] for k in ("batch", "heads", "seq", "head_dim"))
    q, k, v = torch.randn(b, s, 3, h, d, device=device).to(case.dtype).permute(2, 0, 3, 1, 4).unbind(0)  # HF's layout
    real = torch.arange(s, device=device)[None, :] < torch.tensor(lengths(case), device=device)[:, None]
    mask = torch.where(real, 0.0, torch.finfo(case.dtype).min).to(case.dtype)[:, None, None, :]
    return {"q": q, "k": k, "v": v, "mask": mask}


def valid(inputs):
    """[B, 1, S, 1]: the real query rows."""
    return (inputs["mask"] == 0).transpose(-1, -2)


def _bshd(out):
    """The layout copy HF makes before the output projection, returned as the [B, H, S, D] view."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def eager(q, k, v, mask, fill=1.0):
    """HF BertSelfAttention, eager attention."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + mask
    return _bshd(torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v))


def ref(q, k, v, mask, fill=1.0):
    return reference.attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]))


def sdpa(case, device):
    return lambda q, k, v, mask, fill=1.0: _bshd(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def kernel(backend: str, case: Case, device):
    def fn(q, k, v, mask, fill=1.0):
        return torch.ops.bertkern.attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]), 0.0, None, backend)[0]

    return fn


def varlen(attend):
    """A padding-free provider: unpad q, k, v to [total, H, D] (indices found once per case: no host
    sync per call), attend(q, k, v, cu_seqlens, max_seqlen), repad to [B, H, S, D]."""
    def factory(case: Case, device):
        b, h, s, d = (case.shape[k] for k in ("batch", "heads", "seq", "head_dim"))
        real = torch.arange(s, device=device)[None, :] < torch.tensor(lengths(case), device=device)[:, None]
        _, indices, cu_seqlens, max_seqlen = padding.unpad(real[..., None], real)

        def fn(q, k, v, mask, fill=1.0):
            packed = [t.transpose(1, 2).reshape(b * s, h, d).index_select(0, indices) for t in (q, k, v)]
            return padding.repad(attend(*packed, cu_seqlens, max_seqlen), indices, b, s).transpose(1, 2)

        return fn

    return factory


def varlen_kernel(backend: str, case: Case, device):
    return varlen(lambda q, k, v, cu, n: bertkern.ops.attention_varlen(q, k, v, cu, n, backend=backend))(case, device)


def torch_varlen(case: Case, device):
    if device.type != "cuda":
        raise Skip("torch.nn.attention.varlen.varlen_attn runs on CUDA only")
    from torch.nn.attention.varlen import varlen_attn

    return varlen(lambda q, k, v, cu, n: varlen_attn(q, k, v, cu.int(), cu.int(), n, n))(case, device)


def flops(case: Case) -> int:
    fwd = 4 * case.shape["heads"] * case.shape["head_dim"] * sum(n * n for n in lengths(case))
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[case.direction]


def bytes_moved(case: Case) -> int:
    b, h, s, d = (case.shape[k] for k in ("batch", "heads", "seq", "head_dim"))
    n = b * h * s * d
    fwd, bwd = (4 * n + b * s) * case.dtype.itemsize, (8 * n + b * s) * case.dtype.itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.direction]


def shape(batch: int, seq: int, heads: int = 12):
    return {"batch": batch, "heads": heads, "seq": seq, "head_dim": 64}


def cases(quick: bool):
    if quick:
        return grid(("fwd", "fwd+bwd"), (torch.float16,), [shape(32, 512), shape(32, 128)], FILLS)
    return grid(("fwd", "fwd+bwd"), (torch.float16, torch.bfloat16),  # batch 1 (launch-bound) last
                [shape(b, s, h) for b in (32, 8, 64, 1) for h in (12, 16) for s in (512, 128, 384)], FILLS)


def cpu_cases(quick: bool):
    """A tiny shape with an odd length and padding, for the interpreter."""
    return grid(("fwd", "fwd+bwd"), (torch.float32,) if quick else CPU_DTYPES[False],
                [{"batch": 3, "heads": 2, "seq": 37, "head_dim": 32}], ({"fill": 0.6},))


ATTENTION = OpSpec("attention", make_inputs, eager, bytes_moved, cases, cpu_cases, ref, kernel,
                   grad_inputs=("q", "k", "v"), output_names=("out",), x_key="batch", extra_providers={"sdpa": sdpa},
                   flops=flops, valid=valid)
ATTENTION_VARLEN = dataclasses.replace(ATTENTION, name="attention_varlen", kernel=varlen_kernel,
                                       extra_providers={"sdpa": sdpa, "torch-varlen": torch_varlen})
