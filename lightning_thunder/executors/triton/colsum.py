"""Sums over all rows (a norm weight's or a bias's gradient) inside a fusion region: the ``column_sums`` pass.

``sum(x, dims=[0, .., n-2])`` of a value ``x`` the region computes would otherwise make the region
write all of ``x`` in fp32 (64 MiB for 8192 x 2048) for PyTorch's reduction kernel to read back, and
then need a cast kernel for the weight's dtype. Instead the region's kernel runs a fixed number ``G``
of programs, each walking its share of the rows (a grid-stride loop) and adding them into a per-column
accumulator in registers; it writes one row of ``G x N`` partial sums per program. A second small
kernel (:class:`ColumnSum`, run right after the region) adds the ``G`` partials of each column in a fixed
order and casts to the result's dtype (folding the ``view`` and cast that follow the sum in the trace).
The order of every addition is fixed by ``G`` and the block size, so results are the same from run to run.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.kinds import dims, numel
from lightning_thunder.executors.triton.plan import FusionPlan, Output
from lightning_thunder.trace.proxy import Proxy, empty_example
from lightning_thunder.trace.trace import BoundOp, NameGenerator

__all__ = ["ColumnSum", "column_sums_pass", "programs_for"]


def programs_for(device: torch.device, rows: int) -> int:
    """The grid size ``G`` of a region with column sums: two programs per multiprocessor (at most one
    per row); a handful under the CPU interpreter."""
    most = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(rows, most)) if type(rows) is int else most  # a symbolic row count is large


class ColumnSum:
    """Finish a column sum: ``out = partials.sum(0)`` cast to ``dtype`` and shaped ``shape``.

    Args:
        name: the op's name in traces (``colsum0``).
        shape: the result's shape (``N`` elements: the sum's output, or a view of it).
        dtype: the result's dtype (the sum's, or that of the cast that followed it).
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.__name__ = self.__qualname__ = name
        self.shape = tuple(shape)
        self.dtype = dtype

    def __call__(self, partials: torch.Tensor) -> torch.Tensor:
        from lightning_thunder.executors.triton.colsum_kernel import finish_column_sum

        G, N = partials.shape
        out = torch.empty(self.shape, dtype=self.dtype, device=partials.device)
        if math.prod(self.shape) != N:
            raise AssertionError(f"{self.__name__}: {N} column sums for an output of shape {self.shape}")
        rtne = self.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
        finish_column_sum(partials, out, rtne)
        return out

    def __repr__(self) -> str:
        return f"ColumnSum({self.__name__}, {self.shape}, {self.dtype})"


def column_sums_pass(plan: FusionPlan, names: NameGenerator, executor: str) -> FusionPlan:
    """Make each column sum of a region a ``[G, N]`` partial-sums output plus a :class:`ColumnSum` op (run right
    after the region) that finishes it; the views and the cast that only follow the sum are folded into that op
    (and dropped from the trace)."""
    trace = plan.trace
    readers = trace.readers()
    graph_outputs = {id(p) for p in trace.output_proxies()}
    in_region = {id(op) for r in plan.regions for op in r.ops}
    folded: set[int] = set()
    regions = []
    count = 0
    for region in plan.regions:
        sums = [op for op in region.column_sums if region.output_of(op.outputs[0]) is not None]
        if not sums:
            regions.append(region)
            continue
        programs = programs_for(region.device, region.R)
        outputs = list(region.outputs)
        trailing = list(region.trailing)
        for op in sums:
            out = op.outputs[0]
            n = int(out.val.shape[-1])
            final = out
            # Fold the views, then at most one floating-point cast, that are the sum's only readers.
            while id(final) not in graph_outputs and len(readers.get(id(final), [])) == 1:
                nxt = readers[id(final)][0]
                is_cast = nxt.target in fops.CASTS and nxt.target is not fops.aten.copy.default
                if not (nxt.target in fops.VIEWS or is_cast) or nxt.args[0] is not final or nxt.outputs[0] is None:
                    break
                if id(nxt) in in_region:  # another region computes it (from this sum): it stays there
                    break
                if is_cast and not nxt.outputs[0].val.dtype.is_floating_point:
                    break
                if numel(dims(nxt.outputs[0].val)) != n:  # an expand: the finisher writes the N sums, no more
                    break
                folded.add(id(nxt))
                final = nxt.outputs[0]
                if is_cast:
                    break
            partial = Proxy(names(f"{out.name}_partial"), empty_example(out.val, (programs, n), torch.float32))
            k = next(i for i, o in enumerate(outputs) if o.proxy is out)
            outputs[k] = dataclasses.replace(outputs[k], proxy=partial, partial_of=op, strides=None)
            finish = ColumnSum(names("colsum"), tuple(final.val.shape), final.val.dtype)
            trailing.append(BoundOp(finish, (partial,), {}, (final,), executor=executor))
            count += 1
        regions.append(region.replace(outputs=outputs, trailing=trailing, programs=programs))
    if not count:
        return plan
    new_trace = trace.derive("column sums folded", ops=[op for op in trace.ops if id(op) not in folded]) if folded else trace
    return plan.replace(
        trace=new_trace, regions=regions, notes=(*plan.notes, f"column_sums: {count} sums over rows kept in their regions")
    )
