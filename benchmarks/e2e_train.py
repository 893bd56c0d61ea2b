"""The paths users train with, side by side on one card: our recipe and strategies against torch.compile's.

Each mode runs in its own process, one after the other, on the same model and batch shape:

- ``recipe``: ``lightning_thunder.recipes.pretrain`` on ``examples/recipes/llama-3.2-1b.yaml`` (micro-batch = global
  batch: no accumulation; validation off; its checkpoint write skipped, as a step's time does not include it).
- ``fabric-compile``: the loop ``litgpt pretrain`` runs: ``torch.compile(GPT)``, ``fabric.setup``, the loss
  (``litgpt.utils.chunked_cross_entropy``) outside the compiled model, clipping at norm 1, fused AdamW.
- ``fabric-thunder``: the same loop with ``Fabric(strategy="thunder")`` and ``ModelWithLoss(GPT, loss)``: the model and
  the loss one compiled graph (what the recipe builds).
- ``trainer-thunder``: ``Trainer(strategy="thunder")``; the LightningModule's ``training_step`` computes the loss.
- ``trainer-compile``: the same LightningModule with ``torch.compile`` applied in ``configure_model``, default strategy.
- ``trainer-thunder-fp8``: ``trainer-thunder`` with ``plugins=[ThunderFP8()]`` (bf16 weights, FP8 matmuls).
- ``trainer-thunder-fsdp``: ``Trainer(strategy="thunder_fsdp")`` on the same single device (FSDP2 units, blocks compiled
  one by one, the steps compiled around them).
- ``trainer-thunder-fsdp-fp8``: ``thunder_fsdp`` with ``ThunderFP8()``: the blocks' FP8 weights all-gathered in FP8
  (``all_gather="fp8"``, the default); ``trainer-thunder-fsdp-fp8-bf16ag``: the same with ``all_gather="bf16"``.
  These four are compared with ``trainer-thunder`` in a second table: per phase (forward, backward, clipping +
  optimizer; GPU time between CUDA events recorded by a callback, and when the host finished issuing each phase),
  the number of weights gathered in FP8, and with ``--profile-rows N`` where one step's GPU time goes (kernel
  families and the CPU ops that launched them, from ``step_profile.py``'s breakdown).

Every mode: ``--precision`` (Lightning's setting), AdamW fused on CUDA. Reported per mode: median step time over
``--steps`` steps after ``--warmup`` (the first compiles), tokens/s, the ratio to the torch.compile path of the same
kind (recipe and fabric-thunder against fabric-compile, trainer-thunder against trainer-compile), CUDA peak allocated
memory over the whole run (the first step included: it has to fit too), the first step's time (compilation included),
and with ``--max-batch`` the largest micro-batch that fits (Fabric modes; the recipe runs fabric-thunder's module,
loss, optimizer and strategy). The search, in the mode's process after the timed steps: twice the batch, then the
size a straight line through the two peaks predicts for the card's memory, then one more, then bisection; each size
runs two steps (a new size may recompile once, with a dynamic batch dimension).

    python benchmarks/e2e_train.py --modes recipe,fabric-compile,fabric-thunder --batch 4 --seq 2048 --max-batch
    python benchmarks/e2e_train.py --modes trainer-thunder,trainer-compile --n-layer 8 --precision bf16-true
    python benchmarks/e2e_train.py --device cpu --tiny --steps 2 --warmup 1          # a quick CPU run
    python benchmarks/e2e_train.py --n-layer 8 --precision bf16-true --clip 1.0 --modes trainer-thunder,\
        trainer-thunder-fsdp,trainer-thunder-fsdp-fp8,trainer-thunder-fsdp-fp8-bf16ag     # FSDP and FP8 on one card

Needs ``litgpt`` (the model, and LitGPT's loss for ``fabric-compile``); ``recipe`` needs ``omegaconf`` too. A mode that
cannot run here is reported with the reason.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measure import Unavailable, environment, parent_argv, spawn_worker, synchronize, worker_result  # noqa: E402

#: Trainer modes of the second table: (strategy, ThunderFP8's all_gather or None for no FP8 plugin).
TRAINER_VARIANTS = {
    "trainer-thunder-fp8": ("thunder", "fp8"),
    "trainer-thunder-fsdp": ("thunder_fsdp", None),
    "trainer-thunder-fsdp-fp8": ("thunder_fsdp", "fp8"),
    "trainer-thunder-fsdp-fp8-bf16ag": ("thunder_fsdp", "bf16"),
}
MODES = ("recipe", "fabric-compile", "fabric-thunder", "trainer-thunder", "trainer-compile", *TRAINER_VARIANTS)
#: Each of our paths and the torch.compile path it is compared with.
BASELINE = {"recipe": "fabric-compile", "fabric-thunder": "fabric-compile", "trainer-thunder": "trainer-compile"}
#: ``--tiny``: a 2-layer Llama-style model for CPU runs and tests.
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, vocab_size=1000,
            padded_vocab_size=1000, block_size=64)
_GIB = float(1 << 30)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The recipe's loss (``lightning_thunder.recipes.model.lm_loss``): cross-entropy in fp32 over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def _config(args: argparse.Namespace):
    try:
        from litgpt import Config
    except ImportError as e:
        raise Unavailable(f"litgpt is not importable ({e}): carry its wheel (pip download litgpt==0.5.13 --no-deps)")
    if args.tiny:
        return Config.from_name(args.model, **{**TINY, "block_size": args.seq, **_n_layer(args)})
    from litgpt_train import build_config

    return build_config(args)


def _n_layer(args: argparse.Namespace) -> dict[str, int]:
    return {"n_layer": args.n_layer} if args.n_layer else {}


def _batch(b: int, args: argparse.Namespace, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, vocab, (b, args.seq + 1), device=device)
    return data[:, :-1], data[:, 1:]


def _optimizer(params, cuda: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True if cuda else None)


# ---------------------------------------------------------------------------------------------------- the modes
def fabric_step(args: argparse.Namespace, mode: str, device: torch.device) -> tuple[Callable[[int], None], Callable]:
    """``(step(batch_size), stats)`` for a Fabric mode: one training step on a fresh random batch."""
    from lightning.fabric import Fabric

    config = _config(args)
    from litgpt import GPT
    from litgpt.utils import chunked_cross_entropy

    from lightning_thunder.strategies import ModelWithLoss

    thunder = mode == "fabric-thunder"
    strategy = "thunder" if thunder else "auto"
    fabric = Fabric(accelerator=device.type, devices=1, precision=args.precision, strategy=strategy)
    fabric.seed_everything(0)
    with fabric.init_module():
        model = GPT(config)
    model = ModelWithLoss(model, lm_loss) if thunder else torch.compile(model)
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(_optimizer(model.parameters(), device.type == "cuda"))

    def step(b: int) -> None:
        x, y = _batch(b, args, config.padded_vocab_size, device)
        try:
            loss = model(x, y) if thunder else chunked_cross_entropy(model(x), y)
            fabric.backward(loss)
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)

    return step, lambda: _thunder_stats(model) if thunder else {}


def trainer_run(args: argparse.Namespace, mode: str, device: torch.device) -> dict:
    """Fit ``warmup + steps`` steps with the Trainer; per-step times from a callback."""
    import lightning as L

    import lightning_thunder  # registers the "thunder" strategies; ThunderFP8 for the FP8 modes

    config = _config(args)
    from litgpt import GPT

    thunder = mode != "trainer-compile"
    strategy, all_gather = TRAINER_VARIANTS.get(mode, ("thunder" if thunder else "auto", None))
    precision: dict = {"precision": args.precision}
    if all_gather is not None:  # ThunderFP8 is the precision plugin (bf16-true); emulated off CUDA (tests)
        precision = {"plugins": [lightning_thunder.ThunderFP8(emulate=device.type != "cuda", all_gather=all_gather)]}

    class LitGPTModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: torch.nn.Module | None = None

        def configure_model(self) -> None:
            if self.model is None:
                self.model = GPT(config) if thunder else torch.compile(GPT(config))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return lm_loss(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _optimizer(self.parameters(), device.type == "cuda")

    n = args.warmup + args.steps + (1 if args.profile_rows else 0)
    x, y = _batch(n * args.batch, args, config.padded_vocab_size, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch)
    timer = _step_timer(device, profile_step=args.warmup + args.steps if args.profile_rows else None)
    torch.manual_seed(0)
    module = LitGPTModule()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, strategy=strategy, max_steps=n, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], gradient_clip_val=args.clip,
        **precision,
    )
    trainer.fit(module, loader)
    result = {"times": timer.times[: args.warmup + args.steps], **(_thunder_stats(module) if thunder else {})}
    if timer.phases:
        timed = timer.phases[args.warmup : args.warmup + args.steps] or timer.phases[1:]
        result["phases"] = [statistics.median(c) for c in zip(*timed)]
    if timer.trace_path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from step_profile import breakdown

        result["breakdown"] = breakdown(timer.trace_path, args.profile_rows)
    if mode in TRAINER_VARIANTS:
        from lightning_thunder.fp8.fsdp import FP8AllGather

        groups = {getattr(p, "_local_tensor", p).__dict__.get("_group") for p in module.parameters()}
        result["fp8_gathered"] = sum(len(g.names) for g in groups if isinstance(g, FP8AllGather))
        result["fp8_refreshes"] = sum(g.refreshes for g in groups if isinstance(g, FP8AllGather))
    return result


def _step_timer(device: torch.device, profile_step: int | None):
    """A callback timing each training step (synchronized), and on CUDA its phases: GPU time between events recorded
    at the Trainer's hooks (forward: batch start to ``on_before_backward``; backward: to ``on_after_backward``;
    step: ``on_before_optimizer_step`` to batch end, i.e. clipping, the optimizer and ``zero_grad``) and when the host
    reached each hook. ``profile_step``: profile that step (CPU and CUDA) into a Chrome trace."""
    import lightning as L

    class StepTimer(L.Callback):
        HOOKS = ("before_backward", "after_backward", "before_optimizer_step", "end")

        def __init__(self) -> None:
            self.times: list[float] = []
            self.phases: list[list[float]] = []
            self.trace_path: str | None = None
            self.index = 0
            self.profiler = None

        def _mark(self, hook: str) -> None:
            if device.type == "cuda":
                self.events[hook] = torch.cuda.Event(enable_timing=True)
                self.events[hook].record()
                self.host[hook] = time.perf_counter()

        def on_train_batch_start(self, *args: object) -> None:
            synchronize(device)
            if self.index == profile_step and device.type == "cuda":
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.profiler.__enter__()
            self.events: dict = {}
            self.host: dict = {}
            self.t0 = time.perf_counter()
            self._mark("start")

        def on_before_backward(self, *args: object) -> None:
            self._mark("before_backward")

        def on_after_backward(self, *args: object) -> None:
            self._mark("after_backward")

        def on_before_optimizer_step(self, *args: object) -> None:
            self._mark("before_optimizer_step")

        def on_train_batch_end(self, *args: object) -> None:
            self._mark("end")
            synchronize(device)
            self.times.append(time.perf_counter() - self.t0)
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                    self.trace_path = f.name
                self.profiler.export_chrome_trace(self.trace_path)
                self.profiler = None
            if device.type == "cuda" and all(h in self.events for h in self.HOOKS):
                e, h = self.events, self.host
                self.phases.append([
                    e["start"].elapsed_time(e["before_backward"]),
                    e["before_backward"].elapsed_time(e["after_backward"]),
                    e["before_optimizer_step"].elapsed_time(e["end"]),
                    *((h[k] - h["start"]) * 1e3 for k in ("before_backward", "after_backward", "end")),
                ])
            self.index += 1

    return StepTimer()


def recipe_run(args: argparse.Namespace, device: torch.device) -> dict:
    """``lightning_thunder.recipes.pretrain`` for ``warmup + steps`` steps, each step timed."""
    try:
        from lightning_thunder.recipes import loop, pretrain
        from lightning_thunder.recipes.config import load_config
    except ImportError as e:
        raise Unavailable(f"the recipe needs omegaconf and litgpt ({e}); carry their wheels")
    n = args.warmup + args.steps
    recipe = "debug.yaml" if args.tiny else "llama-3.2-1b.yaml"
    overrides = [
        f"accelerator={device.type}", f"precision={args.precision}", f"data.seq_length={args.seq}",
        f"model.overrides.block_size={args.seq}", f"train.max_steps={n}", f"train.micro_batch_size={args.batch}",
        f"train.global_batch_size={args.batch}", "train.save_interval=null", f"train.log_interval={n}",
        "train.lr_warmup_steps=1", f"eval.interval={n + 1}", "eval.final_validation=false", "resume=false",
        f"out_dir={tempfile.mkdtemp(prefix='e2e_recipe_')}",
    ]
    if args.tiny:
        overrides.append(f"model.name={args.model}")
        overrides += [f"model.overrides.{k}={v}" for k, v in TINY.items() if k != "block_size"]
    overrides += [f"model.overrides.n_layer={args.n_layer}"] if args.n_layer else []
    cfg = load_config(ROOT / "examples" / "recipes" / recipe, overrides)
    times: list[float] = []
    step = loop._Run._step

    def timed_step(self: object, index: int) -> object:
        synchronize(device)
        t0 = time.perf_counter()
        out = step(self, index)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        return out

    loop._Run._step = timed_step  # this process runs the recipe once: no need to restore
    loop._Run._save = lambda self, index: None  # the final checkpoint (15 GB for this model) is not a step's time
    result = pretrain(cfg)
    return {"times": times, "compile_s": result.compile_time_s, "recipe_tokens_per_s": result.tokens_per_sec}


def variants_table(results: list[dict]) -> str:
    """The FSDP / FP8 Trainer modes against ``trainer-thunder``: step time, phases (CUDA), FP8 all-gather."""
    by_mode = {r["mode"]: r for r in results if "step_ms" in r}
    base = by_mode.get("trainer-thunder")
    rows = [
        "| mode | step ms | step / trainer-thunder's | GPU fwd / bwd / clip+opt ms | "
        "host issued fwd / bwd / step at ms | weights gathered in FP8 (refreshes) | peak GiB |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for r in results:
        if r["mode"] not in ("trainer-thunder", *TRAINER_VARIANTS):
            continue
        if "step_ms" not in r:
            rows.append(f"| {r['mode']} | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        ratio = f"{r['step_ms'] / base['step_ms']:.3f}x" if base else "-"
        ph = r.get("phases")
        gpu = " / ".join(f"{v:.1f}" for v in ph[:3]) if ph else "n/a"
        host = " / ".join(f"{v:.1f}" for v in ph[3:]) if ph else "n/a"
        gathered = f"{r['fp8_gathered']} ({r['fp8_refreshes']})" if "fp8_gathered" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        rows.append(f"| {r['mode']} | {r['step_ms']:.1f} | {ratio} | {gpu} | {host} | {gathered} | {peak} |")
    return "\n".join(rows)


def _thunder_stats(model: object) -> dict:
    import lightning_thunder

    stats = lightning_thunder.compile_stats(model)
    return {"graphs": stats.graphs, "graph_breaks": len(stats.graph_breaks), "fusion_regions": stats.fusion_regions}


# ---------------------------------------------------------------------------------------------------- measuring
def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / _GIB if device.type == "cuda" else None


def max_batch_search(step: Callable[[int], None], b0: int, peak0: float, device: torch.device, probes: int) -> dict:
    """The largest micro-batch that runs (see the module docstring); ``tried`` maps sizes to peak GiB (None: OOM)."""
    capacity = torch.cuda.mem_get_info(device)[1] / _GIB

    def fits(b: int) -> float | None:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            for _ in range(2):
                step(b)
            synchronize(device)
            return _peak_gib(device)
        except torch.OutOfMemoryError:
            return None

    tried: dict[int, float | None] = {b0: peak0}
    lo, hi = b0, None
    for _ in range(probes):
        if hi is not None:
            b = (lo + hi) // 2
        elif len([p for p in tried.values() if p is not None]) < 2:
            b = 2 * lo
        else:  # a straight line through the two largest sizes that ran
            (b1, p1), (b2, p2) = sorted((k, v) for k, v in tried.items() if v is not None)[-2:]
            slope = (p2 - p1) / (b2 - b1)
            b = max(lo + 1, b2 + int((capacity - p2) / slope)) if slope > 0 else 2 * lo
            b = b if b not in tried else lo + 1
        if b <= lo or (hi is not None and b >= hi):
            break
        tried[b] = fits(b)
        if tried[b] is None:
            hi = b
        else:
            lo = b
        if hi is not None and hi - lo <= 1:
            break
    return {"max_batch": lo, "max_batch_exact": hi is not None and hi - lo <= 1, "tried": tried}


def run_mode(args: argparse.Namespace) -> dict:
    """Worker: run one mode in this process and return its measurements."""
    device, mode = torch.device(args.device), args.worker
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result: dict = {"mode": mode}
    if mode.startswith("fabric"):
        step, stats = fabric_step(args, mode, device)
        times = []
        for _ in range(args.warmup + args.steps):
            synchronize(device)
            t0 = time.perf_counter()
            step(args.batch)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        result.update(stats())
    elif mode == "recipe":
        result.update(recipe_run(args, device))
        times = result.pop("times")
    else:
        result.update(trainer_run(args, mode, device))
        times = result.pop("times")
    if len(times) < 2:
        raise RuntimeError(f"{mode} ran {len(times)} step(s); need at least 2 (--warmup 1 --steps 1)")
    result.update(
        step_ms=statistics.median(times[args.warmup:] or times[1:]) * 1e3,
        first_step_s=times[0],
        peak_gib=_peak_gib(device),
    )
    if args.max_batch and mode.startswith("fabric") and device.type == "cuda":
        result.update(max_batch_search(step, args.batch, result["peak_gib"], device, args.max_batch_probes))
    return result


def spawn(args: argparse.Namespace, mode: str) -> dict:
    """Run ``mode`` in a fresh process and return its JSON result (or the reason it failed)."""
    return spawn_worker(__file__, args.argv, mode, "mode", args.timeout)


def table(results: list[dict], tokens_per_step: int) -> str:
    by_mode = {r["mode"]: r for r in results if "step_ms" in r}
    rows = [
        "| mode | step ms | tokens/s | vs torch.compile | peak GiB | first step s | max micro-batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "step_ms" not in r:
            rows.append(f"| {r['mode']} | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        base = by_mode.get(BASELINE.get(r["mode"], ""))
        ratio = f"{base['step_ms'] / r['step_ms']:.2f}x" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        if "max_batch" in r:
            most = f"{r['max_batch']}" + ("" if r["max_batch_exact"] else "+")
        elif r["mode"] == "recipe" and "max_batch" in by_mode.get("fabric-thunder", {}):
            most = "see fabric-thunder"
        else:
            most = "-"
        rows.append(
            f"| {r['mode']} | {r['step_ms']:.1f} | {tokens_per_step / (r['step_ms'] / 1e3):,.0f} | {ratio} | {peak} | "
            f"{r['first_step_s']:.1f} | {most} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.2-1B", help="LitGPT config name")
    p.add_argument("--n-layer", type=int, default=None, help="override the config's number of layers")
    p.add_argument("--tiny", action="store_true", help=f"a tiny Llama-style model ({TINY}) for CPU runs")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048 on CUDA, 32 on CPU)")
    p.add_argument("--precision", default=None, help="Lightning precision (default bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--modes", default="recipe,fabric-compile,fabric-thunder,trainer-thunder,trainer-compile",
                   help=f"comma-separated, from {MODES}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (the first one compiles)")
    p.add_argument("--max-batch", action="store_true", help="also search the largest micro-batch (Fabric modes, CUDA)")
    p.add_argument("--max-batch-probes", type=int, default=5, help="batch sizes tried at most by --max-batch")
    p.add_argument("--clip", type=float, default=None, help="Trainer modes: gradient_clip_val (clipping by norm)")
    p.add_argument("--profile-rows", type=int, default=0,
                   help="Trainer modes on CUDA: profile one more step and print this many rows of its GPU breakdown")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per mode")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (4 if cuda else 2)
    args.seq = args.seq or (2048 if cuda else 32)
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    args.argv = parent_argv(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        result = worker_result(lambda: run_mode(args), "mode", args.worker)
        Path(args.worker_out).write_text(json.dumps(result))
        return
    results = []
    for mode in args.mode_list:
        t0 = time.perf_counter()
        results.append(spawn(args, mode))
        r = results[-1]
        summary = f"{r['step_ms']:.1f} ms/step" if "step_ms" in r else r.get("skipped") or r.get("error")
        print(f"{mode}: {summary} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    device = torch.device(args.device)
    env = environment(device)
    layers = f"n_layer={args.n_layer}" if args.n_layer else "all layers"
    print(
        f"\n{args.model}{' (tiny)' if args.tiny else ''}, {layers}, micro-batch {args.batch} x {args.seq}, "
        f"{args.precision}, fused AdamW; {env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}\n"
        f"median of {args.steps} steps after {args.warmup}; peak: CUDA peak allocated over the run\n"
    )
    print(table(results, args.batch * args.seq))
    if any(m in TRAINER_VARIANTS for m in args.mode_list):
        clip = f"clipping at norm {args.clip}" if args.clip else "no clipping"
        print(f"\nFSDP and FP8 on one device ({clip}; phases: medians over the timed steps)\n")
        print(variants_table(results))
    for r in results:
        if "breakdown" in r:
            print(f"\n{r['mode']}: one step's GPU time\n{r['breakdown']}")
    for r in results:
        if "tried" in r:
            sizes = sorted(r["tried"].items(), key=lambda kv: int(kv[0]))
            tried = ", ".join(f"{b}: {'OOM' if p is None else f'{p:.1f} GiB'}" for b, p in sizes)
            print(f"\n{r['mode']} micro-batches tried: {tried}")
    if args.json:
        command = "python benchmarks/e2e_train.py " + " ".join(argv)
        payload = {"command": command, "environment": env, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
