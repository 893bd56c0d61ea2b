"""The pretraining loop of a recipe, on Fabric with lightning_thunder's strategies and callbacks.

One optimizer step: ``global_batch_size / (micro_batch_size * devices)`` micro-batches per device (gradient
synchronization only on the last), gradient clipping, AdamW with a warmup + cosine learning rate. Every
``train.log_interval`` steps a line with the loss, learning rate, tokens/s and memory; every ``eval.interval``
steps the validation loss; every ``train.save_interval`` steps and at the end a checkpoint (see
:mod:`~lightning_thunder.recipes.checkpoints` for what it holds and how ``resume`` continues from it).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_thunder.recipes.checkpoints import (
    check_resumable,
    checkpoint_path,
    read_checkpoint_metadata,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lightning_thunder.recipes.config import RecipeConfig, to_dict, to_yaml
from lightning_thunder.recipes.data import TrainSampler, load_tokens, validation_batches
from lightning_thunder.recipes.errors import ConfigError, require_litgpt
from lightning_thunder.recipes.model import check_model, lm_loss, reset_parameters, set_initializers
from lightning_thunder.recipes.plugins import RecipePlugins, apply_activation_checkpointing, build_plugins, build_strategy
from lightning_thunder.recipes.report import (
    PretrainResult,
    Progress,
    describe_outputs,
    format_summary,
    peak_memory_bytes,
    write_summary,
)

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from torch import nn

__all__ = ["pretrain", "learning_rate"]

_GIB = float(1 << 30)


def learning_rate(step: int, cfg: RecipeConfig) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear warmup from 0 over ``train.lr_warmup_steps``,
    then a cosine decay from ``optimizer.lr`` to ``train.min_lr`` at ``train.max_steps``."""
    peak, warmup, floor, total = cfg.optimizer.lr, cfg.train.lr_warmup_steps, cfg.train.min_lr, cfg.train.max_steps
    if step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def _monitors(cfg: RecipeConfig, plugins: RecipePlugins) -> list[Any]:
    from lightning_thunder.callbacks import CompileReport, MemoryMonitor, ThroughputMonitor

    every = cfg.train.log_interval
    return [
        ThroughputMonitor(
            length_fn=lambda batch: batch[0].numel(),
            step_fn=lambda model, batch: model(batch[0]),
            precision="fp8" if plugins.fp8 else None,
            log_every_n_steps=every,
            window_size=max(2, min(50, cfg.train.max_steps // 4)),
        ),
        MemoryMonitor(log_every_n_steps=every),
        CompileReport(log_every_n_steps=every),
    ]


def _build_model(
    fabric: Fabric, cfg: RecipeConfig, config: Any, plugins: RecipePlugins
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The LitGPT model for ``config`` (a ``litgpt.Config``) and its AdamW, set up by Fabric (compiled, sharded)."""
    from litgpt import GPT

    sharded = cfg.strategy == "thunder_fsdp"
    with fabric.init_module(empty_init=sharded):  # thunder_fsdp: meta device, materialized after sharding
        model = GPT(config)
    set_initializers(model, config.n_layer, config.n_embd)
    if not sharded:
        reset_parameters(model)
    blocks = apply_activation_checkpointing(model, cfg.strategy, plugins)
    if blocks:
        fabric.print(f"activation checkpointing: {blocks} blocks")
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.betas[0], opt.betas[1]), eps=opt.eps
    )
    return fabric.setup(model, optimizer)


def _validate(fabric: Fabric, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    fabric.call("on_validation_start")
    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model(x), y) for x, y in (fabric.to_device(b) for b in batches)]
    model.train()
    value = float(fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item())
    fabric.call("on_validation_end")
    return value


def _log_dir(fabric: Fabric) -> Path | None:
    logger = fabric.logger if fabric.loggers else None
    return Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None


def pretrain(cfg: RecipeConfig) -> PretrainResult:
    """Train ``cfg.model`` on ``cfg.data`` as the recipe says; returns what the run did (every rank).

    Raises:
        ConfigError: for a config that cannot run (e.g. ``resume`` points nowhere, a checkpoint from another model).
        MissingDependencyError: ``litgpt`` or a plugin's implementation (e.g. FP8) is not installed.
    """
    require_litgpt()
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    import lightning_thunder

    wall_start = time.perf_counter()
    plugins = build_plugins(cfg.plugins)  # fails now, before any work, when e.g. FP8 is not installed
    out_dir = Path(cfg.out_dir)
    resume_path = resolve_resume(cfg.resume, out_dir)
    start_step = 0
    if resume_path is not None:
        meta = read_checkpoint_metadata(resume_path)
        check_resumable(meta["config"], to_dict(cfg), resume_path)
        start_step = int(meta["step"])
        if start_step >= cfg.train.max_steps:
            print(
                f"{resume_path} is at step {start_step}, train.max_steps={cfg.train.max_steps}: nothing left to train. "
                f"Train longer with train.max_steps=<more than {start_step}>, or start over with resume=false and "
                "another out_dir",
                flush=True,
            )
            return PretrainResult(str(out_dir), start_step + 1, start_step, cfg.train.max_steps,
                                  resumed_from=str(resume_path))

    monitors = _monitors(cfg, plugins)
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=build_strategy(cfg.strategy, plugins),
        precision=cfg.precision,  # type: ignore[arg-type]
        callbacks=monitors,
        loggers=CSVLogger(root_dir=out_dir, name="logs", flush_logs_every_n_steps=cfg.train.log_interval),
    )
    fabric.launch()
    fabric.seed_everything(cfg.train.seed, verbose=False)
    rank0 = fabric.is_global_zero
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    data = load_tokens(cfg.data)
    config = check_model(cfg)
    if data.vocab_size > config.padded_vocab_size:
        raise ConfigError(
            f"the tokenizer has {data.vocab_size} token ids but the model's padded_vocab_size is "
            f"{config.padded_vocab_size}; set model.overrides.vocab_size={data.vocab_size}"
        )
    model, optimizer = _build_model(fabric, cfg, config, plugins)
    world = fabric.world_size
    accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    sampler = TrainSampler(data.train, cfg.data.seq_length, cfg.train.micro_batch_size, rank=fabric.global_rank,
                           world_size=world, seed=cfg.train.seed)
    val_batches = validation_batches(data.val, cfg.data.seq_length, cfg.train.micro_batch_size, cfg.eval.max_iters,
                                     rank=fabric.global_rank, world_size=world)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0, "tokens": 0,
                             "data": sampler.state_dict(), "rng": rng_state(), "config": to_dict(cfg)}
    if resume_path is not None:
        fabric.load(resume_path, state)
        sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"])

    n_params = sum(p.numel() for p in model.parameters())  # this rank's shard under thunder_fsdp
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    fabric.print(
        f"model {cfg.model.name} {dict(cfg.model.overrides) or ''}: {n_params:,} parameters"
        f"{' on this rank' if cfg.strategy == 'thunder_fsdp' and world > 1 else ''}; strategy {cfg.strategy} on "
        f"{world} {fabric.device.type} device(s), precision {cfg.precision}, plugins {list(cfg.plugins) or 'none'}\n"
        f"data: {data.description}\n"
        f"batches: {cfg.train.global_batch_size} sequences x {cfg.data.seq_length} tokens = {tokens_per_step:,} tokens "
        f"per step (micro-batch {cfg.train.micro_batch_size} x {world} device(s) x {accumulation} accumulation); "
        f"steps {state['step'] + 1}-{cfg.train.max_steps}\n"
        f"outputs: {out_dir} (config.yaml, checkpoints/, logs/, summary.json)"
        + (f"\nresumed from {resume_path} at step {state['step']}: continuing with step {state['step'] + 1}"
           if resume_path is not None else "")
    )

    result = PretrainResult(str(out_dir), state["step"] + 1, state["step"], cfg.train.max_steps,
                            resumed_from=str(resume_path) if resume_path is not None else None)
    progress = Progress(rank0, cfg.train.max_steps, state["step"])
    peak = 0
    train_time = 0.0  # training steps after the run's first, excluding validation and checkpoints
    timed_tokens = 0
    interval_start, interval_tokens = time.perf_counter(), 0
    fabric.call("on_train_start")
    for step in range(state["step"] + 1, cfg.train.max_steps + 1):
        step_start = time.perf_counter()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets, loss_sum = [], [], torch.zeros((), device=fabric.device)
        for micro in range(accumulation):
            x, y = fabric.to_device(sampler.next_batch())
            with fabric.no_backward_sync(model, enabled=micro < accumulation - 1):
                loss = lm_loss(model(x), y)
                fabric.backward(loss / accumulation)
            loss_sum += loss.detach()
            inputs.append(x)
            targets.append(y)
        if cfg.train.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=cfg.train.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize(fabric.device)
        peak = max(peak, peak_memory_bytes(fabric.device)[0])  # before MemoryMonitor resets CUDA's peak
        batch = (torch.cat(inputs), torch.cat(targets)) if accumulation > 1 else (inputs[0], targets[0])
        fabric.call("on_train_batch_end", batch=batch)
        state["step"], state["tokens"] = step, state["tokens"] + tokens_per_step
        result.last_step, result.tokens = step, result.tokens + tokens_per_step
        if step > result.first_step:
            train_time += time.perf_counter() - step_start
            timed_tokens += tokens_per_step
        interval_tokens += tokens_per_step

        if step % cfg.train.log_interval == 0 or step in (result.first_step, cfg.train.max_steps):
            value = float(fabric.all_reduce(loss_sum / accumulation, reduce_op="mean").item())
            result.train_losses[step] = value
            now = time.perf_counter()
            rate = interval_tokens / (now - interval_start)
            fabric.log_dict({"train/loss": value, "train/lr": lr, "train/tokens_per_sec": rate}, step=step)
            progress.write(
                f"step {step:>{len(str(cfg.train.max_steps))}}/{cfg.train.max_steps} | loss {value:.4f} | lr {lr:.2e} | "
                f"{rate:,.0f} tok/s | {peak_memory_bytes(fabric.device)[1]} {peak / _GIB:.2f} GiB | "
                f"{now - wall_start:.0f} s"
            )
            progress.update({"loss": f"{value:.3f}"})
        else:
            progress.update({})
        pause_start = time.perf_counter()
        if step % cfg.eval.interval == 0 or (cfg.eval.final_validation and step == cfg.train.max_steps):
            value = _validate(fabric, model, val_batches)
            result.val_losses[step] = value
            fabric.log_dict({"val/loss": value}, step=step)
            progress.write(f"step {step} | validation loss {value:.4f} ({len(val_batches)} batches per device)")
        save_every = cfg.train.save_interval
        if step == cfg.train.max_steps or (save_every is not None and step % save_every == 0):
            path = checkpoint_path(out_dir, step)
            state["data"], state["rng"] = sampler.state_dict(), rng_state()
            save_checkpoint(fabric, path, state)
            result.checkpoints.append(str(path))
            progress.write(f"step {step} | saved {path}")
        if step % cfg.train.log_interval == 0 or step == result.first_step:
            interval_start, interval_tokens = time.perf_counter(), 0
        else:
            interval_start += time.perf_counter() - pause_start  # validation and saving are not training time

    progress.close()
    fabric.call("on_train_end")  # the monitors print their summaries and write their plots
    peak_all = fabric.all_reduce(torch.tensor(float(peak), device=fabric.device), reduce_op="max")
    result.peak_memory_gib = float(peak_all.item()) / _GIB
    result.peak_memory_kind = peak_memory_bytes(fabric.device)[1]
    result.tokens_per_sec = timed_tokens / train_time if train_time > 0 else None
    result.compile_time_s = lightning_thunder.compile_stats(model).compile_time_s
    result.wall_time_s = time.perf_counter() - wall_start
    log_dir = _log_dir(fabric)
    result.log_dir = str(log_dir) if log_dir is not None else None
    for logger in fabric.loggers:
        logger.finalize("success")
    if rank0:
        write_summary(result, out_dir / "summary.json")
        print(format_summary(result, describe_outputs(out_dir, log_dir)), flush=True)
    fabric.barrier()
    return result
