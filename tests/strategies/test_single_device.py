"""``strategy="thunder"`` (one device) with Fabric and the Trainer, against the same run without it."""

from __future__ import annotations

import pytest
import torch

import lightning_thunder as lt
from tests.strategies.helpers import lm_loss, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

STEPS = 4


def _fabric_losses(strategy: str) -> tuple[list[float], torch.nn.Module]:
    from lightning.fabric import Fabric

    torch._dynamo.reset()
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy)
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = fabric.setup(model, opt)
    losses = []
    for x, y in token_batches(STEPS):
        loss = lm_loss(model(x), y)
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=0.5)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, model


def test_fabric_thunder_matches_eager():
    expected, _ = _fabric_losses("auto")
    got, model = _fabric_losses("thunder")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert isinstance(model._forward_module, lt.ThunderModule) and lt.compile_stats(model).graphs == 1
    assert list(model.state_dict()) == list(tiny_gpt().state_dict())


def _trainer_losses(strategy: str) -> tuple[list[float], torch.nn.Module]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class LitTiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_gpt()
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = lm_loss(self.model(batch[0]), batch[1])
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch._dynamo.reset()
    x, y = (torch.cat(t) for t in zip(*token_batches(STEPS)))
    module = LitTiny()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.5,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    return module.losses, module


def test_trainer_thunder_matches_eager():
    from lightning_thunder.strategies import ThunderTrainerStrategy

    expected, _ = _trainer_losses("auto")
    got, module = _trainer_losses(ThunderTrainerStrategy(compile_step=False))  # compile_step: test_compile_step.py
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert isinstance(module.model, lt.ThunderModule), "the LightningModule's network must be compiled"
    assert lt.compile_stats(module).graphs == 1
