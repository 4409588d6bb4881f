"""add_layer_norm: y = layer_norm(dropout(x + x_bias) + residual), BERT's block after each projection,
and its backward, over rows 128..64k and hidden 384..4096. embedding_layer_norm: BERT's embeddings
(three gathers, two adds, LayerNorm) and its backward, over 128..64k tokens, vocabulary 30522.

The dropout_p = 0.1 cases are forward only with x = x_bias = 0: dropout(0) = 0 for any mask, so the
output is checkable against float64 while every provider still draws its mask and does all its work
(tests/test_layer_norm.py checks their backward against the forward's mask).
"""
import torch
import torch.nn.functional as F

from benchmarks.ops import BERT_TOKENS, CPU_DTYPES, ROWS, Case, OpSpec, budget_order, grid

import bertkern
from bertkern import reference

HIDDEN = (768, 1024, 384, 4096)  # BERT-base, -large, MiniLM, a wide row; a time budget cuts from the end
EPS = 1e-12  # BERT's layer_norm_eps
NO_DROPOUT, DROPOUT = ({"dropout_p": 0.0},), ({"dropout_p": 0.1},)


def make_inputs(case: Case, device):
    rows, n, dt = case.shape["rows"], case.shape["hidden"], case.dtype
    x, x_bias = torch.randn(rows, n, device=device).to(dt), (0.5 * torch.randn(n, device=device)).to(dt)
    if case.options.get("dropout_p", 0.0) > 0.0:  # see the module docstring
        x, x_bias = torch.zeros_like(x), torch.zeros_like(x_bias)
    return {"x": x, "residual": torch.randn(rows, n, device=device).to(dt), "x_bias": x_bias,
            "weight": (1.0 + 0.1 * torch.randn(n, device=device)).to(dt),
            "bias": (0.1 * torch.randn(n, device=device)).to(dt)}


def eager(x, residual, weight, bias, x_bias, dropout_p=0.0):
    """HF BertSelfOutput / BertOutput after the dense layer."""
    h = F.dropout(x + x_bias, dropout_p, training=True) + residual
    return F.layer_norm(h, h.shape[-1:], weight, bias, EPS)


def bytes_moved(case: Case) -> int:
    """fwd: read x, residual (+ x_bias, weight, bias), write y. bwd: read dy and the saved pre-norm sum
    (+ weight), write d(sum) (dx too with dropout), dweight, dbias, dx_bias. fwd+bwd also writes the
    pre-norm sum. The fp32 row statistics are the kernels' own overhead, not counted."""
    m, n, size = case.shape["rows"], case.shape["hidden"], case.dtype.itemsize
    fwd = (3 * m * n + 3 * n) * size
    bwd = ((3 + (case.options.get("dropout_p", 0.0) > 0.0)) * m * n + 4 * n) * size
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + m * n * size + bwd}[case.direction]


def cases(quick: bool):
    rows, widths = (BERT_TOKENS, HIDDEN[:1]) if quick else (ROWS, HIDDEN)
    shapes = budget_order([{"rows": r, "hidden": n} for n in widths for r in rows], "rows", "hidden")
    dtypes, both = (torch.float16, torch.bfloat16), () if quick else ("fwd+bwd",)
    return [c for s in shapes for c in grid(("fwd", "bwd"), dtypes, [s], NO_DROPOUT)  # each dtype's fwd, bwd first
            + grid(both, dtypes, [s], NO_DROPOUT) + grid(("fwd",), dtypes, [s], DROPOUT)]


def cpu_cases(quick: bool):
    """Odd sizes (masking), a BERT-base row, and the dropout path."""
    shapes = [{"rows": 37, "hidden": 200}] + ([] if quick else [{"rows": 16, "hidden": 768}])
    return (grid(("fwd", "bwd"), CPU_DTYPES[quick], shapes, NO_DROPOUT)
            + grid(("fwd",), (torch.float32,), shapes[:1], DROPOUT))


# eps: bertkern.reference / ops' default 1e-12, BERT's
ADD_LAYER_NORM = OpSpec("add_layer_norm", make_inputs, eager, bytes_moved, cases, cpu_cases,
                        grad_inputs=("x", "residual", "weight", "bias", "x_bias"))


# ----------------------------------------------------------------------------- embedding_layer_norm
VOCAB, MAX_POS = 30522, 512
TOKENS = (128, 2048, 4096, 16384, 65536)


def emb_make_inputs(case: Case, device):
    n, seq = case.shape["hidden"], min(case.shape["tokens"], 128)
    batch, vocab = case.shape["tokens"] // seq, case.shape.get("vocab", VOCAB)
    table = lambda rows: (0.05 * torch.randn(rows, n, device=device)).to(case.dtype)  # noqa: E731
    return {"input_ids": torch.randint(0, vocab, (batch, seq), device=device),
            "token_type_ids": torch.randint(0, 2, (batch, seq), device=device),
            "word": table(vocab), "position": table(MAX_POS), "token_type": table(2),
            "weight": (1.0 + 0.1 * torch.randn(n, device=device)).to(case.dtype),
            "bias": (0.1 * torch.randn(n, device=device)).to(case.dtype)}


def emb_eager(input_ids, token_type_ids, word, position, token_type, weight, bias):
    """HF BertEmbeddings (absolute positions, dropout off)."""
    pos = torch.arange(input_ids.shape[-1], device=input_ids.device)
    e = F.embedding(input_ids, word) + F.embedding(token_type_ids, token_type) + F.embedding(pos, position)
    return F.layer_norm(e, e.shape[-1:], weight, bias, EPS)


def emb_ref(input_ids, token_type_ids, word, position, token_type, weight, bias):
    return reference.embedding_layer_norm(input_ids, None, token_type_ids, word, position, token_type, weight, bias,
                                          EPS)


def emb_kernel(backend: str, case: Case, device):
    def fn(input_ids, token_type_ids, word, position, token_type, weight, bias):
        return bertkern.ops.embedding_layer_norm(input_ids, None, token_type_ids, word, position, token_type, weight,
                                                 bias, EPS, backend=backend)

    return fn


def emb_bytes_moved(case: Case) -> int:
    """fwd: the ids, 3 table rows per token, y. bwd: dy and the saved rows in, a table row per token out."""
    t, n, size = case.shape["tokens"], case.shape["hidden"], case.dtype.itemsize
    fwd = 2 * t * 8 + (4 * t * n + 2 * n) * size  # ids + type ids; 3 rows read and y written per token
    bwd = (2 * t * n + 3 * t * n + 2 * n) * size + 2 * t * 8
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.direction]


def emb_cases(quick: bool):
    tokens, widths = (BERT_TOKENS, HIDDEN[:1]) if quick else (TOKENS, HIDDEN[:3])
    shapes = budget_order([{"tokens": t, "hidden": n} for n in widths for t in tokens], "tokens", "hidden")
    return grid(("fwd", "bwd"), (torch.float16, torch.bfloat16), shapes)


def emb_cpu_cases(quick: bool):
    return grid(("fwd", "bwd"), CPU_DTYPES[quick], [{"tokens": 74, "hidden": 200, "vocab": 97}])


EMBEDDING_LAYER_NORM = OpSpec("embedding_layer_norm", emb_make_inputs, emb_eager, emb_bytes_moved, emb_cases,
                              emb_cpu_cases, emb_ref, emb_kernel,
                              grad_inputs=("word", "position", "token_type", "weight", "bias"), x_key="tokens")
