"""What the Fabric and Trainer strategies share: option checks, the mixed-precision policy, compiling
a LightningModule's submodules, and switching FSDP's gradient synchronization."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_thunder.capture.compiled import ThunderModule
from lightning_thunder.capture.options import CompileOptions
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.ddp import DDP
from lightning_thunder.plugins.fsdp import FSDP
from lightning_thunder.plugins.tensor_parallel import TensorParallel

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = [
    "check_plugins",
    "with_precision_plugins",
    "check_compile_options",
    "check_tensor_parallel_size",
    "mesh_shape",
    "fsdp_mixed_precision",
    "compile_submodules",
    "gradient_sync_disabled",
    "check_single_device",
    "check_unsharded",
]

_PARALLEL_PLUGINS = (FSDP, DDP, TensorParallel)


def check_plugins(plugins: Sequence[Plugin] | None, strategy: str) -> list[Plugin] | None:
    """Validate the compiler plugins given to a strategy (``None`` keeps the compiler's defaults).

    Parallelism plugins are rejected: the strategy applies its own engine.
    """
    if plugins is None:
        return None
    if isinstance(plugins, Plugin):
        raise TypeError(f"plugins must be a list of Plugin instances; wrap the single plugin: plugins=[{plugins!r}]")
    checked = list(plugins)
    for p in checked:
        if isinstance(p, type):
            raise TypeError(f"plugins must hold Plugin instances, got the class {p.__name__}; use {p.__name__}()")
        if not isinstance(p, Plugin):
            raise TypeError(f"plugins must hold lightning_thunder.Plugin instances, got {type(p).__name__}: {p!r}")
        if isinstance(p, _PARALLEL_PLUGINS):
            raise ValueError(
                f"plugins=[..., {p!r}] conflicts with strategy={strategy!r}, which applies its own parallelism; "
                f"remove {type(p).__name__} from plugins and pick the strategy instead ('thunder_fsdp' shards with "
                "FSDP2, and with tensor_parallel_size=N splits layers too; 'thunder_ddp' replicates with DDP)"
            )
    return checked


def with_precision_plugins(plugins: Sequence[Plugin] | None, precision: Any) -> list[Plugin] | None:
    """The compiler plugins a strategy compiles with: its own (``None``: the compiler's defaults) followed by those
    its Lightning precision plugin brings through a ``compiler_plugins()`` method (``ThunderFP8`` brings ``FP8``;
    Lightning's own precision plugins bring none, and then ``plugins`` is returned as is)."""
    hook = getattr(precision, "compiler_plugins", None)
    extra = check_plugins(list(hook()), "thunder") if callable(hook) else []
    if not extra:
        return plugins
    from lightning_thunder.api import default_plugins

    base = default_plugins() if plugins is None else list(plugins)
    return base + [p for p in extra if all(p is not q for q in base)]


def check_compile_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``compile_options`` now (unknown names raise ``TypeError``) rather than at the first step."""
    options = dict(options or {})
    CompileOptions.from_kwargs(options)
    return options


def fsdp_mixed_precision(precision: str) -> MixedPrecisionPolicy | None:
    """FSDP2's mixed-precision policy for a Lightning ``precision`` setting.

    ``"bf16-mixed"``/``"16-mixed"``: the gathered parameters are cast to bf16/fp16 for compute and
    gradients are reduced in fp32 (the sharded master weights stay fp32). ``"*-true"``: the module is
    already in that dtype (Lightning converts it), no policy. Lightning's autocast still applies.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return None


def check_tensor_parallel_size(tensor_parallel_size: Any) -> int:
    """Validate the ``tensor_parallel_size`` argument of the ``thunder_fsdp`` strategies (an int >= 1)."""
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size!r} must be an int >= 1: the number of consecutive ranks that "
            "split each layer (1: FSDP only)"
        )
    return tensor_parallel_size


def mesh_shape(tensor_parallel_size: int, num_nodes: int, num_processes: int) -> tuple[int, int]:
    """``(data_parallel_size, tensor_parallel_size)`` of the ``thunder_fsdp`` device mesh over ``num_nodes`` x
    ``num_processes`` ranks; raises ``ValueError`` naming the sizes when the tensor-parallel size does not divide
    the world size."""
    world = num_nodes * num_processes
    if world % tensor_parallel_size:
        sizes = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the world size {world} (num_nodes="
            f"{num_nodes} x devices={num_processes}): the ranks form a (data_parallel x tensor_parallel) mesh; choose "
            f"tensor_parallel_size among {sizes}, or change the number of devices"
        )
    return world // tensor_parallel_size, tensor_parallel_size


def compile_and_shard(
    module: nn.Module,
    options: Any,
    mesh: Any,
    precision_plugin: Any,
    plugins: Sequence[Plugin] | None,
    compile_options: Mapping[str, Any],
    tensor_parallel: TensorParallel | None = None,
) -> tuple[nn.Module, bool]:
    """``thunder_fsdp``'s model setup, shared by the Fabric and Trainer strategies, in torchtitan's order:
    tensor parallelism (``tensor_parallel``, on ``mesh["tensor_parallel"]``), then every block (the detected or
    given ``options.block_cls``) compiled with the same plugin instances, so all blocks share one backend and one
    graph and see local (tensor-parallel) shapes, then the FSDP plugin puts activation checkpointing inside the
    compiled blocks (before their first call) and shards the units over ``mesh["data_parallel"]``.

    On a data-parallel group of one rank (no tensor parallelism, no CPU offload) the FSDP plugin makes the whole
    model one unit (:meth:`~lightning_thunder.plugins.FSDP.one_unit`) and no block is compiled on its own: the caller
    compiles the whole step or module, as the ``thunder`` strategies do (one graph: the loss with the head, no graph
    break per block). Returns ``(module, whole)``, ``whole`` telling the caller to do so.

    Args:
        options: the strategy's validated FSDP options (``block_cls``, ``reshard_after_forward``,
            ``cpu_offload``, ``activation_checkpointing``).
        mesh: the 2-D ``("data_parallel", "tensor_parallel")`` device mesh.
        precision_plugin: Lightning's precision plugin (its mixed-precision policy; ThunderFP8's plugin).
        tensor_parallel: the tensor-parallel plugin (its mesh is ``mesh["tensor_parallel"]``), or ``None``.
    """
    from lightning_thunder.plugins.blocks import compile_blocks, find_block_class

    from lightning_thunder.plugins.fp8 import FP8

    block_cls = options.block_cls if options.block_cls is not None else find_block_class(module)
    if tensor_parallel is not None:
        tensor_parallel.transform_module(module)
    block_plugins = with_precision_plugins(plugins, precision_plugin)
    fsdp = FSDP(
        mesh=mesh["data_parallel"],
        block_cls=block_cls,
        mp_policy=fsdp_mixed_precision(precision_plugin.precision),
        reshard_after_forward=options.reshard_after_forward,
        cpu_offload=options.cpu_offload,
        activation_checkpointing=options.activation_checkpointing,
        # The FP8 plugin the blocks compile with (ThunderFP8's, or one in `plugins`): FP8 all-gather of its weights.
        fp8=next((p for p in block_plugins or () if isinstance(p, FP8)), None),
    )
    whole = fsdp.one_unit(module, mesh["data_parallel"])
    if not whole:
        compile_blocks(module, block_plugins, block_cls=block_cls, **compile_options)
    return fsdp.transform_module(module), whole


def compile_submodules(
    module: nn.Module, plugins: Sequence[Plugin] | None, options: Mapping[str, Any], strategy: str
) -> list[str]:
    """Compile each direct child of ``module`` that holds parameters, in place; returns their names.

    Used for a LightningModule, whose own methods (``training_step``, logging) stay eager while the
    networks it holds are compiled. ``state_dict`` keys do not change. Children compiled before are kept.
    """
    from lightning_thunder.api import compile as thunder_compile

    compiled = []
    for name, child in list(module.named_children()):
        if isinstance(child, ThunderModule):
            compiled.append(name)
        elif next(child.parameters(), None) is not None:
            module.register_module(name, thunder_compile(child, plugins=plugins, **options))
            compiled.append(name)
    if not compiled:
        raise ValueError(
            f"strategy={strategy!r} compiles the submodules of {type(module).__name__} that hold parameters, and it "
            "has none; hold the network in a submodule (e.g. `self.model = GPT(config)` in `__init__` or "
            "`configure_model`)"
        )
    return compiled


@contextmanager
def gradient_sync_disabled(module: nn.Module) -> Iterator[None]:
    """Skip FSDP2's gradient reduce-scatter in the backward (gradient accumulation); re-enable on exit.

    Gradients accumulate unsharded until the next backward outside this context reduces them.
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.set_requires_gradient_sync(True, recurse=False)


def check_single_device(strategy: str, devices: Sequence[Any] | None, num_nodes: int) -> None:
    """Raise when a single-device strategy is asked for several devices or nodes."""
    if devices is not None and len(devices) > 1:
        raise ValueError(
            f"strategy={strategy!r} runs on one device, but {len(devices)} devices were requested "
            f"({', '.join(str(d) for d in devices)}); use strategy='thunder_ddp' or 'thunder_fsdp' for several "
            "devices, or set devices=1"
        )
    if num_nodes > 1:
        raise ValueError(
            f"strategy={strategy!r} runs on one device, but num_nodes={num_nodes}; use strategy='thunder_ddp' or "
            "'thunder_fsdp' across nodes, or set num_nodes=1"
        )


def check_unsharded(module: nn.Module, strategy: str) -> None:
    """Raise if ``module`` is already sharded, wrapped in DDP, or compiled as a whole: the strategy does that."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    for name, m in module.named_modules():
        where = f"`{name}`" if name else "the model"
        if isinstance(m, (FSDPModule, FullyShardedDataParallel, DistributedDataParallel)):
            raise ValueError(
                f"{where} ({type(m).__name__}) is already wrapped or sharded, but strategy={strategy!r} shards the "
                "model itself; pass the plain model (remove fully_shard/FSDP/DDP, e.g. from configure_model), or "
                "use Lightning's ModelParallelStrategy to parallelize it yourself"
            )
    if isinstance(module, ThunderModule):
        raise ValueError(
            f"the model is already compiled with lightning_thunder.compile, but strategy={strategy!r} compiles it per "
            "transformer block itself; pass the model before compiling (`cm.original_module`)"
        )


class OneDevice:
    """Mixin for the single-device ``thunder`` strategies (Fabric and Trainer): the ``parallel_devices``
    and ``num_nodes`` Lightning sets, checked to name one device on one node."""

    def _init_one_device(self, device: Any) -> None:
        self._device_given = device is not None
        self._parallel_devices: list[Any] | None = None
        self._num_nodes = 1

    @property
    def parallel_devices(self) -> list[Any] | None:
        """The devices Lightning selected (at most one)."""
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[Any] | None) -> None:
        check_single_device("thunder", devices, 1)
        self._parallel_devices = devices
        if devices and not self._device_given:
            self._root_device = devices[0]

    @property
    def num_nodes(self) -> int:
        """Number of nodes (must be 1)."""
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        check_single_device("thunder", None, num_nodes)
        self._num_nodes = num_nodes
