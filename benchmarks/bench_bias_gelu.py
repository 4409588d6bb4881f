"""bias_gelu: y = gelu(x + bias), BERT's intermediate activation, and its backward (dx, dbias), over rows
128..64k and BERT's intermediate sizes. A new op's benchmark is a file like this one (`bertkern bench --ops
bias_gelu`): the reference and the bertkern call default to bertkern.reference/ops.<name>.
"""
import torch
import torch.nn.functional as F

from benchmarks.ops import BERT_TOKENS, CPU_DTYPES, ROWS, Case, OpSpec, budget_order, grid

INTERMEDIATE = (3072, 4096, 1536)  # BERT-base, -large, -small; a time budget cuts from the end


def make_inputs(case: Case, device):
    n = case.shape["intermediate"]
    return {"x": torch.randn(case.shape["rows"], n, device=device).to(case.dtype),
            "bias": (0.5 * torch.randn(n, device=device)).to(case.dtype)}


def eager(x, bias, approximate="none"):
    """What a BERT implementation does today: an add kernel, then a GELU kernel."""
    return F.gelu(x + bias, approximate=approximate)


def bytes_moved(case: Case) -> int:
    """fwd: read x and bias, write y. bwd: read dy, x and bias, write dx and dbias."""
    m, n = case.shape["rows"], case.shape["intermediate"]
    fwd, bwd = (2 * m * n + n) * case.dtype.itemsize, (3 * m * n + 2 * n) * case.dtype.itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.direction]


def cases(quick: bool):
    rows, widths = (BERT_TOKENS, INTERMEDIATE[:1]) if quick else (ROWS, INTERMEDIATE)
    shapes = budget_order([{"rows": r, "intermediate": n} for n in widths for r in rows], "rows", "intermediate")
    return grid(("fwd", "bwd"), (torch.float16, torch.bfloat16), shapes)


def cpu_cases(quick: bool):
    """Odd sizes (masking) and a BERT-small row; both GELU forms."""
    shapes = [{"rows": 37, "intermediate": 200}] + ([] if quick else [{"rows": 64, "intermediate": 1536}])
    return grid(("fwd", "bwd"), CPU_DTYPES[quick], shapes, ({"approximate": "none"}, {"approximate": "tanh"}))


BIAS_GELU = OpSpec("bias_gelu", make_inputs, eager, bytes_moved, cases, cpu_cases, grad_inputs=("x", "bias"))
