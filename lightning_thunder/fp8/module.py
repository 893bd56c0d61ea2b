"""The FP8 linear module, for models that run eagerly (Lightning's own strategies): ``nn.Linear`` -> ``FP8Linear``.

:func:`swap_linears` turns chosen ``nn.Linear`` instances into :class:`FP8Linear` *in place* (the
instance's class changes; its parameters, hooks and ``state_dict`` keys stay, so optimizers built
before still hold the right tensors) and :func:`restore_linears` turns them back. The
:class:`~lightning_thunder.plugins.FP8` compiler plugin restores them when it compiles a module: in a
compiled module the plugin rewrites ``linear`` in the trace instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_thunder.fp8.linear import fp8_linear

__all__ = ["FP8Linear", "swap_linears", "restore_linears"]


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`~lightning_thunder.fp8.linear.fp8_linear` (FP8 matmuls forward and
    backward; weights stay in their dtype). Made from an ``nn.Linear`` by :func:`swap_linears`.

    Attributes:
        fp8_recipe: ``"tensorwise"`` or ``"rowwise"``.
        fp8_emulate: quantize/dequantize but multiply in the input's dtype.
    """

    fp8_recipe: str = "tensorwise"
    fp8_emulate: bool = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's argument name
        """``fp8_linear(input, weight, bias)``."""
        return fp8_linear(input, self.weight, self.bias, recipe=self.fp8_recipe, emulate=self.fp8_emulate)

    def extra_repr(self) -> str:
        """``nn.Linear``'s description plus the recipe."""
        return f"{super().extra_repr()}, recipe={self.fp8_recipe!r}, emulate={self.fp8_emulate}"


def swap_linears(
    module: nn.Module,
    accept: Callable[[str, nn.Linear], bool],
    *,
    recipe: str,
    emulate: bool,
    skip: Callable[[nn.Module], bool] | None = None,
) -> tuple[list[str], list[str]]:
    """Make every ``nn.Linear`` (exactly that class) below ``module`` for which ``accept(qualified_name, linear)``
    holds an :class:`FP8Linear`, in place.

    Args:
        module: the root; its own class is never changed.
        accept: the filter (``qualified_name`` as in ``module.named_modules()``).
        recipe, emulate: set on each swapped module.
        skip: subtrees for which this is true are left alone (e.g. modules compiled with the FP8 plugin).

    Returns:
        ``(swapped, kept)``: the qualified names of the linear layers made FP8 and of those left as they were.
    """
    swapped: list[str] = []
    kept: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}{name}"
            if skip is not None and skip(child):
                continue
            if type(child) is nn.Linear:
                if accept(path, child):
                    child.__class__ = FP8Linear
                    child.fp8_recipe, child.fp8_emulate = recipe, emulate
                    swapped.append(path)
                else:
                    kept.append(path)
            else:
                visit(child, f"{path}.")

    visit(module, "")
    return swapped, kept


def restore_linears(module: nn.Module) -> list[str]:
    """Turn the :class:`FP8Linear` modules below (and including) ``module`` back into ``nn.Linear``; returns their
    qualified names."""
    restored = []
    for name, m in module.named_modules():
        if type(m) is FP8Linear:
            m.__class__ = nn.Linear
            for attr in ("fp8_recipe", "fp8_emulate"):
                m.__dict__.pop(attr, None)
            restored.append(name)
    return restored
