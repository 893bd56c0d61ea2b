"""FP8 linear layers under tensor parallelism: ``fp8_linear`` on ``DTensor`` operands.

Tensor parallelism (:class:`~lightning_thunder.plugins.TensorParallel`) makes linear weights ``DTensor``s split
over a 1-D mesh. DTensor has no sharding rule for the FP8 quantization ops, so the FP8 matmul runs on each rank's
local tensors, as PyTorch's own colwise/rowwise matmuls do:

=======================  ===================  ================  ======================================
weight placement         input (made so)      output            gradients of the local operands
=======================  ===================  ================  ======================================
``Shard(0)`` (colwise)   ``Replicate``        ``Shard(-1)``     input: ``Partial`` (summed over ranks)
``Shard(1)`` (rowwise)   ``Shard(-1)``        ``Partial``       input: ``Shard(-1)``; bias added once,
                                                                after the sum
``Replicate``            as it is             as the input      input: as the input
=======================  ===================  ================  ======================================

Tensorwise scales are computed per shard (each rank scales its slice of a weight by that slice's own maximum):
a finer scaling than one scale for the whole weight, so results differ from unsharded FP8 in rounding only.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["fp8_linear_dtensor", "is_dtensor"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it where distributed is absent)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fp8_linear_dtensor(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, recipe: str, emulate: bool
) -> torch.Tensor:
    """``fp8_linear`` for a ``DTensor`` weight on a 1-D mesh (see the module docstring); returns a ``DTensor``."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from lightning_thunder.fp8.linear import fp8_linear

    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"fp8_linear takes DTensor weights on a 1-D (tensor-parallel) mesh, got placements {weight.placements} "
            f"on a {mesh.ndim}-D mesh; FSDP gathers its dimension before the layer runs, so pass the gathered weight"
        )
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    last = x.ndim - 1
    (placement,) = weight.placements
    w_local = weight.to_local()
    if placement == Shard(0):  # colwise: whole input, a slice of the output features
        x = x.redistribute(mesh, [Replicate()])
        b_local = bias.to_local() if isinstance(bias, DTensor) else bias
        y = fp8_linear(x.to_local(grad_placements=[Partial()]), w_local, b_local, recipe=recipe, emulate=emulate)
        return DTensor.from_local(y, mesh, [Shard(last)], run_check=False)
    if placement == Shard(1):  # rowwise: a slice of the input features, partial sums of the output
        x = x.redistribute(mesh, [Shard(last)])
        y = fp8_linear(x.to_local(), w_local, None, recipe=recipe, emulate=emulate)
        out = DTensor.from_local(y, mesh, [Partial()], run_check=False)
        return out if bias is None else out + bias
    if placement == Replicate():
        b_local = bias.to_local() if isinstance(bias, DTensor) else bias
        y = fp8_linear(x.to_local(), w_local, b_local, recipe=recipe, emulate=emulate)
        return DTensor.from_local(y, mesh, x.placements, run_check=False)
    raise ValueError(
        f"fp8_linear supports DTensor weights split by rows (Shard(0)), by columns (Shard(1)) or replicated, got "
        f"{placement}; keep this layer out of FP8 with the FP8 plugin's filter"
    )
