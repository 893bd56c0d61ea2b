"""How a recipe's ``strategy`` and ``plugins`` keys become a Fabric strategy and compiler plugins.

An entry of ``plugins`` is a name, or a one-key mapping from the name to its options::

    plugins: [activation_checkpointing, fp8]
    plugins: [{fp8: {recipe: tensorwise}}]

===========================  ====================================================================================
name                         what it maps to (at run time)
===========================  ====================================================================================
``fp8``                      ``lightning_thunder.plugins.FP8(**options)``, imported when the run starts and
                             appended to the compiler plugins (after the compiler's defaults: Fusion with CUDA)
``activation_checkpointing`` ``thunder_fsdp``: ``ThunderFSDPStrategy(activation_checkpointing=True)``;
                             ``thunder``/``thunder_ddp``: :func:`~lightning_thunder.plugins.checkpoint_block` on
                             every transformer block before the model is compiled
``cudagraphs``               ``lightning_thunder.plugins.CUDAGraphs(**options)``, appended to the compiler plugins
                             (the compiled forward and backward replayed as CUDA graphs)
===========================  ====================================================================================

Names are checked when the config is loaded, and ``fp8`` against the machine when a run starts
(:func:`~lightning_thunder.recipes.config.check_environment`: FP8 hardware, or ``emulate: true``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_thunder.recipes.errors import ConfigError

if TYPE_CHECKING:
    from lightning.fabric.strategies import Strategy
    from torch import nn

    from lightning_thunder.plugins.base import Plugin

__all__ = ["PLUGINS", "PluginEntry", "RecipePlugins", "parse_plugins", "build_plugins", "build_strategy",
           "data_parallel_rank_and_size", "apply_activation_checkpointing"]

#: The names ``plugins`` accepts, with what each does.
PLUGINS = {
    "fp8": "FP8 matmuls through lightning_thunder.plugins.FP8; options are its arguments, e.g. {recipe: tensorwise}",
    "activation_checkpointing": "recompute each transformer block's activations in the backward; no options",
    "cudagraphs": "replay the compiled forward and backward as CUDA graphs (lightning_thunder.plugins.CUDAGraphs); "
    "options are its arguments, e.g. {max_graphs: 32}",
}
_NO_OPTIONS = ("activation_checkpointing",)


@dataclass(frozen=True)
class PluginEntry:
    """One validated entry of ``plugins``: its name and options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


def _allowed() -> str:
    return ", ".join(PLUGINS)


def parse_plugins(entries: Sequence[Any]) -> list[PluginEntry]:
    """Validate the ``plugins`` list (names, option mappings, no duplicates); raises :class:`ConfigError`."""
    parsed: list[PluginEntry] = []
    for index, entry in enumerate(entries):
        where = f"plugins[{index}]"
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, Mapping) and len(entry) == 1:
            name, options = next(iter(entry.items()))
            options = {} if options is None else options
            if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
                raise ConfigError(
                    f"{where}={dict(entry)!r}: the options of {name!r} must be a mapping of option names to values, "
                    f"e.g. {{{name}: {{option: value}}}}"
                )
        else:
            raise ConfigError(
                f"{where}={entry!r} is not allowed: an entry is a plugin name or a one-key mapping "
                f"{{name: {{option: value}}}}; allowed names: {_allowed()}"
            )
        if name not in PLUGINS:
            raise ConfigError(f"{where}={name!r} is not a recipe plugin; allowed names: {_allowed()}")
        if name in _NO_OPTIONS and options:
            raise ConfigError(f"{where}: {name!r} takes no options, got {dict(options)!r}; write it as `{name}`")
        if any(p.name == name for p in parsed):
            raise ConfigError(f"{where}={name!r} is listed twice in plugins; list each plugin once")
        parsed.append(PluginEntry(name, dict(options)))
    return parsed


@dataclass
class RecipePlugins:
    """What ``plugins`` resolved to for a run."""

    #: Compiler plugin instances, appended to the compiler's defaults (in list order).
    compile_plugins: list[Plugin] = field(default_factory=list)
    #: Recompute each block's activations in the backward.
    activation_checkpointing: bool = False
    #: An FP8 plugin is active (the throughput monitor then measures MFU against the FP8 peak).
    fp8: bool = False

    def compiler_plugins(self) -> list[Plugin] | None:
        """The strategy's ``plugins=``: ``None`` (the compiler's defaults) when no compiler plugin was asked for,
        else the defaults followed by the recipe's compiler plugins."""
        if not self.compile_plugins:
            return None
        from lightning_thunder.api import default_plugins

        return [*default_plugins(), *self.compile_plugins]


def build_plugins(entries: Sequence[Any]) -> RecipePlugins:
    """Validate ``plugins`` and build what each entry maps to (imports optional features now)."""
    resolved = RecipePlugins()
    for entry in parse_plugins(entries):
        if entry.name == "activation_checkpointing":
            resolved.activation_checkpointing = True
        elif entry.name == "fp8":
            from lightning_thunder.plugins import FP8 as cls

            try:
                resolved.compile_plugins.append(cls(**entry.options))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"plugins: fp8 options {entry.options!r} were refused by {cls.__name__}: {e}") from e
            resolved.fp8 = True
        elif entry.name == "cudagraphs":
            from lightning_thunder.plugins import CUDAGraphs

            try:
                resolved.compile_plugins.append(CUDAGraphs(**entry.options))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"plugins: cudagraphs options {entry.options!r} were refused by CUDAGraphs: {e}") from e
    return resolved


def build_strategy(strategy: str, plugins: RecipePlugins, tensor_parallel_size: int = 1) -> Strategy:
    """The Fabric strategy instance for ``strategy`` with the recipe's compiler plugins (and, for ``thunder_fsdp``,
    activation checkpointing inside each compiled block and ``tensor_parallel_size``)."""
    from lightning_thunder.strategies import ThunderDDPStrategy, ThunderFSDPStrategy, ThunderStrategy

    compiler_plugins = plugins.compiler_plugins()
    if tensor_parallel_size > 1 and strategy != "thunder_fsdp":
        raise ConfigError(
            f"tensor_parallel_size={tensor_parallel_size} with strategy={strategy!r}: tensor parallelism runs in "
            "strategy=thunder_fsdp; set strategy=thunder_fsdp or tensor_parallel_size=1"
        )
    if strategy == "thunder":
        return ThunderStrategy(plugins=compiler_plugins)
    if strategy == "thunder_ddp":
        return ThunderDDPStrategy(plugins=compiler_plugins)
    if strategy == "thunder_fsdp":
        return ThunderFSDPStrategy(
            plugins=compiler_plugins, activation_checkpointing=plugins.activation_checkpointing,
            tensor_parallel_size=tensor_parallel_size,
        )
    raise ConfigError(f"strategy={strategy!r} is not allowed; allowed values: thunder, thunder_ddp, thunder_fsdp")


def data_parallel_rank_and_size(strategy: Strategy) -> tuple[int, int]:
    """This rank's index among the ranks that read different data, and their number: the global rank and world size,
    except under tensor parallelism, where the ranks of one tensor-parallel group read the same batches."""
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))


def apply_activation_checkpointing(model: nn.Module, strategy: str, plugins: RecipePlugins) -> int:
    """For ``thunder``/``thunder_ddp``: checkpoint every transformer block of ``model`` (before it is compiled, so
    the checkpoint is inside the compiled graph). Returns the number of blocks changed (0 when not asked for, or
    for ``thunder_fsdp``, whose strategy does it per block)."""
    if not plugins.activation_checkpointing or strategy == "thunder_fsdp":
        return 0
    from lightning_thunder.plugins import checkpoint_block, find_block_class, find_blocks

    blocks = find_blocks(model, find_block_class(model))
    for _, _, block in blocks:
        checkpoint_block(block)
    return len(blocks)
