"""Where a training step's time goes: host (Python, launches) against GPU (kernels), for one mode.

Builds the same step as ``litgpt_train.py`` (model + loss, backward, fused AdamW) and reports, after
warm-up, the median wall time of a synchronized step, the median time until the step call returns
without synchronizing (the host's issue time: when it is close to the step time, the GPU waits for
the host), the summed GPU kernel time, and optionally writes a Chrome trace (CPU and CUDA) to inspect
gaps with ``chrome://tracing`` or Perfetto.

    python benchmarks/step_profile.py --mode thunder --model Llama-3.2-1B --n-layer 8 --trace step.json.gz
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litgpt_train import DTYPES, MODES, build_config, make_step_fn  # noqa: E402
from measure import kernel_time_ms, synchronize  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="thunder", choices=MODES)
    p.add_argument("--model", default="Llama-3.2-1B")
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trace", default=None, help="write a Chrome trace of one step here (.json or .json.gz)")
    args = p.parse_args(argv)
    from litgpt import GPT

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = build_config(args)
    with device:
        model = GPT(config).to(DTYPES[args.dtype])
    step, _ = make_step_fn(args.mode, model, device)
    idx = torch.randint(0, config.padded_vocab_size, (args.batch, args.seq), device=device)
    targets = torch.randint(0, config.padded_vocab_size, (args.batch, args.seq), device=device)
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
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        synchronize(device)
        with profile(activities=activities) as prof:
            step(idx, targets)
            synchronize(device)
        prof.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace}")


if __name__ == "__main__":
    main()
