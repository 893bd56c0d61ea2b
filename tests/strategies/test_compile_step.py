"""Trainer strategies compile the LightningModule's steps (model + loss in one graph) by default; ``compile_step=False``
keeps the steps eager and compiles the submodules."""

from __future__ import annotations

import warnings

import pytest
import torch

import lightning_thunder as lt
from lightning_thunder.callbacks import CompileReport, ThroughputMonitor
from lightning_thunder.capture.compiled import COMPILED_METHODS, ThunderFunction
from lightning_thunder.plugins import FusedLinearCrossEntropy
from lightning_thunder.strategies import ThunderTrainerStrategy
from tests.strategies.helpers import lm_loss, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

STEPS = 3


def _module(manual: bool = False):
    import lightning as L

    class LitTiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_gpt()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            loss = lm_loss(self.model(batch[0]), batch[1])
            self.log("train_loss", loss)  # a graph break: runs eagerly
            if manual:
                opt = self.optimizers()
                self.manual_backward(loss)
                opt.step()
                opt.zero_grad()
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", lm_loss(self.model(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return LitTiny()


def _loader(steps: int = STEPS):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = (torch.cat(t) for t in zip(*token_batches(steps)))
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _fit(strategy, tmp_path, callbacks=()):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    torch._dynamo.reset()
    module = _module()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=STEPS, logger=CSVLogger(tmp_path),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks), limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2,
    )
    trainer.fit(module, _loader(), _loader(1))
    metrics = trainer.logged_metrics
    return module, float(metrics["train_loss"]), float(metrics["val_loss"]), trainer


def test_trainer_compiles_training_step_with_the_loss(tmp_path):
    eager_monitor = ThroughputMonitor(length_fn=lambda batch: batch[0].numel())
    _, train_ref, val_ref, _ = _fit("auto", tmp_path / "eager", [eager_monitor])
    fused = FusedLinearCrossEntropy(chunk_size=16)
    report, monitor = CompileReport(write_traces=True), ThroughputMonitor(length_fn=lambda batch: batch[0].numel())
    module, train, val, trainer = _fit(ThunderTrainerStrategy(plugins=[fused]), tmp_path / "thunder", [report, monitor])
    torch.testing.assert_close(torch.tensor([train, val]), torch.tensor([train_ref, val_ref]), rtol=1e-5, atol=1e-5)
    # FLOPs are measured on a meta copy of the module, whose steps run eagerly there.
    assert monitor.flops_per_batch == eager_monitor.flops_per_batch > 0, monitor.unavailable

    compiled = module.__dict__[COMPILED_METHODS]
    assert sorted(compiled) == ["training_step", "validation_step"]
    assert module.training_step is compiled["training_step"] and isinstance(module.training_step, ThunderFunction)
    assert not isinstance(module.model, lt.ThunderModule), "the network runs inside the compiled step"
    # The head and the loss were one graph: fused into linear_cross_entropy, in training and in validation.
    assert len(fused.rewritten) == 2 and fused.kept == [], (fused.rewritten, fused.kept)
    training_state = compiled["training_step"]._lt_state
    assert training_state.recompiles == [] and len(training_state.records) == 1, "validation recompiled training"
    assert any("log" in b for b in lt.compile_stats(module).graph_breaks), lt.compile_stats(module).graph_breaks

    # CompileReport found the compiled steps and wrote their traces: the training graph holds the loss.
    assert report.stats is not None and report.stats.graphs >= 2
    written = {p.name: p.read_text() for p in report.written}
    final = [text for name, text in written.items() if name.endswith("forward-final.py")]
    assert any("lightning_thunder.linear_cross_entropy" in text for text in final), sorted(written)
    backward = [text for name, text in written.items() if name.endswith("backward-final.py")]
    assert backward, sorted(written)


def test_compile_step_false_compiles_the_submodules(tmp_path):
    module, *_ = _fit(ThunderTrainerStrategy(compile_step=False), tmp_path)
    assert isinstance(module.model, lt.ThunderModule)
    assert COMPILED_METHODS not in module.__dict__ and "training_step" not in module.__dict__
    assert lt.compile_stats(module).graph_breaks == []


def test_manual_optimization_warns_and_compiles_the_submodules(tmp_path):
    import lightning as L

    torch._dynamo.reset()
    module = _module(manual=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy="thunder", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _loader(2))
    assert any("manual optimization" in str(w.message) and "compile_step=False" in str(w.message) for w in caught)
    assert isinstance(module.model, lt.ThunderModule) and COMPILED_METHODS not in module.__dict__


def _fabric_losses(strategy, with_loss: bool) -> tuple[list[float], torch.nn.Module]:
    from lightning.fabric import Fabric

    from lightning_thunder.strategies import ModelWithLoss

    torch._dynamo.reset()
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy)
    gpt = tiny_gpt()
    model = ModelWithLoss(gpt, lm_loss) if with_loss else gpt
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = fabric.setup(model, opt)
    losses = []
    for x, y in token_batches(STEPS):
        loss = model(x, y) if with_loss else lm_loss(model(x), y)
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, model


def test_fabric_model_with_loss_compiles_the_loss():
    from lightning_thunder.strategies import ThunderStrategy

    expected, _ = _fabric_losses("auto", with_loss=False)
    fused = FusedLinearCrossEntropy(chunk_size=16)
    got, model = _fabric_losses(ThunderStrategy(plugins=[fused]), with_loss=True)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert len(fused.rewritten) == 1 and lt.compile_stats(model).graphs == 1
    assert "lightning_thunder.linear_cross_entropy" in lt.last_traces(model)[-1].python()
    # The wrapper is the model for checkpoints and attributes.
    assert list(model.state_dict()) == list(tiny_gpt().state_dict())
    assert model.config is model.module.model.config
    model.max_seq_length = 8
    assert model.module.model.max_seq_length == 8
