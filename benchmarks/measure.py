"""Shared measurement helpers for the benchmarks: timing, device peaks, kernel counts, versions, and running each
mode in a worker process.

Peaks are *measured* on the card in the same run (never taken from a spec sheet): the bf16 matmul
rate of a large square GEMM and the bandwidth of a large device-to-device copy.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronized before and after each call)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n GEMM on ``device``."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=5, iters=20 if device.type == "cuda" else 3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Measured copy bandwidth (GB/s, bytes read + written) of a large device-to-device copy."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 64 << 20)
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=5, iters=20 if device.type == "cuda" else 5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def count_kernels(fn: Callable[[], object], device: torch.device) -> int | None:
    """Number of GPU kernels one call of ``fn`` launches (torch profiler); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def environment(device: torch.device) -> dict[str, str]:
    """Card, versions and date for the results table."""
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def top_kernels(
    fn: Callable[[], object], device: torch.device, n: int = 15, *, by: str = "us"
) -> list[dict[str, object]]:
    """The ``n`` GPU kernels of one call of ``fn`` with the most total time (``by="us"``) or the most
    launches (``by="calls"``): name, calls, total µs. Memcpy/memset events count as kernels here."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    key = 0 if by == "calls" else 1
    rows = sorted(totals.items(), key=lambda kv: (-kv[1][key], -kv[1][1 - key]))[:n]
    return [{"kernel": name[:90], "calls": int(c), "us": round(t, 1)} for name, (c, t) in rows]


def kernel_time_ms(fn: Callable[[], object], device: torch.device, *, iters: int = 10) -> float | None:
    """GPU time of the kernels one call of ``fn`` launches (median over ``iters`` profiled calls), in ms.

    Unlike :func:`time_ms` this excludes the host-side cost of the call (guards, wrappers, launches),
    so bytes / kernel time measures the kernels themselves. ``None`` off CUDA.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            synchronize(device)
        total = 0.0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                total += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        samples.append(total / 1e3)
    return statistics.median(samples)


# ----------------------------------------------------------------------------------------------- worker processes
# Each benchmark runs every mode in a fresh process: the script calls itself with --worker MODE --worker-out FILE,
# the worker writes one JSON result there, and the parent collects the results into its table.


class Unavailable(RuntimeError):
    """The mode cannot run here (missing package or hardware); the message says why."""


def parent_argv(argv: list[str]) -> list[str]:
    """``argv`` without the ``--worker``/``--worker-out`` flags (and their values) a worker was started with."""
    out = list(argv)
    for flag in ("--worker", "--worker-out"):
        if flag in out:
            i = out.index(flag)
            del out[i : i + 2]
    return out


def worker_result(run: Callable[[], dict | None], key: str, name: str) -> dict | None:
    """``run()``'s result, or ``{key: name, "skipped": ...}`` / ``{key: name, "error": ...}`` when it could not run
    (reported in the table; the other modes still run)."""
    try:
        return run()
    except Unavailable as e:
        return {key: name, "skipped": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001 - any failure of one mode is that mode's table row
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return {key: name, "error": f"failed: {type(e).__name__}: {lines[0] if lines else ''}"[:300]}


def spawn_worker(
    script: str, argv: list[str], name: str, key: str, timeout: float, env: dict[str, str] | None = None
) -> dict:
    """Run ``script`` with ``argv --worker name`` in a fresh process and return its JSON result (or why there is
    none: the end of its output, or the timeout)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = Path(f.name)
    cmd = [sys.executable, script, *argv, "--worker", name, "--worker-out", str(out_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        out_path.unlink(missing_ok=True)
        return {key: name, "error": f"timed out after {timeout} s"}
    try:
        text = out_path.read_text()
        out_path.unlink()
        if text:
            return json.loads(text)
    except (OSError, json.JSONDecodeError):
        pass
    tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-8:]
    return {key: name, "error": f"exit code {proc.returncode}: " + " | ".join(tail)}
