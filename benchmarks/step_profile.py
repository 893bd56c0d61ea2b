"""Where a training step's time goes: host (Python, launches) against GPU (kernels), for one mode.

Builds the same step as ``litgpt_train.py`` (model + loss, backward, fused AdamW) and reports, after
warm-up, the median wall time of a synchronized step, the median time until the step call returns
without synchronizing (the host's issue time: when it is close to the step time, the GPU waits for
the host), the summed GPU kernel time, and optionally writes a Chrome trace (CPU and CUDA) to inspect
gaps with ``chrome://tracing`` or Perfetto.

    python benchmarks/step_profile.py --mode thunder --model Llama-3.2-1B --n-layer 8 --trace step.json.gz
    python benchmarks/step_profile.py --mode thunder+fp8 --n-layer 8 --breakdown 20   # where the time goes
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litgpt_train import DTYPES, MODES, build_step  # noqa: E402
from measure import kernel_time_ms, synchronize  # noqa: E402


def kernel_family(name: str) -> str:
    """A short family name for a GPU kernel (generated kernels by generator, library kernels by library)."""
    for prefix, family in (
        ("fused_", "lightning_thunder fusion regions"),
        ("triton_", "torch.compile (Inductor) kernels"),
        ("nvjet", "cuBLAS matmuls"),
        ("Memset", "memsets"),
        ("Memcpy", "memcpys"),
    ):
        if name.startswith(prefix):
            return family
    if "sdpa" in name or "cudnn" in name or "flash" in name:
        return "attention (cuDNN/flash)"
    if "multi_tensor_apply" in name:
        return "optimizer (multi-tensor)"
    return name.split("<")[0].split("(")[0].removeprefix("void ")[:60]


def breakdown(trace_path: str, rows: int) -> str:
    """GPU time of one step by kernel family and by the CPU op that launched each kernel, from a Chrome
    trace (``prof.export_chrome_trace``), plus the GPU's idle time inside the step."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    if not gpu:
        return "no GPU events (CPU run)"
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    cpu_ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu_ops]

    def launcher(kernel: dict) -> str:
        launch = launches.get(kernel["args"].get("correlation"))
        if launch is None:
            return "?"
        best = None
        for k in range(bisect.bisect_right(starts, launch["ts"]) - 1, -1, -1):
            op = cpu_ops[k]
            if op["tid"] == launch["tid"] and op["ts"] + op["dur"] >= launch["ts"] + launch["dur"]:
                best = op if best is None or op["dur"] < best["dur"] else best
            if launch["ts"] - op["ts"] > 5e5:  # 0.5 s back is far enough
                break
        return best["name"] if best else "(no op: generated kernel or library call)"

    by_family: dict[str, list[float]] = {}
    by_op: dict[str, list[float]] = {}
    for k in gpu:
        for table, key in ((by_family, kernel_family(k["name"])), (by_op, launcher(k))):
            entry = table.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += k["dur"]
    intervals = sorted((k["ts"], k["ts"] + k["dur"]) for k in gpu)
    start = intervals[0][0]
    span = max(b for _, b in intervals) - start
    busy, end = 0.0, start
    idle_by_tenth = [0.0] * 10  # GPU idle time in each tenth of the step: where the host fell behind
    for a, b in intervals:
        if a > end:
            idle_by_tenth[min(9, int(10 * (end - start) / span))] += a - end
        if b > end:
            busy += b - max(a, end)
            end = b
    lines = [
        f"GPU busy {busy / 1e3:.1f} ms of a {span / 1e3:.1f} ms span ({len(gpu)} kernels/memsets/memcpys)",
        "GPU idle ms by tenth of the span: " + " ".join(f"{us / 1e3:.2f}" for us in idle_by_tenth),
    ]
    for title, table in (("kernel family", by_family), ("launched by", by_op)):
        lines.append(f"\n| {title} | launches | GPU ms |\n| --- | ---: | ---: |")
        for key, (n, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[:rows]:
            lines.append(f"| {key} | {n} | {us / 1e3:.2f} |")
    return "\n".join(lines)


def host_profile(fn, device: torch.device, rows: int, steps: int = 3) -> str:
    """The functions that take the host's time during ``steps`` calls of ``fn`` (cProfile, by own time), to
    find what keeps the GPU waiting when the host issue time is close to the step time."""
    import cProfile
    import io
    import pstats

    synchronize(device)
    profiler = cProfile.Profile()
    # The backward runs on the autograd engine's device thread, which cProfile does not see: run it on this one.
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        for _ in range(steps):
            fn()
        profiler.disable()
    synchronize(device)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return out.getvalue()


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose the benchmarked step (mode, model and its size, batch, sequence, dtype)."""
    p.add_argument("--mode", default="thunder", choices=MODES)
    p.add_argument("--model", default="Llama-3.2-1B")
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trace", default=None, help="write a Chrome trace of one step here (.json or .json.gz)")
    p.add_argument("--breakdown", type=int, default=0, help="print this many rows of GPU time by kernel family and op")
    p.add_argument(
        "--gpu-only",
        action="store_true",
        help="record GPU activity only (no CPU ops): the host runs at nearly its unprofiled speed, so the GPU idle "
        "time by tenth is the real one (the 'launched by' table is then empty)",
    )
    p.add_argument(
        "--host-profile", type=int, default=0, help="print this many functions by host (Python) time over 3 steps (cProfile)"
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    step, _, idx, targets = build_step(args, args.mode, device)
    for _ in range(3):
        step(idx, targets)
    synchronize(device)
    wall, issue = [], []
    for _ in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        step(idx, targets)
        issue.append((time.perf_counter() - t0) * 1e3)
        synchronize(device)
        wall.append((time.perf_counter() - t0) * 1e3)
    gpu = kernel_time_ms(lambda: step(idx, targets), device, iters=3)
    print(
        f"{args.mode}: step {statistics.median(wall):.1f} ms, host issue {statistics.median(issue):.1f} ms, "
        f"GPU kernels {gpu:.1f} ms"
        if gpu is not None
        else f"{args.mode}: step {statistics.median(wall):.1f} ms"
    )
    if args.host_profile:
        print(host_profile(lambda: step(idx, targets), device, args.host_profile))
    if args.trace or args.breakdown:
        from torch.profiler import ProfilerActivity, profile

        activities = [] if args.gpu_only else [ProfilerActivity.CPU]
        activities += [ProfilerActivity.CUDA] if device.type == "cuda" else []
        synchronize(device)
        with profile(activities=activities) as prof:
            step(idx, targets)
            synchronize(device)
        path = args.trace or str(Path(tempfile.mkdtemp()) / "step.json")
        prof.export_chrome_trace(path)
        if args.trace:
            print(f"trace written to {args.trace}")
        if args.breakdown:
            print(breakdown(path, args.breakdown))


if __name__ == "__main__":
    main()
