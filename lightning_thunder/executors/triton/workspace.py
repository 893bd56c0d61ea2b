"""One zero fill per trace for the partial results fusion regions fold with atomics: the ``workspace`` pass.

A region that folds an epilogue (FP8's ``fp8_amax``: partial maxima of ``|x|``) writes into a ``[P]`` output that
must start at zero. Allocated per region, each is a ``torch.zeros``: an allocation and a fill kernel, about
30-60 µs of host time on an H100 host, in an FP8 forward whose pace the host sets. Here every such output of a
trace becomes a slice of one workspace per device, zeroed once before the first region that writes into it;
each region op takes the workspace as an argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from lightning_thunder.executors.triton.plan import FusionPlan, WorkspaceSlice

__all__ = ["workspace_pass", "ALIGN"]

#: Slices start at multiples of this many floats (16 bytes).
ALIGN = 4


def workspace_pass(plan: FusionPlan) -> FusionPlan:
    """Give the zero-initialized outputs of the regions slices of one zeroed workspace per device (when two or more
    regions of that device have such outputs, each of them 1-D fp32)."""
    by_device: dict[Any, list] = {}
    for region in plan.regions:
        zeroed = [o for o in region.outputs if o.zeroed and o.into is None]
        if zeroed and all(o.proxy.val.dtype == torch.float32 and o.proxy.val.dim() == 1 for o in zeroed):
            by_device.setdefault(region.device, []).append(region)
    changed = {}
    sizes = list(plan.workspaces)
    for device, regions in by_device.items():
        if len(regions) < 2:
            continue
        number = len(sizes)
        total = 0
        for region in regions:
            outputs = []
            for o in region.outputs:
                if o.zeroed and o.into is None:
                    o = dataclasses.replace(o, into=WorkspaceSlice(number, total))
                    total += math.ceil(o.proxy.val.numel() / ALIGN) * ALIGN
                outputs.append(o)
            changed[region.index] = region.replace(outputs=outputs)
        sizes.append(total)
    if not changed:
        return plan
    return plan.replace(
        regions=[changed.get(r.index, r) for r in plan.regions],
        workspaces=tuple(sizes),
        notes=(*plan.notes, f"workspace: {len(changed)} regions share {len(sizes) - len(plan.workspaces)} zeroed workspace(s)"),
    )
