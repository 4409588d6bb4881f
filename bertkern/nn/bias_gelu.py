from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertkern import ops


def linear_bias_gelu(x: torch.Tensor, dense: nn.Linear, approximate: str = "none",
                     backend: str | None = None) -> torch.Tensor:
    """gelu(dense(x)), BERT's intermediate block: the matmul without its bias, then bias + GELU in one
    op (under autocast the op adds the fp32 bias in the matmul's dtype, as addmm would)."""
    return ops.bias_gelu(F.linear(x, dense.weight), dense.bias, approximate=approximate, backend=backend)


class BiasGELU(nn.Module):
    """gelu(x + bias) in one kernel. Use after a bias-free nn.Linear, giving it the Linear's bias.

    num_features=None makes a bias-free GELU (the bias can still be passed to forward).
    """

    def __init__(self, num_features: int | None = None, approximate: str = "none", backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.approximate, self.backend = approximate, backend
        self.bias = (None if num_features is None
                     else nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype)))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.bias_gelu(x, self.bias if bias is None else bias, approximate=self.approximate, backend=self.backend)

    def extra_repr(self) -> str:
        n = None if self.bias is None else self.bias.shape[0]
        return f"num_features={n}, approximate={self.approximate!r}, backend={self.backend!r}"
