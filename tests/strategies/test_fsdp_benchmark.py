"""benchmarks/fsdp_train.py runs on CPU with a tiny config (its figures come from 2-GPU runs, not from here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fsdp_benchmark_runs_on_two_cpu_processes(tmp_path):
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    out_json = tmp_path / "fsdp.json"
    cmd = [
        sys.executable, "benchmarks/fsdp_train.py", "--accelerator", "cpu", "--devices", "2", "--tiny",
        "--strategies", "thunder_fsdp,fsdp", "--steps", "2", "--warmup", "1", "--json", str(out_json),
        "--timeout", "300",  # a stuck rank fails this test in minutes instead of holding CI
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "| strategy | tokens/s per device | step ms | peak memory GiB |" in proc.stdout
    assert "| fsdp | skipped: Lightning's FSDPStrategy (FSDP1) runs on GPUs only |" in proc.stdout
    results = {r["strategy"]: r for r in json.loads(out_json.read_text())["results"]}
    thunder = results["thunder_fsdp"]
    assert thunder["world_size"] == 2 and thunder["tokens_per_s_per_device"] > 0 and thunder["peak_gib"] > 0
    assert thunder["thunder_graphs"] == 1 and thunder["thunder_graph_breaks"] == 0
    assert thunder["env_on_every_rank"], "NCCL_NVLS_ENABLE=0 / TORCH_SYMM_MEM_DISABLE_MULTICAST=1 must reach every rank"
