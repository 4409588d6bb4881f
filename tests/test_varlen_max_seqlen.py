"""attention_varlen with a max_seqlen smaller than the longest sequence: a clear error where the check
is free (cu_seqlens on the CPU, or BERTKERN_DEBUG=1), and never uninitialised output from the Triton
kernels when it is not checked (they write NaN over the whole longer sequence)."""
from __future__ import annotations

import pytest
import torch

import bertkern
from bertkern import backend as _backend

H, D = 2, 16
LENS = (5, 9, 3)  # the middle sequence is the longest


def _packed(dtype=torch.float32):
    torch.manual_seed(0)
    total = sum(LENS)
    q, k, v = (torch.randn(total, H, D, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(LENS), 0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_too_small_max_seqlen_raises(backend):
    if backend == "triton" and not _backend.triton_interpreted():
        pytest.skip("the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    q, k, v, cu = _packed()
    with pytest.raises(ValueError, match=r"max_seqlen=8 is smaller than the longest sequence .*9 tokens"):
        bertkern.ops.attention_varlen(q, k, v, cu, 8, backend=backend)
    out = bertkern.ops.attention_varlen(q, k, v, cu, 9, backend=backend)  # exactly the longest: fine
    assert torch.isfinite(out).all()


def test_debug_env_checks_any_device(monkeypatch):
    """BERTKERN_DEBUG=1 turns the check on where it would sync the device (here: still the CPU)."""
    q, k, v, cu = _packed()
    monkeypatch.setenv("BERTKERN_DEBUG", "1")
    with pytest.raises(ValueError, match="max_seqlen=4"):
        bertkern.ops.attention_varlen(q, k, v, cu, 4, backend="torch")


def test_triton_kernels_poison_a_longer_sequence():
    """Past the host check (as on a GPU): the kernels give NaN for every row of the sequence that
    max_seqlen does not cover, forward and backward, and the right values for the others."""
    if not _backend.triton_interpreted():
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    from bertkern.ops.attention import torch_varlen_forward
    from bertkern.triton import attention as k_mod

    q, k, v, cu = _packed()
    scale = D ** -0.5
    out, stats = k_mod.varlen_forward(q, k, v, cu, 8, scale, 0.0, None)
    want, _ = torch_varlen_forward(q, k, v, cu, 9, scale, 0.0, None)
    long = slice(LENS[0], LENS[0] + LENS[1])
    assert torch.isnan(out[long]).all()
    others = torch.ones(sum(LENS), dtype=torch.bool)
    others[long] = False
    torch.testing.assert_close(out[others], want.to(out.dtype)[others], rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(out)
    dq, dk, dv = k_mod.varlen_backward(grad, q, k, v, cu, 8, out, stats, scale, 0.0, None)
    for g in (dq, dk, dv):
        assert torch.isnan(g[long]).all()
        assert torch.isfinite(g[others]).all()
