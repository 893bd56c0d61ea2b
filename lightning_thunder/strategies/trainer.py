"""Trainer strategies: ``Trainer(strategy="thunder" | "thunder_ddp" | "thunder_fsdp")``.

By default (``compile_step=True``) the LightningModule's ``training_step``, ``validation_step``, ``test_step`` and
``predict_step`` are compiled with lightning_thunder (:func:`compile_steps`): the model *and the loss* are one graph,
so the loss runs fused and :class:`~lightning_thunder.plugins.FusedLinearCrossEntropy` replaces the output head and
the cross-entropy by one chunked op. ``self.log`` & co. run eagerly (a graph break each). With ``compile_step=False``
(and for manual optimization, with a warning) the steps stay eager and the networks the LightningModule holds are
compiled:

- ``thunder`` (:class:`ThunderTrainerStrategy`) and ``thunder_ddp`` (:class:`ThunderDDPTrainerStrategy`):
  the steps, or each direct submodule of the LightningModule that holds parameters (``self.model`` in the
  usual layout); ``thunder_ddp`` then wraps the LightningModule in DDP as Lightning's ``DDPStrategy`` does.
- ``thunder_fsdp`` (:class:`ThunderFSDPTrainerStrategy`): Lightning's ``ModelParallelStrategy`` (FSDP2, and
  tensor parallelism with ``tensor_parallel_size=N``) with the parallelization done for you after
  ``configure_model``: the layers are split over the tensor-parallel ranks, each transformer block is compiled
  and sharded, and the LightningModule is the FSDP root (its ``*_step`` methods are registered as FSDP forward
  methods, so the root's parameters are gathered around them). With ``compile_step`` the steps are compiled too; the
  blocks inside them run their own compiled graphs (a graph break around each).
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_thunder.capture.compiled import COMPILED_METHODS
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.blocks import BlockClass
from lightning_thunder.plugins.fsdp import FSDP
from lightning_thunder.plugins.tensor_parallel import TensorParallel, keep_qkv_state_order
from lightning_thunder.strategies.checkpoint import AtomicTrainerSave
from lightning_thunder.strategies.common import (
    OneDevice,
    check_compile_options,
    check_plugins,
    check_tensor_parallel_size,
    check_unsharded,
    compile_and_shard,
    compile_submodules,
    gradient_sync_disabled,
    mesh_shape,
    with_precision_plugins,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["ThunderTrainerStrategy", "ThunderDDPTrainerStrategy", "ThunderFSDPTrainerStrategy", "compile_steps"]

_STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_PARALLELIZED = "_lt_thunder_fsdp_applied"  # set on a LightningModule this strategy has sharded
#: LightningModule methods a compiled step calls eagerly: they talk to the Trainer (a graph break each).
_EAGER_METHODS = ("log", "log_dict", "print")


def compile_steps(
    module: pl.LightningModule, plugins: Sequence[Plugin] | None, options: Mapping[str, Any], strategy: str
) -> list[str]:
    """Compile ``module``'s ``training_step``, ``validation_step``, ``test_step`` and ``predict_step`` (those it
    overrides) in place.

    Each becomes an instance attribute running its compiled graphs (listed under
    :data:`~lightning_thunder.capture.compiled.COMPILED_METHODS`, where :func:`lightning_thunder.compile_stats` and
    the callbacks find them), so everything a step computes, the model and the loss, is captured together. Each step
    is its own compiled function: validation compiles its own (inference) graphs and never recompiles training's.
    ``self.log``, ``self.log_dict`` and ``self.print`` run eagerly (``torch.compiler.disable``): a graph break each.
    The plugins' ``transform_module`` runs once on ``module`` (it must change it in place). Steps compiled before
    are kept. Returns the names of the compiled steps.
    """
    import types

    import torch

    from lightning_thunder.api import compile as thunder_compile
    from lightning_thunder.api import default_plugins

    compiled = module.__dict__.get(COMPILED_METHODS)
    if compiled is None:
        for plugin in default_plugins() if plugins is None else plugins:
            if plugin.transform_module(module) is not module:
                raise TypeError(
                    f"{plugin.name}.transform_module returned another module, but strategy={strategy!r} compiles the "
                    "LightningModule's steps in place; pass compile_step=False to compile its submodules instead"
                )
        for name in _EAGER_METHODS:  # bound methods: a copy of the module (deepcopy) rebinds them to the copy
            setattr(module, name, types.MethodType(torch.compiler.disable(getattr(type(module), name)), module))
        compiled = module.__dict__[COMPILED_METHODS] = {}
    for name in _STEP_METHODS:  # those the LightningModule overrides: every step the Trainer calls
        if name not in compiled and is_overridden(name, module):
            compiled[name] = thunder_compile(getattr(module, name), plugins=plugins, **options)
            setattr(module, name, compiled[name])
    return list(compiled)


class _StepCompilation:
    """What the Trainer strategies share: compiling the LightningModule's steps (``compile_step``)."""

    compile_step: bool
    compile_options: dict[str, Any]

    def _compile_steps(self, module: pl.LightningModule, plugins: Sequence[Plugin] | None, strategy: str) -> bool:
        """Compile the steps when ``compile_step`` is on and the module optimizes automatically; whether it did."""
        if not self.compile_step:
            return False
        if not module.automatic_optimization:
            rank_zero_warn(
                f"strategy={strategy!r} does not compile the steps of {type(module).__name__}: it uses manual "
                "optimization (automatic_optimization=False), whose backward and optimizer calls inside training_step "
                "cannot be captured; the networks it holds are compiled and the loss runs eagerly. Pass "
                "compile_step=False to keep this without the warning"
            )
            return False
        compile_steps(module, plugins, self.compile_options, strategy)
        return True


class ThunderTrainerStrategy(_StepCompilation, OneDevice, AtomicTrainerSave, SingleDeviceStrategy):
    """``Trainer(strategy="thunder")``: one device; the LightningModule's steps (model + loss) are compiled at setup.

    Args:
        plugins: compiler plugins (``None``: the compiler's defaults).
        compile_options: options for :func:`lightning_thunder.compile`.
        device: the device; by default the one the Trainer's ``accelerator``/``devices`` select.
        accelerator, checkpoint_io, precision_plugin: as for Lightning's ``SingleDeviceStrategy``.
        compile_step: compile the ``*_step`` methods (:func:`compile_steps`); ``False``: the steps stay eager and
            each submodule that holds parameters is compiled.
    """

    def __init__(
        self,
        plugins: Sequence[Plugin] | None = None,
        compile_options: Mapping[str, Any] | None = None,
        device: _DEVICE | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        compile_step: bool = True,
    ) -> None:
        super().__init__(
            device="cpu" if device is None else device,
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.plugins = check_plugins(plugins, "thunder")
        self.compile_options = check_compile_options(compile_options)
        self.compile_step = bool(compile_step)
        self._init_one_device(device)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Compile the LightningModule's steps (or its submodules that hold parameters), then set up as
        ``SingleDeviceStrategy``."""
        assert self.lightning_module is not None
        plugins = with_precision_plugins(self.plugins, self.precision_plugin)
        if not self._compile_steps(self.lightning_module, plugins, "thunder"):
            compile_submodules(self.lightning_module, plugins, self.compile_options, "thunder")
        super().setup(trainer)


class ThunderDDPTrainerStrategy(_StepCompilation, AtomicTrainerSave, DDPStrategy):
    """``Trainer(strategy="thunder_ddp")``: the LightningModule's steps (model + loss) compiled, then DDP around it.

    Args:
        plugins: compiler plugins (``None``: the compiler's defaults).
        compile_options: options for :func:`lightning_thunder.compile`.
        compile_step: compile the steps (:func:`compile_steps`); ``False``: compile each submodule that holds
            parameters.
        **kwargs: Lightning's ``DDPStrategy`` arguments and ``DistributedDataParallel`` options.
    """

    def __init__(
        self,
        plugins: Sequence[Plugin] | None = None,
        compile_options: Mapping[str, Any] | None = None,
        compile_step: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plugins = check_plugins(plugins, "thunder_ddp")
        self.compile_options = check_compile_options(compile_options)
        self.compile_step = bool(compile_step)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Compile the LightningModule's steps (or its submodules that hold parameters), then set up as
        ``DDPStrategy`` (which wraps the LightningModule in DDP when fitting; DDP's forward runs the compiled step)."""
        assert self.lightning_module is not None
        plugins = with_precision_plugins(self.plugins, self.precision_plugin)
        if not self._compile_steps(self.lightning_module, plugins, "thunder_ddp"):
            compile_submodules(self.lightning_module, plugins, self.compile_options, "thunder_ddp")
        super().setup(trainer)


class ThunderFSDPTrainerStrategy(_StepCompilation, AtomicTrainerSave, ModelParallelStrategy):
    """``Trainer(strategy="thunder_fsdp")``: FSDP2 with each transformer block compiled by lightning_thunder, and
    tensor parallelism on a 2-D mesh with ``tensor_parallel_size=N``.

    No ``configure_model`` parallelization is needed (``configure_model`` may still build the model, e.g. under
    ``trainer.init_module(empty_init=True)``): at setup the layers are split over the tensor-parallel ranks (when
    ``N > 1``), every block is compiled and sharded, then the LightningModule is sharded as the root. The mesh is
    ``strategy.device_mesh`` (``("data_parallel", "tensor_parallel")``, tensor parallelism innermost; also
    ``self.device_mesh`` in the LightningModule), and the Trainer's distributed samplers split data by the
    data-parallel rank. Checkpoints (sharded or full), resuming, gradient clipping by norm and gradient
    accumulation (without gradient reduction on accumulating steps) work as with Lightning's
    ``ModelParallelStrategy``. Arguments as for :class:`~lightning_thunder.strategies.ThunderFSDPStrategy`, and
    ``compile_step``: also compile the LightningModule's steps (:func:`compile_steps`: embedding, head and loss in
    their graphs; the sharded blocks run their own compiled graphs inside them).
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
        compile_step: bool = True,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.plugins = check_plugins(plugins, "thunder_fsdp")
        self.compile_options = check_compile_options(compile_options)
        self.compile_step = bool(compile_step)
        self.fsdp = FSDP(
            block_cls=block_cls,
            reshard_after_forward=reshard_after_forward,
            cpu_offload=cpu_offload,
            activation_checkpointing=activation_checkpointing,
        )
        self.tensor_parallel_size = check_tensor_parallel_size(tensor_parallel_size)
        self.sequence_parallel = bool(sequence_parallel)

    @override
    def setup_environment(self) -> None:
        """Check the options against the devices, then initialize the process group and the
        (data_parallel x tensor_parallel) mesh."""
        self._data_parallel_size, self._tensor_parallel_size = mesh_shape(
            self.tensor_parallel_size, self.num_nodes, self.num_processes
        )
        if self.fsdp.cpu_offload and self.root_device.type == "cpu":
            raise ValueError(
                "ThunderFSDPTrainerStrategy(cpu_offload=True) needs CUDA devices: on accelerator='cpu' the "
                "parameters already live in CPU memory; set cpu_offload=False or use accelerator='cuda'"
            )
        super().setup_environment()

    def _parallelize(self, module: pl.LightningModule) -> None:
        # Same order as the Fabric strategy: split the layers, compile every block (one shared graph), then the FSDP
        # plugin puts activation checkpointing inside the compiled blocks and shards them and the root.
        tensor_parallel = None
        if self.tensor_parallel_size > 1:
            tensor_parallel = TensorParallel(
                mesh=self.device_mesh["tensor_parallel"], sequence_parallel=self.sequence_parallel,
                block_cls=self.fsdp.block_cls,
            )
        _, whole = compile_and_shard(
            module, self.fsdp, self.device_mesh, self.precision_plugin, self.plugins, self.compile_options,
            tensor_parallel,
        )
        # The steps compiled before FSDP wraps them: the root's all-gather runs outside their graphs.
        if tensor_parallel is not None and self.compile_step:
            rank_zero_warn(
                f"strategy='thunder_fsdp' with tensor_parallel_size={self.tensor_parallel_size} does not compile the "
                f"steps of {type(module).__name__}: Dynamo cannot trace DTensor's vocabulary-parallel embedding (its "
                "masked partial sum) and the fused head + loss op has no DTensor rule, so the embedding, the head and "
                "the loss run eagerly; the transformer blocks are compiled (with the tensor-parallel collectives in "
                "their graphs). Pass compile_step=False to keep this without the warning"
            )
        else:
            plugins = with_precision_plugins(self.plugins, self.precision_plugin)
            # One rank: the whole model is one FSDP unit and no block was compiled; compile the steps (or, when they
            # stay eager, the networks) whole, as strategy="thunder" does.
            if not self._compile_steps(module, plugins, "thunder_fsdp") and whole:
                compile_submodules(module, plugins, self.compile_options, "thunder_fsdp")
        # Lightning calls `training_step` & co. directly, not `forward`: make FSDP gather the root's parameters
        # (embeddings, head) around them too.
        from torch.distributed.fsdp import register_fsdp_forward_method

        for name in _STEP_METHODS:
            if is_overridden(name, module):
                register_fsdp_forward_method(module, name)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Compile and shard the LightningModule (first setup only), materialize meta-device parameters, set up
        the optimizers."""
        # Lightning's ModelParallelStrategy.setup, minus its requirement that `configure_model` parallelizes the
        # model itself (here the strategy does it), plus the parallelization (once: `validate` after `fit` reuses it).
        assert self.model is not None
        assert self.accelerator is not None
        assert self.lightning_module is not None
        self.accelerator.setup(trainer)
        if not getattr(self.lightning_module, _PARALLELIZED, False):
            check_unsharded(self.lightning_module, "thunder_fsdp")
            # Lower-precision ("*-true") weights are converted before sharding, so the shards are in that dtype.
            self.model = self.precision_plugin.convert_module(self.model)
            self._parallelize(self.lightning_module)
            setattr(self.lightning_module, _PARALLELIZED, True)
        _materialize_distributed_module(self.model, self.root_device)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        """Set up the optimizers as ``ModelParallelStrategy`` does; their ``state_dict`` keeps the state of
        tensor-parallel ``qkv`` weights in LitGPT's layout, as the model's does."""
        super().setup_optimizers(trainer)
        assert self.model is not None
        for optimizer in self.optimizers:
            keep_qkv_state_order(optimizer, self.model)

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """On gradient-accumulation steps, skip FSDP's reduce-scatter; the step that syncs reduces the sum."""
        assert self.model is not None
        with gradient_sync_disabled(self.model):
            yield
