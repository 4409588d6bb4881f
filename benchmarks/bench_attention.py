"""attention: softmax(q k^T / sqrt(D) + padding mask) v over BERT shapes, forward and forward+backward,
in TFLOP/s of useful work.

    python benchmarks/bench_attention.py [--quick] [--dtype fp16,bf16] [--budget-s S] [--out DIR]

Cases: batch 1 / 8 / 32 / 64 x seq 128 / 384 / 512, head dim 64 with 12 heads (BERT-base) and 16
heads (BERT-large), fp16 and bf16, and a padding mask at 60% fill (lengths spread evenly from 20% to
100% of seq, mean 60%; batch 1: one sequence of 60%) or 100% fill. No dropout.

Inputs are what a BERT layer has: q, k, v are [B, H, S, D] views of one [B, S, 3, H, D] QKV
projection, and an additive [B, 1, 1, S] mask in the inputs' dtype (0 = real token, finfo.min =
padding), as HF builds it. Providers:
- eager: HF BertSelfAttention's eager path: matmul, scale, + mask, softmax (fp32 inside), matmul,
  then the transpose(1, 2).contiguous() to [B, S, H, D] that the output projection needs;
- compile: torch.compile of eager;
- sdpa: torch.nn.functional.scaled_dot_product_attention with the same mask (a float mask rules out
  its FlashAttention backend: this is HF's sdpa path), plus the same layout copy;
- triton, cuda: bertkern.ops.attention on its Triton kernel and on its CUDA C++ (mma.sync) kernel
  (the output is already [B, S, H, D] memory: no copy);
- varlen, varlen-cuda: bertkern.ops.attention_varlen (Triton, CUDA) on the real tokens only. Its
  step includes gathering q, k, v into packed form and scattering the output back (and the reverse
  in backward), O(B S H D) bytes: in the padding-free model those happen once per forward, not per
  layer, so this understates it.
The correctness gate compares the real tokens only (padded query rows are garbage in the dense
providers and absent in varlen), and output gradients are 0 at padded rows (as a model's loss on real
tokens gives them).

TFLOP/s counts useful work only: forward 4 H D sum_b L_b^2 (L_b = real length: the padded part of a
dense provider's work is not counted), forward+backward 3x that (the backward's four S x S x D
matmuls; FlashAttention's recomputation of q k^T is not counted). The GB/s column counts q, k, v and
out once (and the backward's dO, dq, dk, dv), so its % of copy bandwidth is not a meaningful floor here.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `bertkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.harness import Case, OpSpec, Skip, grid  # noqa: E402  (sets TRITON_INTERPRET=1 without a GPU)

import bertkern  # noqa: E402,F401  (registers torch.ops.bertkern.attention)
from bertkern import padding  # noqa: E402
from bertkern import reference as _reference  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16)
BATCHES = (32, 8, 64, 1)  # run order: a time budget cuts from the end
SEQS = (512, 128, 384)
FILLS = (0.6, 1.0)


def lengths(case: Case) -> list[int]:
    """Real lengths of the batch: deterministic per case, mean fill x seq."""
    b, s, fill = case.shape["batch"], case.shape["seq"], case.options.get("fill", 1.0)
    if fill >= 1.0:
        return [s] * b
    if b == 1:
        return [max(1, round(fill * s))]
    lo = max(1, round((2 * fill - 1) * s))
    return [round(lo + (s - lo) * i / (b - 1)) for i in range(b)]


def _scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def make_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    b, h, s, d = (case.shape[k] for k in ("batch", "heads", "seq", "head_dim"))
    qkv = torch.randn(b, s, 3, h, d, device=device).to(case.dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    real = torch.arange(s, device=device)[None, :] < torch.tensor(lengths(case), device=device)[:, None]
    mask = torch.where(real, 0.0, torch.finfo(case.dtype).min).to(case.dtype)[:, None, None, :]
    return {"q": q, "k": k, "v": v, "mask": mask}


def valid(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, 1, S, 1]: the real query rows."""
    return (inputs["mask"] == 0).transpose(-1, -2)


def _bshd(out: torch.Tensor) -> torch.Tensor:
    """The layout copy HF makes before the output projection, returned as the [B, H, S, D] view."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def eager(q, k, v, mask, fill=1.0):
    """HF BertSelfAttention, eager attention."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * _scale(q) + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return _bshd(torch.matmul(probs, v))


def reference(q, k, v, mask, fill=1.0):
    return _reference.attention(q, k, v, mask, _scale(q))


def sdpa_provider(case: Case, device: torch.device):
    if device.type != "cuda":
        raise Skip("sdpa is timed on CUDA only")
    return lambda q, k, v, mask, fill=1.0: _bshd(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=_scale(q)))


def kernel(backend: str):
    op = torch.ops.bertkern.attention

    def fn(q, k, v, mask, fill=1.0):
        return op(q, k, v, mask, _scale(q), 0.0, None, backend)[0]

    return fn


def varlen_provider(backend: str):
    return lambda case, device: _varlen(case, device, backend)


def _varlen(case: Case, device: torch.device, backend: str):
    from bertkern import backend as _backend

    why = _backend.unavailable_reason(backend, device)
    if why is not None:
        raise Skip(why)
    b, h, s, d = (case.shape[k] for k in ("batch", "heads", "seq", "head_dim"))
    real = torch.arange(s, device=device)[None, :] < torch.tensor(lengths(case), device=device)[:, None]
    _, indices, cu_seqlens, max_seqlen = padding.unpad(real[..., None], real)  # once per case: no sync per call

    def fn(q, k, v, mask, fill=1.0):
        packed = [t.transpose(1, 2).reshape(b * s, h, d).index_select(0, indices) for t in (q, k, v)]
        out = bertkern.ops.attention_varlen(*packed, cu_seqlens, max_seqlen, scale=_scale(q), backend=backend)
        return padding.repad(out, indices, b, s).transpose(1, 2)

    return fn


def flops(case: Case) -> int:
    fwd = 4 * case.shape["heads"] * case.shape["head_dim"] * sum(n * n for n in lengths(case))
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[case.direction]


def bytes_moved(case: Case) -> int:
    b, h, s, d = (case.shape[k] for k in ("batch", "heads", "seq", "head_dim"))
    size = case.dtype.itemsize
    n = b * h * s * d
    fwd = (4 * n + b * s) * size
    bwd = (8 * n + b * s) * size
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.direction]


def _shape(batch: int, seq: int, heads: int = 12) -> dict[str, int]:
    return {"batch": batch, "heads": heads, "seq": seq, "head_dim": 64}


def cases(quick: bool) -> list[Case]:
    fills = tuple({"fill": f} for f in FILLS)
    if quick:
        return grid("attention", ("fwd", "fwd+bwd"), (torch.float16,), [_shape(32, 512), _shape(32, 128)], fills)
    shapes = [_shape(b, s, h) for h in (12, 16) for b in BATCHES for s in SEQS]
    return grid("attention", ("fwd", "fwd+bwd"), DTYPES, shapes, fills)


def cpu_cases(quick: bool) -> list[Case]:
    """Tiny shapes with an odd length and padding, for the interpreter."""
    shapes = [{"batch": 3, "heads": 2, "seq": 37, "head_dim": 32}]
    dtypes = (torch.float32,) if quick else (torch.float32, torch.float16, torch.bfloat16)
    return grid("attention", ("fwd", "fwd+bwd"), dtypes, shapes, ({"fill": 0.6},))


SPEC = OpSpec(
    name="attention",
    make_inputs=make_inputs,
    eager=eager,
    reference=reference,
    kernel=kernel,
    bytes_moved=bytes_moved,
    cases=cases,
    cpu_cases=cpu_cases,
    grad_inputs=("q", "k", "v"),
    output_names=("out",),
    x_key="batch",
    backends=("triton", "cuda"),
    extra_providers={"sdpa": sdpa_provider, "varlen": varlen_provider("triton"),
                     "varlen-cuda": varlen_provider("cuda")},
    flops=flops,
    valid=valid,
)

if __name__ == "__main__":
    from benchmarks import run

    sys.exit(run.main(["--ops", SPEC.name, *sys.argv[1:]]))
