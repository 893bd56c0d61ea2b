"""LitGPT training-step benchmark: eager vs torch.compile vs lightning_thunder, side by side, one run.

One step = forward, cross-entropy loss, backward, fused AdamW step, zero_grad. For compiled modes the
loss is computed inside the compiled region (the model and the loss are one module), as LitGPT's
recipes do. Each mode runs in its own process, one after the other; the card's bf16 matmul peak is
measured in the same run (its own process first) and MFU is reported against it.

    python benchmarks/litgpt_train.py --model Llama-3.2-1B --n-layer 8 --batch 4 --seq 2048 \\
        --dtype bf16 --modes eager,torch.compile,thunder --json results.json

Modes: ``eager``, ``torch.compile`` (Inductor, default mode), ``torch.compile-reduce-overhead``
(``torch.compile(mode="reduce-overhead")``: Inductor with CUDA graphs), ``thunder`` (lightning_thunder with its
default plugins), ``thunder+fp8`` (needs the FP8 plugin), ``thunder+cudagraphs`` and ``thunder+fp8+cudagraphs``
(the same with the CUDAGraphs plugin: forward and backward replayed as CUDA graphs; the table's notes give its
graphs, replays and memory pool), ``torchao-fp8`` (torchao float8 training + torch.compile; needs torchao). A mode
that cannot run on this machine is reported with the reason.

FLOPs per token (analytic, stated in the output): 6 x (parameters of every matmul weight, lm_head
included) + 12 x n_layer x (n_head x head_size) x seq for attention scores and values (the PaLM
convention: causal masking not discounted).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    Unavailable,
    count_kernels,
    environment,
    matmul_tflops,
    parent_argv,
    spawn_worker,
    synchronize,
    top_kernels,
    worker_result,
)

MODES = (
    "eager",
    "torch.compile",
    "torch.compile-reduce-overhead",
    "thunder",
    "thunder+fp8",
    "thunder+cudagraphs",
    "thunder+fp8+cudagraphs",
    "torchao-fp8",
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_config(args: argparse.Namespace):
    from litgpt import Config

    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    return Config.from_name(args.model, **overrides)


def flops_per_token(config, seq: int) -> tuple[float, int]:
    """Analytic training FLOPs per token and the matmul parameter count behind them."""
    from litgpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * config.n_layer * config.n_head * config.head_size * seq
    return 6 * matmul_params + attention, matmul_params


class WithLoss(torch.nn.Module):
    """The model and its loss as one module, so compiled modes compile the loss too."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(idx)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def thunder_plugins(exclude: str = "") -> list:
    """lightning_thunder's default plugins without those whose class names ``exclude`` lists (comma-separated)."""
    import lightning_thunder

    names = {n for n in exclude.split(",") if n}
    return [p for p in lightning_thunder.default_plugins() if type(p).__name__ not in names]


def make_step_fn(mode: str, model: torch.nn.Module, device: torch.device, exclude: str = ""):
    """Returns ``(step, net)``: ``step(idx, targets) -> loss`` for ``mode`` (its optimizer is ``step.optimizer``)
    and the compiled (or eager) model with the loss, ``net(idx, targets) -> loss``. ``exclude`` names default
    plugins the thunder modes leave out (``FusedLinearCrossEntropy``: the loss fused as before that plugin)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if mode == "torchao-fp8":
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError as e:
            raise Unavailable(f"torchao is not importable ({e})") from e
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise Unavailable("float8 needs a CUDA device with compute capability >= 8.9")
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn != "lm_head")
    if mode.startswith("thunder+fp8"):
        import lightning_thunder.plugins as plugins

        if not hasattr(plugins, "FP8"):
            raise Unavailable("lightning_thunder.plugins.FP8 does not exist yet (fp8 issue)")
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise Unavailable("FP8 needs a CUDA device with compute capability >= 8.9")
    if mode == "torch.compile-reduce-overhead" and device.type != "cuda":
        raise Unavailable("reduce-overhead captures CUDA graphs: it needs a CUDA device")
    wrapped = WithLoss(model)
    cudagraphs = None
    if mode == "eager":
        net = wrapped
    elif mode in ("torch.compile", "torchao-fp8"):
        net = torch.compile(wrapped)
    elif mode == "torch.compile-reduce-overhead":
        net = torch.compile(wrapped, mode="reduce-overhead")
    else:  # the thunder modes
        import lightning_thunder

        compiler_plugins = thunder_plugins(exclude)
        if "+fp8" in mode:
            from lightning_thunder.plugins import FP8

            compiler_plugins.append(FP8())
        if mode.endswith("+cudagraphs"):
            from lightning_thunder.plugins import CUDAGraphs

            cudagraphs = CUDAGraphs()
            compiler_plugins.append(cudagraphs)
        net = lightning_thunder.compile(wrapped, plugins=compiler_plugins)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)

    reduce_overhead = mode == "torch.compile-reduce-overhead"

    def step(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if reduce_overhead:  # a new step: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        loss = net(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # reduce-overhead hands out the graph's own output, overwritten by the next step: keep a copy, as users do
        return loss.detach().clone() if reduce_overhead else loss

    step.optimizer = opt
    step.cudagraphs = cudagraphs  # the CUDAGraphs plugin of the +cudagraphs modes (its stats), else None
    return step, net


def build_step(args: argparse.Namespace, mode: str, device: torch.device):
    """``(step, net, idx, targets)``: the model of ``args`` (model, n_layer, dtype) built on ``device`` with seed 0,
    :func:`make_step_fn`'s step and net for ``mode``, and one random batch of ``args.batch`` x ``args.seq`` tokens."""
    from litgpt import GPT

    torch.manual_seed(0)
    config = build_config(args)
    with device:
        model = GPT(config).to(DTYPES[args.dtype])
    step, net = make_step_fn(mode, model, device, getattr(args, "exclude_plugins", ""))
    idx = torch.randint(0, config.padded_vocab_size, (args.batch, args.seq), device=device)
    targets = torch.randint(0, config.padded_vocab_size, (args.batch, args.seq), device=device)
    return step, net, idx, targets


def run_mode(args: argparse.Namespace) -> dict:
    """Worker: benchmark one mode in this process and return its measurements."""
    device = torch.device(args.device)
    step, net, idx, targets = build_step(args, args.worker, device)

    synchronize(device)
    t0 = time.perf_counter()
    loss = step(idx, targets)
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(max(0, args.warmup - 1)):
        step(idx, targets)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = step(idx, targets)
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    kernels = count_kernels(lambda: step(idx, targets), device)
    profile = top_kernels(lambda: step(idx, targets), device, args.profile) if args.profile else []
    census = top_kernels(lambda: step(idx, targets), device, args.census, by="calls") if args.census else []
    result = {
        "mode": args.worker,
        "step_ms": sorted(times)[len(times) // 2],
        "first_step_s": first_step_s,
        "peak_gib": peak_gib,
        "kernels_per_step": kernels,
        "loss": float(loss),
        "top_kernels": profile,
        "kernel_census": census,
    }
    if args.worker.startswith("thunder"):
        import lightning_thunder

        stats = lightning_thunder.compile_stats(net)
        result["thunder_graphs"] = stats.graphs
        result["thunder_executor_counts"] = stats.executor_counts
        result["thunder_fusion_regions"] = stats.fusion_regions
    if step.cudagraphs is not None:
        graphs = step.cudagraphs.stats()
        result["cudagraphs"] = {
            "segments": graphs.segments,
            "graphs": graphs.graphs,
            "replays": graphs.replays,
            "uncaptured_calls": graphs.uncaptured_calls,
            "pool_gib": graphs.pool_bytes / 2**30,
            "uncaptured": graphs.uncaptured,
        }
    return result


def run_peak(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    return {"matmul_tflops": matmul_tflops(device, DTYPES[args.dtype]), "environment": environment(device)}


def spawn(args: argparse.Namespace, worker: str) -> dict:
    """Run ``worker`` in a fresh process and return its JSON result (or the reason it failed)."""
    return spawn_worker(__file__, args.argv, worker, "mode", args.timeout)


def table(results: list[dict], peak: dict, tokens_per_step: int, flops_token: float) -> str:
    eager = next((r for r in results if r.get("mode") == "eager" and "step_ms" in r), None)
    compiled = next((r for r in results if r.get("mode") == "torch.compile" and "step_ms" in r), None)
    rows = [
        "| mode | step ms | tokens/s | vs eager | vs torch.compile | MFU | peak GiB | first step s | kernels/step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "step_ms" not in r:
            rows.append(f"| {r['mode']} | {r.get('skipped') or r.get('error')} | | | | | | | |")
            continue
        tps = tokens_per_step / (r["step_ms"] / 1e3)
        mfu = tps * flops_token / (peak["matmul_tflops"] * 1e12)
        vs_eager = f"{eager['step_ms'] / r['step_ms']:.2f}x" if eager else "-"
        vs_tc = f"{compiled['step_ms'] / r['step_ms']:.2f}x" if compiled else "-"
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a (CPU)"
        kern = str(r["kernels_per_step"]) if r["kernels_per_step"] is not None else "n/a (CPU)"
        rows.append(
            f"| {r['mode']} | {r['step_ms']:.1f} | {tps:,.0f} | {vs_eager} | {vs_tc} | {mfu:.1%} | {mem} | "
            f"{r['first_step_s']:.1f} | {kern} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.2-1B", help="LitGPT config name (Config.from_name)")
    p.add_argument("--n-layer", type=int, default=None, help="override the config's number of layers")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048 on CUDA, 128 on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--modes", default="eager,torch.compile,thunder", help=f"comma-separated, from {MODES}")
    p.add_argument(
        "--exclude-plugins", default="", help="default plugins the thunder modes leave out, by class name (comma-separated)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (the first one compiles)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per mode")
    p.add_argument("--profile", type=int, default=0, help="also list this many top GPU kernels per mode")
    p.add_argument("--census", type=int, default=0, help="also list this many most-launched GPU kernels per mode")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.batch = args.batch or (4 if on_cuda else 2)
    args.seq = args.seq or (2048 if on_cuda else 128)
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.argv = parent_argv(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    args.mode_list = modes
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        result = worker_result(lambda: run_peak(args) if args.worker == "peak" else run_mode(args), "mode", args.worker)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return
    config = build_config(args)
    flops_token, matmul_params = flops_per_token(config, args.seq)
    peak = spawn(args, "peak")
    if "matmul_tflops" not in peak:
        raise SystemExit(f"could not measure the matmul peak: {peak.get('error')}")
    results = []
    for mode in args.mode_list:
        t0 = time.perf_counter()
        results.append(spawn(args, mode))
        r = results[-1]
        summary = f"{r['step_ms']:.1f} ms/step" if "step_ms" in r else r.get("skipped") or r.get("error")
        print(f"{mode}: {summary} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    tokens_per_step = args.batch * args.seq
    env = peak["environment"]
    print(
        f"\n{config.name}, n_layer={config.n_layer}, batch={args.batch}, seq={args.seq}, {args.dtype}; "
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}\n"
        f"measured {args.dtype} matmul peak: {peak['matmul_tflops']:.1f} TFLOP/s; "
        f"FLOPs/token = 6 x {matmul_params / 1e6:.1f}M matmul params + attention = {flops_token / 1e9:.2f} GFLOP; "
        f"median of {args.steps} steps after {args.warmup} warm-up; peak memory over the timed steps\n"
    )
    print(table(results, peak, tokens_per_step, flops_token))
    for r in results:
        if r.get("cudagraphs"):
            g = r["cudagraphs"]
            print(
                f"\n{r['mode']}: {g['segments']} segments, {g['graphs']} CUDA graphs, {g['replays']} replays, "
                f"{g['uncaptured_calls']} uncaptured segment calls, memory pool {g['pool_gib']:.2f} GiB"
                + "".join(f"\n  uncaptured: {k}: {v}" for k, v in g["uncaptured"].items())
            )
    for r in results:
        if r.get("top_kernels"):
            print(f"\ntop GPU kernels, {r['mode']} (one step):")
            for k in r["top_kernels"]:
                print(f"  {k['us'] / 1e3:8.2f} ms  {k['calls']:4d} x  {k['kernel']}")
        if r.get("kernel_census"):
            print(f"\nmost-launched GPU kernels, {r['mode']} (one step):")
            for k in r["kernel_census"]:
                print(f"  {k['calls']:4d} x  {k['us'] / 1e3:8.2f} ms  {k['kernel']}")
    if args.json:
        payload = {
            "command": "python benchmarks/litgpt_train.py " + " ".join(argv),
            "config": {"model": config.name, "n_layer": config.n_layer, "batch": args.batch, "seq": args.seq, "dtype": args.dtype},
            "flops_per_token": flops_token,
            "peak": peak,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
