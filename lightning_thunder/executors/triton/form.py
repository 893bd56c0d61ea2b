"""Region formation: which ops of a post-autograd trace run together in one generated kernel.

Ops join a region greedily in trace order: vertically (an input comes from the region) or horizontally
(it reads a tensor the region reads), when its shapes fit the region's grid (see kinds.py) and joining
cannot create a cycle (an input computed outside the region, directly or through other regions, from the
region's own outputs). Two regions an op connects are merged when that creates no cycle either. Views
that keep the last dimension only regroup rows, so inside a region they cost nothing. Matmuls, attention,
gathers and everything else stay outside, on their library kernels; :func:`form_plan` records why each op
that is not in a region is not (``FusionPlan.unfused``, shown by :func:`lightning_thunder.explain`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.epilogues import Epilogue
from lightning_thunder.executors.triton.kinds import (
    AFTER_KERNEL,
    COL,
    COLSUM,
    COLSUM_MAX_N,
    EPILOGUE,
    FULL,
    ROW,
    SCALAR,
    WIDE,
    check_operands,
    column_move,
    external_kind,
    join_kinds,
    dims,
    free_symbols,
    strides,
    gt1,
    numel,
    op_role,
)
from lightning_thunder.executors.triton.plan import FusionPlan, Output, RegionPlan, frozen_map
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp, Trace

__all__ = ["form_plan"]

_FUSIBLE_ROLES = ("pointwise", "reduction", "column")


@dataclass(eq=False)
class _Region:
    """A region while it is being formed (mutable); :func:`form_plan` freezes it into a :class:`RegionPlan`."""

    index: int
    R: int
    N: int | None
    device: torch.device
    ops: list[BoundOp] = field(default_factory=list)
    kinds: dict[int, str] = field(default_factory=dict)
    widths: dict[int, int] = field(default_factory=dict)
    has_col: dict[int, bool] = field(default_factory=dict)
    produced: dict[int, Proxy] = field(default_factory=dict)
    epilogues: dict[int, Epilogue] = field(default_factory=dict)

    @property
    def compute_ops(self) -> int:
        return sum(1 for op in self.ops if op.target not in fops.VIEWS and op.target not in fops.CONSTANTS)

    @property
    def folds_after_kernel(self) -> bool:
        return any(k in AFTER_KERNEL for k in self.kinds.values())


class _Former:
    def __init__(
        self, trace: Trace, allow_cpu: bool, epilogues: Sequence[Epilogue], exclude: Mapping[int, str]
    ) -> None:
        self.trace = trace
        self.exclude = exclude
        self.allow_cpu = allow_cpu
        self.epilogue_list = list(epilogues)
        self.regions: list[_Region] = []
        self.region_of: dict[int, _Region] = {}  # op id -> region
        self.producer_region: dict[int, _Region] = {}  # proxy id -> region producing it
        self.depends: dict[int, frozenset[int]] = {}  # proxy id -> regions it (transitively) depended on when made
        self.region_deps: dict[int, set[int]] = {}  # region index -> regions its external inputs depend on
        self.readers: dict[int, list[_Region]] = {}  # proxy id -> regions reading it
        self.merged_into: dict[int, int] = {}  # region index -> the region it was merged into
        self.position: dict[int, int] = {id(op): k for k, op in enumerate(trace.ops)}
        self.producer_op: dict[int, BoundOp] = {}
        self.first_consumer: dict[int, BoundOp] = {}
        self.unfused: dict[int, str] = {}
        for op in trace.ops:
            for p in op.input_proxies():
                self.first_consumer.setdefault(id(p), op)
            for p in op.output_proxies():
                self.producer_op[id(p)] = op

    def epilogue(self, op: BoundOp) -> Epilogue | None:
        if op.is_method or op.unpack or op.outputs[0] is None:
            return None
        return next((e for e in self.epilogue_list if e.matches(op)), None)

    def role(self, op: BoundOp) -> tuple[str | None, Epilogue | None]:
        epilogue = self.epilogue(op)
        return op_role(op, epilogue), epilogue

    def find(self, index: int) -> int:
        """The live region that region ``index`` now belongs to."""
        while index in self.merged_into:
            index = self.merged_into[index]
        return index

    def depends_on(self, p: Proxy, region: _Region) -> bool:
        """Whether ``p`` (transitively) depends on ``region``'s outputs.

        ``depends`` records the regions ``p`` depended on when it was made; regions grow afterwards, and a region
        that has since come to read another region's outputs passes that dependency on: the walk follows
        ``region_deps`` (what each region's inputs depend on) from there."""
        target = region.index
        stack = [self.find(i) for i in self.depends.get(id(p), frozenset())]
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i == target:
                return True
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.find(j) for j in self.region_deps.get(i, ()) if self.find(j) != i)
        return False

    # ------------------------------------------------------------------ grid checks
    @staticmethod
    def _wide(region: _Region, shape: tuple[int, ...]) -> str | None:
        """``full`` / ``col`` if a value of ``shape`` can vary along columns in ``region``."""
        if len(shape) == 0 or shape[-1] <= 1:
            return None
        rows = numel(shape[:-1])
        if rows == region.R:
            return FULL
        return COL if rows == 1 else None

    def _classify(
        self, region: _Region, out_shape: tuple[int, ...], externals: list[Proxy], internal: list[str]
    ) -> tuple[str, bool] | None:
        """(kind, has_col) of a pointwise op's output in ``region``."""
        wide = self._wide(region, out_shape)
        if any(k in WIDE for k in internal):
            if wide is None:
                return None
            has_col = True
        elif ROW in internal and len(out_shape) == 1 and numel(out_shape) == region.R:
            has_col = False  # elementwise with a per-row value: a 1-D result (and operand) is per row too
        elif wide is not None and any(external_kind(dims(p.val), out_shape, True) in WIDE for p in externals):
            has_col = True
        elif numel(out_shape) == region.R or numel(out_shape) == 1:
            has_col = False
        else:
            return None
        kind = SCALAR
        for k in internal:
            kind = join_kinds(kind, k)
        for p in externals:
            kind = join_kinds(kind, external_kind(dims(p.val), out_shape, has_col))
        if kind in WIDE and self._wide(region, out_shape) is None:
            return None
        if kind == ROW and numel(out_shape) != region.R and not has_col:
            return None
        if kind == FULL and self._wide(region, out_shape) != FULL:
            return None
        return kind, has_col

    def _effective_shape(self, region: _Region, p: Proxy) -> tuple[int, ...]:
        """``p``'s shape with the dimensions an ``expand`` made (constant along them) set to 1."""
        shape = dims(p.val)
        op = self.producer_op.get(id(p))
        if op is None or op.target is not torch.ops.aten.expand.default or id(op.args[0]) not in region.produced:
            return shape
        src = self._effective_shape(region, op.args[0])
        return (1,) * (len(shape) - len(src)) + src

    def _reads_as_its_kind(self, region: _Region, p: Proxy, target: tuple[int, ...], has_col: bool) -> bool:
        """Whether internal value ``p``, broadcast against an op output of shape ``target``, is indexed the way its
        kind says: a ``row`` value by the region's row index, a ``col`` value by the column, a ``full`` value by
        both. A read that broadcasts it differently (a ``[10, 5]`` value whose 50 elements happen to equal the
        region's 50 rows, read against ``[5, 10, 5]``) must not join."""
        kind = region.kinds[id(p)]
        if kind == SCALAR:
            return True
        return external_kind(self._effective_shape(region, p), target, has_col) == kind

    def _input_width(self, region: _Region, p: Proxy) -> tuple[str, int] | None:
        """(kind, width) of a column-varying operand of a column move (internal or loaded)."""
        if id(p) in region.produced:
            kind = region.kinds[id(p)]
            return (kind, region.widths[id(p)]) if kind in WIDE else None
        shape = dims(p.val)
        kind = self._wide(region, shape)
        return (kind, shape[-1]) if kind is not None else None

    def _try_join(self, region: _Region, op: BoundOp, role: str) -> tuple[str, bool, int | None] | None:
        """(kind, has_col, width) if ``op`` can join ``region``; ``None`` otherwise."""
        fit = self._fit(region, op, role)
        if fit is not None and region.folds_after_kernel:
            wider = fit[2] if fit[0] in WIDE else None
            if role == "reduction":
                wider = dims(op.args[0].val)[-1]
            if wider is not None and wider > (region.N or 0):
                return None  # column sums and epilogues cover the region's full width: it may not grow
        return fit

    def _fit(self, region: _Region, op: BoundOp, role: str) -> tuple[str, bool, int | None] | None:
        out_shape = dims(op.outputs[0].val)
        if op.outputs[0].val.device != region.device:
            return None
        for p in op.input_proxies():  # joining must not create a cycle
            if id(p) not in region.produced and self.depends_on(p, region):
                return None
            if region.kinds.get(id(p)) in AFTER_KERNEL:  # complete only after the kernel: read outside
                return None
        if role == "colreduce":
            x = op.args[0]
            width = dims(x.val)[-1]
            if id(x) not in region.produced or region.kinds[id(x)] != FULL or region.widths.get(id(x)) != width:
                return None
            if region.N != width or width > COLSUM_MAX_N or numel(dims(x.val)) != region.R * width:
                return None
            return COLSUM, True, width
        if role == "epilogue":  # over a full-width value the region computes (never over a loaded input)
            x = op.args[0]
            if not isinstance(x, Proxy) or id(x) not in region.produced:
                return None
            if region.kinds[id(x)] != FULL or region.widths.get(id(x)) != region.N:
                return None
            if numel(dims(x.val)) != region.R * region.N or region.N > COLSUM_MAX_N:
                return None
            return EPILOGUE, False, None
        if role == "view":
            src = op.args[0]
            if not isinstance(src, Proxy) or id(src) not in region.produced:
                return None
            kind, width = region.kinds[id(src)], region.widths.get(id(src))
            if op.target is torch.ops.aten.expand.default and kind in (ROW, COL, SCALAR):
                return kind, kind == COL, width
            if kind in WIDE:
                ok = out_shape[-1:] == (width,) and self._wide(region, out_shape) == kind
            else:
                ok = kind == SCALAR or numel(out_shape) == region.R
            return (kind, kind in WIDE, width) if ok else None
        if role == "constant":
            return SCALAR, False, None
        if role == "iota":  # a column index: varies along the columns of a region whose rows it does not have
            width = out_shape[-1]
            return (COL, True, width) if width > 1 and region.N is not None and width <= region.N else None
        if role == "reduction":
            x = op.args[0]
            x_shape = dims(x.val)
            if self._wide(region, x_shape) != FULL and not (
                id(x) in region.produced and region.kinds[id(x)] in (ROW, SCALAR) and numel(x_shape) == region.R * x_shape[-1]
            ):
                return None
            if id(x) in region.produced and region.kinds[id(x)] in WIDE and region.widths[id(x)] != x_shape[-1]:
                return None
            return (ROW, False, None) if numel(out_shape) == region.R else None
        if role == "column":
            how, spec = column_move(op)
            if how == "slice" and id(spec[0]) not in region.produced:
                return None  # a slice of a tensor made elsewhere stays a view outside (eager's aliasing)
            kind = SCALAR
            sources = [piece for piece, _, _ in spec] if how == "cat" else [spec[0]]
            for p in sources:
                info = self._input_width(region, p)
                if info is None:
                    return None
                kind = join_kinds(kind, info[0])
            width = out_shape[-1]
            return (kind, True, width) if self._wide(region, out_shape) == kind else None
        internal = [region.kinds[id(p)] for p in op.input_proxies() if id(p) in region.produced]
        for p in op.input_proxies():
            if id(p) in region.produced and region.kinds[id(p)] in WIDE and region.widths[id(p)] != out_shape[-1]:
                return None
        externals = [p for p in op.input_proxies() if id(p) not in region.produced]
        fit = self._classify(region, out_shape, externals, internal)
        if fit is None:
            return None
        kind, has_col = fit
        for p in op.input_proxies():
            if id(p) in region.produced and not self._reads_as_its_kind(region, p, out_shape, has_col):
                return None
        return kind, has_col, (out_shape[-1] if kind in WIDE else None)

    def _new_region(self, op: BoundOp, role: str) -> _Region | None:
        out = op.outputs[0].val
        if out.device.type == "cpu" and not self.allow_cpu:
            return None
        shape = dims(out)
        if role == "reduction":
            rows = numel(dims(op.args[0].val)[:-1])
        elif role in ("pointwise", "column") and len(shape) > 0 and shape[-1] > 1:
            rows = numel(shape[:-1])
            if rows == 1:
                return None  # a lone [n] value (a weight's .float()): left for the region that reads it
        elif role == "pointwise" and gt1(numel(shape)):
            rows = numel(shape)
        else:
            return None
        region = _Region(len(self.regions), rows, None, out.device)
        self.regions.append(region)
        return region

    def _add(self, region: _Region, op: BoundOp, kind: str, has_col: bool, width: int | None, epilogue=None) -> None:
        region.ops.append(op)
        out = op.outputs[0]
        region.kinds[id(out)] = kind
        if epilogue is not None:
            region.epilogues[id(op)] = epilogue
        if kind in WIDE:
            region.widths[id(out)] = width
            region.N = max(region.N or 0, width)
        if op.target in fops.REDUCTIONS:
            region.N = max(region.N or 0, dims(op.args[0].val)[-1])
        region.has_col[id(op)] = has_col
        region.produced[id(out)] = out
        for p in op.input_proxies():
            if id(p) not in region.produced:
                self.readers.setdefault(id(p), []).append(region)
                self.region_deps.setdefault(region.index, set()).update(self.depends.get(id(p), ()))
        self.region_of[id(op)] = region
        self.producer_region[id(out)] = region
        self.unfused.pop(id(op), None)  # an op pulled in after it was first left out

    def _reads_indirectly(self, reader: _Region, source: _Region) -> bool:
        """Whether ``reader`` reads a value computed outside both regions from ``source``'s outputs."""
        for op in reader.ops:
            for p in op.input_proxies():
                if id(p) in reader.produced or id(p) in source.produced:
                    continue
                if self.depends_on(p, source):
                    return True
        return False

    @staticmethod
    def _reads_after_kernel(reader: _Region, source: _Region) -> bool:
        """Whether ``reader`` reads a value of ``source`` that is complete only after the kernel (column sums,
        epilogues): merged, the reads would see a partial value."""
        return any(source.kinds.get(id(p)) in AFTER_KERNEL for op in reader.ops for p in op.input_proxies())

    def _try_merge(self, into: _Region, other: _Region) -> bool:
        """Merge ``other`` into ``into`` when their rows agree and no path leaves and re-enters them."""
        if into is other or into.device != other.device or into.R != other.R:
            return False
        for r in (into, other):
            if r.folds_after_kernel and max(into.N or 0, other.N or 0) != r.N:
                return False  # column sums and epilogues need the whole region at their width
        if self._reads_indirectly(into, other) or self._reads_indirectly(other, into):
            return False
        if self._reads_after_kernel(into, other) or self._reads_after_kernel(other, into):
            return False
        into.N = max(into.N or 0, other.N or 0) or None
        into.ops = sorted(into.ops + other.ops, key=lambda op: self.position[id(op)])
        into.kinds.update(other.kinds)
        into.widths.update(other.widths)
        into.has_col.update(other.has_col)
        into.produced.update(other.produced)
        into.epilogues.update(other.epilogues)
        self.region_deps.setdefault(into.index, set()).update(self.region_deps.pop(other.index, ()))
        for op in other.ops:
            self.region_of[id(op)] = into
            self.producer_region[id(op.outputs[0])] = into
        for readers in self.readers.values():
            for k, r in enumerate(readers):
                if r is other:
                    readers[k] = into
        other.ops = []
        self.merged_into[other.index] = into.index
        return True

    def _pull_in_producers(self, region: _Region, op: BoundOp) -> None:
        """Move into ``region`` the fusible producers of ``op``'s inputs that no region took (a weight's
        ``.float()``, a zero fill, a column index ``arange`` and its ``unsqueeze``) when ``op`` is their
        output's first reader: nothing outside has read it yet, so no cycle can arise."""
        pulled = False
        for p in op.input_proxies():
            pulled = self._pull(region, p, op, depth=0) or pulled
        if pulled:
            region.ops.sort(key=lambda o: self.position[id(o)])

    def _pull(self, region: _Region, p: Proxy, reader: BoundOp, depth: int) -> bool:
        q = self.producer_op.get(id(p))
        if q is None or id(q) in self.region_of or id(p) in region.produced or q.executor or depth > 1:
            return False
        if self.first_consumer.get(id(p)) is not reader:
            return False
        q_role = op_role(q)
        if q_role not in ("pointwise", "constant", "iota", "view") or check_operands(q, q_role) is not None:
            return False
        if q_role == "view":
            # Only the views of a column index (``arange(n).unsqueeze(0)``): leading unit dims, same length,
            # so once the index is in the region the view is sure to join too (no half-pulled chain).
            src = q.args[0]
            src_op = self.producer_op.get(id(src)) if isinstance(src, Proxy) else None
            out_shape = dims(q.outputs[0].val)
            if src_op is None or op_role(src_op) != "iota" or out_shape is None:
                return False
            if out_shape[-1] != src.shape[-1] or numel(out_shape) != src.shape[-1]:
                return False
            if not self._pull(region, src, q, depth + 1):  # the index first (q must be its first reader)
                return False
        elif any(id(x) in region.produced or self.producer_region.get(id(x)) is not None for x in q.input_proxies()):
            return False  # only producers whose own inputs come from outside every region
        fit = self._try_join(region, q, q_role)
        if fit is None or not self._read_as(region, reader, p, fit[0]):
            return False
        self._add(region, q, *fit)
        self.depends[id(p)] = self.depends.get(id(p), frozenset()) | {region.index}
        return True

    def _read_as(self, region: _Region, reader: BoundOp, p: Proxy, kind: str) -> bool:
        """Whether ``reader`` (in ``region``, or the view being pulled with it), which took ``p`` as a loaded input,
        reads it the way a value of ``kind`` made in the region is indexed: pulling ``p``'s producer in must not
        change what the reader sees (a ``[R]`` value read per row must not become a per-column one)."""
        if kind == SCALAR or id(reader) not in region.has_col:
            return True
        shape = dims(p.val)
        if reader.target in fops.REDUCTIONS or reader.target in fops.COLUMN_MOVES:
            return external_kind(shape, shape, True) == kind
        return external_kind(shape, dims(reader.outputs[0].val), region.has_col[id(reader)]) == kind

    # ------------------------------------------------------------------ main loop
    def _place(self, op: BoundOp, role: str, epilogue: Epilogue | None) -> _Region | None:
        candidates: list[_Region] = []
        for p in op.input_proxies():
            r = self.producer_region.get(id(p))
            if r is not None and r not in candidates:
                candidates.append(r)
        if role not in ("view", "epilogue"):
            for p in op.input_proxies():
                for r in self.readers.get(id(p), []):
                    if r not in candidates:
                        candidates.append(r)
        for region in candidates:
            fit = self._try_join(region, op, role)
            if fit is not None:
                self._add(region, op, *fit, epilogue=epilogue)
                if role not in ("view", "epilogue"):
                    self._pull_in_producers(region, op)
                    for p in op.input_proxies():
                        other = self.producer_region.get(id(p))
                        if other is not None and other is not region:
                            self._try_merge(region, other)
                return region
        if role not in _FUSIBLE_ROLES:
            return None
        region = self._new_region(op, role)
        if region is None:
            return None
        fit = self._try_join(region, op, role)
        if fit is None:
            self.regions.pop()
            return None
        self._add(region, op, *fit)
        self._pull_in_producers(region, op)
        return region

    def run(self) -> list[_Region]:
        for op in self.trace.ops:
            role, epilogue = self.role(op)
            placed = None
            if id(op) in self.exclude:
                self.unfused[id(op)] = self.exclude[id(op)]
            elif role is None:
                self.unfused[id(op)] = f"claimed by executor {op.executor!r}" if op.executor else "no Triton lowering"
            else:
                problem = check_operands(op, role, epilogue)
                if problem is not None:
                    self.unfused[id(op)] = problem
                else:
                    placed = self._place(op, role, epilogue)
                    if placed is None:
                        self.unfused[id(op)] = _unplaced_reason(op, role, self.allow_cpu)
            deps: set[int] = set()
            for p in op.input_proxies():
                deps |= self.depends.get(id(p), frozenset())
            if placed is not None:
                deps.add(placed.index)
            for p in op.output_proxies():
                self.depends[id(p)] = frozenset(deps)
        return [r for r in self.regions if r.ops]


def _unplaced_reason(op: BoundOp, role: str, allow_cpu: bool) -> str:
    out = op.outputs[0].val
    if out.device.type == "cpu" and not allow_cpu:
        return "CPU tensors are fused only under TRITON_INTERPRET=1"
    if role == "epilogue":
        return "no region computes its input (it runs as its own pass)"
    if role in ("view", "constant", "iota"):
        return f"a {role} whose reader is in no region"
    return f"its shape {list(out.shape)} fits the grid of no region it reads from or feeds"


def _symbol_proxies(trace: Trace) -> dict[Any, Proxy]:
    """sympy symbol -> the proxy of the trace that holds its value (an int input such as ``s27``, or an op's output)."""
    found: dict[Any, Proxy] = {}
    for p in [*trace.inputs, *(q for op in trace.ops for q in op.output_proxies())]:
        if not p.is_tensor and isinstance(p.val, torch.SymInt) and p.val.node.expr.is_Symbol:
            found.setdefault(p.val.node.expr, p)
    return found


def _symbols_of(region: _Region) -> set:
    found: set = set()
    for op in region.ops:
        for p in (op.outputs[0], *op.input_proxies()):
            if p.is_tensor:
                found |= free_symbols(dims(p.val)) | free_symbols(tuple(strides(p.val)))
    return found


def _freeze(region: _Region, used_outside: set[int], symbols: dict[Any, Proxy]) -> RegionPlan:
    """Inputs and outputs of ``region``; outputs made by views are re-viewed outside (``trailing``). The tensors the
    kernel reads come first among the inputs, then the ints that give its symbolic dimensions their values."""
    producer = {id(op.outputs[0]): op for op in region.ops}
    inputs: dict[int, Proxy] = {}
    for op in region.ops:
        for p in op.input_proxies():
            if id(p) not in region.produced and p.is_tensor:  # not the sizes of views: regions regroup rows freely
                inputs.setdefault(id(p), p)
    for sym in sorted(_symbols_of(region), key=str):
        inputs.setdefault(id(symbols[sym]), symbols[sym])
    outputs: dict[int, Proxy] = {}
    trailing: dict[int, BoundOp] = {}
    for op in region.ops:
        out = op.outputs[0]
        if id(out) not in used_outside:
            continue
        chain = []
        while producer[id(out)].target in fops.VIEWS or producer[id(out)].target is torch.ops.aten.slice.Tensor:
            view = producer[id(out)]
            chain.append(view)
            out = view.args[0]
        outputs.setdefault(id(out), out)
        for view in reversed(chain):
            trailing.setdefault(id(view), view)
    order = {id(op): i for i, op in enumerate(region.ops)}
    return RegionPlan(
        index=region.index,
        R=region.R,
        N=region.N,
        device=region.device,
        ops=tuple(region.ops),
        kinds=frozen_map(region.kinds),
        widths=frozen_map(region.widths),
        has_col=frozen_map(region.has_col),
        produced=frozen_map(region.produced),
        inputs=tuple(inputs.values()),
        outputs=tuple(
            Output(p, zeroed=region.kinds[id(p)] == EPILOGUE and region.epilogues[id(producer[id(p)])].zeroed,
                   partial_of=producer[id(p)] if region.kinds[id(p)] == EPILOGUE else None)
            for p in outputs.values()
        ),
        trailing=tuple(sorted(trailing.values(), key=lambda v: order[id(v)])),
        epilogues=frozen_map(region.epilogues),
    )


def form_plan(
    trace: Trace,
    *,
    epilogues: Sequence[Epilogue] = (),
    allow_cpu: bool | None = None,
    exclude: Mapping[int, str] | None = None,
) -> FusionPlan:
    """The regions of ``trace`` (each with at least two ops that compute or move data), as a :class:`FusionPlan`.

    Args:
        trace: a post-autograd trace; ops already claimed by an executor are left alone (except ops an epilogue
            folds).
        epilogues: the epilogues the compiling plugins declare.
        allow_cpu: fuse CPU tensors too (default: when ``TRITON_INTERPRET=1``).
        exclude: op id -> why the op must stay out of every region (a region whose kernel failed to generate).
    """
    if allow_cpu is None:
        allow_cpu = os.environ.get("TRITON_INTERPRET", "0") == "1"
    former = _Former(trace, allow_cpu, epilogues, exclude or {})
    unfused = former.unfused
    regions = []
    for r in former.run():
        if r.compute_ops >= 2:
            regions.append(r)
        else:
            for op in r.ops:
                unfused[id(op)] = "alone: a region needs two ops that compute or move data"
    in_region = {id(op): r for r in regions for op in r.ops}
    used_outside: set[int] = {id(p) for p in trace.output_proxies()}
    for op in trace.ops:
        owner = in_region.get(id(op))
        for p in op.input_proxies():
            if owner is None or id(p) not in owner.produced:
                used_outside.add(id(p))
    symbols = _symbol_proxies(trace)
    plans = []
    for r in regions:
        missing = sorted(str(sym) for sym in _symbols_of(r) if sym not in symbols)
        if missing:
            for op in r.ops:
                unfused[id(op)] = f"its region's shapes use {', '.join(missing)}, a size no value of the trace holds"
            continue
        r.index = len(plans)
        plan = _freeze(r, used_outside, symbols)
        if plan.outputs:
            plans.append(plan)
        else:
            for op in r.ops:
                unfused[id(op)] = "its region's results are never read"
    return FusionPlan(trace=trace, regions=tuple(plans), unfused=unfused)
