"""The recipes' LitGPT model as a LightningModule, trained by the Lightning Trainer with lightning_thunder:

    Trainer(strategy="thunder_fsdp", plugins=[ThunderFP8()], callbacks=[ThroughputMonitor(...), MemoryMonitor(),
            CompileReport()])

``thunder_fsdp`` compiles each transformer block with lightning_thunder and shards it with FSDP2. FP8 only where it
is supported (a lightning_thunder that has ``ThunderFP8`` and a GPU of compute capability 8.9 or more); elsewhere
bf16-mixed on CUDA and 32-true on CPU, and the script says why at the start. The data is the recipes' default (the
Python standard library's source as bytes), so it runs on a fresh machine:

    python examples/trainer_litgpt.py                                   # CPU, 1 process, a pythia-14m-sized model
    python examples/trainer_litgpt.py --accelerator cuda --devices 2 --model Llama-3.2-1B --seq 2048 --steps 200
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import lightning_thunder
from lightning_thunder.callbacks import CompileReport, MemoryMonitor, ThroughputMonitor
from lightning_thunder.recipes.config import DataConfig
from lightning_thunder.recipes.data import TokenWindows, load_tokens
from lightning_thunder.recipes.model import (
    litgpt_config,
    lm_loss,
    reset_parameters,
    set_initializers,
    training_flops,
)


class LitGPTModule(L.LightningModule):
    """A LitGPT ``GPT`` trained as a language model (the network is ``self.model``, built in ``configure_model``
    so that ``thunder_fsdp`` can create it on the meta device and materialize it sharded)."""

    def __init__(self, config: Any, lr: float, warmup_steps: int, max_steps: int, flops_per_batch: int) -> None:
        super().__init__()
        self.config = config
        self.lr, self.warmup_steps, self.max_steps = lr, warmup_steps, max_steps
        self.flops_per_batch = flops_per_batch  # read by ThroughputMonitor (a sharded model cannot be copied)
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        from litgpt import GPT

        if self.model is not None:
            return
        self.model = GPT(self.config)
        set_initializers(self.model, self.config.n_layer, self.config.n_embd)
        if not next(self.model.parameters()).is_meta:  # on meta, the strategy calls reset_parameters itself
            reset_parameters(self.model)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = lm_loss(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", lm_loss(self.model(x), y), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, betas=(0.9, 0.95))

        def factor(step: int) -> float:  # linear warmup, then cosine decay to a tenth
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fp8_precision_plugin() -> tuple[Any | None, str]:
    """``(ThunderFP8(), why)`` where FP8 is supported, else ``(None, why not)``."""
    if not hasattr(lightning_thunder, "ThunderFP8"):
        return None, "FP8 off: this lightning_thunder has no ThunderFP8"
    if not torch.cuda.is_available():
        return None, "FP8 off: no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        return None, f"FP8 off: the GPU has compute capability {capability[0]}.{capability[1]}; FP8 needs 8.9 or more"
    return lightning_thunder.ThunderFP8(), "FP8 on: ThunderFP8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pythia-14m", help="a LitGPT model name")
    parser.add_argument("--layers", type=int, default=None, help="override the model's n_layer (smaller and faster)")
    parser.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="out/trainer-litgpt")
    args = parser.parse_args()

    overrides: dict[str, Any] = {"block_size": args.seq}
    if args.model == "pythia-14m":
        overrides.update(vocab_size=256, padded_vocab_size=256)  # byte tokens
    if args.layers is not None:
        overrides["n_layer"] = args.layers
    config = litgpt_config(args.model, overrides)
    data = load_tokens(DataConfig(seq_length=args.seq))
    train = TokenWindows(data.train, args.seq, length=args.steps * args.micro_batch * args.devices, seed=0)
    val = TokenWindows(data.val, args.seq, length=4 * args.micro_batch * args.devices, seed=1)

    fp8, why = fp8_precision_plugin()
    cuda = args.accelerator == "cuda" or (args.accelerator == "auto" and torch.cuda.is_available())
    # A precision plugin sets the precision itself; otherwise bf16 on CUDA, fp32 on CPU.
    precision = None if fp8 is not None else ("bf16-mixed" if cuda else "32-true")
    print(f"{why}; precision {precision or 'from ThunderFP8'}; data: {data.description}", flush=True)

    torch.manual_seed(0)
    module = LitGPTModule(config, args.lr, warmup_steps=max(1, args.steps // 10), max_steps=args.steps,
                          flops_per_batch=training_flops(config, args.micro_batch, args.seq))
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="thunder_fsdp",
        precision=precision,
        plugins=[fp8] if fp8 is not None else None,
        callbacks=[
            ThroughputMonitor(length_fn=lambda batch: batch[0].numel()),
            MemoryMonitor(),
            CompileReport(),
        ],
        max_steps=args.steps,
        val_check_interval=max(1, args.steps // 2),
        limit_val_batches=4,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, args.steps // 4)),
        gradient_clip_val=1.0,
        default_root_dir=args.out,
        logger=CSVLogger(args.out),
    )
    trainer.fit(
        module,
        DataLoader(train, batch_size=args.micro_batch, shuffle=False),
        DataLoader(val, batch_size=args.micro_batch, shuffle=False),
    )
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_loss")}
    trainer.print(f"finished: {trainer.global_step} steps, {metrics}; logs and checkpoints in {trainer.log_dir}")


if __name__ == "__main__":
    main()
