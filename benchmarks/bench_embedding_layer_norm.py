"""embedding_layer_norm: LayerNorm(word[ids] + type[token_type_ids] + pos[arange(S)]), BERT's
embeddings, and its backward (gradients of the tables, weight and bias), over batch x seq = 128..64k
tokens with BERT's vocabulary (30522) and hidden sizes 384, 768, 1024.

    bertkern bench --ops embedding_layer_norm [--quick] [--dtype fp16,bf16]

Eager is HF BertEmbeddings' composition: three gathers, two adds, F.layer_norm. Bytes: fwd reads the
ids and one row of each table per token, writes y; bwd reads dy and the saved normalized rows and
writes the gathered table gradients (a row per token) and dweight, dbias.
"""
import torch
import torch.nn.functional as F

from benchmarks.ops import Case, OpSpec, grid

import bertkern
from bertkern import reference

VOCAB, MAX_POS, EPS = 30522, 512, 1e-12
TOKENS = (128, 2048, 16384, 65536)
HIDDEN = (768, 1024, 384)


def make_inputs(case: Case, device):
    n, seq = case.shape["hidden"], min(case.shape["tokens"], 128)
    batch, vocab = case.shape["tokens"] // seq, case.shape.get("vocab", VOCAB)
    table = lambda rows: (0.05 * torch.randn(rows, n, device=device)).to(case.dtype)  # noqa: E731
    return {"input_ids": torch.randint(0, vocab, (batch, seq), device=device),
            "token_type_ids": torch.randint(0, 2, (batch, seq), device=device),
            "word": table(vocab), "position": table(MAX_POS), "token_type": table(2),
            "weight": (1.0 + 0.1 * torch.randn(n, device=device)).to(case.dtype),
            "bias": (0.1 * torch.randn(n, device=device)).to(case.dtype)}


def eager(input_ids, token_type_ids, word, position, token_type, weight, bias):
    """HF BertEmbeddings (absolute positions, dropout off)."""
    pos = torch.arange(input_ids.shape[-1], device=input_ids.device)
    e = F.embedding(input_ids, word) + F.embedding(token_type_ids, token_type) + F.embedding(pos, position)
    return F.layer_norm(e, e.shape[-1:], weight, bias, EPS)


def ref(input_ids, token_type_ids, word, position, token_type, weight, bias):
    return reference.embedding_layer_norm(input_ids, None, token_type_ids, word, position, token_type, weight, bias,
                                          EPS)


def kernel(backend: str, case: Case, device):
    def fn(input_ids, token_type_ids, word, position, token_type, weight, bias):
        return bertkern.ops.embedding_layer_norm(input_ids, None, token_type_ids, word, position, token_type, weight,
                                                 bias, EPS, backend=backend)

    return fn


def bytes_moved(case: Case) -> int:
    t, n, size = case.shape["tokens"], case.shape["hidden"], case.dtype.itemsize
    fwd = 2 * t * 8 + (4 * t * n + 2 * n) * size  # ids + type ids; 3 rows read and y written per token
    bwd = (2 * t * n + 3 * t * n + 2 * n) * size + 2 * t * 8
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.direction]


def cases(quick: bool):
    tokens, widths = ((2048, 16384), (768,)) if quick else (TOKENS, HIDDEN)
    shapes = [{"tokens": t, "hidden": n} for n in widths for t in tokens]
    return grid(("fwd", "bwd"), (torch.float16, torch.bfloat16), shapes)


def cpu_cases(quick: bool):
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.float16, torch.bfloat16)
    return grid(("fwd", "bwd"), dtypes, [{"tokens": 74, "hidden": 200, "vocab": 97}])


EMBEDDING_LAYER_NORM = OpSpec("embedding_layer_norm", make_inputs, eager, ref, kernel, bytes_moved, cases, cpu_cases,
                              grad_inputs=("word", "position", "token_type", "weight", "bias"), x_key="tokens")
