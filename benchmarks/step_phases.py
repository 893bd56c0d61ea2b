"""Where a training step's wall time goes, without a profiler: forward, backward and optimizer, on the GPU and
on the host.

CUDA events recorded between the phases give the GPU time of each phase (an event completes when the GPU
reaches it, so a phase whose kernels wait for the host includes that wait); host timestamps give when the
host finished issuing each phase. A forward whose GPU time is close to its host time plus the work queued
at its end is bound by the host; a backward whose GPU time is well above its host time is bound by the GPU.
Unlike ``step_profile.py`` nothing slows the host down, so host-bound phases show their real length.

    python benchmarks/step_phases.py --mode thunder+fp8 --n-layer 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litgpt_train import build_step  # noqa: E402
from step_profile import add_step_arguments  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_phases.py times CUDA events: it needs a CUDA GPU")
    step, net, idx, targets = build_step(args, args.mode, torch.device("cuda"))
    optimizer = step.optimizer
    for _ in range(args.warmup):
        step(idx, targets)
    rows = []
    for _ in range(args.steps):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        events[0].record()
        loss = net(idx, targets)
        forward_issued = time.perf_counter()
        events[1].record()
        loss.backward()
        backward_issued = time.perf_counter()
        events[2].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        optimizer_issued = time.perf_counter()
        events[3].record()
        torch.cuda.synchronize()
        wall = time.perf_counter()
        rows.append(
            [
                (wall - t0) * 1e3,
                events[0].elapsed_time(events[1]),
                events[1].elapsed_time(events[2]),
                events[2].elapsed_time(events[3]),
                (forward_issued - t0) * 1e3,
                (backward_issued - t0) * 1e3,
                (optimizer_issued - t0) * 1e3,
            ]
        )
    wall, gpu_fwd, gpu_bwd, gpu_opt, host_fwd, host_bwd, host_opt = (statistics.median(c) for c in zip(*rows))
    print(
        f"{args.mode} on {torch.cuda.get_device_name()}: step {wall:.1f} ms | GPU forward {gpu_fwd:.1f}, backward "
        f"{gpu_bwd:.1f}, optimizer {gpu_opt:.1f} ms | host done issuing: forward at {host_fwd:.1f}, backward at "
        f"{host_bwd:.1f}, optimizer at {host_opt:.1f} ms (medians of {args.steps} steps)"
    )


if __name__ == "__main__":
    main()
