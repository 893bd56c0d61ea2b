"""Keeping optimizers pointed at the model's parameters when sharding replaces them.

FSDP2 swaps every parameter for a new sharded ``DTensor`` parameter. Fabric users build the optimizer
before ``fabric.setup(model, optimizer)``, so its param groups still hold the old parameters: stepping it
would update tensors the model no longer uses. The strategy records each parameter's name before
sharding and re-points the param groups to the parameters of the same name afterwards (possible
because the optimizer has no state yet), or raises naming the order to use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["parameter_names", "check_repointable", "repoint_optimizers", "check_sharded_optimizer"]

_ORDER = (
    "create the optimizer from the model's parameters and pass both to `fabric.setup(model, optimizer)` before "
    "the first `optimizer.step()`, or set the model up first (`model = fabric.setup_module(model)`), then build "
    "the optimizer from `model.parameters()` and call `fabric.setup_optimizers(optimizer)`"
)


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(parameter) -> qualified name`` for the parameters of ``module`` (a tied parameter keeps its first name)."""
    return {id(p): name for name, p in module.named_parameters()}


def _describe(p: torch.Tensor) -> str:
    return f"a {tuple(p.shape)} {str(p.dtype).replace('torch.', '')} parameter"


def check_repointable(optimizers: Sequence[Optimizer], names_before: dict[int, str], strategy: str) -> None:
    """Raise unless every optimizer is stateless and holds only parameters named in ``names_before`` (call it
    before sharding, so a bad order fails before the model is changed)."""
    for opt in optimizers:
        if len(opt.state) > 0:
            raise RuntimeError(
                f"{type(opt).__name__} already has state for {len(opt.state)} parameters (it has stepped), but "
                f"strategy={strategy!r} replaces the parameters with sharded ones during setup and cannot carry "
                f"state over: {_ORDER}"
            )
        for index, group in enumerate(opt.param_groups):
            for p in group["params"]:
                if id(p) not in names_before:
                    raise ValueError(
                        f"{type(opt).__name__} param group {index} holds {_describe(p)} that is not a parameter of "
                        f"the model passed to setup, so strategy={strategy!r} cannot point it at the sharded "
                        f"model: {_ORDER}"
                    )


def repoint_optimizers(
    optimizers: Sequence[Optimizer], names_before: dict[int, str], module: nn.Module, strategy: str
) -> None:
    """Replace, in every param group, each parameter recorded in ``names_before`` with ``module``'s parameter of
    the same name (see :func:`check_repointable` for the errors)."""
    check_repointable(optimizers, names_before, strategy)
    current = dict(module.named_parameters())
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [current[names_before[id(p)]] for p in group["params"]]


def check_sharded_optimizer(optimizer: Optimizer, strategy: str) -> None:
    """Raise if ``optimizer`` holds parameters that are not sharded (``DTensor``) ones, i.e. it was built from
    the model before sharding and would step stale tensors."""
    from torch.distributed.tensor import DTensor

    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if not isinstance(p, DTensor):
                raise ValueError(
                    f"{type(optimizer).__name__} param group {index} holds {_describe(p)} that is not sharded: it "
                    f"was created from the model before strategy={strategy!r} sharded it, and stepping it would "
                    f"update tensors the model no longer uses; {_ORDER}"
                )
