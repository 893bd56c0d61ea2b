"""Fabric strategies: ``Fabric(strategy="thunder" | "thunder_ddp" | "thunder_fsdp")``.

Each is Lightning's own strategy with the model compiled by lightning_thunder at ``fabric.setup``:

- ``thunder`` (:class:`ThunderStrategy`): ``SingleDeviceStrategy``; the module is compiled.
- ``thunder_ddp`` (:class:`ThunderDDPStrategy`): ``DDPStrategy``; DDP wraps the compiled module.
- ``thunder_fsdp`` (:class:`ThunderFSDPStrategy`): ``ModelParallelStrategy`` (FSDP2, and tensor parallelism with
  ``tensor_parallel_size=N``) whose parallelize function applies the
  :class:`~lightning_thunder.plugins.TensorParallel` plugin, compiles each transformer block and applies the
  :class:`~lightning_thunder.plugins.FSDP` plugin; Lightning's machinery does launching, distributed checkpoints,
  clipping and ``no_backward_sync``.

The loss in the compiled graph: ``fabric.setup`` compiles the module's ``forward``, so a module whose forward returns
the loss is compiled with its loss. :class:`ModelWithLoss` makes one from a model and a loss function without changing
the model or its checkpoints::

    model, optimizer = fabric.setup(ModelWithLoss(GPT(config), loss_fn), optimizer)
    loss = model(input_ids, targets)          # logits and loss in one graph: FusedLinearCrossEntropy applies
    fabric.backward(loss)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.fabric.utilities.types import _DEVICE
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_thunder.api import compile as thunder_compile
from lightning_thunder.capture.compiled import ModuleView
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.blocks import BlockClass
from lightning_thunder.plugins.fsdp import FSDP
from lightning_thunder.plugins.tensor_parallel import TensorParallel, keep_qkv_state_order
from lightning_thunder.strategies.checkpoint import AtomicFabricSave
from lightning_thunder.strategies.common import (
    OneDevice,
    check_compile_options,
    check_plugins,
    check_single_device,
    check_tensor_parallel_size,
    check_unsharded,
    compile_and_shard,
    mesh_shape,
    with_precision_plugins,
)
from lightning_thunder.strategies.optimizers import (
    check_repointable,
    check_sharded_optimizer,
    parameter_names,
    repoint_optimizers,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.optim.lr_scheduler import LRScheduler

__all__ = ["ModelWithLoss", "ThunderStrategy", "ThunderDDPStrategy", "ThunderFSDPStrategy"]


class ModelWithLoss(ModuleView):
    """A model and its loss as one module: ``ModelWithLoss(model, loss_fn)(inputs, targets)`` returns
    ``loss_fn(model(inputs), targets)``.

    Compiled as a whole (``fabric.setup`` with ``strategy="thunder"`` or ``"thunder_ddp"``,
    :func:`lightning_thunder.compile`), the loss is part of the graph: it runs fused, and
    :class:`~lightning_thunder.plugins.FusedLinearCrossEntropy` (a default plugin with CUDA) replaces the output head
    and the cross-entropy by one chunked op that never materializes the logits. (``thunder_fsdp`` compiles the
    transformer blocks, not the root, so there the loss runs eagerly.)

    Nothing about the model changes: this module shares the model's parameters, buffers, submodules and state-dict
    hooks, so ``parameters()``, ``state_dict()`` keys (no ``model.`` prefix) and ``load_state_dict`` are the model's,
    checkpoints load into either, and attributes it does not have (``config``, ``flops_per_batch``) are read from and
    written to the model.

    Args:
        model: the network; ``model(inputs, **kwargs)`` returns the logits.
        loss_fn: ``loss_fn(logits, targets) -> loss``, e.g. the cross-entropy over the last dimension (in fp32, as
            LitGPT computes it): ``F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())``.

    Example (a LitGPT-style Fabric loop)::

        fabric = Fabric(strategy="thunder", precision="bf16-mixed")
        model = ModelWithLoss(GPT(config), lm_loss)
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        model, optimizer = fabric.setup(model, optimizer)
        loss = model(input_ids, targets)
        fabric.backward(loss)
    """

    _target = "model"
    _own = ("loss_fn",)

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelWithLoss(model, loss_fn) takes an nn.Module as model, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(logits, targets), got {loss_fn!r}")
        super().__init__(model)
        self.loss_fn = loss_fn

    def forward(self, inputs: Any, targets: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``loss_fn(model(inputs, **kwargs), targets)``."""
        return self.loss_fn(self.model(inputs, **kwargs), targets)

    def extra_repr(self) -> str:
        return f"loss_fn={getattr(self.loss_fn, '__name__', self.loss_fn)}"


class ThunderStrategy(OneDevice, AtomicFabricSave, SingleDeviceStrategy):
    """``Fabric(strategy="thunder")``: one device; ``fabric.setup`` compiles the module with lightning_thunder.

    Args:
        plugins: compiler plugins (``None``: the compiler's defaults).
        compile_options: options for :func:`lightning_thunder.compile` (``dynamic``, ``partitioner``, ...).
        device: the device; by default the one Fabric's ``accelerator``/``devices`` select.
        accelerator, checkpoint_io, precision: as for Lightning's ``SingleDeviceStrategy``.
    """

    def __init__(
        self,
        plugins: Sequence[Plugin] | None = None,
        compile_options: Mapping[str, Any] | None = None,
        device: _DEVICE | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(
            device="cpu" if device is None else device,
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision=precision,
        )
        self.plugins = check_plugins(plugins, "thunder")
        self.compile_options = check_compile_options(compile_options)
        self._init_one_device(device)

    @override
    def setup_environment(self) -> None:
        """Check that one device on one node was requested."""
        check_single_device("thunder", self._parallel_devices, self._num_nodes)
        super().setup_environment()

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Compile ``module`` (parameters and ``state_dict`` keys stay those of ``module``)."""
        plugins = with_precision_plugins(self.plugins, self.precision)
        return thunder_compile(module, plugins=plugins, **self.compile_options)


class ThunderDDPStrategy(AtomicFabricSave, DDPStrategy):
    """``Fabric(strategy="thunder_ddp")``: DistributedDataParallel around the module compiled by lightning_thunder.

    NCCL on GPU, Gloo on CPU. Gradient synchronization, ``no_backward_sync``, checkpoints and launching are
    Lightning's ``DDPStrategy``.

    Args:
        plugins: compiler plugins (``None``: the compiler's defaults).
        compile_options: options for :func:`lightning_thunder.compile`.
        **kwargs: Lightning's ``DDPStrategy`` arguments (``process_group_backend``, ``timeout``,
            ``start_method``, ...) and ``DistributedDataParallel`` options (``bucket_cap_mb``, ...).
    """

    def __init__(
        self,
        plugins: Sequence[Plugin] | None = None,
        compile_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plugins = check_plugins(plugins, "thunder_ddp")
        self.compile_options = check_compile_options(compile_options)

    @override
    def setup_module(self, module: nn.Module) -> DistributedDataParallel:
        """Compile ``module``, then wrap it in DDP (rank 0's weights are broadcast to every rank)."""
        plugins = with_precision_plugins(self.plugins, self.precision)
        compiled = thunder_compile(module, plugins=plugins, **self.compile_options)
        return super().setup_module(compiled)


class ThunderFSDPStrategy(AtomicFabricSave, ModelParallelStrategy):
    """``Fabric(strategy="thunder_fsdp")``: FSDP2 with each transformer block compiled by lightning_thunder, and
    tensor parallelism on a 2-D mesh with ``tensor_parallel_size=N``.

    The ranks form a ``("data_parallel", "tensor_parallel")`` mesh (``strategy.device_mesh``) with tensor parallelism
    innermost: ranks ``0..N-1`` split each layer between them, and so on. At ``fabric.setup`` the layers are split
    over the tensor-parallel dimension (:class:`~lightning_thunder.plugins.TensorParallel`, when ``N > 1``), every
    block is compiled (one graph shared by all blocks, on the per-rank shapes) and, with activation checkpointing
    inside its graph, the model is sharded with ``fully_shard`` over the data-parallel dimension (embedding, each
    block, [final norm + head], root). ``fabric.setup_dataloaders`` splits data by the data-parallel rank (all ranks
    of a tensor-parallel group read the same batch); for your own sampling use
    ``strategy.distributed_sampler_kwargs`` (``num_replicas``, ``rank``). The mixed-precision policy follows
    Fabric's ``precision`` (``"bf16-mixed"``: bf16 compute, fp32 gradient reduction). Meta-device models
    (``fabric.init_module(empty_init=True)``) are materialized after sharding with ``reset_parameters()``.
    Checkpoints, sharded or full, hold the whole model's tensors in LitGPT's layout whatever the mesh, and gradient
    clipping uses the norm over both mesh dimensions.

    An optimizer created before ``fabric.setup(model, optimizer)`` is re-pointed to the sharded parameters.

    Args:
        plugins: compiler plugins for the blocks (``None``: the compiler's defaults).
        compile_options: options for :func:`lightning_thunder.compile`.
        block_cls: the transformer block class (or a tuple); ``None`` detects the repeated block.
        reshard_after_forward: free each block's gathered parameters after its forward (``True``), keep them
            for the backward (``False``), or an int (see :class:`~lightning_thunder.plugins.FSDP`).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory (CUDA only).
        activation_checkpointing: recompute each block's activations in the backward.
        save_distributed_checkpoint: ``True``: ``fabric.save`` writes a directory with one shard file per rank;
            ``False``: a single file with the full state, assembled on rank 0.
        tensor_parallel_size: ranks that split each layer (tensor parallelism, innermost); it must divide the
            world size, and the data-parallel size is the quotient. ``1``: FSDP only.
        sequence_parallel: with tensor parallelism, shard norms and activations between blocks along the sequence
            (see :class:`~lightning_thunder.plugins.TensorParallel`).
        process_group_backend, timeout: as for Lightning's ``ModelParallelStrategy``.
    """

    def __init__(
        self,
        plugins: Sequence[Plugin] | None = None,
        compile_options: Mapping[str, Any] | None = None,
        block_cls: BlockClass | None = None,
        reshard_after_forward: bool | int = True,
        cpu_offload: bool = False,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        tensor_parallel_size: int = 1,
        sequence_parallel: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            parallelize_fn=self._parallelize,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.plugins = check_plugins(plugins, "thunder_fsdp")
        self.compile_options = check_compile_options(compile_options)
        # The FSDP options, validated now; the mesh and precision policy are known at setup.
        self.fsdp = FSDP(
            block_cls=block_cls,
            reshard_after_forward=reshard_after_forward,
            cpu_offload=cpu_offload,
            activation_checkpointing=activation_checkpointing,
        )
        self.tensor_parallel_size = check_tensor_parallel_size(tensor_parallel_size)
        self.sequence_parallel = bool(sequence_parallel)
        self._sharded_module: nn.Module | None = None

    @override
    def setup_environment(self) -> None:
        """Check the options against the devices, then initialize the process group and the
        (data_parallel x tensor_parallel) mesh."""
        self._data_parallel_size, self._tensor_parallel_size = mesh_shape(
            self.tensor_parallel_size, self.num_nodes, self.num_processes
        )
        if self.fsdp.cpu_offload and self.root_device.type == "cpu":
            raise ValueError(
                "ThunderFSDPStrategy(cpu_offload=True) needs CUDA devices: on accelerator='cpu' the parameters "
                "already live in CPU memory; set cpu_offload=False or use accelerator='cuda'"
            )
        super().setup_environment()

    def _parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # Split the layers, compile the blocks, then checkpoint and shard them (torchtitan's order; see
        # compile_and_shard).
        check_unsharded(module, "thunder_fsdp")
        tensor_parallel = None
        if self.tensor_parallel_size > 1:
            tensor_parallel = TensorParallel(
                mesh=device_mesh["tensor_parallel"], sequence_parallel=self.sequence_parallel,
                block_cls=self.fsdp.block_cls,
            )
        module, whole = compile_and_shard(
            module, self.fsdp, device_mesh, self.precision, self.plugins, self.compile_options, tensor_parallel
        )
        self._sharded_module = module
        if whole:  # one rank: one FSDP unit, compiled as a whole (as strategy="thunder" does)
            plugins = with_precision_plugins(self.plugins, self.precision)
            return thunder_compile(module, plugins=plugins, **self.compile_options)
        return module

    @override
    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer], scheduler: LRScheduler | None = None
    ) -> tuple[nn.Module, list[Optimizer], LRScheduler | None]:
        """Shard the module and point the optimizers (built before sharding, still stateless) at the sharded
        parameters."""
        names = parameter_names(module)
        check_repointable(optimizers, names, "thunder_fsdp")  # fail before the model is changed
        module = self.setup_module(module)
        repoint_optimizers(optimizers, names, module, "thunder_fsdp")
        for optimizer in optimizers:
            keep_qkv_state_order(optimizer, module)
        return module, optimizers, scheduler

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """Check that ``optimizer`` was built from the sharded model's parameters."""
        check_sharded_optimizer(optimizer, "thunder_fsdp")
        if self._sharded_module is not None:
            keep_qkv_state_order(optimizer, self._sharded_module)
        return optimizer

    @override
    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: float | int,
        norm_type: float | int = 2.0,
        error_if_nonfinite: bool = True,
    ) -> torch.Tensor:
        """Clip by the norm of the *whole* gradient: ``clip_grad_norm_`` on the sharded gradients reduces the
        per-shard norms across ranks, over both mesh dimensions (DTensor), so every rank scales by the same global
        norm (returned as a plain tensor)."""
        from torch.distributed.tensor import DTensor

        total = super().clip_gradients_norm(module, optimizer, max_norm, norm_type, error_if_nonfinite)
        return total.full_tensor() if isinstance(total, DTensor) else total
