"""Lightning strategies that compile the model with lightning_thunder.

``import lightning_thunder`` registers the names, so ``Fabric(strategy="thunder_fsdp")`` and
``Trainer(strategy="thunder_fsdp")`` work as is. Instantiate a class to pass options::

    Fabric(strategy=ThunderFSDPStrategy(plugins=[...], block_cls=Block, activation_checkpointing=True))
    Trainer(strategy=ThunderFSDPTrainerStrategy(reshard_after_forward=False))

The Trainer strategies compile the LightningModule's steps, loss included; with Fabric, set up a module whose forward
returns the loss, e.g. ``fabric.setup(ModelWithLoss(model, loss_fn))`` (:class:`ModelWithLoss`).

========================  ===============================  ==========================================
name                      Fabric                           Trainer
========================  ===============================  ==========================================
``"thunder"``             :class:`ThunderStrategy`         :class:`ThunderTrainerStrategy`
``"thunder_ddp"``         :class:`ThunderDDPStrategy`      :class:`ThunderDDPTrainerStrategy`
``"thunder_fsdp"``        :class:`ThunderFSDPStrategy`     :class:`ThunderFSDPTrainerStrategy`
========================  ===============================  ==========================================
"""

from lightning_thunder.strategies.fabric import ModelWithLoss, ThunderDDPStrategy, ThunderFSDPStrategy, ThunderStrategy
from lightning_thunder.strategies.registry import register_strategies
from lightning_thunder.strategies.trainer import (
    ThunderDDPTrainerStrategy,
    ThunderFSDPTrainerStrategy,
    ThunderTrainerStrategy,
    compile_steps,
)

__all__ = [
    "ModelWithLoss",
    "ThunderDDPStrategy",
    "ThunderDDPTrainerStrategy",
    "ThunderFSDPStrategy",
    "ThunderFSDPTrainerStrategy",
    "ThunderStrategy",
    "ThunderTrainerStrategy",
    "compile_steps",
    "register_strategies",
]
