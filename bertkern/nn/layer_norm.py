from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertkern import ops


def linear_add_layer_norm(x: torch.Tensor, dense: nn.Linear, residual: torch.Tensor | None, norm: nn.LayerNorm,
                          dropout_p: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """LayerNorm(dropout(dense(x)) + residual), BERT's "output" block after attention and after the
    FFN: the matmul without its bias, then bias + dropout + residual + LayerNorm in one op. The
    modules' parameters and eps are read at every call (nothing is copied). Pass dropout_p = 0.0 in
    eval mode."""
    return ops.add_layer_norm(F.linear(x, dense.weight), residual, norm.weight, norm.bias, norm.eps,
                              x_bias=dense.bias, dropout_p=dropout_p, backend=backend)


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dim through bertkern.ops.add_layer_norm (same parameters and
    state dict, so it can replace an nn.LayerNorm in place)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError("FusedLayerNorm normalizes the last dim only, "
                             f"got normalized_shape {self.normalized_shape}")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.add_layer_norm(x, None, self.weight, self.bias, self.eps, backend=self.backend)

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, backend: str | None = None) -> "FusedLayerNorm":
        """A FusedLayerNorm sharing ln's parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = ln.normalized_shape, ln.eps, ln.elementwise_affine
        if len(new.normalized_shape) != 1:
            raise ValueError("FusedLayerNorm normalizes the last dim only, "
                             f"got normalized_shape {new.normalized_shape}")
        new.weight, new.bias, new.backend = ln.weight, ln.bias, backend
        return new


class FusedAddLayerNorm(FusedLayerNorm):
    """LayerNorm(dropout(x + x_bias) + residual) in one kernel: the BERT "output" block after a
    bias-free Linear (pass the Linear's bias as x_bias). Dropout applies in training mode only."""

    def __init__(self, normalized_shape, eps: float = 1e-12, dropout_p: float = 0.0, elementwise_affine: bool = True,
                 bias: bool = True, backend: str | None = None, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, backend=backend, device=device, dtype=dtype)
        self.dropout_p = dropout_p

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, x_bias: torch.Tensor | None = None,
                return_prenorm: bool = False):
        p = self.dropout_p if self.training else 0.0
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, x_bias=x_bias, dropout_p=p,
                                  return_prenorm=return_prenorm, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}"


class FusedEmbeddingLayerNorm(nn.Module):
    """BERT embeddings: LayerNorm(word[ids] + type[token_type_ids] + pos[position_ids]) in one kernel,
    with HF BertEmbeddings' parameter names (word_embeddings, position_embeddings,
    token_type_embeddings, LayerNorm). Dropout after it is left to the caller."""

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, pad_token_id: int | None = 0, eps: float = 1e-12,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id, **kw)
        self.position_embeddings = (nn.Embedding(max_position_embeddings, hidden_size, **kw)
                                    if max_position_embeddings else None)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size, **kw) if type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps, **kw)
        self.backend = backend

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        ln = self.LayerNorm
        return ops.embedding_layer_norm(
            input_ids, position_ids, token_type_ids, self.word_embeddings.weight,
            None if self.position_embeddings is None else self.position_embeddings.weight,
            None if self.token_type_embeddings is None else self.token_type_embeddings.weight,
            ln.weight, ln.bias, ln.eps, padding_idx=self.word_embeddings.padding_idx, backend=self.backend,
        )
