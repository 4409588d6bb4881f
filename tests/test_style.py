"""flake8 over every Python file of the tree, with the project's settings (.flake8: 120 columns)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_flake8():
    pytest.importorskip("flake8", reason="flake8 is in requirements-dev.txt")
    r = subprocess.run([sys.executable, "-m", "flake8", "--config", str(ROOT / ".flake8"), "bertkern", "benchmarks",
                        "tests", "setup.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
