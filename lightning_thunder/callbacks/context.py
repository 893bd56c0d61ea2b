"""What a monitor needs from the loop running it, the same for a Lightning ``Trainer`` and ``Fabric``.

:class:`RunContext` wraps either one: world size and rank, the device, the precision plugin, the
user's model, collectives (``all_reduce``, ``all_gather``), logging through the configured Lightning
loggers, printing on rank 0 and the log directory. The monitors are written against it once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from lightning.pytorch import LightningModule, Trainer

__all__ = ["RunContext"]


class RunContext:
    """A Trainer or a Fabric, seen through what the monitors use.

    Build it with :meth:`for_trainer` or :meth:`for_fabric`.
    """

    def __init__(
        self,
        *,
        trainer: Trainer | None = None,
        pl_module: LightningModule | None = None,
        fabric: Fabric | None = None,
        module: nn.Module | None = None,
    ) -> None:
        if (trainer is None) == (fabric is None):
            raise ValueError("RunContext needs exactly one of trainer= or fabric=")
        self.trainer = trainer
        self.pl_module = pl_module
        self.fabric = fabric
        self._module = module

    @classmethod
    def for_trainer(cls, trainer: Trainer, pl_module: LightningModule) -> RunContext:
        """The context of a Trainer run."""
        return cls(trainer=trainer, pl_module=pl_module)

    @classmethod
    def for_fabric(cls, fabric: Fabric, module: nn.Module | None) -> RunContext:
        """The context of a Fabric loop; ``module`` is what ``fabric.setup`` returned (or ``None``)."""
        return cls(fabric=fabric, module=module)

    # ----------------------------------------------------------------------------------- facts
    @property
    def is_trainer(self) -> bool:
        """Whether this is a Trainer run (else Fabric)."""
        return self.trainer is not None

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return int(self.trainer.world_size if self.trainer is not None else self.fabric.world_size)

    @property
    def replicas_per_batch(self) -> int:
        """How many ranks process each batch together: the tensor-parallel size of the strategy's device mesh
        (``strategy.device_mesh["tensor_parallel"]``), 1 without tensor parallelism. Global counts of batches,
        samples, tokens and FLOPs sum every rank's and divide by this."""
        strategy = self.trainer.strategy if self.trainer is not None else self.fabric.strategy
        try:
            mesh = strategy.device_mesh  # ModelParallelStrategy's (thunder_fsdp): raises before it exists
        except (AttributeError, RuntimeError):
            return 1
        names = getattr(mesh, "mesh_dim_names", None) or ()
        return int(mesh["tensor_parallel"].size()) if "tensor_parallel" in names else 1

    @property
    def global_rank(self) -> int:
        """This process's rank."""
        return int(self.trainer.global_rank if self.trainer is not None else self.fabric.global_rank)

    @property
    def is_global_zero(self) -> bool:
        """Whether this is rank 0 (the one that logs and prints)."""
        return self.global_rank == 0

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self.trainer.strategy.root_device if self.trainer is not None else self.fabric.device

    @property
    def precision_plugin(self) -> object:
        """The Lightning precision plugin in use."""
        return self.trainer.precision_plugin if self.trainer is not None else self.fabric.strategy.precision

    @property
    def model(self) -> nn.Module | None:
        """What the user trains: the LightningModule (Trainer) or the module ``fabric.setup`` returned."""
        return self.pl_module if self.trainer is not None else self._module

    @property
    def wrapped_model(self) -> nn.Module | None:
        """The model as it runs, wrappers included (DDP, Fabric's module wrapper), for finding compiled
        submodules."""
        if self.trainer is not None:
            model = self.trainer.strategy.model
            return model if isinstance(model, nn.Module) else self.pl_module
        return self._module

    @property
    def user_model(self) -> nn.Module | None:
        """The model without Lightning's wrappers: the LightningModule, or for Fabric the module that was
        passed to ``fabric.setup`` (``_FabricModule.module``)."""
        if self.trainer is not None:
            return self.pl_module
        module = self._module
        inner = getattr(module, "module", None)
        return inner if isinstance(inner, nn.Module) else module

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The Trainer's optimizers (Fabric does not list them: the monitors see them in
        ``on_after_optimizer_step``)."""
        return list(self.trainer.optimizers) if self.trainer is not None else []

    def log_dir(self) -> Path | None:
        """Where files go: ``trainer.log_dir``, or the first Fabric logger's ``log_dir`` (``None`` when
        Fabric has no logger). Must be called on every rank (the Trainer broadcasts it)."""
        if self.trainer is not None:
            path = self.trainer.log_dir
            return Path(path) if path else None
        for logger in self.fabric.loggers:
            path = getattr(logger, "log_dir", None) or getattr(logger, "root_dir", None)
            if path:
                return Path(path)
        return None

    # ----------------------------------------------------------------------------------- actions
    def all_reduce(self, values: Sequence[float], op: str) -> list[float]:
        """Reduce ``values`` (float64) over all processes with ``op`` (``"sum"`` or ``"max"``)."""
        if op not in ("sum", "max"):
            raise ValueError(f"op={op!r}: use 'sum' or 'max'")
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        if self.trainer is not None:
            out = self.trainer.strategy.reduce(tensor, reduce_op=op)
        else:
            out = self.fabric.all_reduce(tensor, reduce_op=op)
        return [float(v) for v in out.cpu().tolist()]

    def all_gather(self, values: Sequence[float]) -> list[list[float]]:
        """``values`` of every process, indexed by rank."""
        if self.world_size == 1:
            return [[float(v) for v in values]]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        if self.trainer is not None:
            out = self.trainer.strategy.all_gather(tensor)
        else:
            out = self.fabric.all_gather(tensor)
        return [[float(v) for v in row] for row in out.reshape(self.world_size, -1).cpu().tolist()]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Send ``metrics`` to every configured Lightning logger (rank 0 only)."""
        if not metrics or not self.is_global_zero:
            return
        if self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_metrics(dict(metrics), step=step)
        else:
            self.fabric.log_dict(dict(metrics), step=step)

    def flush_loggers(self) -> None:
        """Write what the loggers buffer (Fabric does not finalize loggers itself; the Trainer does)."""
        if self.fabric is not None and self.is_global_zero:
            for logger in self.fabric.loggers:
                logger.save()

    def show_in_progress_bar(self, metrics: Mapping[str, float]) -> None:
        """Put ``metrics`` in the Trainer's progress bar (Fabric has none: read the monitor's
        ``progress_bar_metrics`` instead)."""
        if self.trainer is None or self.pl_module is None:
            return
        for name, value in metrics.items():
            self.pl_module.log(name, float(value), prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def print(self, text: str) -> None:
        """Print on rank 0."""
        if self.trainer is not None:
            self.trainer.print(text)
        else:
            self.fabric.print(text)

    def synchronize(self) -> None:
        """Wait for the device's queued work (so wall-clock times are right on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, fallback: int) -> int:
        """The step to log at: ``trainer.global_step`` (optimizer steps), or ``fallback`` under Fabric."""
        return int(self.trainer.global_step) if self.trainer is not None else fallback

    def log_every_n_steps(self, requested: int | None) -> int:
        """``requested``, or the Trainer's ``log_every_n_steps``, or 50 under Fabric (Lightning's default)."""
        if requested is not None:
            return requested
        return int(self.trainer.log_every_n_steps) if self.trainer is not None else 50
