"""What the FP8 Trainer tests share: a LightningModule that builds its network in ``configure_model`` and trains it
on a language-model loss, and a callback recording each step's loss (Lightning is imported when they are used)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tests.strategies.helpers import lm_loss


def lit_module(build: Callable[[], torch.nn.Module], lr: float = 1e-2) -> Any:
    """A LightningModule whose ``configure_model`` builds ``build()`` once and whose ``training_step`` returns
    ``lm_loss(model(x), y)``; AdamW at ``lr``."""
    import lightning as L

    class LitModel(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: torch.nn.Module | None = None

        def configure_model(self) -> None:
            if self.model is None:
                self.model = build()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return lm_loss(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=lr)

    return LitModel()


def loss_recorder(reduce: bool = False) -> Any:
    """A callback whose ``values`` are the training steps' losses (``reduce``: averaged over the ranks)."""
    import lightning as L

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"].detach()
            self.values.append(float(trainer.strategy.reduce(loss, reduce_op="mean") if reduce else loss))

    return Losses()
