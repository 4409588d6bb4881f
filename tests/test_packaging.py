"""Packaging: the sdist carries what building and testing need whatever machine made it; wheels say
what they need (a wheel with bertkern._C pins its torch); `make` rebuilds _C only when something it
is built from changed. Pure-Python builds only (BERTKERN_BUILD_CUDA=0): seconds, not a CUDA build."""
from __future__ import annotations

import email
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _source_files() -> list[str]:
    """The files of this checkout that a commit would carry (tracked, plus new not-ignored ones)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the checkout: building in place would write build records into the real tree."""
    dst = tmp_path_factory.mktemp("checkout")
    for f in _source_files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def dists(checkout, tmp_path_factory) -> Path:
    """sdist, then a wheel built from that sdist (as pip would), pure Python."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "BERTKERN_BUILD_CUDA": "0"}
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(checkout)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _sdist_names(dists: Path) -> tuple[str, set[str]]:
    (sdist,) = dists.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    return top, {n.split("/", 1)[1] for n in names if "/" in n}


def test_sdist_carries_sources_and_tests(dists, checkout):
    _, names = _sdist_names(dists)
    tracked = {f for f in _source_files()}
    for wanted in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "pytest.ini",
                   "requirements-dev.txt", "Makefile", "tests/conftest.py", "tests/harness.py",
                   "tests/emulation.py", "bertkern/__init__.py", "benchmarks/run.py"):
        assert wanted in names, f"sdist lacks {wanted}"
    for prefix in ("csrc/", "tests/cuda_emu/", "tests/test_"):
        want = {f for f in tracked if f.startswith(prefix)}
        assert want and want <= names, f"sdist lacks {sorted(want - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n.endswith("_build_config.json")]


def test_sdist_metadata(dists):
    top, _ = _sdist_names(dists)
    (sdist,) = dists.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        meta = email.message_from_bytes(tar.extractfile(f"{top}/PKG-INFO").read())
    assert meta["Name"] == "bertkern" and meta["License-Expression"] == "MIT"
    assert meta["Requires-Python"] == ">=3.10"
    assert set(meta.get_all("Provides-Extra")) == {"interpret", "hf", "bench"}
    assert "+" not in meta["Version"], "an sdist has a plain version (local tags are for wheels with _C)"
    dynamic = [d.lower() for d in meta.get_all("Dynamic") or []]
    assert "requires-dist" in dynamic, "the torch pin depends on the build: installers must recompute it"


def test_pure_python_wheel(dists):
    (wheel,) = dists.glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(meta_name))
        record = json.loads(z.read("bertkern/_build_config.json"))
    assert "+" not in meta["Version"], "a pure-Python wheel has no local version tag"
    requires = meta.get_all("Requires-Dist")
    assert [r for r in requires if "extra ==" not in r] == ["torch>=2.4"], requires  # no pin, no triton
    assert 'numpy; extra == "interpret"' in requires
    assert not any("_C" in n and n.endswith(".so") for n in names)
    assert record["cuda_extension"] == "off"  # so `bertkern info` says "left out on purpose"
    assert any(n.endswith("licenses/LICENSE") for n in names)


def _setup_kwargs(tmp_path, monkeypatch, build_cuda: str) -> dict:
    """Run a copy of setup.py with setuptools.setup replaced: the metadata it computes, no build."""
    import setuptools

    (tmp_path / "bertkern").mkdir()
    (tmp_path / "csrc").mkdir()
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copy(ROOT / "bertkern" / "__init__.py", tmp_path / "bertkern")
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.setenv("BERTKERN_BUILD_CUDA", build_cuda)
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    runpy.run_path(str(tmp_path / "setup.py"), run_name="__main__")
    seen["record"] = json.loads((tmp_path / "bertkern" / "_build_config.json").read_text())
    return seen


def test_wheel_with_extension_pins_its_torch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("needs nvcc and a CUDA build of torch (as in CI)")
    kw = _setup_kwargs(tmp_path, monkeypatch, "1")
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    assert kw["install_requires"] == [f"torch=={major}.{minor}.*"]
    assert kw["version"].endswith(f"+cu{torch.version.cuda.replace('.', '')}.torch{major}.{minor}")
    assert kw["ext_modules"] and kw["record"]["cuda_extension"] == "built"
    assert kw["record"]["torch"] == torch.__version__ and kw["record"]["archs"]


def test_pure_python_build_pins_nothing(tmp_path, monkeypatch):
    kw = _setup_kwargs(tmp_path, monkeypatch, "0")
    assert kw["install_requires"] == ["torch>=2.4"] and "+" not in kw["version"] and not kw["ext_modules"]
    assert kw["record"]["cuda_extension"] == "off"


# ---------------------------------------------------------------- make: no rebuild without a change
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls.log"
"""


@pytest.fixture
def make_dir(tmp_path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("no make")
    for f in ("Makefile", "requirements-dev.txt", "setup.py", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "op.cu").write_text("// kernel\n")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    return tmp_path


def _installs(make_dir: Path, **env) -> int:
    """Run `make install` with a fake python; how many times it ran the build (pip install -e)."""
    log = make_dir / ".venv" / "bin" / "calls.log"
    log.unlink(missing_ok=True)
    proc = subprocess.run(["make", "install", "BERTKERN_BUILD_CUDA=1", *[f"{k}={v}" for k, v in env.items()]],
                          cwd=make_dir, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return sum("pip install -v --no-build-isolation --no-deps -e ." in c for c in calls)


def test_make_rebuilds_only_on_change(make_dir):
    assert _installs(make_dir) == 1  # first run builds
    assert _installs(make_dir) == 0  # nothing changed: up to date
    built = make_dir / ".venv" / ".built"
    os.utime(built, (built.stat().st_mtime - 10,) * 2)  # older than the kernel source
    assert _installs(make_dir) == 1  # a kernel source changed
    assert _installs(make_dir, TORCH_CUDA_ARCH_LIST="9.0") == 1  # a build setting changed
    assert _installs(make_dir, TORCH_CUDA_ARCH_LIST="9.0") == 0
    with open(make_dir / "requirements-dev.txt", "a") as f:
        f.write("some-test-tool\n")  # a new test dependency: deps reinstall, _C does not rebuild
    assert _installs(make_dir, TORCH_CUDA_ARCH_LIST="9.0") == 0
