"""FLOPs of one training step, counted with ``FlopCounterMode`` on a meta-device copy of the model.

The copy holds no data (parameters and buffers become meta tensors) and runs eagerly: modules
compiled by lightning_thunder are replaced by the modules they compiled, so measuring never compiles
or recompiles anything. Counted: forward and backward of the step function on a meta copy of the
batch (model FLOPs, as MFU defines them; recomputation by activation checkpointing is not counted).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.fabric.utilities.throughput import measure_flops
from torch import nn

from lightning_thunder.capture.compiled import ThunderModule

__all__ = ["StepFn", "loss_of", "measure_step_flops", "meta_copy"]

#: ``step_fn(model, batch) -> output``: one training step's forward on ``batch`` (its loss is found
#: with :func:`loss_of`).
StepFn = Callable[[nn.Module, Any], Any]


def meta_copy(module: nn.Module, drop: Iterable[object] = ()) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors (no memory), with every
    lightning_thunder-compiled submodule replaced by (a meta copy of) the module it compiled.

    Args:
        module: the model.
        drop: objects the model refers to that must not be copied (the Trainer, Fabric); the copy sees
            ``None`` in their place.
    """
    memo: dict[int, Any] = {id(obj): None for obj in drop if obj is not None}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    compiled = [m for m in module.modules() if isinstance(m, ThunderModule)]
    for m in reversed(compiled):  # innermost first, so an outer original's copy finds them in memo
        memo[id(m)] = copy.deepcopy(m.original_module, memo)
    out = copy.deepcopy(module, memo)
    for m in out.modules():
        if hasattr(m, "_device"):  # Lightning's device mixin: `self.device` must say meta in the copy
            m._device = torch.device("meta")
    return out


def loss_of(output: Any) -> torch.Tensor:
    """The tensor to backpropagate from a step's output: the tensor itself, ``output["loss"]``, or the
    first tensor of a tuple/list (summed to a scalar)."""
    value = output
    if isinstance(value, Mapping):
        value = value.get("loss")
    elif isinstance(value, (tuple, list)):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"the step returned {type(output).__name__}, not a loss tensor (or a dict with 'loss', or a tuple "
            "starting with a tensor); pass step_fn= returning one"
        )
    if not value.requires_grad:
        raise ValueError("the step's loss does not require grad, so its backward cannot be counted")
    return value.sum()


def measure_step_flops(model: nn.Module, batch: Any, step_fn: StepFn, drop: Iterable[object] = ()) -> int:
    """FLOPs of ``step_fn(model, batch)`` plus its backward, measured on a meta copy (see the module doc).

    Raises whatever the step raises on meta tensors (data-dependent control flow, ``.item()``): the
    caller reports FLOPs as unavailable then.
    """
    meta_model = meta_copy(model, drop)
    meta_batch = apply_to_collection(batch, torch.Tensor, lambda t: t.detach().to("meta"))
    with warnings.catch_warnings(), torch.compiler.set_stance("force_eager"):
        # `self.log` in a copied LightningModule has no Trainer and warns; the copy logs nothing.
        warnings.simplefilter("ignore")
        return int(measure_flops(meta_model, lambda: step_fn(meta_model, meta_batch), loss_of))
