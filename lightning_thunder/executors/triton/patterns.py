"""The ``patterns`` pass: shapes of computation the code generator writes specially, found once and recorded as
annotations on the region (and printed in its trace comment) rather than discovered inside the code generator.

- :class:`~lightning_thunder.executors.triton.plan.OneHotSum`: ``sum(where(arange(w) == t [& c], v, 0), -1)``
  is ``v`` at column ``t`` (a loss picking each row's target logit): one load per row, no pass over the row.
- :class:`~lightning_thunder.executors.triton.plan.OnlineSoftmax` (looped kernels): ``m = amax(f)`` and
  ``s = sum(exp(f - m))`` computed in one chunked pass with a running maximum.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.plan import FusionPlan, OneHotSum, OnlineSoftmax, RegionPlan
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp

__all__ = ["patterns_pass", "find_patterns"]

aten = torch.ops.aten


class _Finder:
    def __init__(self, region: RegionPlan) -> None:
        self.region = region
        self.producer = {id(op.outputs[0]): op for op in region.ops}

    def through_views(self, p: Any) -> Any:
        while isinstance(p, Proxy) and id(p) in self.producer and self.producer[id(p)].target in fops.VIEWS:
            p = self.producer[id(p)].args[0]
        return p

    def made_by(self, p: Any) -> BoundOp | None:
        p = self.through_views(p)
        return self.producer.get(id(p)) if isinstance(p, Proxy) else None

    def is_zero(self, x: Any) -> bool:
        x = self.through_views(x)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return x == 0
        op = self.producer.get(id(x)) if isinstance(x, Proxy) else None
        if op is None or op.target not in fops.CONSTANTS or op.target in fops.COLUMN_MOVES:
            return False
        return fops.CONSTANTS[op.target](op) == 0

    def column_index(self, x: Any) -> int | None:
        """The width of ``x`` when it is (a view of) an in-region ``arange(width)``."""
        op = self.made_by(x)
        if op is None or op.target not in fops.IOTA or fops.iota_params(op) != (0, 1):
            return None
        return int(op.outputs[0].val.shape[-1])

    @staticmethod
    def row_constant(x: Any) -> bool:
        return isinstance(x, Proxy) and x.is_tensor and (x.val.dim() == 0 or x.val.shape[-1] == 1)

    def onehot_index(self, cond: Any) -> tuple[Proxy, BoundOp, int] | None:
        """``(t, eq_op, width)`` when ``cond`` is ``arange(width) == t`` (``t`` one column per row), possibly and-ed
        with a condition that is constant along the row."""
        op = self.made_by(cond)
        if op is None or len(op.args) != 2 or op.kwargs:
            return None
        a, b = op.args
        if op.target is aten.eq.Tensor:
            for index, t in ((a, b), (b, a)):
                width = self.column_index(index)
                if width is not None and self.row_constant(t) and not t.val.dtype.is_floating_point:
                    return t, op, width
            return None
        if op.target in (aten.bitwise_and.Tensor, aten.logical_and.default):
            for c, other in ((a, b), (b, a)):
                found = self.onehot_index(c)
                if found is not None and self.row_constant(other):
                    return found
        return None

    def onehot_sums(self) -> list[OneHotSum]:
        found = []
        for op in self.region.ops:
            if op.target is not aten.sum.dim_IntList or set(op.kwargs) - {"keepdim"}:
                continue
            w_op = self.made_by(op.args[0])
            if w_op is None or w_op.target is not aten.where.self or len(w_op.args) != 3 or not self.is_zero(w_op.args[2]):
                continue
            index = self.onehot_index(w_op.args[0])
            if index is not None:
                t, eq_op, width = index
                found.append(OneHotSum(op, op.args[0], t, eq_op, width))
        return found

    def online_softmax(self, skip: set[int]) -> list[OnlineSoftmax]:
        pairs = []
        for op in self.region.ops:
            if op.target is not aten.sum.dim_IntList or id(op) in skip:
                continue
            e_op = self.made_by(op.args[0])
            if e_op is None or e_op.target is not aten.exp.default:
                continue
            d_op = self.made_by(e_op.args[0])
            if d_op is None or d_op.target is not aten.sub.Tensor or d_op.kwargs.get("alpha", 1) != 1:
                continue
            f, m_op = d_op.args[0], self.made_by(d_op.args[1])
            if m_op is not None and m_op.target is aten.amax.default and m_op.args[0] is f:
                pairs.append(OnlineSoftmax(op, m_op))
        return pairs


def find_patterns(region: RegionPlan) -> tuple[Any, ...]:
    """The annotations of ``region`` (online softmax only for looped kernels, where it saves a pass)."""
    finder = _Finder(region)
    onehots = finder.onehot_sums()
    found: list[Any] = list(onehots)
    if region.kernel == "looped":
        found += finder.online_softmax({id(p.sum_op) for p in onehots})
    return tuple(found)


def patterns_pass(plan: FusionPlan) -> FusionPlan:
    """Annotate every region with :func:`find_patterns`."""
    regions = []
    count = 0
    for region in plan.regions:
        found = find_patterns(region)
        count += len(found)
        regions.append(region.replace(patterns=found) if found != region.patterns else region)
    if not count:
        return plan
    return plan.replace(regions=regions, notes=(*plan.notes, f"patterns: {count} annotated"))
