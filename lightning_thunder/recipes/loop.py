"""The pretraining loop of a recipe, on Fabric with lightning_thunder's strategies and callbacks.

One optimizer step: ``global_batch_size / (micro_batch_size * devices)`` micro-batches per device (gradient
synchronization only on the last), gradient clipping, AdamW (fused on CUDA, as LitGPT) with a warmup + cosine learning
rate. The model and its loss are one module (:class:`~lightning_thunder.strategies.ModelWithLoss`), so ``thunder`` and
``thunder_ddp`` compile the loss with the model: the output head and the cross-entropy run as one chunked op
(:class:`~lightning_thunder.plugins.FusedLinearCrossEntropy`, a default plugin with CUDA), without the logits. Every
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
from lightning_thunder.recipes.config import RecipeConfig, check_environment, to_dict, to_yaml
from lightning_thunder.recipes.data import TrainSampler, load_tokens, validation_batches
from lightning_thunder.recipes.errors import ConfigError, require_litgpt
from lightning_thunder.recipes.model import check_model, lm_loss, reset_parameters, set_initializers, training_flops
from lightning_thunder.recipes.plugins import (
    RecipePlugins,
    apply_activation_checkpointing,
    build_plugins,
    build_strategy,
    data_parallel_rank_and_size,
)
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
            step_fn=lambda model, batch: model(*batch),
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
    """The LitGPT model for ``config`` (a ``litgpt.Config``) with its loss (``model(x, y)`` returns the loss; the
    parameters and ``state_dict`` keys are the GPT's) and its AdamW, set up by Fabric (compiled, sharded)."""
    from litgpt import GPT

    from lightning_thunder.strategies import ModelWithLoss

    sharded = cfg.strategy == "thunder_fsdp"
    with fabric.init_module(empty_init=sharded):  # thunder_fsdp: meta device, materialized after sharding
        model = GPT(config)
    set_initializers(model, config.n_layer, config.n_embd)
    if not sharded:
        reset_parameters(model)
    # The throughput monitor reads FLOPs per batch (here: per optimizer step on this rank) from the model.
    _, data_parallel = data_parallel_rank_and_size(fabric.strategy)
    accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * data_parallel)
    flops = training_flops(config, cfg.train.micro_batch_size, cfg.data.seq_length) // cfg.tensor_parallel_size
    model.flops_per_batch = accumulation * flops
    blocks = apply_activation_checkpointing(model, cfg.strategy, plugins)
    if blocks:
        fabric.print(f"activation checkpointing: {blocks} blocks")
    model = ModelWithLoss(model, lm_loss)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.betas[0], opt.betas[1]), eps=opt.eps,
        fused=True if fabric.device.type == "cuda" else None,  # one kernel for all parameters, as LitGPT on CUDA
    )
    return fabric.setup(model, optimizer)


def _mesh(cfg: RecipeConfig) -> str:
    tp = cfg.tensor_parallel_size
    return f" ({cfg.devices // tp} data parallel x {tp} tensor parallel)" if tp > 1 else ""


def _log_dir(fabric: Fabric) -> Path | None:
    logger = fabric.logger if fabric.loggers else None
    return Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None


def _resume_point(cfg: RecipeConfig) -> tuple[Path | None, int]:
    """The checkpoint to resume from (checked against ``cfg``) and its step, before anything heavy starts."""
    resume_path = resolve_resume(cfg.resume, Path(cfg.out_dir))
    if resume_path is None:
        return None, 0
    meta = read_checkpoint_metadata(resume_path)
    check_resumable(meta["config"], to_dict(cfg), resume_path)
    return resume_path, int(meta["step"])


def pretrain(cfg: RecipeConfig) -> PretrainResult:
    """Train ``cfg.model`` on ``cfg.data`` as the recipe says; returns what the run did (on every rank).

    Raises:
        ConfigError: for a config that cannot run (e.g. ``resume`` points nowhere, a checkpoint from another model).
        MissingDependencyError: ``litgpt`` is not installed.
    """
    require_litgpt()
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    wall_start = time.perf_counter()
    check_environment(cfg)  # CUDA, FP8 hardware, precision and out_dir against this machine: one line each
    plugins = build_plugins(cfg.plugins)  # fails now, before any work, when e.g. FP8 is not installed
    out_dir = Path(cfg.out_dir)
    resume_path, start_step = _resume_point(cfg)
    if start_step >= cfg.train.max_steps:
        print(
            f"{resume_path} is at step {start_step}, train.max_steps={cfg.train.max_steps}: nothing left to train. "
            f"Train longer with train.max_steps=<more than {start_step}>, or start over with resume=false and another "
            "out_dir",
            flush=True,
        )
        return PretrainResult(
            str(out_dir), start_step + 1, start_step, cfg.train.max_steps, resumed_from=str(resume_path)
        )

    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=build_strategy(cfg.strategy, plugins, cfg.tensor_parallel_size),
        precision=cfg.precision,  # type: ignore[arg-type]
        callbacks=_monitors(cfg, plugins),
        loggers=CSVLogger(root_dir=out_dir, name="logs", flush_logs_every_n_steps=cfg.train.log_interval),
    )
    fabric.launch()
    fabric.seed_everything(cfg.train.seed, verbose=False)
    if fabric.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    run = _Run(fabric, cfg, plugins, resume_path, wall_start)
    run.train()
    return run.finish()


class _Run:
    """One run of the loop: the model, optimizer, data and state, the training steps, validation, checkpoints."""

    def __init__(
        self, fabric: Fabric, cfg: RecipeConfig, plugins: RecipePlugins, resume_path: Path | None, wall_start: float
    ) -> None:
        self.fabric, self.cfg, self.wall_start = fabric, cfg, wall_start
        self.out_dir = Path(cfg.out_dir)
        data = load_tokens(cfg.data)
        config = check_model(cfg)
        if data.vocab_size > config.padded_vocab_size:
            raise ConfigError(
                f"the tokenizer has {data.vocab_size} token ids but the model's padded_vocab_size is "
                f"{config.padded_vocab_size}; set model.overrides.vocab_size={data.vocab_size}"
            )
        self.model, self.optimizer = _build_model(fabric, cfg, config, plugins)
        (rank, world), train = data_parallel_rank_and_size(fabric.strategy), cfg.train
        self.accumulation = train.global_batch_size // (train.micro_batch_size * world)
        self.tokens_per_step = train.global_batch_size * cfg.data.seq_length
        self.sampler = TrainSampler(data.train, cfg.data.seq_length, train.micro_batch_size, rank=rank,
                                    world_size=world, seed=train.seed)
        self.val_batches = validation_batches(data.val, cfg.data.seq_length, train.micro_batch_size,
                                              cfg.eval.max_iters, rank=rank, world_size=world)
        # Everything the next step depends on (see lightning_thunder.recipes.checkpoints).
        self.state: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer, "step": 0, "tokens": 0,
                                      "data": self.sampler.state_dict(), "rng": rng_state(), "config": to_dict(cfg)}
        if resume_path is not None:
            fabric.load(resume_path, self.state)
            self.sampler.load_state_dict(self.state["data"])
            set_rng_state(self.state["rng"])
        step = self.state["step"]
        self.result = PretrainResult(str(self.out_dir), step + 1, step, train.max_steps,
                                     resumed_from=str(resume_path) if resume_path is not None else None)
        self.progress = Progress(fabric.is_global_zero, train.max_steps, step)
        self.peak = 0  # bytes: CUDA peak allocated or peak RSS
        self.train_time, self.timed_tokens = 0.0, 0  # steps after the run's first; no validation or checkpoints
        self._banner(data.description, resume_path)

    def _banner(self, data: str, resume_path: Path | None) -> None:
        cfg, fabric, world = self.cfg, self.fabric, self.fabric.world_size
        n_params = sum(p.numel() for p in self.model.parameters())  # this rank's shard under thunder_fsdp
        sharded = " on this rank" if cfg.strategy == "thunder_fsdp" and world > 1 else ""
        lines = [
            f"model {cfg.model.name} {dict(cfg.model.overrides) or ''}: {n_params:,} parameters{sharded}; strategy "
            f"{cfg.strategy} on {world} {fabric.device.type} device(s){_mesh(cfg)}, precision {cfg.precision}, plugins "
            f"{list(cfg.plugins) or 'none'}",
            f"data: {data}",
            f"batches: {cfg.train.global_batch_size} sequences x {cfg.data.seq_length} tokens = "
            f"{self.tokens_per_step:,} tokens per step (micro-batch {cfg.train.micro_batch_size} x "
            f"{world // cfg.tensor_parallel_size} data-parallel rank(s) x "
            f"{self.accumulation} accumulation); steps {self.result.first_step}-{cfg.train.max_steps}",
            f"outputs: {self.out_dir} (config.yaml, checkpoints/, logs/, summary.json)",
        ]
        if resume_path is not None:
            lines.append(f"resumed from {resume_path} at step {self.state['step']}: continuing with step "
                         f"{self.state['step'] + 1}")
        fabric.print("\n".join(lines))

    def _step(self, step: int) -> tuple[torch.Tensor, float]:
        """One optimizer step; returns this rank's mean loss over its micro-batches and the learning rate."""
        fabric, model, optimizer = self.fabric, self.model, self.optimizer
        lr = learning_rate(step, self.cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets, loss_sum = [], [], torch.zeros((), device=fabric.device)
        for micro in range(self.accumulation):
            x, y = fabric.to_device(self.sampler.next_batch())
            with fabric.no_backward_sync(model, enabled=micro < self.accumulation - 1):
                loss = model(x, y)  # the model and its loss: one compiled graph
                fabric.backward(loss / self.accumulation)
            loss_sum += loss.detach()
            inputs.append(x)
            targets.append(y)
        if self.cfg.train.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=self.cfg.train.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize(fabric.device)
        self.peak = max(self.peak, peak_memory_bytes(fabric.device)[0])  # before MemoryMonitor resets CUDA's peak
        # The monitors see one batch per optimizer step: this rank's micro-batches together.
        batch = (torch.cat(inputs), torch.cat(targets)) if self.accumulation > 1 else (inputs[0], targets[0])
        loss = loss_sum / self.accumulation
        fabric.call("on_train_batch_end", outputs=loss, batch=batch)  # the loss: throughput.png's loss panel
        return loss, lr

    def train(self) -> None:
        """Steps ``state["step"] + 1`` to ``train.max_steps``, with logging, validation and checkpoints."""
        cfg, fabric, result = self.cfg, self.fabric, self.result
        last = cfg.train.max_steps
        interval_start, interval_tokens = time.perf_counter(), 0
        fabric.call("on_train_start")
        for step in range(result.first_step, last + 1):
            step_start = time.perf_counter()
            loss, lr = self._step(step)
            self.state["step"], self.state["tokens"] = step, self.state["tokens"] + self.tokens_per_step
            result.last_step, result.tokens = step, result.tokens + self.tokens_per_step
            if step > result.first_step:  # the run's first step compiles
                self.train_time += time.perf_counter() - step_start
                self.timed_tokens += self.tokens_per_step
            interval_tokens += self.tokens_per_step
            logged = step % cfg.train.log_interval == 0 or step in (result.first_step, last)
            if logged:
                rate = interval_tokens / (time.perf_counter() - interval_start)
                self._log(step, float(fabric.all_reduce(loss, reduce_op="mean").item()), lr, rate)
            else:
                self.progress.update({})
            pause_start = time.perf_counter()
            if step % cfg.eval.interval == 0 or (cfg.eval.final_validation and step == last):
                self._validate(step)
            if step == last or (cfg.train.save_interval is not None and step % cfg.train.save_interval == 0):
                self._save(step)
            if logged:
                interval_start, interval_tokens = time.perf_counter(), 0
            else:
                interval_start += time.perf_counter() - pause_start  # validation and saving are not training time
        self.progress.close()

    def _log(self, step: int, loss: float, lr: float, rate: float) -> None:
        self.result.train_losses[step] = loss
        self.fabric.log_dict({"train/loss": loss, "train/lr": lr, "train/tokens_per_sec": rate}, step=step)
        last = self.cfg.train.max_steps
        memory = f"{peak_memory_bytes(self.fabric.device)[1]} {self.peak / _GIB:.2f} GiB"
        self.progress.write(
            f"step {step:>{len(str(last))}}/{last} | loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} tok/s | {memory} | "
            f"{time.perf_counter() - self.wall_start:.0f} s"
        )
        self.progress.update({"loss": f"{loss:.3f}"})

    def _validate(self, step: int) -> None:
        fabric, model = self.fabric, self.model
        fabric.call("on_validation_start")
        model.eval()
        with torch.no_grad():
            losses = [model(x, y) for x, y in (fabric.to_device(b) for b in self.val_batches)]
        model.train()
        value = float(fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item())
        fabric.call("on_validation_end")
        self.result.val_losses[step] = value
        fabric.log_dict({"val/loss": value}, step=step)
        self.progress.write(f"step {step} | validation loss {value:.4f} ({len(self.val_batches)} batches per device)")

    def _save(self, step: int) -> None:
        path = checkpoint_path(self.out_dir, step)
        self.state["data"], self.state["rng"] = self.sampler.state_dict(), rng_state()
        save_checkpoint(self.fabric, path, self.state)
        self.result.checkpoints.append(str(path))
        self.progress.write(f"step {step} | saved {path}")

    def finish(self) -> PretrainResult:
        """End of training: the monitors' summaries and plots, then the run's summary (printed, summary.json)."""
        import lightning_thunder

        fabric, result = self.fabric, self.result
        fabric.call("on_train_end")  # the monitors print their summaries and write their plots
        peak = fabric.all_reduce(torch.tensor(float(self.peak), device=fabric.device), reduce_op="max")
        result.peak_memory_gib = float(peak.item()) / _GIB
        result.peak_memory_kind = peak_memory_bytes(fabric.device)[1]
        result.tokens_per_sec = self.timed_tokens / self.train_time if self.train_time > 0 else None
        result.compile_time_s = lightning_thunder.compile_stats(self.model).compile_time_s
        result.wall_time_s = time.perf_counter() - self.wall_start
        log_dir = _log_dir(fabric)
        result.log_dir = str(log_dir) if log_dir is not None else None
        for logger in fabric.loggers:
            logger.finalize("success")
        if fabric.is_global_zero:
            write_summary(result, self.out_dir / "summary.json")
            print(format_summary(result, describe_outputs(self.out_dir, log_dir)), flush=True)
        fabric.barrier()
        return result
