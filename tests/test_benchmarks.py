"""The benchmark scripts run on CPU with tiny configs (their figures come from GPU runs, not from here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_litgpt_train_benchmark_on_cpu(tmp_path):
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    out_json = tmp_path / "bench.json"
    out = _run("benchmarks/litgpt_train.py", "--model", "pythia-14m", "--steps", "2", "--device", "cpu", "--json", str(out_json))
    assert "| mode | step ms | tokens/s |" in out
    payload = json.loads(out_json.read_text())
    by_mode = {r["mode"]: r for r in payload["results"]}
    assert set(by_mode) == {"eager", "torch.compile", "thunder"}
    for mode in ("eager", "thunder"):
        assert by_mode[mode]["step_ms"] > 0, by_mode[mode]
    assert by_mode["thunder"]["thunder_graphs"] >= 1
    assert payload["peak"]["matmul_tflops"] > 0 and payload["flops_per_token"] > 0


def test_litgpt_train_benchmark_reports_unavailable_modes():
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    out = _run(
        "benchmarks/litgpt_train.py", "--model", "pythia-14m", "--n-layer", "1", "--steps", "1", "--warmup", "1",
        "--device", "cpu", "--modes", "thunder+fp8,torchao-fp8",
    )
    assert "| thunder+fp8 | skipped:" in out and "| torchao-fp8 | skipped:" in out


def test_kernels_benchmark_on_cpu(tmp_path):
    out_json = tmp_path / "kernels.json"
    out = _run("benchmarks/kernels.py", "--device", "cpu", "--modes", "eager,thunder", "--iters", "1", "--json", str(out_json))
    assert "| rmsnorm | thunder |" in out
    results = json.loads(out_json.read_text())["results"]
    assert all("error" not in r for r in results), [r for r in results if "error" in r]


def test_step_profile_breakdown_of_a_trace(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_profile import breakdown, kernel_family

    events = [
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50, "tid": 1},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "dur": 5, "tid": 1, "args": {"correlation": 7}},
        {"cat": "kernel", "name": "nvjet_sm90_tst_x", "ts": 100, "dur": 40, "args": {"correlation": 7}},
        {"cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 60, "dur": 5, "tid": 1, "args": {"correlation": 8}},
        {"cat": "kernel", "name": "fused_abc", "ts": 150, "dur": 10, "args": {"correlation": 8}},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    text = breakdown(str(path), 5)
    assert "GPU busy 0.1 ms of a 0.1 ms span (2 kernels" in text
    # The 10 us gap between the kernels starts two thirds into the 60 us span: the seventh tenth.
    assert "GPU idle ms by tenth of the span: 0.00 0.00 0.00 0.00 0.00 0.00 0.01 0.00 0.00 0.00" in text
    assert "| cuBLAS matmuls | 1 | 0.04 |" in text and "| aten::mm | 1 | 0.04 |" in text
    assert kernel_family("fused_abc") == "lightning_thunder fusion regions"


def test_step_phases_needs_a_gpu_and_says_so():
    """Without CUDA, step_phases.py (CUDA events) stops with a message naming what it needs, not a traceback."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    proc = subprocess.run(
        [sys.executable, "benchmarks/step_phases.py", "--mode", "thunder", "--n-layer", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "step_phases.py times CUDA events: it needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_e2e_train_benchmark_on_cpu(tmp_path):
    """Two of the user paths (the recipe run by the benchmark, the Trainer with compiled steps), a tiny model."""
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    out_json = tmp_path / "e2e.json"
    out = _run("benchmarks/e2e_train.py", "--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1",
               "--modes", "recipe,trainer-thunder,trainer-thunder-fsdp-fp8", "--clip", "1.0", "--json", str(out_json))
    assert "| mode | step ms | tokens/s | vs torch.compile | peak GiB | first step s | max micro-batch |" in out
    by_mode = {r["mode"]: r for r in json.loads(out_json.read_text())["results"]}
    assert set(by_mode) == {"recipe", "trainer-thunder", "trainer-thunder-fsdp-fp8"}
    # The FSDP / FP8 table: thunder_fsdp with ThunderFP8 (emulated on CPU) gathered the tiny model's 10 FP8 weights.
    assert "| mode | step ms | step / trainer-thunder's |" in out
    assert by_mode["trainer-thunder-fsdp-fp8"]["fp8_gathered"] == 10, by_mode["trainer-thunder-fsdp-fp8"]
    for r in by_mode.values():
        assert r["step_ms"] > 0 and r["first_step_s"] > 0, r
    assert by_mode["trainer-thunder"]["graphs"] >= 1 and by_mode["recipe"]["recipe_tokens_per_s"] > 0
