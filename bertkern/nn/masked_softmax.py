from __future__ import annotations

import torch
from torch import nn

from bertkern import ops


class MaskedSoftmax(nn.Module):
    """dropout(softmax(scores * scale + mask)) over the last dim in one kernel; dropout only in
    training mode. See bertkern.ops.masked_softmax for the mask forms."""

    def __init__(self, scale: float = 1.0, dropout_p: float = 0.0, backend: str | None = None):
        super().__init__()
        self.scale, self.dropout_p, self.backend = scale, dropout_p, backend

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        return ops.masked_softmax(scores, mask, scale=self.scale, dropout_p=p, backend=self.backend)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, dropout_p={self.dropout_p}, backend={self.backend!r}"
