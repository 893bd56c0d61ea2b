"""The examples run as users run them (a fresh interpreter each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_custom_plugin_example():
    out = _run("examples/custom_plugin.py")
    assert 'lightning_thunder trace "torch/SwapAndCount"' in out
    assert "relu_via_clamp(" in out and "'aten.clamp.default': 1" in out


def test_train_cpu_example_runs_a_few_steps():
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    out = _run("examples/train_cpu.py", "--steps", "3", "--batch", "2", "--seq", "32")
    assert "step    1  loss" in out and "validation loss" in out and "compiled 2 graphs" in out
