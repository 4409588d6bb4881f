"""add_layer_norm and embedding_layer_norm on the torch, triton or cuda backend.

add_layer_norm(x, residual, weight, bias, eps) = layer_norm(dropout(x + x_bias) + residual) over the
last dim; embedding_layer_norm = layer_norm(word[ids] + type[token_type_ids] + pos[position_ids]).

Custom ops (each with a fake implementation; the first and third with autograd):

  bertkern::add_layer_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? x_bias,
      Tensor? seed, float eps, float dropout_p, bool store_prenorm, str backend)
      -> (Tensor y, Tensor prenorm, Tensor mean, Tensor rstd)
  bertkern::add_layer_norm_backward(Tensor grad, Tensor? grad_prenorm, Tensor h, Tensor mean,
      Tensor rstd, Tensor? weight, Tensor? seed, float dropout_p, bool need_dweight, bool need_dbias,
      bool need_dx_bias, str backend) -> (Tensor dh, Tensor dx, Tensor dweight, Tensor dbias, Tensor dx_bias)
  bertkern::embedding_layer_norm(Tensor input_ids, Tensor? position_ids, Tensor? token_type_ids,
      Tensor word_embeddings, Tensor? position_embeddings, Tensor? token_type_embeddings,
      Tensor? weight, Tensor? bias, float eps, int padding_idx, bool store_prenorm, str backend)
      -> (Tensor y, Tensor prenorm, Tensor mean, Tensor rstd)

Outputs that are not computed are empty tensors: prenorm unless store_prenorm, dx without dropout
(then dx == dh), the column sums unless asked for. mean and rstd are float32 (float64 for float64
inputs), shaped like the input without its last dim.

Dropout: the public op draws a one-element int64 seed tensor on the input's device from torch's
generator (so torch.manual_seed reproduces it, and no host sync happens: under CUDA-graph capture the
draw is a graph-safe generator kernel). The kernels derive the mask from (seed, row, col) with
Philox4x32-10 (bertkern.reference.dropout_keep_mask) and the backward pass regenerates it from the
saved seed, so forward and backward agree and no mask is stored. Every backend, the torch one
included, draws the same mask from the same seed. Calling the custom op with your own seed tensor
gives a fixed mask (used by gradcheck).

Saved for backward: the pre-norm sum h in the input dtype (written by the forward only when a
gradient is needed, or when return_prenorm=True; when h is just x it is not written), mean, rstd,
weight and the seed.
"""
from __future__ import annotations

import torch

from bertkern import backend as _backend
from bertkern import reference
from bertkern._utils import (NormArgs, NormGradArgs, OpCall, acc_dtype, broadcasts_to, check_float, check_floating,
                             check_like, contiguous_or_none, empty, keep_mask, needs_grad)


# ---------------------------------------------------------------- torch backend (2-D rows)
def _torch_forward(x, residual, weight, bias, x_bias, seed, args: NormArgs):
    keep = keep_mask(seed, x.shape, args.dropout_p)
    h = reference.add_layer_norm_prenorm(x, residual, x_bias, args.dropout_p if keep is not None else 0.0, keep=keep)
    h = h.to(x.dtype).to(h.dtype)  # normalize the sum as stored for backward (and as eager adds): in x's dtype
    y, mean, rstd = reference.layer_norm_with_stats(h, weight, bias, args.eps)
    y = y.to(x.dtype)
    # copy=True: with nothing added, h is x itself, and a custom op's output must not alias an input.
    return y, (h.to(x.dtype, copy=True) if args.store_prenorm else empty(x)), mean, rstd


def _torch_backward(grad, grad_prenorm, h, mean, rstd, weight, seed, args: NormGradArgs):
    keep = keep_mask(seed, h.shape, args.dropout_p)
    dh, dx, dw, db, dxb = reference.add_layer_norm_backward(grad, h, mean, rstd, weight, keep, args.dropout_p,
                                                            grad_prenorm)
    return (
        dh,
        dx if keep is not None else empty(h),
        dw.to(h.dtype) if args.need_dweight else empty(h),
        db.to(h.dtype) if args.need_dbias else empty(h),
        dxb.to(h.dtype) if args.need_dx_bias else empty(h),
    )


def _cuda_forward(x, residual, weight, bias, x_bias, seed, a: NormArgs):
    return torch.ops.bertkern_cuda.add_layer_norm_fwd(x, residual, weight, bias, x_bias, seed, a.eps, a.dropout_p,
                                                      a.store_prenorm)


def _cuda_backward(grad, grad_prenorm, h, mean, rstd, weight, seed, a: NormGradArgs):
    return torch.ops.bertkern_cuda.add_layer_norm_bwd(grad, grad_prenorm, h, mean, rstd, weight, seed, a.dropout_p,
                                                      a.need_dweight, a.need_dbias, a.need_dx_bias)


def _kernels(backend: str):
    """(forward, backward) of one backend, on 2-D row views, with the custom ops' conventions:
    forward(x, residual, weight, bias, x_bias, seed, NormArgs), backward(grad, grad_prenorm, h, mean,
    rstd, weight, seed, NormGradArgs)."""
    if backend == "triton":
        from bertkern.triton import layer_norm as k

        return k.forward, k.backward
    if backend == "cuda":
        return _cuda_forward, _cuda_backward
    return _torch_forward, _torch_backward


def _rows_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _backend.as_rows(t)


# Both forwards (add_layer_norm, embedding_layer_norm) return (y, prenorm or empty, mean, rstd).
def _shaped_outputs(outputs, shape, store_prenorm: bool):
    """A forward's outputs on 2-D rows, viewed as y `shape` ([..., N]) and statistics shape[:-1]."""
    y, prenorm, mean, rstd = outputs
    stats, shaped = shape[:-1], _backend.shaped
    return (shaped(y, shape), (shaped(prenorm, shape) if store_prenorm else prenorm), shaped(mean, stats),
            shaped(rstd, stats))


def _outputs_fake(like: torch.Tensor, shape, store_prenorm: bool):
    """A forward's outputs for y of `shape` in like's dtype (the fake implementations)."""
    acc, stats = acc_dtype(like.dtype), shape[:-1]
    prenorm = like.new_empty(shape) if store_prenorm else like.new_empty(0)
    return like.new_empty(shape), prenorm, like.new_empty(stats, dtype=acc), like.new_empty(stats, dtype=acc)


# ---------------------------------------------------------------- add_layer_norm custom ops
# The impls' annotations are the custom ops' schemas: flat (torch.library takes no dataclass), so
# add_layer_norm's and embedding_layer_norm's share their tail (weight ... backend) line by line.
def _add_layer_norm_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    x_bias: torch.Tensor | None,
    seed: torch.Tensor | None,
    eps: float,
    dropout_p: float,
    store_prenorm: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    forward, _ = _kernels(backend)
    outputs = forward(
        _backend.as_rows(x), _rows_or_none(residual), contiguous_or_none(weight), contiguous_or_none(bias),
        contiguous_or_none(x_bias), seed, NormArgs(eps, dropout_p, store_prenorm),
    )
    return _shaped_outputs(outputs, x.shape, store_prenorm)


def _add_layer_norm_fake(x, residual, weight, bias, x_bias, seed, eps, dropout_p, store_prenorm, backend):
    return _outputs_fake(x, x.shape, store_prenorm)


def _add_layer_norm_backward_impl(
    grad: torch.Tensor,
    grad_prenorm: torch.Tensor | None,
    h: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    seed: torch.Tensor | None,
    dropout_p: float,
    need_dweight: bool,
    need_dbias: bool,
    need_dx_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = _kernels(backend)
    n = h.shape[-1]
    dh, dx, dw, db, dxb = backward(
        _backend.as_rows(grad), _rows_or_none(grad_prenorm), _backend.as_rows(h),
        mean.reshape(-1), rstd.reshape(-1), contiguous_or_none(weight), seed,
        NormGradArgs(dropout_p, need_dweight, need_dbias, need_dx_bias),
    )
    assert dw.numel() in (0, n) and db.numel() in (0, n) and dxb.numel() in (0, n)
    return (_backend.shaped(dh, h.shape), (_backend.shaped(dx, h.shape) if dx.dim() == 2 else dx),  # 1-D [0]: no dx
            dw, db, dxb)


def _add_layer_norm_backward_fake(grad, grad_prenorm, h, mean, rstd, weight, seed, dropout_p, need_dweight,
                                  need_dbias, need_dx_bias, backend):
    n = h.shape[-1]
    dx = h.new_empty(h.shape) if (seed is not None and dropout_p > 0.0) else h.new_empty(0)
    return (h.new_empty(h.shape), dx,
            *(h.new_empty(n if need else 0) for need in (need_dweight, need_dbias, need_dx_bias)))


_ADD_LAYER_NORM_BACKWARD = OpCall.define("add_layer_norm_backward", _add_layer_norm_backward_impl,
                                         fake=_add_layer_norm_backward_fake)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, x_bias, seed, eps, dropout_p, store_prenorm, backend = inputs
    _, prenorm, mean, rstd = output
    # The sum the norm saw: the stored pre-norm copy, or x itself when nothing was added to it.
    ctx.h_is_x = not store_prenorm
    ctx.h_missing = not store_prenorm and (residual is not None or x_bias is not None or seed is not None)
    ctx.save_for_backward(x if ctx.h_is_x else prenorm, mean, rstd, weight, seed)
    ctx.dropout_p, ctx.backend = dropout_p, backend
    ctx.has = (residual is not None, weight is not None, bias is not None, x_bias is not None)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, grad_prenorm, _grad_mean, _grad_rstd):
    if ctx.h_missing:
        raise RuntimeError(
            "bertkern.ops.add_layer_norm: the pre-norm sum was not stored for backward "
            "(the op ran with store_prenorm=False while its inputs required grad)"
        )
    h, mean, rstd, weight, seed = ctx.saved_tensors
    has_res, has_w, has_b, has_xb = ctx.has
    need = ctx.needs_input_grad
    if grad is None:
        grad = torch.zeros_like(h)
    if grad_prenorm is not None and grad_prenorm.numel() == 0:
        grad_prenorm = None
    dh, dx, dw, db, dxb = _ADD_LAYER_NORM_BACKWARD.pick(grad)(
        grad, grad_prenorm, h, mean, rstd, weight, seed, ctx.dropout_p,
        has_w and need[2], has_b and need[3], has_xb and need[4], ctx.backend,
    )
    if seed is None:
        dx = dh
    return (
        dx if need[0] else None,
        dh if (has_res and need[1]) else None,
        dw if (has_w and need[2]) else None,
        db if (has_b and need[3]) else None,
        dxb if (has_xb and need[4]) else None,
        None, None, None, None, None,
    )


_ADD_LAYER_NORM = OpCall.define("add_layer_norm", _add_layer_norm_impl, fake=_add_layer_norm_fake,
                                setup_context=_setup_context, backward=_backward)


# ---------------------------------------------------------------- input checks
def _check(x, residual, weight, bias, x_bias, eps, dropout_p) -> None:
    name = "bertkern.ops.add_layer_norm"
    check_floating(name, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x must have a non-empty last dim, got shape {list(x.shape)}")
    n = (x.shape[-1],)
    check_like(name, "x", x, (("residual", residual, x.shape, "x's shape"), ("weight", weight, n, "x's last dim"),
                              ("bias", bias, n, "x's last dim"), ("x_bias", x_bias, n, "x's last dim")))
    check_float(name, "eps", eps, 0.0)
    check_float(name, "dropout_p", dropout_p, 0.0, 1.0)


def _autocast(*tensors):
    """Under autocast, run in float32 like F.layer_norm does (autocast's fp32 list: lower-precision
    floats go up to float32, float64 stays)."""
    low = (torch.float16, torch.bfloat16)
    return tuple(t.float() if t is not None and t.dtype in low else t for t in tensors)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-12,
    *,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_prenorm: bool = False,
    backend: str | None = None,
):
    """layer_norm(dropout(x + x_bias) + residual) over the last dim, in one pass.

    residual has x's shape; weight, bias and x_bias are [N] (N = x.shape[-1]); each may be None. All
    share x's dtype and device. Dropout (scaled by 1 / (1 - dropout_p)) applies whenever
    dropout_p > 0: pass 0.0 in eval mode. return_prenorm=True returns (y, prenorm), prenorm being
    dropout(x + x_bias) + residual in x's dtype (the next residual of a pre-LN model); it is
    differentiable. Statistics are fp32 (fp64 for fp64). Under autocast everything runs in float32,
    as F.layer_norm does. backend: "torch", "triton", "cuda" or "auto" (default: $BERTKERN_BACKEND,
    else "auto").
    """
    if isinstance(x, torch.Tensor) and _backend.autocast_enabled(x):
        x, residual, weight, bias, x_bias = _autocast(x, residual, weight, bias, x_bias)
    _check(x, residual, weight, bias, x_bias, eps, dropout_p)
    unsupported = None if x.dtype in _backend.KERNEL_DTYPES else f"dtype {x.dtype} has no kernel"
    chosen = _backend.resolve("add_layer_norm", backend, x.device, unsupported)
    seed = reference.dropout_seed(dropout_p, x.device)
    trivial = residual is None and x_bias is None and seed is None  # the norm's input is x itself
    grad = needs_grad(x, residual, weight, bias, x_bias)
    store = return_prenorm or (not trivial and grad)
    y, prenorm, _, _ = _ADD_LAYER_NORM.pick(x, grad)(
        x, residual, weight, bias, x_bias, seed, float(eps), float(dropout_p), store, chosen
    )
    return (y, prenorm) if return_prenorm else y


# ---------------------------------------------------------------- embedding_layer_norm
def _ids_2d(ids: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """An id tensor as a [rows, S] view (expanded to input_ids' shape; views where possible)."""
    if ids is None:
        return None
    ids = ids.expand(shape)
    return ids.reshape(-1, shape[-1]) if ids.dim() != 2 else ids


def _emb_torch_forward(ids, tables, weight, bias, args: NormArgs):
    word = tables[0]
    e = reference.embedding_sum(ids, tables)
    e = e.to(word.dtype).to(e.dtype)  # the sum as stored for backward, in the tables' dtype
    y, mean, rstd = reference.layer_norm_with_stats(e, weight, bias, args.eps)
    y = y.to(word.dtype)
    n = word.shape[1]
    prenorm = e.to(word.dtype).reshape(-1, n) if args.store_prenorm else empty(word)
    return y.reshape(-1, n), prenorm, mean.reshape(-1), rstd.reshape(-1)


def _emb_cuda_forward(ids, tables, weight, bias, args: NormArgs):
    return torch.ops.bertkern_cuda.embedding_layer_norm_fwd(*ids, *tables, weight, bias, args.eps, args.store_prenorm)


def _embedding_layer_norm_impl(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor | None,
    token_type_embeddings: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    padding_idx: int,
    store_prenorm: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = input_ids.shape
    tables = tuple(_rows_or_none(t) for t in (word_embeddings, position_embeddings, token_type_embeddings))
    if backend == "cuda" and input_ids.dim() == 2:
        # One kernel; it broadcasts the other ids to input_ids' [B, S] itself and returns [B, S, N]:
        # no views on the host (each costs microseconds).
        ids = (input_ids, position_ids, token_type_ids)
    else:
        ids = tuple(_ids_2d(t, shape) for t in (input_ids, position_ids, token_type_ids))
    args = NormArgs(eps, store_prenorm=store_prenorm)
    if backend == "cuda":
        forward = _emb_cuda_forward
    elif backend == "torch":
        forward = _emb_torch_forward
    else:
        from bertkern.triton import layer_norm as k

        forward = k.embedding_forward
    outputs = forward(ids, tables, contiguous_or_none(weight), contiguous_or_none(bias), args)
    return _shaped_outputs(outputs, (*shape, word_embeddings.shape[1]), store_prenorm)


def _embedding_layer_norm_fake(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                               token_type_embeddings, weight, bias, eps, padding_idx, store_prenorm, backend):
    return _outputs_fake(word_embeddings, (*input_ids.shape, word_embeddings.shape[1]), store_prenorm)


def _emb_setup_context(ctx, inputs, output):
    (input_ids, position_ids, token_type_ids, word, pos, typ, weight, bias, eps, padding_idx, store_prenorm,
     backend) = inputs
    _, prenorm, mean, rstd = output
    ctx.stored = store_prenorm
    ctx.save_for_backward(prenorm, mean, rstd, weight, input_ids, position_ids, token_type_ids)
    ctx.rows = (word.shape[0], None if pos is None else pos.shape[0], None if typ is None else typ.shape[0])
    ctx.dtype, ctx.has_bias, ctx.padding_idx, ctx.backend = word.dtype, bias is not None, padding_idx, backend
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _table_grad(num_rows: int, ids: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum of d's rows into a [num_rows, N] float32 table by ids (repeats accumulate); deterministic
    (sorted, index_put_ accumulate) when torch.use_deterministic_algorithms is on."""
    out = torch.zeros((num_rows, d.shape[1]), dtype=d.dtype, device=d.device)
    ids = ids.reshape(-1)
    if torch.are_deterministic_algorithms_enabled():
        return out.index_put_((ids,), d, accumulate=True)
    return out.index_add_(0, ids, d)


def _emb_backward(ctx, grad, _grad_prenorm, _grad_mean, _grad_rstd):
    if not ctx.stored:
        raise RuntimeError("bertkern.ops.embedding_layer_norm: the pre-norm sum was not stored for backward")
    prenorm, mean, rstd, weight, input_ids, position_ids, token_type_ids = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad is None:
        grad = torch.zeros_like(prenorm)
    dh, _, dw, db, _ = _ADD_LAYER_NORM_BACKWARD.pick(grad)(
        grad, None, prenorm, mean, rstd, weight, None, 0.0,
        weight is not None and need[6], ctx.has_bias and need[7], False, ctx.backend,
    )
    n = prenorm.shape[-1]
    acc = acc_dtype(ctx.dtype)
    d = dh.reshape(-1, n).to(acc)
    n_word, n_pos, n_type = ctx.rows
    dword = dpos = dtype_ = None
    if need[3]:
        dword = _table_grad(n_word, input_ids, d)
        if ctx.padding_idx >= 0:
            dword[ctx.padding_idx] = 0
        dword = dword.to(ctx.dtype)
    if n_pos is not None and need[4]:
        if position_ids is None:  # arange(S) along the last dim: a plain sum over the leading dims
            s = input_ids.shape[-1]
            dpos = torch.zeros((n_pos, n), dtype=acc, device=d.device)
            dpos[:s] = d.view(-1, s, n).sum(0)
        else:
            dpos = _table_grad(n_pos, position_ids.expand(input_ids.shape), d)
        dpos = dpos.to(ctx.dtype)
    if n_type is not None and need[5]:
        if token_type_ids is None:  # every token uses row 0
            dtype_ = torch.zeros((n_type, n), dtype=acc, device=d.device)
            dtype_[0] = d.sum(0)
        else:
            dtype_ = _table_grad(n_type, token_type_ids.expand(input_ids.shape), d)
        dtype_ = dtype_.to(ctx.dtype)
    return (
        None, None, None, dword, dpos, dtype_,
        dw if (weight is not None and need[6]) else None,
        db if (ctx.has_bias and need[7]) else None,
        None, None, None, None,
    )


_EMBEDDING_LAYER_NORM = OpCall.define("embedding_layer_norm", _embedding_layer_norm_impl,
                                      fake=_embedding_layer_norm_fake, setup_context=_emb_setup_context,
                                      backward=_emb_backward)


_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_embedding(input_ids, position_ids, token_type_ids, word, pos, typ, weight, bias, eps, padding_idx):
    name = "bertkern.ops.embedding_layer_norm"
    check_floating(name, "word_embeddings", word, 2, "[vocab, hidden]")
    n = word.shape[1]
    if n == 0:
        raise ValueError(f"{name}: word_embeddings must be [vocab, hidden], got shape {list(word.shape)}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name}: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    ids = (("input_ids", input_ids), ("position_ids", position_ids), ("token_type_ids", token_type_ids))
    check_like(name, "word_embeddings", word, [(arg, t, None, "") for arg, t in ids], dtypes=_INDEX_DTYPES)
    if input_ids.dim() == 0:
        raise ValueError(f"{name}: input_ids must have at least one dimension (the sequence), got a scalar")
    for arg, t in ids[1:]:
        if t is not None and not broadcasts_to(t.shape, input_ids.shape):
            raise ValueError(f"{name}: {arg} of shape {list(t.shape)} does not broadcast to "
                             f"input_ids' {list(input_ids.shape)}")
    for arg, t in (("position_embeddings", pos), ("token_type_embeddings", typ)):
        if isinstance(t, torch.Tensor) and (t.dim() != 2 or t.shape[1] != n or t.shape[0] == 0):
            raise ValueError(f"{name}: {arg} must have shape [rows, {n}] (word_embeddings' hidden size), "
                             f"got {list(t.shape)}")
    check_like(name, "word_embeddings", word, (
        ("position_embeddings", pos, None, ""), ("token_type_embeddings", typ, None, ""),
        ("weight", weight, (n,), "the hidden size"), ("bias", bias, (n,), "the hidden size")))
    if pos is not None and position_ids is None and input_ids.shape[-1] > pos.shape[0]:
        raise ValueError(f"{name}: sequence length {input_ids.shape[-1]} exceeds "
                         f"position_embeddings' {pos.shape[0]} rows")
    if padding_idx is not None and not -word.shape[0] <= padding_idx < word.shape[0]:
        raise ValueError(f"{name}: padding_idx {padding_idx} is out of range for {word.shape[0]} word embeddings")
    check_float(name, "eps", eps, 0.0)
    # Out-of-range ids would read out of bounds in a kernel. Checking costs a host sync on a GPU, so
    # only CPU tensors are checked, and not while compiling (a data-dependent branch).
    if word.device.type == "cpu" and not torch.compiler.is_compiling():
        for arg, t, rows in (("input_ids", input_ids, word.shape[0]),
                             ("position_ids", position_ids, None if pos is None else pos.shape[0]),
                             ("token_type_ids", token_type_ids, None if typ is None else typ.shape[0])):
            if t is not None and rows is not None and t.numel() and (t.min() < 0 or t.max() >= rows):
                raise ValueError(f"{name}: {arg} has values outside [0, {rows})")


def embedding_layer_norm(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor | None,
    token_type_embeddings: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-12,
    *,
    padding_idx: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm(word[input_ids] + type[token_type_ids] + pos[position_ids]) in one gather+add+norm pass.

    input_ids: [..., S] int64/int32. position_ids None means arange(S) for every sequence, and
    token_type_ids None means zeros; both may be any shape that broadcasts to input_ids (e.g. [1, S]
    or expanded views). position_embeddings / token_type_embeddings None leave that term out. The
    tables, weight and bias share one floating dtype and device. padding_idx (like nn.Embedding's)
    keeps that word row's gradient at zero. Table gradients accumulate repeated ids in float32
    (index_add_; deterministic index_put_ under torch.use_deterministic_algorithms). backend="cuda"
    runs the forward as one CUDA C++ kernel (any hidden size) and the LayerNorm backward in CUDA C++.

    Ids outside their table raise a ValueError for CPU tensors. On a GPU they are not checked (that
    costs a host sync): the cuda and triton backends' rows with such an id come out NaN (nothing is
    read out of bounds), the torch backend hits torch's device assert.
    """
    if isinstance(word_embeddings, torch.Tensor) and _backend.autocast_enabled(word_embeddings):
        word_embeddings, position_embeddings, token_type_embeddings, weight, bias = _autocast(
            word_embeddings, position_embeddings, token_type_embeddings, weight, bias
        )
    _check_embedding(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                     token_type_embeddings, weight, bias, eps, padding_idx)
    word = word_embeddings

    def unsupported(chosen: str) -> str | None:
        if word.dtype not in _backend.KERNEL_DTYPES:
            return f"dtype {word.dtype} has no kernel"
        # the cuda kernel takes any hidden size: only Triton's single tile limits it
        return _triton_embedding_unsupported(word.shape[1]) if chosen == "triton" else None

    chosen = _backend.resolve("embedding_layer_norm", backend, word.device, unsupported)
    if position_embeddings is None:
        position_ids = None
    if token_type_embeddings is None:
        token_type_ids = None
    store = needs_grad(word, position_embeddings, token_type_embeddings, weight, bias)
    pad = -1 if padding_idx is None else padding_idx % word.shape[0]
    y, _, _, _ = _EMBEDDING_LAYER_NORM.pick(word, store)(
        input_ids, position_ids, token_type_ids, word, position_embeddings, token_type_embeddings,
        weight, bias, float(eps), pad, store, chosen,
    )
    return y


def _triton_embedding_unsupported(n: int) -> str | None:
    from bertkern.triton import layer_norm as k

    return k.embedding_supported(n)
