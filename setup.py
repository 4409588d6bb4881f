"""Build bertkern's CUDA extension; the package metadata is in pyproject.toml.

The CUDA extension bertkern._C (every csrc/*.cu and csrc/*.cpp: a new op only adds files) is built
when a CUDA toolchain is there: nvcc with its headers, and a CUDA build of torch. No GPU is needed to
build. Without a toolchain bertkern installs as a pure-Python package (torch and triton backends).

    pip install --no-build-isolation -e .     # compiles against the torch already installed

Environment:
    BERTKERN_BUILD_CUDA=0|1    force the extension off, or on (then a missing toolchain is an error);
                               unset: build it when the toolchain is found
    TORCH_CUDA_ARCH_LIST       archs to build, default "8.0;9.0+PTX" (A100, H100 cubins; PTX that newer
                               GPUs JIT-compile at first use)
    MAX_JOBS                   parallel compile jobs (read by torch's ninja build)
    CUDA_HOME / CUDA_PATH      the CUDA toolkit; default: from nvcc on PATH, else /usr/local/cuda
    BERTKERN_PTXAS_VERBOSE=1   print ptxas register / spill reports for every kernel

What this file decides, because it depends on the build: the version (a wheel with bertkern._C gets a
local tag naming its CUDA and torch, e.g. 0.1.0+cu130.torch2.14), the torch requirement (pinned to the
torch minor release _C was compiled against, whose C++ ABI it needs), and bertkern/_build_config.json,
the record `bertkern info` reads to say why _C is missing or does not load.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
DEFAULT_ARCHS = "8.0;9.0+PTX"
RECORD = os.path.join(ROOT, "bertkern", "_build_config.json")
# custom_op, register_fake and is_autocast_enabled(device_type) are torch 2.4 APIs; CI tests 2.14.
TORCH_FLOOR = "torch>=2.4"


def _log(message: str) -> None:
    print(f"bertkern setup: {message}", file=sys.stderr)


def _version() -> str:
    # One source of truth: bertkern/__init__.py (read, not imported: importing needs torch).
    with open(os.path.join(ROOT, "bertkern", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if not match:
        raise SystemExit("bertkern setup: no __version__ = \"...\" line in bertkern/__init__.py")
    return match.group(1)


def _torch_versions() -> tuple[str | None, str | None]:
    try:
        import torch
    except ImportError:
        return None, None
    return torch.__version__, torch.version.cuda


def _write_record(state: str, why_not: str = "", archs: str | None = None) -> None:
    """bertkern/_build_config.json: what this build did, for `bertkern info`. Not for an sdist (it
    would ship this machine's record); MANIFEST.in excludes it there too."""
    if "sdist" in sys.argv:
        return
    torch_version, torch_cuda = _torch_versions()
    record = {"cuda_extension": state, "why_not": why_not, "torch": torch_version, "torch_cuda": torch_cuda,
              "archs": archs}
    with open(RECORD, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


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
        _write_record("off", "BERTKERN_BUILD_CUDA=0")
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
        _write_record("not_built", why)
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
    _write_record("built", archs=archs)

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


def build_metadata(with_extension: bool) -> tuple[str, list[str]]:
    """(version, torch requirement): a build with _C names its CUDA and torch in a local version tag
    and needs that torch minor release (its C++ ABI changes between releases); pure Python does not."""
    version = _version()
    if not with_extension or "sdist" in sys.argv:  # an sdist is built anywhere: plain version, no pin
        return version, [TORCH_FLOOR]
    torch_version, torch_cuda = _torch_versions()
    major, minor = torch_version.split("+")[0].split(".")[:2]
    return f"{version}+cu{torch_cuda.replace('.', '')}.torch{major}.{minor}", [f"torch=={major}.{minor}.*"]


ext_modules, cmdclass = cuda_extension()
version, torch_requirement = build_metadata(bool(ext_modules))

# Everything else (name, extras, entry point, license, packages) is in pyproject.toml.
setup(version=version, install_requires=torch_requirement, ext_modules=ext_modules, cmdclass=cmdclass)
