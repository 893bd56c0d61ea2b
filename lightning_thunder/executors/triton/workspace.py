"""One zero fill per trace for the partial maxima fusion regions fold with atomics (``fp8_amax`` in a region).

A region that computes a value FP8 quantizes writes that value's partial maxima into a ``[P]`` output that
must start at zero (see ``codegen.fold_absmax``). Allocated per region, each is a ``torch.zeros``: an
allocation and a fill kernel, about 30-60 µs of host time on an H100 host, in an FP8 forward whose pace the
host sets. Here every such output of a trace becomes a slice of one workspace zeroed once, before the first
region that writes into it; each region op takes the workspace as its last argument.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_thunder.executors.triton.runtime import FusedRegion, RegionWrapper
from lightning_thunder.trace.proxy import Proxy, empty_example
from lightning_thunder.trace.trace import BoundOp, NameGenerator

__all__ = ["IntoWorkspace", "share_zeroed_outputs"]

#: Slices start at multiples of this many floats (16 bytes).
_ALIGN = 4


class IntoWorkspace(RegionWrapper):
    """The callable of a region whose zero-initialized outputs are slices of a workspace passed as its last
    argument (the region returns them like its other outputs)."""

    def __init__(self, fused: FusedRegion, slices: dict[int, tuple[tuple[int, ...], int]]) -> None:
        super().__init__(fused)
        self.slices = slices  # output index -> (shape, offset in the workspace)

    def __call__(self, *args: torch.Tensor) -> Any:
        *inputs, workspace = args
        base = workspace.storage_offset()
        into = {k: workspace.as_strided(shape, (1,), base + offset) for k, (shape, offset) in self.slices.items()}
        outs = self.fused.run(tuple(inputs), into)
        return outs[0] if len(outs) == 1 else tuple(outs)


def share_zeroed_outputs(ops: list[BoundOp], names: NameGenerator) -> list[BoundOp]:
    """Give the zero-initialized outputs of the fused-region ops in ``ops`` slices of one zeroed workspace per
    device (when two or more regions have such outputs); see the module docstring."""
    users: dict[Any, list[BoundOp]] = {}
    for op in ops:
        target = op.target
        if type(target) is FusedRegion and any(arg.zeroed for arg in target.spec.outputs):
            device = next(p.val.device for p in op.output_proxies())
            users.setdefault(device, []).append(op)
    replace: dict[int, BoundOp] = {}
    insert_before: dict[int, BoundOp] = {}
    for device, region_ops in users.items():
        if len(region_ops) < 2:
            continue
        total = 0
        plans = []
        for op in region_ops:
            slices = {}
            end = total
            for k, arg in enumerate(op.target.spec.outputs):
                if arg.zeroed:
                    if arg.dtype != torch.float32 or len(arg.shape) != 1:
                        break
                    slices[k] = (tuple(arg.shape), end)
                    end += math.ceil(math.prod(arg.shape) / _ALIGN) * _ALIGN
            else:  # every zeroed output fits: the region takes its slices (a region that does not takes no space)
                plans.append((op, slices))
                total = end
        if len(plans) < 2:
            continue
        first_out = plans[0][0].output_proxies()[0]
        workspace = Proxy(names("amax_workspace"), empty_example(first_out.val, (total,), torch.float32))
        insert_before[id(plans[0][0])] = BoundOp(
            torch.ops.aten.zeros.default, ([total],), {"dtype": torch.float32, "device": device}, (workspace,)
        )
        for op, slices in plans:
            replace[id(op)] = op.replace(target=IntoWorkspace(op.target, slices), args=(*op.args, workspace))
    if not replace:
        return ops
    result = []
    for op in ops:
        if id(op) in insert_before:
            result.append(insert_before[id(op)])
        result.append(replace.get(id(op), op))
    return result
