"""Build and install bertkern.

The CUDA extension bertkern._C (every csrc/*.cu and csrc/*.cpp: a new op only adds files) is built
when a CUDA toolchain is there: nvcc with its headers, and a CUDA build of torch. No GPU is needed to
build. Without a toolchain bertkern installs as a pure-Python package (torch and triton backends).

    pip install --no-build-isolation -e .     # compiles against the torch already installed

Environment:
    BERTKERN_BUILD_CUDA=0|1    force the extension off, or on (then a missing toolchain is an error);
                               unset: build it when the toolchain is found
    TORCH_CUDA_ARCH_LIST       archs to build, default "8.0;9.0" (A100, H100)
    MAX_JOBS                   parallel compile jobs (read by torch's ninja build)
    CUDA_HOME / CUDA_PATH      the CUDA toolkit; default: from nvcc on PATH, else /usr/local/cuda
    BERTKERN_PTXAS_VERBOSE=1   print ptxas register / spill reports for every kernel
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
DEFAULT_ARCHS = "8.0;9.0"


def _log(message: str) -> None:
    print(f"bertkern setup: {message}", file=sys.stderr)


def _version() -> str:
    # One source of truth: bertkern/__init__.py (read, not imported: importing needs torch).
    with open(os.path.join(ROOT, "bertkern", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    return match.group(1) if match else "0.1.0"


def _env_switch(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"bertkern setup: {name} must be 0 or 1, got {os.environ[name]!r}")


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and all(
        os.path.isfile(os.path.join(path, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime_api.h"))
    )


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit root as nvcc itself reports it: sees through wrapper scripts (e.g. a
    /usr/local/bin/nvcc that execs the real one), where dirname(dirname(nvcc)) has no headers."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.normpath(match.group(1).strip()) if match else None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root, "") or (None, why not)."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if _is_toolkit(explicit):
            return explicit, ""
        return None, f"CUDA_HOME/CUDA_PATH={explicit} has no bin/nvcc and include/cuda_runtime_api.h"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(home):
            return home, ""
        home = _nvcc_top(nvcc)
        if _is_toolkit(home):
            return home, ""
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", ""
    return None, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"


def _torch_cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as e:
        return False, f"torch is not importable at build time ({e}); build with pip install --no-build-isolation"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    return True, ""


def _ensure_ninja() -> None:
    # torch runs `ninja` from PATH and silently falls back to a slow serial build without it; the pip
    # package `ninja` is often installed in a venv that is not activated, so put its binary on PATH.
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except (ImportError, AttributeError):
        _log("ninja not found: the build will be serial and slow (pip install ninja)")


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for bertkern._C, or ([], {}) when it is not built."""
    switch = _env_switch("BERTKERN_BUILD_CUDA")
    if switch is False:
        _log("BERTKERN_BUILD_CUDA=0: installing without the CUDA extension")
        return [], {}
    ok, why = _torch_cuda()
    cuda_home = None
    if ok:
        cuda_home, why = find_cuda_home()
        ok = cuda_home is not None
    if not ok:
        if switch:
            raise SystemExit(f"bertkern setup: BERTKERN_BUILD_CUDA=1 but bertkern._C cannot be built: {why}")
        _log(f"installing without the CUDA extension: {why}")
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME and finds nvcc/headers/libs from it once, at import.
    os.environ["CUDA_HOME"] = cuda_home
    # Unset, torch would build for the visible GPU, or for every arch when there is none (slow).
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    if not re.fullmatch(r"[0-9A-Za-z.;+ ]+", archs):
        raise SystemExit(f"bertkern setup: TORCH_CUDA_ARCH_LIST={archs!r} is not a list like '8.0;9.0+PTX'")
    archs_define = ";".join(a for a in re.split(r"[; ]+", archs) if a)
    _ensure_ninja()

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = os.path.join(ROOT, CSRC)
    # Relative paths: setuptools rejects absolute source paths; pip runs setup.py from ROOT.
    sources = [f"{CSRC}/{name}" for ext in ("*.cu", "*.cpp") for name in sorted(glob.glob(ext, root_dir=csrc))]
    headers = [f"{CSRC}/{name}" for ext in ("*.cuh", "*.h") for name in sorted(glob.glob(ext, root_dir=csrc))]
    # torch's build appends -std=c++20 itself when no -std is given; its 2.x headers need C++20
    # (c++17 fails in ATen/core/TensorBase.h), so say it explicitly.
    cxx_flags = ["-O3", "-std=c++20", f'-DBERTKERN_CUDA_ARCHS="{archs_define}"']
    # No --use_fast_math: it swaps erff/expf/division for approximations (GELU's erf loses accuracy).
    # Careful: torch drops its own -gencode flags when any nvcc flag contains the text "arch".
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo"]
    if _env_switch("BERTKERN_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    _log(
        f"CUDA extension bertkern._C enabled: {len(sources)} sources, CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={archs}, MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}"
    )
    ext = CUDAExtension(
        name="bertkern._C",
        sources=sources,
        depends=headers,
        include_dirs=[csrc],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="bertkern",
    version=_version(),
    description="Fused Triton and CUDA kernels for BERT-style encoders",
    packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "benchmarks.*")),
    python_requires=">=3.10",
    install_requires=["torch", "triton"],
    entry_points={"console_scripts": ["bertkern = bertkern.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
