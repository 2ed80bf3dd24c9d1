"""The tree is as ruff (configured in pyproject.toml, pinned in the test extra) leaves it: lint clean and formatted,
so a change that breaks either fails here rather than in a reviewer's eye."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_finds_nothing(args):
    pytest.importorskip("ruff")
    done = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
