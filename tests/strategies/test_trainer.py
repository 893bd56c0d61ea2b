"""Trainer strategies on 2 CPU processes (Gloo), checked against Lightning's own strategies.

The model is built in ``configure_model``. As in the Fabric tests, Lightning's ``fsdp`` (FSDP1) refuses CPU
accelerators; the FSDP reference is Lightning's ``ModelParallelStrategy`` with eager FSDP2 applied in
``configure_model`` (the way Lightning documents it), and ``ddp``.
"""

from __future__ import annotations

import pytest
import torch

from tests.strategies.helpers import WORLD_SIZE, lm_loss, spawn, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

STEPS = 10
LR = 1e-2
RTOL, ATOL = 1e-4, 1e-5


def _lightning_module(eager_fsdp2: bool = False):
    """A LightningModule that builds the tiny LitGPT model in ``configure_model`` (sharding it itself when it is
    the reference for Lightning's ``ModelParallelStrategy``)."""
    import lightning as L

    class LitTiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: torch.nn.Module | None = None

        def configure_model(self) -> None:
            if self.model is not None:
                return
            self.model = tiny_gpt(seed=0)
            if eager_fsdp2:
                from litgpt.model import Block
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for block in self.model.transformer.h:
                    if isinstance(block, Block):
                        fully_shard(block, mesh=mesh)
                fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return lm_loss(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", lm_loss(self.model(x), y), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    return LitTiny()


def _loader(steps: int, accumulate: int = 1):
    """Batches of 2 rows per rank; Lightning's DistributedSampler (no shuffling) splits them across ranks."""
    from torch.utils.data import DataLoader, TensorDataset

    rows = [b for b in token_batches(steps * accumulate, batch=2)]
    x = torch.cat([r[0] for r in rows])
    y = torch.cat([r[1] for r in rows])
    return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=False)


def _loss_recorder():
    import lightning as L

    class LossRecorder(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.synced_while_accumulating: list[bool] = []
            self.batch_idx = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batch_idx = batch_idx

        def on_after_backward(self, trainer, pl_module) -> None:
            if (self.batch_idx + 1) % trainer.accumulate_grad_batches:  # an accumulating micro-batch
                grads = [p.grad for p in pl_module.parameters()]
                self.synced_while_accumulating.append(any(g is not None for g in grads))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

    return LossRecorder()


def _strategy(name: str, **kwargs):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_thunder.strategies import ThunderFSDPTrainerStrategy

    if name == "lightning_fsdp2":
        return ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1, **kwargs)
    if name == "thunder_fsdp" and kwargs:
        return ThunderFSDPTrainerStrategy(**kwargs)
    return name


def _trainer(strategy, callbacks: list, **kwargs):
    import lightning as L

    torch._dynamo.reset()
    defaults = dict(
        accelerator="cpu", devices=WORLD_SIZE, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(strategy=strategy, callbacks=callbacks, **{**defaults, **kwargs})


def _fit_with_clipping_and_accumulation(rank: int, names: list[str]) -> dict:
    import lightning_thunder as lt

    out = {}
    for name in names:
        recorder = _loss_recorder()
        trainer = _trainer(
            _strategy(name), [recorder], max_steps=STEPS, accumulate_grad_batches=2, gradient_clip_val=0.3,
            gradient_clip_algorithm="norm",
        )
        module = _lightning_module(eager_fsdp2=name == "lightning_fsdp2")
        trainer.fit(module, _loader(STEPS, accumulate=2))
        # One loss per micro-batch; the optimizer stepped every 2.
        out[name] = {
            "losses": recorder.losses,
            "global_step": trainer.global_step,
            "synced_while_accumulating": recorder.synced_while_accumulating,
        }
        if name.startswith("thunder"):
            stats = lt.compile_stats(module)
            out[name].update(graphs=stats.graphs, graph_breaks=stats.graph_breaks)
    return out


@pytest.mark.slow
def test_trainer_strategies_match_lightning_with_clipping_and_accumulation():
    res = spawn(_fit_with_clipping_and_accumulation, ["ddp", "lightning_fsdp2", "thunder_ddp", "thunder_fsdp"])[0]
    ref = res["ddp"]["losses"]
    assert len(ref) == 2 * STEPS and res["ddp"]["global_step"] == STEPS
    assert sum(ref[-4:]) < sum(ref[:4]) - 0.5, f"the reference run does not learn: {ref}"
    for name in ("lightning_fsdp2", "thunder_ddp", "thunder_fsdp"):
        got = res[name]
        assert got["global_step"] == STEPS
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref), rtol=RTOL, atol=ATOL, msg=name)
    # FSDP wrote no (reduced) sharded gradients on accumulating micro-batches: their reduce-scatter was skipped.
    fsdp_syncs = res["thunder_fsdp"]["synced_while_accumulating"]
    assert len(fsdp_syncs) == STEPS and not any(fsdp_syncs), fsdp_syncs
    # thunder_ddp: training_step (model + loss) is one graph. thunder_fsdp: the blocks' graph, and training_step's
    # graphs around the FSDP units (the embedding, the sharded blocks, which run their own compiled graphs, and the
    # root; FSDP's hooks and the compiled blocks are graph breaks).
    assert res["thunder_ddp"]["graphs"] == 1 and res["thunder_ddp"]["graph_breaks"] == [], res["thunder_ddp"]
    fsdp = res["thunder_fsdp"]
    assert fsdp["graphs"] == 4, fsdp
    assert all("call_compiled" in b or "_fsdp_common" in b for b in fsdp["graph_breaks"]), fsdp["graph_breaks"]


RESUME_RUNS = {"sharded": {}, "full": {"save_distributed_checkpoint": False}}
STEPS_PER_EPOCH = 3


def _fit_and_checkpoint(rank: int, root: str) -> dict:
    """Per checkpoint format: the losses of an uninterrupted 2-epoch run, and a 1-epoch run that checkpoints."""
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint

    out = {}
    for fmt, kwargs in RESUME_RUNS.items():
        recorder = _loss_recorder()
        trainer = _trainer(_strategy("thunder_fsdp", **kwargs), [recorder], max_epochs=2)
        module = _lightning_module()
        trainer.fit(module, _loader(STEPS_PER_EPOCH), _loader(1))
        fit_val_loss = float(trainer.callback_metrics["val_loss"])
        # validate() after fit sets the strategy up again: the model is already sharded and compiled.
        validated = trainer.validate(module, _loader(1), verbose=False)[0]["val_loss"]
        checkpoint = ModelCheckpoint(dirpath=Path(root) / fmt, filename="epoch{epoch}", save_top_k=-1)
        trainer = _trainer(_strategy("thunder_fsdp", **kwargs), [checkpoint], max_epochs=1, enable_checkpointing=True)
        trainer.fit(_lightning_module(), _loader(STEPS_PER_EPOCH))
        out[fmt] = {
            "losses": recorder.losses,
            "checkpoint": checkpoint.best_model_path,
            "fit_val_loss": fit_val_loss,
            "validated": validated,
        }
    return out


def _resume(rank: int, paths: dict) -> dict:
    out = {}
    for fmt, kwargs in RESUME_RUNS.items():
        recorder = _loss_recorder()
        trainer = _trainer(_strategy("thunder_fsdp", **kwargs), [recorder], max_epochs=2)
        trainer.fit(_lightning_module(), _loader(STEPS_PER_EPOCH), ckpt_path=paths[fmt])
        out[fmt] = {"losses": recorder.losses, "global_step": trainer.global_step}
    return out


@pytest.mark.slow
def test_trainer_fsdp_checkpoint_callback_and_resume_in_fresh_processes(tmp_path):
    from pathlib import Path

    first = spawn(_fit_and_checkpoint, str(tmp_path))[0]
    paths = {fmt: first[fmt]["checkpoint"] for fmt in RESUME_RUNS}
    assert Path(paths["sharded"]).is_dir() and (Path(paths["sharded"]) / "meta.pt").is_file(), paths
    assert Path(paths["full"]).is_file(), paths
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith((".partial", ".old"))]
    resumed = spawn(_resume, paths)[0]
    for fmt in RESUME_RUNS:
        uninterrupted = first[fmt]["losses"]
        assert len(uninterrupted) == 2 * STEPS_PER_EPOCH
        assert resumed[fmt]["global_step"] == 2 * STEPS_PER_EPOCH
        assert resumed[fmt]["losses"] == uninterrupted[STEPS_PER_EPOCH:], f"{fmt}: resumed run diverges"
        assert first[fmt]["validated"] == pytest.approx(first[fmt]["fit_val_loss"], rel=1e-6), first[fmt]
