"""Padding-free helpers: pack the real tokens of a padded batch once, and scatter them back once.

    packed, indices, cu_seqlens, max_seqlen = unpad(hidden, attention_mask)   # [B, S, ...] -> [total, ...]
    hidden = repad(packed, indices, B, S)                                       # [total, ...] -> [B, S, ...]

`unpad` keeps the tokens whose attention_mask entry is nonzero, in row-major order (sequence by
sequence, left to right), so sequence b is packed[cu_seqlens[b] : cu_seqlens[b + 1]]: the layout
bertkern.ops.attention_varlen takes. Any mask pattern works (right or left padding, holes): a
sequence is its real tokens in order. `repad` puts them back and fills padding with zeros.

Both are differentiable (index_select / index_copy: one gather forward and one scatter backward,
and vice versa). unpad waits for the device (to size the packed tensor and learn max_seqlen); a
model calls it once per forward, not per layer.
"""
from __future__ import annotations

import torch


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(packed [total, ...], indices int64 [total] into the flattened [B * S], cu_seqlens int32
    [B + 1], max_seqlen) of hidden [B, S, ...] under attention_mask [B, S] (nonzero / True = real)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError(f"bertkern.padding.unpad: hidden must be a tensor [B, S, ...], got "
                         f"{list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"bertkern.padding.unpad: attention_mask must be [B, S] = {list(hidden.shape[:2])}, got "
                         f"{list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}")
    if attention_mask.device != hidden.device:
        raise ValueError(f"bertkern.padding.unpad: attention_mask is on {attention_mask.device} but hidden is on {hidden.device}")
    B, S = attention_mask.shape
    real = attention_mask.reshape(-1) != 0
    indices = torch.nonzero(real).flatten()  # waits for the device (as does max_seqlen below)
    lengths = real.view(B, S).sum(1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max().item()) if B else 0
    packed = hidden.reshape(B * S, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def repad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """[batch, seqlen, ...] with packed[i] at flattened position indices[i], zeros elsewhere."""
    if packed.shape[0] != indices.numel():
        raise ValueError(f"bertkern.padding.repad: packed has {packed.shape[0]} tokens but indices has {indices.numel()}")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    return out.index_copy(0, indices, packed).view(batch, seqlen, *packed.shape[1:])
