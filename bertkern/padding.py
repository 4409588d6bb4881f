"""Padding-free helpers: pack the real tokens of a padded batch once, and scatter them back once.

    packed, indices, cu_seqlens, max_seqlen = unpad(hidden, attention_mask)   # [B, S, ...] -> [total, ...]
    hidden = repad(packed, indices, B, S)                                       # [total, ...] -> [B, S, ...]

`unpad` keeps the tokens whose attention_mask entry is nonzero, in row-major order (sequence by
sequence, left to right), so sequence b is packed[cu_seqlens[b] : cu_seqlens[b + 1]]: the layout
bertkern.ops.attention_varlen takes. Any mask pattern works (right or left padding, holes): a
sequence is its real tokens in order. `repad` puts them back and fills padding with zeros.

Both are differentiable (index_select / index_copy: one gather forward and one scatter backward,
and vice versa). unpad waits for the device once (to size the packed tensor and learn max_seqlen),
and on a batch without padding returns a view (no gather); a model calls it once per forward, not
per layer. Inside a CUDA graph or torch.compile, where no host sync can happen, unpad_static /
repad_static do the same with shapes fixed on the host (below).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(packed [total, ...], indices int64 [total] into the flattened [B * S], cu_seqlens int32
    [B + 1], max_seqlen) of hidden [B, S, ...] under attention_mask [B, S] (nonzero / True = real)."""
    def got(t):  # a shape, or the type of what is not a tensor
        return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError(f"bertkern.padding.unpad: hidden must be a tensor [B, S, ...], got {got(hidden)}")
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"bertkern.padding.unpad: attention_mask must be [B, S] = {list(hidden.shape[:2])}, got "
                         f"{got(attention_mask)}")
    if attention_mask.device != hidden.device:
        raise ValueError(f"bertkern.padding.unpad: attention_mask is on {attention_mask.device} "
                         f"but hidden is on {hidden.device}")
    B, S = attention_mask.shape
    real = attention_mask.reshape(-1) != 0
    lengths = real.view(B, S).sum(1, dtype=torch.int32)
    host_lengths = lengths.tolist()  # waits for the device: sizes the packed tensor, gives max_seqlen
    total, max_seqlen = sum(host_lengths), max(host_lengths, default=0)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    flat = hidden.reshape(B * S, *hidden.shape[2:])
    if total == B * S:  # no padding: every token is where it is (no nonzero, no gather)
        return flat, torch.arange(total, device=hidden.device), cu_seqlens, max_seqlen
    indices = torch.nonzero(real).flatten()
    return flat.index_select(0, indices), indices, cu_seqlens, max_seqlen


def repad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """[batch, seqlen, ...] with packed[i] at flattened position indices[i], zeros elsewhere."""
    if packed.shape[0] != indices.numel():
        raise ValueError(f"bertkern.padding.repad: packed has {packed.shape[0]} tokens "
                         f"but indices has {indices.numel()}")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    return out.index_copy(0, indices, packed).view(batch, seqlen, *packed.shape[1:])


# ---------------------------------------------------------------- static shapes (CUDA graphs, torch.compile)
# A CUDA graph replays fixed shapes and cannot wait for the device, so the packed path there has a
# fixed token capacity T and a fixed max_seqlen m, both picked on the host by whoever captures (see
# bertkern.cuda_graphs) and declared with `static_shapes(T, m)`; the padding-free encoder then packs
# with `unpad_static` instead of `unpad`. Under torch.compile the encoder picks T and m itself, in an
# eager prologue before the compiled region (bertkern.optimize), and packs with `unpad_static` too
# (static_shapes is not read there: a thread-local read while tracing would be baked into the graph).
_STATIC = threading.local()


@contextlib.contextmanager
def static_shapes(capacity: int, max_seqlen: int) -> Iterator[None]:
    """Inside the block, bertkern's padding-free encoder packs with unpad_static(capacity, max_seqlen)
    (no host sync) instead of unpad. The caller guarantees: real tokens <= capacity <= B * S and every
    row's real length <= max_seqlen; a batch that breaks this gets NaN outputs, never wrong numbers."""
    for what, n in (("capacity", capacity), ("max_seqlen", max_seqlen)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"bertkern.padding.static_shapes: {what} must be a positive int, got {n!r}")
    old = getattr(_STATIC, "shapes", None)
    _STATIC.shapes = (capacity, max_seqlen)
    try:
        yield
    finally:
        _STATIC.shapes = old


def current_static_shapes() -> tuple[int, int] | None:
    """(capacity, max_seqlen) of the innermost static_shapes block, or None outside one."""
    return getattr(_STATIC, "shapes", None)


def unpad_static(hidden: torch.Tensor, attention_mask: torch.Tensor, capacity: int, max_seqlen: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """unpad with fixed shapes and no host sync: (packed [capacity, ...], indices int64 [capacity],
    cu_seqlens int32 [B + 1 + ceil(capacity / max_seqlen)], ok: a bool device scalar).

    The first `total` rows are the real tokens in unpad's order; the remaining capacity - total
    "filler" rows are padding positions, cut into dummy sequences of at most max_seqlen tokens after
    the B real ones (so attention never mixes them with real tokens, and max_seqlen bounds every
    sequence; trailing dummy sequences are empty). `ok` is False when the batch does not fit
    (total > capacity, or a row longer than max_seqlen): repad_static then returns NaN."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
            or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"bertkern.padding.unpad_static: attention_mask must be [B, S] = {list(hidden.shape[:2])}")
    B, S = attention_mask.shape
    if not 1 <= capacity <= B * S or max_seqlen < 1:
        raise ValueError(f"bertkern.padding.unpad_static: need 1 <= capacity <= B * S = {B * S} and "
                         f"max_seqlen >= 1, got capacity {capacity}, max_seqlen {max_seqlen}")
    real = attention_mask.reshape(-1) != 0
    # Real positions first (row-major, as unpad), then padding positions: a stable sort, no sync.
    indices = torch.argsort((~real).to(torch.int8), stable=True)[:capacity]
    lengths = real.view(B, S).sum(1, dtype=torch.int32)
    cu = torch.cumsum(lengths, 0, dtype=torch.int32)
    ok = (cu[-1] <= capacity) & (lengths.max() <= max_seqlen)
    dummies = -(-capacity // max_seqlen)
    steps = torch.arange(1, dummies + 1, device=cu.device, dtype=torch.int32) * max_seqlen
    zero = torch.zeros(1, device=cu.device, dtype=torch.int32)
    # Clamped to capacity, so a batch that does not fit still indexes in bounds (and ok is False).
    cu_seqlens = torch.cat([zero, cu, cu[-1] + steps]).clamp_(max=capacity)
    packed = hidden.reshape(B * S, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, ok


def repad_static(packed: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor, ok: torch.Tensor,
                 batch: int, seqlen: int) -> torch.Tensor:
    """repad of unpad_static's rows: real tokens back in place, zeros at padding (filler rows are
    dropped), everything NaN when `ok` is False."""
    total = cu_seqlens[batch]
    real = torch.arange(packed.shape[0], device=packed.device) < total
    keep = torch.where(real.view(-1, *([1] * (packed.dim() - 1))), packed, packed.new_zeros(()))
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:])).index_copy(0, indices, keep)
    return torch.where(ok, out, out.new_full((), float("nan"))).view(batch, seqlen, *packed.shape[1:])
