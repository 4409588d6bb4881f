"""`bertkern info` and `bertkern verify` as a user meets them: what info says in each state of the
extension, what verify reports as having run, and their exit codes (2: usage, 1: past the 2x rule).
Also the backend-name messages and the GPU-arch check of bertkern._C (issue 12 item 5)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bertkern import backend, ops
from bertkern.__main__ import main as cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _one_line_usage_error(capsys, call) -> str:
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


# ---------------------------------------------------------------- info
def test_info_rejects_unknown_arguments(capsys):
    err = _one_line_usage_error(capsys, lambda: cli(["info", "--bogus"]))
    assert "--bogus" in err


def test_info_json(capsys):
    assert cli(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ext = info["cuda_extension"]
    assert ext["built"] == backend.cuda_extension_status()[0]
    if not ext["built"]:
        assert ext["state"] in ("load_failed", "other_torch", "missing", "off_by_choice", "cpu_torch", "no_toolchain",
                                "not_built")
    # attention's auto table, one entry per row of bertkern.ops.attention_auto.TABLE
    from bertkern.ops import attention_auto

    rows = info["attention_auto_table"]
    assert len(rows) == len(attention_auto.TABLE)
    assert all(v.startswith("attention -> ") and "attention_varlen -> " in v for v in rows.values())


BUILT_214 = {"cuda_extension": "built", "torch": "2.14.1+cu130", "torch_cuda": "13.0", "archs": "8.0;9.0+PTX"}


@pytest.mark.parametrize(
    "facts, state, advice",
    [
        # _C is there but built for another torch: both versions, and what to do
        (dict(record=BUILT_214, so_file="_C.so", torch_version="2.13.0", torch_cuda=None, nvcc=True),
         "other_torch", ["torch 2.14.1+cu130 (CUDA 13.0)", "torch 2.13.0 (CUDA none", "rebuild"]),
        (dict(record=BUILT_214, so_file="_C.so", torch_version="2.14.1+cu126", torch_cuda="12.6", nvcc=True),
         "other_torch", ["2.14.1+cu130", "2.14.1+cu126", "rebuild"]),
        (dict(record=BUILT_214, so_file="_C.so", torch_version="2.14.1+cu130", torch_cuda="13.0", nvcc=True),
         "load_failed", ["does not load", "boom"]),
        # left out on purpose: no "install nvcc" advice, how to turn it on
        (dict(record={"cuda_extension": "off"}, so_file="", torch_version="2.14.1", torch_cuda="13.0", nvcc=True),
         "off_by_choice", ["on purpose", "BERTKERN_BUILD_CUDA=1"]),
        # CPU-only torch: following "put nvcc on PATH" cannot work; say what does
        (dict(record={"cuda_extension": "not_built"}, so_file="", torch_version="2.14.1+cpu", torch_cuda=None,
              nvcc=True),
         "cpu_torch", ["CPU-only", "CUDA build of torch", "TRITON_INTERPRET=1"]),
        (dict(record={}, so_file="", torch_version="2.14.1", torch_cuda="13.0", nvcc=False),
         "no_toolchain", ["nvcc", "CUDA toolkit", "13.0"]),
        (dict(record=BUILT_214, so_file="", torch_version="2.14.1+cu130", torch_cuda="13.0", nvcc=True),
         "missing", ["no bertkern/_C", "rebuild"]),
        (dict(record={"cuda_extension": "not_built", "why_not": "nvcc was not found"}, so_file="",
              torch_version="2.14.1", torch_cuda="13.0", nvcc=True), "not_built", ["nvcc was not found", "reinstall"]),
    ],
    ids=["other-torch-cpu", "other-cuda", "load-failed", "off-by-choice", "cpu-torch", "no-toolchain", "missing",
         "toolchain-now"],
)
def test_extension_diagnosis(facts, state, advice):
    d = backend.extension_diagnosis(ImportError("boom"), **facts)
    assert d.state == state
    for text in advice:
        assert text in d.why, (text, d.why)
    if state in ("cpu_torch", "off_by_choice"):
        assert "nvcc on PATH" not in d.why


def test_this_installation_is_diagnosed():
    ok, why = backend.cuda_extension_status()
    assert ok or why.startswith("bertkern._C"), why


# ---------------------------------------------------------------- arch check
@pytest.mark.parametrize(
    "cap, archs, ok",
    [
        ((8, 0), "8.0;9.0+PTX", True),
        ((8, 6), "8.0;9.0+PTX", True),  # sm_80 cubin runs on sm_86
        ((9, 0), "8.0;9.0+PTX", True),
        ((10, 0), "8.0;9.0+PTX", True),  # Blackwell JIT-compiles the sm_90 PTX
        ((12, 0), "8.0 9.0+PTX", True),
        ((10, 0), "8.0;9.0", False),  # the old default: no image for Blackwell
        ((7, 5), "8.0;9.0+PTX", False),  # older than every arch
        ((8, 0), "8.6;9.0", False),  # an sm_86 cubin does not run on sm_80
    ],
)
def test_kernel_image_for_gpu(cap, archs, ok):
    assert backend.has_kernel_image(cap, backend.parse_archs(archs)) is ok


def test_arch_problem_falls_back_to_triton(monkeypatch):
    """A GPU that _C has no image for: backend="cuda" says why; auto runs Triton and warns."""
    monkeypatch.setattr(backend, "cuda_extension_status", lambda: (True, ""))
    monkeypatch.setattr(backend, "triton_status", lambda: (True, ""))
    monkeypatch.setattr(backend, "extension_archs", lambda: "8.0;9.0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (10, 0))
    monkeypatch.delitem(backend._STATUS, "arch0", raising=False)
    monkeypatch.setattr(backend, "_WARNED", set())
    gpu = torch.device("cuda", 0)
    try:
        why = backend.unavailable_reason("cuda", gpu)
        assert why and "sm_100" in why and "8.0;9.0" in why and "TORCH_CUDA_ARCH_LIST" in why
        with pytest.raises(RuntimeError, match="bertkern.ops.bias_gelu: backend='cuda' is unavailable.*sm_100"):
            backend.resolve("bias_gelu", "cuda", gpu)
        with pytest.warns(UserWarning, match="falls back to Triton.*sm_100"):
            assert backend.resolve("bias_gelu", None, gpu) == "triton"
    finally:
        backend._STATUS.pop("arch0", None)


def test_backend_checks_trace_under_fullgraph_with_cold_caches(monkeypatch):
    """The first backend check of a process inside torch.compile(fullgraph=True) (a fresh worker on a
    GPU): loading _C, its arch list and the GPU's capability are read eagerly, never traced."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    for key in ("cuda", "arch0", "triton"):
        monkeypatch.delitem(backend._STATUS, key, raising=False)
    gpu = torch.device("cuda", 0)

    def f(x):
        return x + sum(len(backend.unavailable_reason(b, gpu) or "") for b in ("cuda", "triton"))

    torch._dynamo.reset()
    assert torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)).equal(f(torch.zeros(2)))


# ---------------------------------------------------------------- backend names
@pytest.mark.parametrize("op", ["bias_gelu", "add_layer_norm", "masked_softmax", "attention"])
def test_bad_backend_names_say_where_and_which_op(op, monkeypatch):
    x = torch.randn(1, 1, 4, 8)
    calls = {
        "bias_gelu": lambda **kw: ops.bias_gelu(x, **kw),
        "add_layer_norm": lambda **kw: ops.add_layer_norm(x, x, torch.ones(8), torch.zeros(8), **kw),
        "masked_softmax": lambda **kw: ops.masked_softmax(x, **kw),
        "attention": lambda **kw: ops.attention(x, x, x, **kw),
    }
    with pytest.raises(ValueError, match=rf"bertkern\.ops\.{op}: backend='Triton' .*did you mean 'triton'"):
        calls[op](backend="Triton")
    monkeypatch.setenv("BERTKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=rf"bertkern\.ops\.{op}: BERTKERN_BACKEND='nonsense' is not a backend"):
        calls[op]()


# ---------------------------------------------------------------- verify
@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["minilm", "--backend", "triton"], {"TRITON_INTERPRET": "0"}, "backend 'triton' cannot run on cpu"),
        (["minilm"], {"BERTKERN_BACKEND": "nonsense"}, "BERTKERN_BACKEND='nonsense'"),
        (["minilm", "--batch", "0"], {}, "--batch and --seq must be positive"),
        (["minilm", "--bogus"], {}, "--bogus"),
        (["minilm", "--backend", "Triton"], {}, "invalid choice"),
        ([], {}, "required"),
    ],
    ids=["triton-without-interpreter", "bad-env", "batch", "unknown-flag", "bad-choice", "no-model"],
)
def test_verify_usage_errors_exit_2_with_one_line(argv, env, message, capsys, monkeypatch):
    if torch.cuda.is_available() and "triton" in argv:
        pytest.skip("triton runs on a GPU")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    err = _one_line_usage_error(capsys, lambda: cli(["verify", *argv]))
    assert message in err, err


def test_verify_cuda_backend_without_extension(capsys):
    if backend.unavailable_reason("cuda", torch.device("cpu")) is None:
        pytest.skip("unreachable: cuda never runs on cpu")
    err = _one_line_usage_error(capsys, lambda: cli(["verify", "minilm", "--backend", "cuda", "--device", "cpu"]))
    assert "backend 'cuda' cannot run on cpu" in err


def test_verify_missing_model_is_exit_2(tmp_path, capsys):
    assert cli(["verify", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def _tiny_hf():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, attn_implementation="eager")
    return transformers.BertModel(config).eval()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU auto runs kernels")
@pytest.mark.parametrize("backend_arg", ["torch", None])
def test_verify_says_when_no_kernel_ran(backend_arg, monkeypatch):
    from bertkern import verify as ver

    monkeypatch.delenv("BERTKERN_BACKEND", raising=False)
    result = ver.verify(_tiny_hf(), backend=backend_arg, batch=2, seq=6)
    assert result["passed"] and not result["kernels_ran"]
    assert not {"triton", "cuda"} & {b for backends in result["ran"].values() for b in backends}, result["ran"]
    text = ver.format_result(result)
    assert text.splitlines()[-1].startswith("PASSED, but no bertkern kernel ran")
    if backend_arg == "torch":
        assert set(result["ran"]) >= {"bias_gelu", "add_layer_norm"}
        assert "bias_gelu on torch reference" in text


@pytest.mark.skipif(not (torch.cuda.is_available() or backend.triton_interpreted()), reason="needs triton")
def test_verify_reports_the_kernels_that_ran():
    from bertkern import verify as ver

    result = ver.verify(_tiny_hf(), backend="triton", batch=2, seq=4)
    assert result["passed"], ver.format_result(result)
    assert result["kernels_ran"] and "triton" in result["ran"]["bias_gelu"]
    assert ver.format_result(result).splitlines()[-1] == "PASSED"
