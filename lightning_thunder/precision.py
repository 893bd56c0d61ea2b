"""``ThunderFP8``: one Lightning precision plugin for FP8 training, accepted by Fabric and by the Trainer.

    Fabric(strategy="thunder", plugins=[ThunderFP8()])
    Trainer(strategy="thunder_fsdp", plugins=[ThunderFP8(recipe="rowwise")])
    Trainer(strategy="ddp", plugins=[ThunderFP8()])          # Lightning's own strategies work too

Weights and activations are bf16 (as with ``precision="bf16-true"``); the linear layers chosen by the
filter run their forward and both backward matmuls in FP8. How the FP8 math gets in depends on the
strategy:

- the ``thunder`` strategies compile the model with the :class:`~lightning_thunder.plugins.FP8` compiler
  plugin that :meth:`ThunderFP8.compiler_plugins` hands them (it rewrites ``linear`` in the traces);
- Lightning's own strategies run the model eagerly: :meth:`ThunderFP8.convert_module` turns the chosen
  ``nn.Linear`` modules into :class:`~lightning_thunder.fp8.FP8Linear` in place (the same parameters,
  so an optimizer built before ``setup`` stays valid; ``state_dict`` keys do not change).

Fabric calls ``convert_module`` before the strategy compiles; the FP8 compiler plugin turns the swapped
modules back into ``nn.Linear`` when it compiles them, so both paths never apply together.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins import Precision as FabricPrecision
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn
from typing_extensions import override

from lightning_thunder.capture.compiled import COMPILED_METHODS, ThunderModule
from lightning_thunder.fp8.module import swap_linears
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.fp8 import FP8, OUTPUT_HEAD_NAMES, LinearInfo

__all__ = ["ThunderFP8"]


def _in_trainer(module: Any) -> bool:
    """Whether ``module`` is a LightningModule attached to a Trainer (the Trainer's hook conventions apply)."""
    return getattr(module, "_trainer", None) is not None


class ThunderFP8(HalfPrecision):
    """FP8 training for Fabric and the Trainer: bf16 weights and activations, FP8 matmuls in the linear layers.

    Args:
        recipe: ``"tensorwise"`` or ``"rowwise"`` scaling (see :class:`~lightning_thunder.plugins.FP8`).
        emulate: run the same quantize/dequantize numerics with bf16 matmuls, on any device (tests, CPU);
            without it a CUDA GPU of compute capability >= 8.9 is required.
        filter: ``filter(info: LinearInfo) -> bool`` chooses the FP8 layers among those whose dims are
            multiples of 16 (default: all but the output head ``lm_head``/``output``).
        all_gather: with ``thunder_fsdp``, ``"fp8"`` all-gathers the weights of the blocks' FP8 layers in FP8 with
            their scales, computed once per optimizer step for all weights (half the bytes, and the blocks do not
            quantize them again); ``"bf16"`` gathers them in bf16 and each block quantizes them. ``None`` (default):
            ``"fp8"`` for ``recipe="tensorwise"``, ``"bf16"`` for ``"rowwise"`` (rowwise always gathers in bf16;
            ``"fp8"`` with it is an error). See :class:`~lightning_thunder.plugins.FP8`.

    A subclass of the Trainer's ``HalfPrecision("bf16-true")``, which is a Fabric ``Precision`` too; the hooks
    whose signatures differ between the two (``backward``, ``optimizer_step``, ...) follow the caller's.
    With ``thunder_fsdp``, FSDP2 shards the bf16 weights (no mixed-precision policy: the model is already bf16) and,
    with tensorwise scaling, all-gathers the FP8 layers' weights in FP8 (``all_gather``).
    """

    def __init__(
        self,
        recipe: str = "tensorwise",
        emulate: bool = False,
        filter: Callable[[LinearInfo], bool] | None = None,  # noqa: A002 - the FP8 plugin's name for it
        all_gather: str | None = None,
    ) -> None:
        super().__init__("bf16-true")
        # One compiler plugin instance for every compile: all blocks share one backend and one graph.
        self._fp8 = FP8(recipe=recipe, emulate=emulate, filter=filter, all_gather=all_gather)

    @property
    def recipe(self) -> str:
        """The scaling recipe."""
        return self._fp8.recipe

    @property
    def emulate(self) -> bool:
        """Whether the matmuls are emulated in bf16."""
        return self._fp8.emulate

    @property
    def all_gather(self) -> str:
        """``"fp8"`` or ``"bf16"``: how ``thunder_fsdp`` all-gathers the FP8 layers' weights (see the class
        docstring)."""
        return self._fp8.all_gather

    @property
    def fp8_active(self) -> bool:
        """Whether matmuls run on FP8 tensor cores (read by the callbacks' MFU; ``False`` when emulating)."""
        return not self.emulate

    def compiler_plugins(self) -> list[Plugin]:
        """The compiler plugins the ``thunder`` strategies add to theirs: ``[FP8(recipe, emulate, filter)]``."""
        return [self._fp8]

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Cast to bf16, and make the chosen ``nn.Linear`` modules :class:`~lightning_thunder.fp8.FP8Linear` in place
        (modules already compiled by lightning_thunder, or whose steps are, are skipped: the compiler does FP8
        there)."""
        module = super().convert_module(module)
        if COMPILED_METHODS in module.__dict__:  # the Trainer strategies compiled its steps: FP8 is in their traces
            return module

        def accept(name: str, linear: nn.Linear) -> bool:
            return self._fp8.accepts(LinearInfo(name, linear.in_features, linear.out_features))

        swapped, kept = swap_linears(
            module,
            accept,
            recipe=self.recipe,
            emulate=self.emulate,
            skip=lambda m: isinstance(m, ThunderModule),
        )
        if kept and not swapped:
            warnings.warn(
                f"ThunderFP8: the filter kept every linear layer in bf16 ({', '.join(kept)}), so nothing runs in FP8. "
                "A layer runs in FP8 when both its dims are multiples of 16 and `filter` accepts it (the default "
                f"filter skips the output head, {' / '.join(OUTPUT_HEAD_NAMES)})",
                stacklevel=2,
            )
        return module

    # Fabric and the Trainer call these hooks with different arguments; follow the caller.
    @override
    def pre_backward(self, tensor: torch.Tensor, module: Any) -> Any:  # type: ignore[override]
        """The Trainer's ``on_before_backward`` hooks under the Trainer; nothing under Fabric."""
        if _in_trainer(module):
            return super().pre_backward(tensor, module)
        return FabricPrecision.pre_backward(self, tensor, module)

    @override
    def backward(self, tensor: torch.Tensor, model: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """``model.backward(...)`` under the Trainer (``args[0]`` is the optimizer); ``tensor.backward`` under
        Fabric."""
        if _in_trainer(model):
            return super().backward(tensor, model, *args, **kwargs)
        return FabricPrecision.backward(self, tensor, model, *args, **kwargs)

    @override
    def post_backward(self, tensor: torch.Tensor, module: Any) -> Any:  # type: ignore[override]
        """The Trainer's ``on_after_backward`` hooks under the Trainer; nothing under Fabric."""
        if _in_trainer(module):
            return super().post_backward(tensor, module)
        return FabricPrecision.post_backward(self, tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: Any = None, closure: Callable[[], Any] | None = None, **kwargs: Any
    ) -> Any:
        """The Trainer's step (closure, hooks, clipping) when it passes ``model`` and ``closure``; else Fabric's."""
        if model is not None and closure is not None:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        return FabricPrecision.optimizer_step(self, optimizer, **kwargs)

    def __repr__(self) -> str:
        return f"ThunderFP8(recipe={self.recipe!r}, emulate={self.emulate}, all_gather={self.all_gather!r})"
