"""The 2x-of-eager error rule, public: check your own kernels and models the way bertkern checks itself.

A result is right when its largest error against a float64 reference is at most twice the error of
eager PyTorch (the same computation, plain torch, same dtype) against that same reference, plus a small
absolute floor (eager can be exact on easy inputs). NaN never passes. Unlike a fixed rtol/atol, the
rule follows the dtype and the inputs: a kernel may round differently from eager, but not worse.

    import torch
    from bertkern.testing import assert_close_2x

    x = torch.randn(64, 768, dtype=torch.bfloat16)
    ref64 = torch.nn.functional.gelu(x.double())   # the truth
    eager = torch.nn.functional.gelu(x)            # what plain torch gets in bf16
    assert_close_2x(my_gelu(x), ref64, eager)      # AssertionError with the numbers if not

`check_2x` returns the numbers instead of raising (the benchmarks' correctness gate uses it).
Pass several tensors (e.g. every parameter gradient) as sequences to judge them together.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import torch

__all__ = ["FLOORS", "Check", "check_2x", "assert_close_2x", "floor_of"]

# The absolute floors, per kind of output and dtype: the only copy (tests, benchmarks, verify).
FLOORS = {
    # one op's outputs: a few ulps near 1.0
    "op": {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
    # whole-model outputs (hidden states, logits): LayerNorm-scaled values of order 1 after many layers
    "model": {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2},
    # a training step's parameter gradients, keyed by the autocast dtype (fp32: none); callers scale
    # it by the largest reference gradient
    "grad": {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2},
}

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def floor_of(dtype: torch.dtype, kind: str = "op") -> float:
    """The absolute floor of the rule for outputs of `dtype`; kind is "op", "model" or "grad"."""
    return FLOORS[kind][dtype]


@dataclasses.dataclass(frozen=True)
class Check:
    """One verdict of the rule. Errors are max |a - b| over every element (NaN where they could not be
    computed: a shape mismatch); reason is empty when the output passes."""
    err: float = math.nan  # output vs float64 reference
    eager_err: float = math.nan  # eager vs float64 reference
    vs_eager: float = math.nan  # output vs eager
    tol: float = math.nan  # 2 x eager_err + floor
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason

    def to_dict(self) -> dict:
        """The numbers, JSON-safe (NaN and inf as None: the reason says NaN)."""
        return {k: (v if math.isfinite(v) else None) for k, v in dataclasses.asdict(self).items() if k != "reason"}


def _listed(t: Tensors) -> list[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def _max_abs(pairs) -> float:
    return max([(a.double() - b.double()).abs().max().item() for a, b in pairs if a.numel()], default=0.0)


def _truncating_interpreter(out: torch.Tensor) -> bool:
    # Triton's interpreter casts fp32 -> bf16 by truncation (numpy has no bf16) where GPUs round to
    # nearest: one extra ulp per element is its artefact, not the kernel's.
    from bertkern.backend import triton_interpreted

    return out.dtype == torch.bfloat16 and out.device.type == "cpu" and triton_interpreted()


def check_2x(out: Tensors, ref64: Tensors, eager: Tensors, name: str = "output", *,
             floor: Union[str, float] = "op", scale_floor: bool = False) -> Check:
    """Judge `out` by the rule: max |out - ref64| <= 2 x max |eager - ref64| + floor, NaN never passes.

    out, ref64, eager: tensors, or equal-length sequences of tensors judged together (max over all);
    name: what the message calls them. Each output must have eager's shape and dtype. floor: a kind of
    `FLOORS` ("op": one op's outputs, "model": whole-model outputs, looked up by the output's dtype) or
    a number. scale_floor: multiply the floor by max(1, max |ref64|), for outputs whose values are far
    from 1.
    Under the Triton interpreter, bf16 outputs on CPU get one extra ulp per element (it truncates).
    """
    outs, refs, eagers = _listed(out), _listed(ref64), _listed(eager)
    if not outs or not len(outs) == len(refs) == len(eagers):
        return Check(reason=f"{name}: {len(outs)} outputs, {len(refs)} references, {len(eagers)} eager outputs")
    for o, e in zip(outs, eagers):
        if o.shape != e.shape or o.dtype != e.dtype:
            return Check(reason=f"{name}: {tuple(o.shape)} {o.dtype} != eager's {tuple(e.shape)} {e.dtype}")
    if any(torch.isnan(r).any() for r in refs):
        return Check(reason=f"{name}: NaN in the float64 reference (a bug in the check, not in the output)")
    err, eager_err = _max_abs(zip(outs, refs)), _max_abs(zip(eagers, refs))
    if isinstance(floor, str):
        floor = floor_of(outs[0].dtype, floor)
    if scale_floor:
        floor *= max([1.0] + [r.abs().max().item() for r in refs if r.numel()])
    tol = 2 * eager_err + floor
    if not err <= tol and all(_truncating_interpreter(o) for o in outs):
        err = max(((o.double() - r.double()).abs() - r.double().abs() * 2.0**-7).max().item()
                  for o, r in zip(outs, refs) if o.numel())
    check = Check(err, eager_err, _max_abs(zip(outs, eagers)), tol)
    if any(torch.isnan(o).any() for o in outs):
        return dataclasses.replace(check, reason=f"{name}: NaN in the output")
    if not err <= tol:
        return dataclasses.replace(
            check, reason=f"{name}: max error {err:.3g} > tol {tol:.3g} "
                          f"(2 x eager's {eager_err:.3g} + floor {floor:.2g})")
    return check


def assert_close_2x(out: Tensors, ref64: Tensors, eager: Tensors, name: str = "output", *,
                    floor: Union[str, float] = "op", scale_floor: bool = False) -> None:
    """Raise AssertionError (with the errors, the tolerance and the floor) unless `out` passes `check_2x`."""
    check = check_2x(out, ref64, eager, name, floor=floor, scale_floor=scale_floor)
    if not check.ok:
        raise AssertionError(check.reason)
