"""Checks every fusion plan a pass returns: a pass that breaks one of these rules is a lightning_thunder bug, and
the executor drops that pass's result (see executor.py) instead of running a wrong program."""

from __future__ import annotations

import math

from lightning_thunder.executors.triton.kinds import AFTER_KERNEL
from lightning_thunder.executors.triton.plan import BufferSlice, FusionPlan, WorkspaceSlice

__all__ = ["PlanError", "validate_plan", "render_plan"]


class PlanError(AssertionError):
    """A fusion plan that breaks one of the rules of :func:`validate_plan`."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)


def validate_plan(plan: FusionPlan) -> None:
    """Raise :class:`PlanError` unless:

    - each op of the trace is in at most one region, and region numbers are distinct;
    - every value a region's op reads is made in the region or is one of its inputs, and its inputs are not made
      in it; nothing in a region reads a value that is complete only after the kernel;
    - every output is made in the region, or is the partial result of one of its ops;
    - every ``cat`` written in place has its pieces stored by regions that exist, whose slices cover the result's
      columns exactly once, each with the strides its output is stored with;
    - every workspace slice lies inside its workspace, and no two overlap;
    - the regions can be ordered (no cycle through values computed outside them).
    """
    seen_ops: dict[int, int] = {}
    indices = [r.index for r in plan.regions]
    _check(len(indices) == len(set(indices)), f"region numbers repeat: {indices}")
    for r in plan.regions:
        _check(bool(r.ops), f"{r.name} has no ops")
        inputs = {id(p) for p in r.inputs}
        for op in r.ops:
            _check(id(op) not in seen_ops, f"{op.name} is in {r.name} and fusion{seen_ops.get(id(op))}")
            seen_ops[id(op)] = r.index
            _check(id(op.outputs[0]) in r.kinds, f"{r.name}: {op.outputs[0].name} has no kind")
            for p in op.input_proxies():
                if id(p) in r.produced:
                    _check(r.kinds[id(p)] not in AFTER_KERNEL, f"{r.name}: {op.name} reads {p.name}, complete only after the kernel")
                elif p.is_tensor:  # (an int is the size of a view, which needs no value inside the region)
                    _check(id(p) in inputs, f"{r.name}: {op.name} reads {p.name}, neither made here nor an input")
        _check(not any(id(p) in r.produced for p in r.inputs), f"{r.name}: an input is made in the region")
        for op in r.ops:  # sums over rows and epilogues are accumulated over the whole grid: it is their width
            if r.kinds[id(op.outputs[0])] in AFTER_KERNEL:
                width = op.args[0].shape[-1]
                _check(width == r.N, f"{r.name}: {op.outputs[0].name} folds a value {width} wide in a grid of {r.N} columns")
        proxies = [id(o.proxy) for o in r.outputs]
        _check(len(proxies) == len(set(proxies)), f"{r.name}: an output is stored twice")
        for o in r.outputs:
            if o.partial_of is not None:
                _check(o.partial_of in r.ops, f"{r.name}: {o.proxy.name} holds partials of an op outside the region")
            else:
                _check(id(o.proxy) in r.produced, f"{r.name}: output {o.proxy.name} is not made in the region")
            if isinstance(o.into, BufferSlice):
                _check(o.strides == o.into.stride, f"{r.name}: {o.proxy.name} is stored with strides {o.strides}, its slice has {o.into.stride}")
    _validate_cats(plan)
    _validate_workspaces(plan)
    from lightning_thunder.executors.triton.lower import contract

    try:
        contract(plan.trace, {r.index: _Placeholder.op(r) for r in plan.regions}, plan.regions)
    except AssertionError as e:
        raise PlanError(str(e)) from e


def _validate_cats(plan: FusionPlan) -> None:
    regions = {r.index: r for r in plan.regions}
    for number, cat in enumerate(plan.cats):
        out = cat.cat.outputs[0]
        shape = tuple(out.shape)
        rows, width = math.prod(shape[:-1]), shape[-1]
        for w in cat.writers:
            _check(w in regions, f"cat{number}: writer fusion{w} does not exist")
        slices = [
            o.into for r in plan.regions for o in r.outputs if isinstance(o.into, BufferSlice) and o.into.cat == number
        ]
        _check(bool(slices), f"cat{number} has no writer")
        writers = {r.index for r in plan.regions for o in r.outputs if isinstance(o.into, BufferSlice) and o.into.cat == number}
        _check(writers == set(cat.writers), f"cat{number}: writers {sorted(cat.writers)}, slices written by {sorted(writers)}")
        ranges = []
        for s in slices:
            n = math.prod(s.shape)
            _check(n % rows == 0, f"cat{number}: a slice of {n} elements for {rows} rows")
            ranges.append((s.offset % width, n // rows))
        ranges.sort()
        end = 0
        for start, w in ranges:
            _check(start == end, f"cat{number}: columns {end}..{start} written {'twice' if start < end else 'by nobody'}")
            end = start + w
        _check(end == width, f"cat{number}: columns {end}..{width} written by nobody")


def _validate_workspaces(plan: FusionPlan) -> None:
    used: dict[int, list[tuple[int, int, str]]] = {}
    for r in plan.regions:
        for o in r.outputs:
            if isinstance(o.into, WorkspaceSlice):
                _check(o.into.workspace < len(plan.workspaces), f"{o.proxy.name}: workspace{o.into.workspace} does not exist")
                used.setdefault(o.into.workspace, []).append((o.into.offset, o.proxy.val.numel(), o.proxy.name))
    for number, slices in used.items():
        slices.sort()
        end = 0
        for offset, n, name in slices:
            _check(offset >= end, f"workspace{number}: {name} overlaps the slice before it")
            end = offset + n
        _check(end <= plan.workspaces[number], f"workspace{number}: {end} elements used of {plan.workspaces[number]}")


class _Placeholder:
    """A region's op in a plan that is not lowered yet (for ordering checks and stage traces)."""

    def __init__(self, region) -> None:
        self.region = region
        self.__name__ = self.__qualname__ = region.name

    @property
    def notes(self) -> list[str]:
        from lightning_thunder.executors.triton.lower import region_notes

        return region_notes(self.region)

    def __call__(self, *args):
        raise RuntimeError(
            f"{self.region.name} is a planned region of a fusion stage trace, not yet lowered to a kernel; "
            "run the executor's final trace (forward/executor:triton) instead"
        )

    @classmethod
    def op(cls, region):
        from lightning_thunder.trace.trace import BoundOp

        outs = tuple(region.output_proxies)
        return BoundOp(cls(region), region.inputs, {}, outs, unpack=len(outs) > 1, label=region.name, subops=region.ops)


def render_plan(plan: FusionPlan, name: str, provenance: str, elapsed_ms: float | None = None):
    """The trace of a plan stage: each region one op (a placeholder that prints the region's ops, kernel shape,
    patterns and output layouts), freed copies shown as ``contiguous``; valid Python, but its regions are not
    lowered to kernels yet (calling one says so)."""
    from lightning_thunder.executors.triton.layout import free_clone
    from lightning_thunder.executors.triton.lower import contract

    ops = contract(plan.trace, {r.index: _Placeholder.op(r) for r in plan.regions}, plan.regions)
    ops = [free_clone(op) if id(op) in plan.freed else op for op in ops]
    return plan.trace.derive(provenance, name=name, ops=ops, elapsed_ms=elapsed_ms)
