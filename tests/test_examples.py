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


def test_trainer_litgpt_example_runs_a_few_steps(tmp_path):
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    out = _run("examples/trainer_litgpt.py", "--steps", "3", "--layers", "2", "--seq", "32", "--micro-batch", "2",
               "--accelerator", "cpu", "--out", str(tmp_path))
    assert "FP8 off: " in out and "precision 32-true" in out
    assert "ThroughputMonitor: 3 batches" in out and "CompileReport:" in out and "finished: 3 steps" in out


def test_fabric_loss_in_graph_example():
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    out = _run("examples/fabric_loss_in_graph.py", "--steps", "2")
    assert "step 2: loss" in out and "1 linear + cross_entropy -> linear_cross_entropy" in out
    assert "in the final forward: " in out and "torch.ops.lightning_thunder.linear_cross_entropy.default(" in out


def test_make_train_runs_the_debug_recipe():
    """The README's main job is one recipe (the recipe itself is tested in tests/recipes)."""
    makefile = (ROOT / "Makefile").read_text()
    assert "\t$(VENV)/bin/lightning-thunder pretrain --config examples/recipes/debug.yaml $(ARGS)\n" in makefile
    assert not (ROOT / "examples" / "train_cpu.py").exists()
