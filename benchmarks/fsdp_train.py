"""Sharded training benchmark: a LitGPT Llama-style model trained with Fabric, strategies side by side.

Each strategy runs in its own set of processes, one strategy after the other; Fabric launches the ranks
(no torchrun). Prints, per strategy, per-GPU tokens/s (median step) and peak memory, as a markdown table.

    python benchmarks/fsdp_train.py --strategies thunder_fsdp,model_parallel_compile,fsdp --devices 2 \\
        --model Llama-3.2-1B --n-layer 8 --batch 4 --seq 2048 --json fsdp.json

Strategies (all shard per transformer block plus the root, and use Fabric's ``precision``):

- ``thunder_fsdp``: lightning_thunder's strategy (FSDP2; each block compiled by lightning_thunder).
- ``model_parallel_compile``: Lightning's ``ModelParallelStrategy``; FSDP2 with each block ``torch.compile``d
  (Inductor), the recipe Lightning documents.
- ``model_parallel``: the same, eager.
- ``fsdp``: Lightning's ``FSDPStrategy`` (FSDP1), eager, auto-wrapped per block (GPU only: Lightning refuses it
  on CPU, and the table says so).

A step is forward, cross-entropy, backward and AdamW (fused on CUDA) on a micro-batch of ``--batch`` sequences
per device. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (the maximum over ranks);
on CPU it is the process's maximum resident set size instead. For a quick CPU run: ``--accelerator cpu --tiny``.

NCCL's NVLink SHARP (``NCCL_NVLS_ENABLE=0``) and PyTorch's symmetric-memory multicast
(``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``) are switched off for this process and every rank it launches.
"""

from __future__ import annotations

import os

# Before torch is imported, and inherited by every process launched from here (workers and their ranks).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Unavailable, parent_argv, spawn_worker, worker_result  # noqa: E402

STRATEGIES = ("thunder_fsdp", "model_parallel_compile", "model_parallel", "fsdp")
ENV_KEYS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")
#: ``--tiny``: a 2-layer Llama-style config for CPU runs and tests.
TINY = dict(
    n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, vocab_size=256, padded_vocab_size=256,
    block_size=128,
)


def build_config(args: argparse.Namespace):
    from litgpt import Config

    overrides = dict(TINY) if args.tiny else {}
    if args.n_layer:
        overrides["n_layer"] = args.n_layer
    overrides["block_size"] = max(args.seq, overrides.get("block_size", 0))
    return Config.from_name(args.model, **overrides)


def _block_class():
    from litgpt.model import Block

    return Block


def _fsdp2_parallelize(compile_blocks: bool, precision: str, activation_checkpointing: bool):
    """Lightning's documented ModelParallelStrategy recipe: (checkpoint,) compile, shard each block; shard the root."""

    def parallelize(model: torch.nn.Module, device_mesh) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from lightning_thunder.plugins import checkpoint_block

        mesh = device_mesh["data_parallel"]
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16-mixed"
            else MixedPrecisionPolicy()
        )
        for block in model.transformer.h:
            if activation_checkpointing:
                checkpoint_block(block)
            if compile_blocks:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    return parallelize


def make_strategy(args: argparse.Namespace):
    if args.worker == "thunder_fsdp":
        from lightning_thunder.strategies import ThunderFSDPStrategy

        return ThunderFSDPStrategy(activation_checkpointing=args.activation_checkpointing)
    if args.worker in ("model_parallel_compile", "model_parallel"):
        from lightning.fabric.strategies import ModelParallelStrategy

        fn = _fsdp2_parallelize(args.worker == "model_parallel_compile", args.precision, args.activation_checkpointing)
        return ModelParallelStrategy(parallelize_fn=fn, data_parallel_size=args.devices, tensor_parallel_size=1)
    if args.worker == "fsdp":
        if args.accelerator == "cpu":
            raise Unavailable("Lightning's FSDPStrategy (FSDP1) runs on GPUs only")
        from lightning.fabric.strategies import FSDPStrategy

        block = _block_class()
        return FSDPStrategy(
            auto_wrap_policy={block},
            activation_checkpointing_policy={block} if args.activation_checkpointing else None,
            sharding_strategy="FULL_SHARD",
        )
    raise ValueError(f"unknown strategy {args.worker!r}; choose from {STRATEGIES}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(args: argparse.Namespace) -> dict | None:
    """One strategy on ``--devices`` ranks (Fabric launches them); rank 0 returns the gathered measurements."""
    from lightning.fabric import Fabric
    from litgpt import GPT

    import lightning_thunder as lt

    fabric = Fabric(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=make_strategy(args),
        precision=args.precision,
    )
    fabric.launch()
    fabric.seed_everything(1234)
    config = build_config(args)
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    model = fabric.setup_module(model)
    device = fabric.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    optimizer = fabric.setup_optimizers(optimizer)
    idx = torch.randint(0, config.padded_vocab_size, (args.batch, args.seq + 1), device=device)
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def step() -> torch.Tensor:
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(max(0, args.warmup - 1)):
        step()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        fabric.barrier()
        synchronize(device)
        t0 = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # ru_maxrss is in KiB on Linux
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mine = torch.tensor([args.batch * args.seq / statistics.median(times), peak_gib, first_step_s], device=device)
    every = fabric.all_gather(mine).reshape(-1, 3).cpu()
    env_ok = torch.tensor([float(all(os.environ.get(k) == v for k, v in zip(ENV_KEYS, ("0", "1"))))], device=device)
    env_all = fabric.all_gather(env_ok).reshape(-1).cpu()
    loss = fabric.all_reduce(loss.float(), reduce_op="mean")
    result = None
    if fabric.global_rank == 0:
        result = {
            "strategy": args.worker,
            "tokens_per_s_per_device": float(every[:, 0].mean()),
            "tokens_per_s_per_device_min": float(every[:, 0].min()),
            "step_ms": 1e3 * statistics.median(times),
            "peak_gib": float(every[:, 1].max()),
            "peak_kind": "CUDA max allocated" if device.type == "cuda" else "CPU max RSS",
            "first_step_s": float(every[:, 2].max()),
            "loss": float(loss),
            "world_size": fabric.world_size,
            "env_on_every_rank": bool(env_all.all()),
        }
        if args.worker == "thunder_fsdp":
            stats = lt.compile_stats(model)
            result.update(thunder_graphs=stats.graphs, thunder_graph_breaks=len(stats.graph_breaks))
    fabric.barrier()
    return result


def spawn(args: argparse.Namespace, strategy: str) -> dict:
    """Run one strategy in fresh processes and return its result (or why it did not run)."""
    # Fabric launches this strategy's ranks itself: rank variables inherited from a surrounding job would
    # make it believe it is already one of them (and wait forever for the others). Multi-node runs pass
    # --num-nodes and their own launcher.
    rank_vars = ("LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if args.num_nodes > 1 or k not in rank_vars}
    return spawn_worker(str(Path(__file__).resolve()), args.argv, strategy, "strategy", args.timeout, env=env)


def table(results: list[dict]) -> str:
    rows = [
        "| strategy | tokens/s per device | step ms | peak memory GiB | first step s | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "tokens_per_s_per_device" not in r:
            rows.append(f"| {r['strategy']} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        rows.append(
            f"| {r['strategy']} | {r['tokens_per_s_per_device']:,.0f} | {r['step_ms']:.1f} | "
            f"{r['peak_gib']:.2f} ({r['peak_kind']}) | {r['first_step_s']:.1f} | {r['loss']:.3f} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="thunder_fsdp,model_parallel_compile,fsdp", help=f"from {STRATEGIES}")
    p.add_argument("--accelerator", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--devices", type=int, default=2, help="devices per node")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--model", default="Llama-3.2-1B", help="LitGPT config name (Config.from_name)")
    p.add_argument("--n-layer", type=int, default=None, help="override the config's number of layers")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide Llama-style config (CPU runs, tests)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch per device (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048 on CUDA, 64 on CPU)")
    p.add_argument("--precision", default=None, help="Fabric precision (default bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--activation-checkpointing", action="store_true", help="checkpoint every block")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (the first one compiles)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per strategy")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_cuda = args.accelerator in ("cuda", "gpu")
    args.batch = args.batch or (4 if on_cuda else 2)
    args.seq = args.seq or (2048 if on_cuda else 64)
    args.precision = args.precision or ("bf16-mixed" if on_cuda else "32-true")
    args.argv = parent_argv(argv)
    args.strategy_list = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in args.strategy_list if s not in STRATEGIES]
    if bad:
        p.error(f"unknown strategy(ies) {bad}; choose from {list(STRATEGIES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        result = worker_result(lambda: run_worker(args), "strategy", args.worker)
        first_rank = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
        if result is not None and args.worker_out and first_rank:  # other ranks' failures are in the log
            Path(args.worker_out).write_text(json.dumps(result))
        return
    results = []
    for strategy in args.strategy_list:
        t0 = time.perf_counter()
        results.append(spawn(args, strategy))
        r = results[-1]
        summary = f"{r['step_ms']:.1f} ms/step" if "step_ms" in r else r.get("skipped") or r.get("error")
        print(f"{strategy}: {summary} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    config = build_config(args)
    card = torch.cuda.get_device_name() if args.accelerator in ("cuda", "gpu") and torch.cuda.is_available() else "CPU"
    print(
        f"\n{config.name}{' (--tiny)' if args.tiny else ''}, n_layer={config.n_layer}, n_embd={config.n_embd}; "
        f"micro-batch {args.batch} x seq {args.seq} per device; {args.num_nodes * args.devices} x {card}; "
        f"precision {args.precision}; activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
        f"torch {torch.__version__}, Python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}\n"
        f"median of {args.steps} steps after {args.warmup} warm-up; "
        "NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1\n"
    )
    print(table(results))
    if args.json:
        payload = {
            "command": "python benchmarks/fsdp_train.py " + " ".join(argv),
            "config": {"model": config.name, "n_layer": config.n_layer, "batch": args.batch, "seq": args.seq},
            "precision": args.precision,
            "devices": args.num_nodes * args.devices,
            "card": card,
            "torch": torch.__version__,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
