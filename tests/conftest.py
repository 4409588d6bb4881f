import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; it must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (runs by default; deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def record_backends(monkeypatch):
    """Record (op, backend) for every bertkern op call as it resolves its backend, so a test can
    prove that a fused path ran, and on which backend."""
    from bertkern import backend as _backend

    calls = []
    real_resolve = _backend.resolve

    def resolve(op, *args, **kwargs):
        chosen = real_resolve(op, *args, **kwargs)
        calls.append((op, chosen))
        return chosen

    monkeypatch.setattr(_backend, "resolve", resolve)
    return calls


@pytest.fixture(scope="session")
def triton_compile_cache(tmp_path_factory):
    """TRITON_CACHE_DIR for the child processes that compile Triton kernels for a real GPU
    (test_triton_compile, test_sass_report): empty when the session starts, so every kernel is really
    compiled, and shared by the pytest-xdist workers, so a kernel both compile is compiled once
    (Triton replaces its cache files atomically)."""
    from harness import session_dir

    return session_dir(tmp_path_factory, "triton_compile_cache")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
