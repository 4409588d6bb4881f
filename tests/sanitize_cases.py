"""Every CUDA kernel's launch paths at small sizes, for NVIDIA's compute-sanitizer. On a GPU,

    compute-sanitizer --tool racecheck --kernel-name kns=bertkern --error-exitcode 3 python tests/sanitize_cases.py

reports shared-memory races (racecheck), out-of-bounds or misaligned accesses (memcheck, best with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is an allocation of its own), misused barriers
(synccheck) or reads of global memory never written (initcheck) in bertkern's own kernels;
tests/test_compute_sanitizer.py runs the four. Each case also compares the cuda backend's forward and
backward with the torch backend's on the same values in float64, under a loose bound (5% of the case's
largest value) that only a gross error breaks (a dQ key block added twice or not at all, rows never
written): the 2x rule is the op tests' job. CI runs these cases on the CPU emulation.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bertkern from this tree

import bertkern  # noqa: E402


def _rand(gen, cast, device, *shape, scale=1.0):
    return cast(torch.randn(*shape, generator=gen) * scale).to(device)


def _grads(out, leaves, gen, cast):
    """[out, d leaf...] for a random output gradient."""
    grad = _rand(gen, cast, out.device, *out.shape)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def attention(B, H, S_q, S_k, D, mask=None, p=0.0):
    """mask: None, "key" ([B,1,1,S_k] bool), "fp32" (a [B,H,S_q,S_k] additive fp32 mask, read in place
    when S_k % 64 == 0) or "bool4d" ([B,1,S_q,S_k] bool, converted on the host)."""
    def case(backend, device, cast, gen):
        q, k, v = (_rand(gen, cast, device, B, H, s, D).requires_grad_() for s in (S_q, S_k, S_k))
        m = None
        if mask == "key":
            m = (torch.rand(B, 1, 1, S_k, generator=gen) > 0.3).to(device)
        elif mask == "fp32":
            m = torch.where(torch.rand(B, H, S_q, S_k, generator=gen) > 0.3, 0.0, -1e4).to(device)
        elif mask == "bool4d":
            m = (torch.rand(B, 1, S_q, S_k, generator=gen) > 0.3).to(device)
        seed = torch.tensor([1234], device=device) if p else None
        out = torch.ops.bertkern.attention(q, k, v, m, 1 / math.sqrt(D), p, seed, backend)[0]
        return _grads(out, (q, k, v), gen, cast)

    return case


def attention_varlen(lengths, H, D, p=0.0):
    def case(backend, device, cast, gen):
        total = sum(lengths)
        q, k, v = (_rand(gen, cast, device, total, H, D).requires_grad_() for _ in range(3))
        cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
        seed = torch.tensor([99], device=device) if p else None
        out = torch.ops.bertkern.attention_varlen(q, k, v, cu, max(lengths), 0.2, p, seed, backend)[0]
        return _grads(out, (q, k, v), gen, cast)

    return case


def add_layer_norm(M, N, p=0.0):
    def case(backend, device, cast, gen):
        x, res = (_rand(gen, cast, device, M, N).requires_grad_() for _ in range(2))
        w, b, xb = (_rand(gen, cast, device, N, scale=0.5).requires_grad_() for _ in range(3))
        torch.manual_seed(7)  # the op draws its dropout seed from torch's generator
        y, pre = bertkern.ops.add_layer_norm(x, res, w, b, 1e-5, x_bias=xb, dropout_p=p, return_prenorm=True,
                                             backend=backend)
        return _grads(y + pre, (x, res, w, b, xb), gen, cast)

    return case


def masked_softmax(shape, mask, p=0.0):
    """mask: "key" ([B,1,1,N] bool) or "4d" ([B,H,S,N] additive)."""
    def case(backend, device, cast, gen):
        x = _rand(gen, cast, device, *shape, scale=3.0).requires_grad_()
        B, H, S, N = shape
        keep = torch.rand((B, 1, 1, N) if mask == "key" else shape, generator=gen) > 0.3
        m = (keep if mask == "key" else cast(torch.where(keep, 0.0, float("-inf")))).to(device)
        seed = torch.tensor([5], device=device) if p else None
        out = torch.ops.bertkern.masked_softmax(x, m, 0.5, p, seed, backend)[0]
        return _grads(out, (x,), gen, cast)

    return case


def bias_gelu(M, N, approximate):
    def case(backend, device, cast, gen):
        x, b = _rand(gen, cast, device, M, N, scale=2.0).requires_grad_(), _rand(gen, cast, device, N).requires_grad_()
        return _grads(bertkern.ops.bias_gelu(x, b, approximate=approximate, backend=backend), (x, b), gen, cast)

    return case


def embedding_layer_norm(B, S, N, vocab=97):
    def case(backend, device, cast, gen):
        ids = torch.randint(0, vocab, (B, S), generator=gen).to(device)
        types = torch.randint(0, 2, (B, S), generator=gen).to(device)
        tables = [_rand(gen, cast, device, n, N, scale=0.1).requires_grad_() for n in (vocab, S, 2)]
        w, b = (_rand(gen, cast, device, N, scale=0.5).requires_grad_() for _ in range(2))
        y = bertkern.ops.embedding_layer_norm(ids, None, types, *tables, w, b, backend=backend)
        return _grads(y, (*tables, w, b), gen, cast)

    return case


f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# name -> (dtype, case(backend, device, cast, generator) -> [output, gradients...]); cast(fp32 tensor)
# gives the case's inputs: in the dtype, or in the dtype and then float64 for the reference
CASES = {  # the attention backward's key blocks wait for each other's turn: last, so that a hang there
    # (a sanitizer that serializes blocks, say) leaves every other case's result in the log
    "add_layer_norm team + dropout": (f16, add_layer_norm(9, 384, 0.1)),
    "add_layer_norm two teams": (f32, add_layer_norm(5, 1000)),
    "add_layer_norm loop + dropout": (bf16, add_layer_norm(3, 4097, 0.1)),
    "add_layer_norm float64": (f64, add_layer_norm(33, 100, 0.2)),
    "embedding_layer_norm": (f16, embedding_layer_norm(2, 9, 384)),
    "masked_softmax warp rows + dropout": (f16, masked_softmax((2, 2, 5, 40), "key", 0.3)),
    "masked_softmax element path": (bf16, masked_softmax((2, 2, 3, 77), "4d")),
    "masked_softmax block rows + dropout": (f16, masked_softmax((1, 1, 3, 2051), "4d", 0.2)),
    "masked_softmax float64": (f64, masked_softmax((1, 2, 3, 129), "key", 0.3)),
    "bias_gelu scalar tanh": (f16, bias_gelu(37, 33, "tanh")),
    "bias_gelu vector erf": (bf16, bias_gelu(50, 136, "none")),
    "attention D30 (padded copy), one key block": (f16, attention(1, 1, 33, 33, 30, "key")),
    "attention none D64": (f16, attention(2, 2, 130, 130, 64)),
    "attention key mask + dropout D32": (bf16, attention(1, 2, 70, 200, 32, "key", 0.2)),
    "attention fp32 4-D mask in place D80": (f16, attention(1, 2, 70, 128, 80, "fp32")),
    "attention bool 4-D mask + dropout D128": (bf16, attention(1, 1, 40, 130, 128, "bool4d", 0.1)),
    "attention_varlen + dropout": (f16, attention_varlen([70, 1, 130, 17], 2, 64, 0.2)),
}


def gross_error(got: torch.Tensor, want: torch.Tensor, scale: float = 1.0) -> float:
    """max |got - want| / scale; inf for a NaN or a wrong shape."""
    if got.shape != want.shape:
        return math.inf
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    return math.inf if math.isnan(err) else err / scale


def magnitude(tensors) -> float:
    """max(1, the largest |value| over all of a case's outputs): a gradient that is exactly 0 (a query
    that sees one key) still carries the others' rounding, as test_attention.assert_attention_close says."""
    return max([1.0] + [t.abs().max().item() for t in tensors if t.numel()])


def worst_error(case, dtype, backend: str, device: str) -> float:
    """A case on `backend` against the torch backend on the same values in float64: its largest
    gross_error over all outputs, relative to their magnitude."""
    got = case(backend, device, lambda t: t.to(dtype), torch.Generator().manual_seed(0))
    want = case("torch", device, lambda t: t.to(dtype).double(), torch.Generator().manual_seed(0))
    scale = magnitude(want)
    return max(gross_error(g, w, scale) for g, w in zip(got, want, strict=True))


def run(backend: str = "cuda", device: str = "cuda", log=print) -> list[str]:
    """Every case on `backend` (worst_error at most 0.05): the names of the cases that failed."""
    bad = []
    for name, (dtype, case) in CASES.items():
        log(f"     {name} ...")  # a hang shows where
        worst = worst_error(case, dtype, backend, device)
        ok = worst <= 0.05
        log(f"{'ok  ' if ok else 'FAIL'} {name}: worst relative error {worst:.2e}")
        if not ok:
            bad.append(name)
    return bad


if __name__ == "__main__":
    failed = run()
    print(f"{len(CASES) - len(failed)}/{len(CASES)} cases ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)
