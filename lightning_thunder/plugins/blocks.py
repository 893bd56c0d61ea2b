"""Transformer blocks: find the repeated block of a model, compile each one (regional compilation),
and checkpoint their activations.

A transformer is a stack of identical blocks (``model.transformer.h`` in LitGPT, ``model.layers`` in
Llama). Distributed training and compilation both work per block: FSDP shards each block as its own
unit, and compiling one block instead of the whole model gives one graph that every block reuses.
These helpers are the building blocks of :class:`~lightning_thunder.plugins.FSDP` and of the
``thunder_fsdp`` strategies; they are public so a training script can compose them itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_thunder.capture.compiled import ThunderModule
from lightning_thunder.plugins.base import Plugin

__all__ = [
    "BlockClass",
    "OuterModules",
    "find_block_class",
    "find_blocks",
    "find_outer_modules",
    "compile_blocks",
    "checkpoint_block",
    "module_class",
]

#: A block class or a tuple of them (for models that alternate two kinds of layers).
BlockClass = type[nn.Module] | tuple[type[nn.Module], ...]

_CONTAINERS = (nn.ModuleList, nn.Sequential)
_CHECKPOINTED = "_lt_checkpointed_forward"


def module_class(module: nn.Module) -> type[nn.Module]:
    """The class of ``module``, looking through a :class:`ThunderModule` (and FSDP's class swap) to the
    module that was compiled."""
    if isinstance(module, ThunderModule):
        return type(module.original_module)
    return type(module)


def _check_block_cls(block_cls: Any) -> tuple[type[nn.Module], ...]:
    classes = block_cls if isinstance(block_cls, tuple) else (block_cls,)
    if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        raise TypeError(
            f"block_cls must be an nn.Module subclass or a tuple of them (e.g. block_cls=litgpt.model.Block), "
            f"got {block_cls!r}"
        )
    return classes


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find_block_class(module: nn.Module) -> type[nn.Module]:
    """The class of the repeated block of ``module``.

    The candidates are the children of every ``nn.ModuleList`` / ``nn.Sequential`` whose children all
    share one class and hold parameters; the container holding the most parameters wins (for LitGPT,
    ``transformer.h`` and its ``Block``). Raises ``ValueError`` naming the fix when there is none.
    """
    best: tuple[int, type[nn.Module]] | None = None
    for container in module.modules():
        if not isinstance(container, _CONTAINERS):
            continue
        children = list(container.children())
        classes = {module_class(c) for c in children}
        if len(classes) != 1 or not _has_parameters(container):
            continue
        numel = sum(p.numel() for p in container.parameters())
        if best is None or numel > best[0]:
            best = (numel, classes.pop())
    if best is None:
        raise ValueError(
            f"could not find the repeated transformer block of {type(module).__name__}: no nn.ModuleList or "
            "nn.Sequential in it holds modules of a single class with parameters. Pass the block class "
            "explicitly, e.g. block_cls=MyTransformerBlock"
        )
    return best[1]


def find_blocks(module: nn.Module, block_cls: BlockClass) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute name, block)`` for every outermost instance of ``block_cls`` below ``module``
    (compiled blocks count by the class they compiled). The root itself is never a block.

    Raises ``ValueError`` when ``module`` contains no instance of ``block_cls``.
    """
    classes = _check_block_cls(block_cls)
    found: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if issubclass(module_class(child), classes):
                found.append((parent, name, child))
            else:
                visit(child)

    visit(module)
    if not found:
        present = sorted({module_class(m).__name__ for m in module.modules()} - {type(module).__name__})
        names = ", ".join(c.__name__ for c in classes)
        raise ValueError(
            f"block_cls={names} does not occur in {type(module).__name__} (its submodule classes: "
            f"{', '.join(present) or 'none'}). Pass the class of the model's repeated layer, or leave "
            "block_cls=None to detect it"
        )
    return found


#: Names of the modules around the blocks, as LitGPT spells them (then torchtitan's and Hugging Face Llama's).
EMBEDDING_NAMES = ("wte", "tok_embeddings", "embed_tokens")
FINAL_NORM_NAMES = ("ln_f", "norm")
HEAD_NAMES = ("lm_head", "output")


@dataclass(frozen=True)
class OuterModules:
    """The qualified names (as in ``module.named_modules()``) of the modules around a model's blocks; ``None``
    where there is none. Found by name (:data:`EMBEDDING_NAMES`, :data:`FINAL_NORM_NAMES`, :data:`HEAD_NAMES`)
    outside the blocks: an ``nn.Embedding``, a module with parameters, an ``nn.Linear``."""

    embedding: str | None = None
    final_norm: str | None = None
    head: str | None = None
    #: The head shares its weight with the embedding (weight tying).
    tied: bool = False


def find_outer_modules(module: nn.Module, block_cls: BlockClass) -> OuterModules:
    """The embedding, final norm and output head of ``module`` (outside its ``block_cls`` blocks)."""
    block_ids = {id(b) for _, _, b in find_blocks(module, block_cls)}
    inside: list[str] = []
    found: dict[str, str] = {}
    kinds = (("embedding", EMBEDDING_NAMES, nn.Embedding), ("final_norm", FINAL_NORM_NAMES, nn.Module),
             ("head", HEAD_NAMES, nn.Linear))
    for name, child in module.named_modules():
        if id(child) in block_ids:
            inside.append(name + ".")
        if not name or id(child) in block_ids or name.startswith(tuple(inside)) or not _has_parameters(child):
            continue
        leaf = name.rsplit(".", 1)[-1]
        for kind, names, cls in kinds:
            if kind not in found and leaf in names and isinstance(child, cls):
                found[kind] = name
    tied = False
    if "embedding" in found and "head" in found:
        embedding_params = {id(p) for p in module.get_submodule(found["embedding"]).parameters()}
        tied = any(id(p) in embedding_params for p in module.get_submodule(found["head"]).parameters())
    return OuterModules(found.get("embedding"), found.get("final_norm"), found.get("head"), tied)


def compile_blocks(
    module: nn.Module,
    plugins: Sequence[Plugin] | None = None,
    *,
    block_cls: BlockClass | None = None,
    **options: Any,
) -> list[ThunderModule]:
    """Regional compilation: compile every block of ``module`` with lightning_thunder, in place.

    Each block is replaced in its parent by ``lightning_thunder.compile(block, plugins=plugins)``.
    ``state_dict()`` keys of ``module`` are unchanged (a compiled module adds no prefix). All blocks
    are compiled with the *same* plugin instances, so they share one backend and Dynamo reuses one
    compiled graph for every instance of the block class. Blocks that are already compiled are kept.

    Args:
        module: the model; it is modified in place.
        plugins: compiler plugins (``None``: :func:`lightning_thunder.default_plugins`).
        block_cls: the block class; ``None`` detects it (:func:`find_block_class`).
        **options: compile options (see :class:`~lightning_thunder.CompileOptions`).

    Returns:
        The compiled blocks, in model order.
    """
    from lightning_thunder.api import compile as thunder_compile  # the public entry point; avoids an import cycle

    block_cls = find_block_class(module) if block_cls is None else block_cls
    plugin_list = None if plugins is None else list(plugins)
    compiled: list[ThunderModule] = []
    for parent, name, block in find_blocks(module, block_cls):
        if not isinstance(block, ThunderModule):
            block = thunder_compile(block, plugins=plugin_list, **options)
            parent.register_module(name, block)
        compiled.append(block)
    return compiled


def checkpoint_block(block: nn.Module) -> None:
    """Activation checkpointing for one block: its forward runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, so the backward recomputes the
    block's activations instead of keeping them.

    Unlike ``checkpoint_wrapper`` this adds no submodule, so parameter names and ``state_dict`` keys do
    not change. For a compiled block the original module's forward is wrapped, so the checkpoint lands
    *inside* the compiled graph (the compiler sees it and recomputes in the generated backward); apply
    it before the block's first call. Applying it twice is a no-op.
    """
    target = block.original_module if isinstance(block, ThunderModule) else block
    if getattr(target, _CHECKPOINTED, False):
        return
    forward: Callable[..., Any] = target.forward

    @functools.wraps(forward)
    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    target.forward = checkpointed_forward  # an instance attribute: this module only, reversible
    object.__setattr__(target, _CHECKPOINTED, True)

