"""CUDA graphs for inference without torch.compile: one graph per (batch, seq) bucket.

    runner = bertkern.cuda_graphs.CUDAGraphRunner(bertkern.optimize(model.cuda().eval()))
    out = runner(input_ids=ids, attention_mask=mask)   # same outputs as model(...), sliced to [B, S]

    runner = capture_graphs(model, batch_sizes=(1, 8, 32), seq_lens=(64, 128))  # capture up front

A forward of a small BERT at batch 1 is a few hundred kernel launches of a few microseconds each: the
launches, not the GPU, set the latency. A CUDA graph records them once and replays them with one
launch. Graphs have fixed shapes, so inputs are padded up to the smallest bucket that holds them
(padding tokens get attention_mask 0 and the pad token id, padding rows are all padding) and the
outputs are sliced back: the dims that follow the batch size and the sequence length are found at
capture time by running the model once more at a neighbouring shape (so attention maps
[B, H, S, S] are sliced on both S dims, and a [B, num_labels] logits is left alone on dim 1 even
when num_labels equals the bucket's seq length).

Each bucket is captured on first use: static input buffers, a few warm-up forwards on a side stream
(Triton compiles / autotunes there, outside the capture), then the capture; later calls copy the
inputs in and replay. All buckets share one memory pool. Replays are serialised on the current
stream, and each graph's static inputs and outputs stay alive, so sharing is safe.

For `torch.compile` users, `torch.compile(model, mode="reduce-overhead")` does the same job; this is
for code that does not compile. A compiled bertkern.optimize model stays padding-free too: its encoder
picks (token capacity, max_seqlen) with the same `choose_packed_shapes` (over DEFAULT_SEQ_LENS) in an
eager prologue, one graph break before the compiled region (see bertkern.optimize). Works with the
fused ops: in eval mode no dropout runs; in any case bertkern's dropout seeds are device tensors
drawn from torch's generator (graph-safe), not host values.

Padding-free models (`bertkern.optimize`'s encoder with padding_free=True, the default) keep running
padding-free in a graph: the runner reads the real-token count and the longest row from the
attention mask on the host (outside the graph), picks a token capacity T (the next of CAPACITY_STEPS
steps per power of two, at least 16) and a max_seqlen m (the smallest of the buckets' seq lengths that
holds the longest row) with `choose_packed_shapes`, and runs the forward under
`bertkern.padding.static_shapes(T, m)`: the encoder packs into [T, hidden] by a stable sort (no host
sync; filler rows form dummy sequences of at most m tokens), and (T, m) is part of the graph key, so
a batch that outgrows them gets another graph, never a stale max_seqlen (and a batch that does not
fit a graph's shapes would give NaN, not wrong numbers). A batch whose T would be the whole bucket
(little or no padding) replays the padded path's graph instead: packing would save no rows.
padding_free=False captures the padded path.

Limits: eval mode only (a model in training mode is refused); the inputs are [batch, seq, ...]
tensors (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, ...); other keyword
arguments are constants that are part of the graph key. Outputs are copied out of the graph's static
buffers by default (copy_outputs=False returns views that the next replay of that bucket overwrites).

A forward that cannot be captured (it synchronises with the host, copies from CPU memory or has
data-dependent shapes: e.g. Hugging Face's own forward, which bertkern.optimize keeps for
output_attentions=True) does not make a call fail: that input set (input names, dtypes and constant
keyword arguments) runs eagerly from then on, counted in `eager_calls`, with one warning naming why,
and `uncapturable` says which and why (strict=True raises instead). The failed graph and its memory
pool are dropped; later captures use a new pool.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bertkern import padding as _padding

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SEQ_LENS = (16, 32, 64, 128, 256, 512)
# Token capacities per power of two: at ~60% fill a power-of-two capacity can be the whole batch
# (16 x 512 = 8192 slots for ~4900 real tokens: no rows saved; H100, BERT-base in a graph: 1.07x over
# HF's, against 1.17x for the padded fused model); 4 steps waste at most ~25%, for 4x the graphs
# (under torch.compile, no more compiles once Dynamo makes the capacity symbolic).
CAPACITY_STEPS = 4

__all__ = ["CUDAGraphRunner", "capture_graphs", "choose_bucket", "choose_packed_shapes", "default_buckets"]


# ---------------------------------------------------------------- buckets (pure Python)
def _check_buckets(buckets: Iterable) -> list[tuple[int, int]]:
    out = set()
    for bucket in buckets:
        try:
            batch, seq = bucket
        except (TypeError, ValueError):
            raise ValueError(f"a bucket is a (batch, seq) pair, got {bucket!r}") from None
        for what, n in (("batch", batch), ("seq", seq)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"bucket {bucket!r}: {what} must be a positive int, got {n!r}")
        out.add((batch, seq))
    if not out:
        raise ValueError("no buckets given")
    return sorted(out)


def default_buckets(max_seq: int | None = None, batch_sizes=DEFAULT_BATCH_SIZES,
                    seq_lens=DEFAULT_SEQ_LENS) -> list[tuple[int, int]]:
    """batch_sizes x seq_lens, seq lengths capped at max_seq (the model's longest input, which
    replaces the seq lengths beyond it)."""
    if max_seq is not None and any(s > max_seq for s in seq_lens):
        seq_lens = sorted({s for s in seq_lens if s <= max_seq} | {max_seq})
    return _check_buckets(itertools.product(batch_sizes, seq_lens))


def choose_bucket(buckets: Iterable[tuple[int, int]], batch: int, seq: int) -> tuple[int, int] | None:
    """The bucket an input of [batch, seq] runs in: of the buckets at least that large in both
    dims, the one with the fewest padded tokens (batch x seq), then the shorter sequence (attention
    grows with seq^2), then the smaller batch. None if no bucket holds it."""
    fits = [(b, s) for b, s in buckets if b >= batch and s >= seq]
    return min(fits, key=lambda bs: (bs[0] * bs[1], bs[1], bs[0])) if fits else None


MIN_TOKEN_CAPACITY = 16


def choose_packed_shapes(lengths: Iterable[int], batch: int, seq: int, seq_lens: Iterable[int],
                         steps_per_octave: int = CAPACITY_STEPS) -> tuple[int, int]:
    """(token capacity T, max_seqlen m) of a padding-free graph for real lengths `lengths` in a
    [batch, seq] bucket: T the smallest of k = steps_per_octave evenly spaced steps between the power
    of two below the real tokens and the one above (k = 4: 512 < 640, 768, 896, 1024; steps of at
    least 8 tokens; k = 1: the next power of two), at least MIN_TOKEN_CAPACITY, at most batch x seq;
    m the smallest of seq_lens >= the longest row (at most seq; seq itself when none fits). So
    T >= every token count and m >= every length of this batch, and T wastes at most about 1/k of
    the real tokens, for k capacities per power of two."""
    lengths = [int(n) for n in lengths]
    if len(lengths) > batch or any(n < 0 or n > seq for n in lengths):
        raise ValueError(f"choose_packed_shapes: lengths {lengths} do not fit a [{batch}, {seq}] bucket")
    if isinstance(steps_per_octave, bool) or not isinstance(steps_per_octave, int) or steps_per_octave < 1:
        raise ValueError(f"choose_packed_shapes: steps_per_octave must be a positive int, got {steps_per_octave!r}")
    total, longest = sum(lengths), max(lengths, default=0)
    need = max(MIN_TOKEN_CAPACITY, total)
    # the octave (p/2, p] in k steps, at least 8 tokens each (GEMM rows in multiples of 8)
    step = max(MIN_TOKEN_CAPACITY // 2, (1 << (need - 1).bit_length()) // (2 * steps_per_octave))
    capacity = min(-(-need // step) * step, batch * seq)
    max_seqlen = min([s for s in seq_lens if max(longest, 1) <= s <= seq], default=seq)
    return capacity, max_seqlen


def _padding_free(model: nn.Module) -> bool:
    """Whether bertkern.optimize made an encoder of `model` padding-free."""
    return any(getattr(getattr(m, "_bertkern_patch", None), "kind", None) == "encoder"
               and getattr(m, "_bertkern_patch").padding_free for m in model.modules())


# ---------------------------------------------------------------- the runner
@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static buffers, [bucket batch, bucket seq, ...]
    outputs: list  # the static output leaves (tensors, or other values returned as they are)
    spec: Any  # pytree spec to rebuild the model's output type
    slices: list  # per leaf: (batch dims, seq dims) to slice back, or None for a non-tensor leaf


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def _config_value(model: nn.Module, name: str, default=None):
    value = getattr(getattr(model, "config", None), name, None)
    return default if value is None else value


def _max_seq(model: nn.Module) -> int | None:
    n = _config_value(model, "max_position_embeddings")
    if n is None:
        return None
    if _config_value(model, "model_type") in ("roberta", "xlm-roberta", "camembert"):
        n -= _config_value(model, "pad_token_id", 1) + 1  # positions start after padding_idx
    return int(n)


def end_rng_capture() -> None:
    """After a capture that failed: take torch's CUDA generator out of capture mode. On an invalidated
    capture, capture_end raises before its epilogue resets the generator, and every later random op on
    the device then fails ("Offset increment outside graph capture encountered unexpectedly", seen on an
    H200): one trivial capture runs the generator's prologue / epilogue pair again. Nothing to do where
    CUDA never started (no capture touched a generator)."""
    if not torch.cuda.is_initialized():
        return
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.ones(1, device="cuda").add_(1)
        del graph
    except Exception as e:  # leave the first error as the one reported
        warnings.warn(f"bertkern.cuda_graphs: could not reset the CUDA generator after a failed capture ({e})")


class CUDAGraphRunner:
    """Run `model` (a CUDA model in eval mode; HF or bertkern.models) through CUDA graphs, one per
    (batch, seq) bucket, captured on first use. See the module docstring.

    buckets: (batch, seq) pairs; None: batch 1..64 (powers of 2) x seq 16..512 (powers of 2, capped
        at the model's max_position_embeddings). Only buckets that get used are captured.
    strict: an input larger than every bucket raises ValueError, and a forward that cannot be captured
        raises RuntimeError; False (default) runs those eagerly, with a warning the first time.
    copy_outputs: True (default) returns outputs of their own; False returns views of the graph's
        static outputs (no copy; overwritten by the next replay of that bucket).
    warmup: eager forwards on a side stream before each capture (Triton compiles there).
    pad_token_id: the id for padding tokens (default: model.config.pad_token_id, else 0).
    padding_free: None (default): padding-free graphs (token-count buckets) when bertkern.optimize made
        the model's encoder padding-free; False: graphs of the padded path.
    """

    def __init__(self, model: nn.Module, *, buckets: Iterable[tuple[int, int]] | None = None, strict: bool = False,
                 copy_outputs: bool = True, warmup: int = 2, pad_token_id: int | None = None,
                 padding_free: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"CUDAGraphRunner: model must be a torch.nn.Module, got {type(model).__name__}")
        device = self._graph_device(model)
        _check_eval(model)
        self.model = model
        self.device = device
        self.buckets = _check_buckets(buckets) if buckets is not None else default_buckets(_max_seq(model))
        self.strict = strict
        self.copy_outputs = copy_outputs
        self.warmup = int(warmup)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else _config_value(model, "pad_token_id", 0))
        self.padding_free = _padding_free(model) if padding_free is None else bool(padding_free)
        self._seq_lens = sorted({s for _, s in self.buckets})
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self._warned: set = set()
        self.captures = 0  # graphs captured so far
        self.replays = 0  # calls served by a graph
        self.eager_calls = 0  # calls run eagerly: larger than every bucket, or an uncapturable input set
        self.uncapturable: dict[tuple, str] = {}  # (inputs, constants) of _signature -> why its capture failed

    # -------------------------------------------------------- public
    def bucket_for(self, batch: int, seq: int) -> tuple[int, int] | None:
        return choose_bucket(self.buckets, batch, seq)

    @property
    def captured(self) -> list[tuple]:
        """The keys of the captured graphs: (batch, seq, input names and dtypes, constant kwargs,
        (token capacity, max_seqlen) or None)."""
        return list(self._graphs)

    def capture(self, batch: int, seq: int, input_names=("input_ids", "attention_mask"), **constants) -> None:
        """Capture the graph of bucket (batch, seq) now, for integer [batch, seq] inputs named
        `input_names` (and constant keyword arguments), instead of on first use. Padding-free: the
        graph of a full batch (the padded path's); batches that pack into fewer rows get theirs on
        first use."""
        if (batch, seq) not in self.buckets:
            raise ValueError(f"({batch}, {seq}) is not one of the buckets {self.buckets}")
        templates = {name: torch.empty(0, 0, dtype=torch.long) for name in input_names}
        key = (batch, seq, *self._signature(templates, constants), None)
        if key not in self._graphs:
            self._graphs[key] = self._capture((batch, seq), templates, constants, None)

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        _check_eval(self.model)
        tensors = {k: v for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask), *kwargs.items())
                   if isinstance(v, torch.Tensor)}
        constants = {k: v for k, v in kwargs.items() if k not in tensors and v is not None}
        if not tensors:
            raise TypeError("CUDAGraphRunner: give the inputs as tensors (input_ids=..., attention_mask=...)")
        first = next(iter(tensors.values()))
        if first.dim() < 2:
            raise ValueError(f"CUDAGraphRunner: inputs must be [batch, seq, ...], got shape {tuple(first.shape)}")
        batch, seq = first.shape[:2]
        for name, t in tensors.items():
            if t.dim() < 2 or tuple(t.shape[:2]) != (batch, seq):
                raise ValueError(f"CUDAGraphRunner: {name} has shape {tuple(t.shape)}; every input must be "
                                 f"[batch, seq, ...] = [{batch}, {seq}, ...] like the first")
        if "attention_mask" not in tensors:  # padding needs a mask: all real tokens
            tensors["attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=first.device)
        bucket = choose_bucket(self.buckets, batch, seq)
        if bucket is None:
            return self._eager(batch, seq, tensors, constants)
        packed = None
        if self.padding_free:  # one host sync, outside the graph: the real lengths
            lengths = tensors["attention_mask"].ne(0).sum(1).tolist()
            packed = choose_packed_shapes(lengths, *bucket, self._seq_lens)
            if packed[0] >= bucket[0] * bucket[1]:
                packed = None  # no fewer rows than the padded batch: its graph, without gather and scatter
        signature = self._signature(tensors, constants)
        key = (*bucket, *signature, packed)
        entry = self._graphs.get(key)
        if entry is None and signature not in self.uncapturable:
            try:
                entry = self._graphs[key] = self._capture(bucket, tensors, constants, packed)
            except _CaptureFailed as e:
                if self.strict:
                    raise
                self.uncapturable[signature] = str(e)
                warnings.warn(f"{e}; inputs {[name for name, *_ in signature[0]]} with {dict(signature[1])} run "
                              "eagerly from now on", stacklevel=2)
        if entry is None:
            return self._run_eagerly(tensors, constants)
        with self._on_device():
            self._fill(entry.inputs, tensors)
            entry.graph.replay()
        self.replays += 1
        leaves = [_slice_back(out, how, batch, seq, self.copy_outputs) for out, how in zip(entry.outputs, entry.slices)]
        return pytree.tree_unflatten(leaves, entry.spec)

    # -------------------------------------------------------- the CUDA calls (four small hooks)
    def _graph_device(self, model: nn.Module) -> torch.device:
        """The model's CUDA device; a RuntimeError saying why when there is none."""
        device = _model_device(model)
        if not torch.cuda.is_available():
            raise RuntimeError(
                "CUDAGraphRunner needs a CUDA GPU: CUDA graphs record and replay GPU kernel launches, and "
                "torch.cuda.is_available() is False here. On CPU call the model directly (or torch.compile it).")
        if device is None or device.type != "cuda":
            where = "has no parameters or buffers" if device is None else f"is on {device}"
            raise RuntimeError(
                f"CUDAGraphRunner needs a model on a CUDA device (CUDA graphs replay GPU kernels); this model "
                f"{where}: move it with model.cuda() first")
        return device

    def _on_device(self):
        return torch.cuda.device(self.device)

    def _warm_up(self, forward, probe):
        """`warmup` forwards and the probe on a side stream (kernels compile / autotune there, and the
        allocator sees the side-stream use the capture needs); (last forward's output, probe's)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                out = forward()
            probe_out = probe()
        torch.cuda.current_stream().wait_stream(side)
        return out, probe_out

    def _record(self, forward):
        """(graph, static output) of one forward captured into the runner's shared memory pool."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # The outer stream context puts the current stream back even when capture_end raises (a forward
        # that invalidated the capture), where torch.cuda.graph's exit skips that.
        with torch.cuda.stream(torch.cuda.current_stream()):
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    out = forward()
            except BaseException:
                self._drop_pool()
                end_rng_capture()
                raise
        return graph, out

    def _drop_pool(self):
        """After a failed capture, later captures get a new pool. On an invalidated capture torch's
        capture_end raises before it stops routing allocations to the pool, which could then never be
        captured into again ("already recording to mempool_id"): stop that here, and give back the
        pool's use count that the failed graph, never ended, will not."""
        pool, self._pool = self._pool, None
        end, release = (getattr(torch._C, name, None) for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"))
        if pool is None or end is None or release is None:
            return
        device = torch.cuda.current_device()
        try:
            end(device, pool)
        except RuntimeError:  # "not currently recording": capture_end got that far and cleans up itself
            return
        release(device, pool)

    # -------------------------------------------------------- internals
    def _signature(self, tensors: dict, constants: dict) -> tuple:
        """(inputs, constants): the part of a graph key that does not depend on the sizes."""
        inputs = tuple(sorted((name, t.dtype, tuple(t.shape[2:])) for name, t in tensors.items()))
        try:
            consts = tuple(sorted(constants.items()))
            hash(consts)
        except TypeError:
            raise TypeError(f"CUDAGraphRunner: non-tensor keyword arguments must be hashable constants, got "
                            f"{sorted(constants)}") from None
        return inputs, consts

    def _pad_value(self, name: str) -> int:
        return self.pad_token_id if name == "input_ids" else 0

    def _fill(self, bufs: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
        """Copy [batch, seq, ...] inputs into a bucket's buffers, padding the rest."""
        for name, buf in bufs.items():
            batch, seq = tensors[name].shape[:2]
            buf[:batch, :seq].copy_(tensors[name])
            buf[batch:].fill_(self._pad_value(name))
            buf[:batch, seq:].fill_(self._pad_value(name))

    def _static_inputs(self, batch: int, seq: int, templates: dict) -> dict[str, torch.Tensor]:
        """Buffers of the bucket's shape; warm-up and probe values: pad ids, all tokens real."""
        bufs = {}
        for name, t in templates.items():
            value = 1 if name == "attention_mask" else self._pad_value(name)
            bufs[name] = torch.full((batch, seq, *t.shape[2:]), value, dtype=t.dtype, device=self.device)
        return bufs

    def _eager(self, batch, seq, tensors, constants):
        if self.strict:
            raise ValueError(f"CUDAGraphRunner: no bucket holds an input of [{batch}, {seq}] (largest buckets: "
                             f"batch {max(b for b, _ in self.buckets)}, seq {max(s for _, s in self.buckets)})")
        if (batch, seq) not in self._warned:
            self._warned.add((batch, seq))
            warnings.warn(f"CUDAGraphRunner: no bucket holds an input of [{batch}, {seq}]; running it eagerly",
                          stacklevel=3)
        return self._run_eagerly(tensors, constants)

    def _run_eagerly(self, tensors, constants):
        self.eager_calls += 1
        with torch.no_grad():
            return self.model(**{k: v.to(self.device) for k, v in tensors.items()}, **constants)

    def _forward(self, inputs: dict, constants: dict, packed):
        """The model on `inputs`; under static_shapes(*packed) when packed is not None."""
        if packed is None:
            return self.model(**inputs, **constants)
        with _padding.static_shapes(*packed):
            return self.model(**inputs, **constants)

    def _capture(self, bucket: tuple[int, int], templates: dict, constants: dict, packed=None) -> _Graph:
        batch, seq = bucket
        static = self._static_inputs(batch, seq, templates)
        if packed is not None and templates["attention_mask"].numel():
            # Warm up on this call's batch, which fits (capacity, max_seqlen) (the all-real default
            # fills only the full-batch graph's); replays copy each call's inputs in anyway.
            with self._on_device():
                self._fill(static, templates)
        # A neighbouring shape (one more row, one token fewer) tells which output dims follow the
        # batch and which follow the sequence.
        probe_shape = (batch + 1, seq - 1 if seq > 1 else seq)
        probe = self._static_inputs(*probe_shape, templates)
        with self._on_device(), torch.no_grad():
            out, probe_out = self._warm_up(lambda: self._forward(static, constants, packed),
                                           lambda: self.model(**probe, **constants))
            leaves, _ = pytree.tree_flatten(out)
            probe_leaves, _ = pytree.tree_flatten(probe_out)
            if len(leaves) != len(probe_leaves):
                raise RuntimeError("CUDAGraphRunner: the model's output structure changes with the input shape")
            slices = [_follow_dims(a, b, bucket, probe_shape) for a, b in zip(leaves, probe_leaves)]
            out = probe_out = leaves = probe_leaves = probe = None  # the warm-up's tensors, freed before capture
            try:
                graph, out = self._record(lambda: self._forward(static, constants, packed))
            except Exception as e:
                first = e  # an invalidated capture raises again at its end: name the error that began it
                while first.__context__ is not None:
                    first = first.__context__
                why = (str(first).splitlines() or [""])[0]  # CUDA errors go on with generic advice
                raise _CaptureFailed(
                    f"CUDAGraphRunner: the forward cannot be captured in a CUDA graph (bucket {bucket}: "
                    f"{type(first).__name__}: {why}); a captured forward must not synchronise with the host "
                    "(.item(), .cpu(), data-dependent shapes) nor copy from CPU memory") from e
        outputs, spec = pytree.tree_flatten(out)
        self.captures += 1
        return _Graph(graph, static, outputs, spec, slices)


class _CaptureFailed(RuntimeError):
    pass


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("CUDAGraphRunner is for inference: call model.eval() first (in training mode "
                         "dropout and autograd run, which these graphs do not capture)")


def _follow_dims(a: Any, b: Any, shape: tuple[int, int], probe_shape: tuple[int, int]):
    """(batch dims, seq dims) of an output leaf: the dims whose size went from the bucket's batch
    (seq) to the probe's when the input shape did. None for non-tensors and unchanged tensors."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != b.dim():
        return None
    batch_dims = [d for d in range(a.dim()) if (a.shape[d], b.shape[d]) == (shape[0], probe_shape[0])]
    seq_dims = [d for d in range(a.dim()) if (a.shape[d], b.shape[d]) == (shape[1], probe_shape[1])
                and probe_shape[1] != shape[1]]
    return batch_dims, seq_dims


def _slice_back(out: Any, how, batch: int, seq: int, copy: bool) -> Any:
    if not isinstance(out, torch.Tensor):
        return out
    if how is not None:
        index = [slice(None)] * out.dim()
        for d in how[0]:
            index[d] = slice(0, batch)
        for d in how[1]:
            index[d] = slice(0, seq)
        out = out[tuple(index)]
    return out.clone() if copy else out


def capture_graphs(model: nn.Module, batch_sizes: Iterable[int], seq_lens: Iterable[int],
                   **kwargs: Any) -> CUDAGraphRunner:
    """A CUDAGraphRunner over the buckets batch_sizes x seq_lens, every graph captured now (for
    input_ids + attention_mask; other input sets are captured on first use). kwargs go to the
    runner (strict, copy_outputs, warmup, pad_token_id)."""
    runner = CUDAGraphRunner(model, buckets=list(itertools.product(batch_sizes, seq_lens)), **kwargs)
    for batch, seq in runner.buckets:
        runner.capture(batch, seq)
    return runner
