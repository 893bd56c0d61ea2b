"""The fusion plan: what the Triton fusion executor will do to one trace, as immutable data.

:func:`~lightning_thunder.executors.triton.form.form_plan` draws regions from a trace; each pass of the
executor (``layout``, ``column_sums``, ``cat_slices``, ``patterns``, ``workspace``, ...) takes a
:class:`FusionPlan` and returns a new one, never changing the one it was given, and
:func:`~lightning_thunder.executors.triton.validate.validate_plan` checks every plan a pass returns.
A pass that finds it cannot do what it started returns its input unchanged: nothing half-applied survives.

A region computes on a grid of ``R`` rows by ``N`` columns (see :mod:`~lightning_thunder.executors.triton.kinds`).
Each output says where it is stored (:class:`Output`): a new tensor of its own (with the strides a pass chose
for its readers), a slice of a ``cat``'s result (:class:`BufferSlice`), or a slice of a zeroed workspace
(:class:`WorkspaceSlice`); and what it holds when it is not a value of the region but a partial result an
op after the kernel finishes (a column sum's partial sums, an epilogue's partial maxima).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp, Trace

__all__ = [
    "BufferSlice",
    "CatPlan",
    "FusionPlan",
    "OneHotSum",
    "OnlineSoftmax",
    "Output",
    "RegionPlan",
    "WorkspaceSlice",
    "frozen_map",
]


def frozen_map(items: Mapping | None = None) -> Mapping:
    """A read-only copy of ``items``."""
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True)
class BufferSlice:
    """The output is stored into a slice of the result of planned ``cat`` number ``cat``.

    ``shape``/``stride``/``offset`` are the slice's, in elements of the buffer (which is contiguous)."""

    cat: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class WorkspaceSlice:
    """The output (zero-initialized, 1-D fp32) is the slice ``[offset, offset + numel)`` of workspace ``workspace``."""

    workspace: int
    offset: int


@dataclass(frozen=True)
class Output:
    """One output of a region.

    Attributes:
        proxy: the value the kernel stores.
        strides: the strides to store it with (``None``: contiguous).
        into: where it lives when not in a new tensor of its own.
        partial_of: for a partial result (``[P, N]`` partial column sums, ``[P]`` partial maxima), the op of
            the region whose result it is a part of.
        zeroed: the kernel folds into it with atomics, so it must start at zero.
    """

    proxy: Proxy
    strides: tuple[int, ...] | None = None
    into: BufferSlice | WorkspaceSlice | None = None
    partial_of: BoundOp | None = None
    zeroed: bool = False

    def describe(self) -> str:
        """A short note for the trace comment (empty for a plain contiguous output)."""
        notes = []
        if self.strides is not None:
            notes.append(f"strides {self.strides}")
        if isinstance(self.into, BufferSlice):
            notes.append(f"into cat{self.into.cat} at {self.into.offset}")
        elif isinstance(self.into, WorkspaceSlice):
            notes.append(f"workspace{self.into.workspace}[{self.into.offset}:]")
        if self.partial_of is not None:
            notes.append(f"partials of {self.partial_of.outputs[0].name}")
        return ", ".join(notes)


@dataclass(frozen=True)
class OneHotSum:
    """``sum(where(arange(width) == t [& row condition], v, 0), -1)``: only column ``t`` can be nonzero, so the
    sum is ``v`` at column ``t`` (a loss picking each row's target logit), one load per row and no pass."""

    sum_op: BoundOp
    summand: Proxy
    index: Proxy
    eq_op: BoundOp
    width: int

    def describe(self) -> str:
        return f"one-hot sum {self.sum_op.outputs[0].name} = {self.summand.name}[{self.index.name}]"


@dataclass(frozen=True)
class OnlineSoftmax:
    """``m = amax(f)``, ``s = sum(exp(f - m))`` over long rows: one chunked pass keeps a running maximum and a
    rescaled running sum (Milakov & Gimelshein, 2018) instead of two passes over ``f``."""

    sum_op: BoundOp
    max_op: BoundOp

    def describe(self) -> str:
        return f"online softmax ({self.max_op.outputs[0].name}, {self.sum_op.outputs[0].name})"


@dataclass(frozen=True)
class RegionPlan:
    """One region: ops that run as one generated kernel, and everything the code generator needs about them.

    Attributes:
        index: the region's number (``fusion<index>`` in traces), in the order regions were formed.
        R, N: rows and columns of the grid (``N`` is ``None`` when nothing varies along columns).
        device: where the region runs.
        ops: the region's ops in trace order.
        kinds: proxy id -> ``full`` / ``row`` / ``col`` / ``scalar`` (or ``colsum`` / ``epilogue``) for values made here.
        widths: proxy id -> columns, for ``full``/``col`` values.
        has_col: op id -> whether the op's output's last dim is the column dimension.
        produced: proxy id -> proxy, for values made here.
        inputs: tensors the kernel reads, in argument order.
        outputs: what the kernel stores, in argument order.
        trailing: ops run right after the kernel (views of outputs, column-sum finishers).
        programs: the fixed grid of a kernel that accumulates column sums (``None`` otherwise).
        patterns: annotations the code generator follows (:class:`OneHotSum`, :class:`OnlineSoftmax`).
        kernel: the kernel shape: ``flat``, ``persistent``, ``grid-stride``, ``column-tiled`` or ``looped``
            (set by the ``kernel_shapes`` pass).
        epilogues: op id -> the epilogue that folds that op (partial maxima of ``fp8_amax``...).
    """

    index: int
    R: int
    N: int | None
    device: torch.device
    ops: tuple[BoundOp, ...]
    kinds: Mapping[int, str]
    widths: Mapping[int, int]
    has_col: Mapping[int, bool]
    produced: Mapping[int, Proxy]
    inputs: tuple[Proxy, ...]
    outputs: tuple[Output, ...]
    trailing: tuple[BoundOp, ...] = ()
    programs: int | None = None
    patterns: tuple[Any, ...] = ()
    kernel: str | None = None
    epilogues: Mapping[int, Any] = field(default_factory=frozen_map)

    @property
    def name(self) -> str:
        """``fusion<index>``."""
        return f"fusion{self.index}"

    def replace(self, **changes: Any) -> RegionPlan:
        """A copy with ``changes`` (mappings are frozen)."""
        for key in ("kinds", "widths", "has_col", "produced", "epilogues"):
            if key in changes:
                changes[key] = frozen_map(changes[key])
        for key in ("ops", "inputs", "outputs", "trailing", "patterns"):
            if key in changes:
                changes[key] = tuple(changes[key])
        return dataclasses.replace(self, **changes)

    @property
    def output_proxies(self) -> list[Proxy]:
        """The proxies the kernel stores, in argument order."""
        return [o.proxy for o in self.outputs]

    def output_of(self, proxy: Proxy) -> Output | None:
        """The output entry storing ``proxy``."""
        return next((o for o in self.outputs if o.proxy is proxy), None)

    @property
    def column_sums(self) -> list[BoundOp]:
        """The ops that sum a value over all rows (kind ``colsum``)."""
        from lightning_thunder.executors.triton.kinds import COLSUM

        return [op for op in self.ops if self.kinds.get(id(op.outputs[0])) == COLSUM]

    @property
    def epilogue_ops(self) -> list[BoundOp]:
        """The ops folded by an epilogue (kind ``epilogue``)."""
        return [op for op in self.ops if id(op) in self.epilogues]

    @property
    def has_reduction(self) -> bool:
        """Whether any op reduces over the columns."""
        from lightning_thunder.executors.triton import ops as fops

        return any(op.target in fops.REDUCTIONS for op in self.ops)

    @property
    def partial_outputs(self) -> dict[int, BoundOp]:
        """Output proxy id -> the op it holds partial results of."""
        return {id(o.proxy): o.partial_of for o in self.outputs if o.partial_of is not None}

    def pattern(self, kind: type, op: BoundOp) -> Any:
        """The annotation of ``kind`` whose ``sum_op`` is ``op`` (``None`` if none)."""
        return next((p for p in self.patterns if isinstance(p, kind) and p.sum_op is op), None)


@dataclass(frozen=True)
class CatPlan:
    """A ``cat`` along the last dimension whose result is allocated up front and written piece by piece.

    Attributes:
        cat: the ``cat`` op (removed from the trace, with the view chains in ``removed``).
        removed: ids of the ops the in-place writes replace.
        writers: indices of the regions storing a piece, each once.
    """

    cat: BoundOp
    removed: frozenset[int]
    writers: tuple[int, ...]


@dataclass(frozen=True)
class FusionPlan:
    """What the fusion executor will do to ``trace``.

    Attributes:
        trace: the trace the regions come from (passes that fold ops into regions derive a new one).
        regions: the regions.
        cats: ``cat`` ops written in place (see :class:`CatPlan`).
        freed: ids of ``clone`` ops that become ``contiguous()`` (their input is stored in the order they want).
        workspaces: sizes (fp32 elements) of the zeroed workspaces, one per index used by :class:`WorkspaceSlice`.
        unfused: op id -> why the op is not in a region (for :func:`lightning_thunder.explain`).
        notes: one line per pass that changed something (shown in the stage traces).
    """

    trace: Trace
    regions: tuple[RegionPlan, ...]
    cats: tuple[CatPlan, ...] = ()
    freed: frozenset[int] = frozenset()
    workspaces: tuple[int, ...] = ()
    unfused: Mapping[int, str] = field(default_factory=frozen_map)
    notes: tuple[str, ...] = ()

    def replace(self, **changes: Any) -> FusionPlan:
        """A copy with ``changes``."""
        if "regions" in changes:
            changes["regions"] = tuple(changes["regions"])
        if "unfused" in changes:
            changes["unfused"] = frozen_map(changes["unfused"])
        return dataclasses.replace(self, **changes)

    def with_region(self, region: RegionPlan) -> FusionPlan:
        """A copy with ``region`` in place of the region of the same index."""
        return self.replace(regions=[region if r.index == region.index else r for r in self.regions])

    def region(self, index: int) -> RegionPlan:
        """The region of ``index``."""
        return next(r for r in self.regions if r.index == index)
