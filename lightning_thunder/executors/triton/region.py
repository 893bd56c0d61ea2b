"""Region formation: which ops of a post-autograd trace run together in one generated kernel.

A region computes on a grid of ``R`` rows by ``N`` columns: the columns are the last dimension of its
widest values, the rows everything before it, in row-major order. Every value in a region has a
*kind* saying which of the two it varies along, and values that vary along columns a *width*:

- ``full``  varies along rows and columns (``x`` of shape [B, T, n]);
- ``row``   varies along rows only (a reduction over the last dimension, ``[B, T, 1]``);
- ``col``   varies along columns only (a weight of shape [n]);
- ``scalar`` varies along neither.

A value's width may be less than ``N``: RoPE's halves ``x[..., :h/2]`` live beside the ``h``-wide
result, and ``cat``, ``slice`` and ``slice_backward`` along the last dimension move values between
column ranges (the code generator evaluates a value at shifted columns).

Ops join a region greedily in trace order: vertically (an input comes from the region) or
horizontally (it reads a tensor the region reads), when its shapes fit the region's rows and joining
cannot create a cycle (an input computed outside the region from the region's own outputs). Two
regions an op connects are merged when that creates no cycle either. Views that keep the last
dimension only regroup rows, so inside a region they cost nothing. Matmuls, attention, gathers and
everything else stay outside, on their library kernels.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp, Trace

__all__ = [
    "Region", "FULL", "ROW", "COL", "SCALAR", "COLSUM", "ABSMAX", "column_sum_dims", "form_regions", "contract", "external_kind",
    "join_kinds",
]

FULL, ROW, COL, SCALAR = "full", "row", "col", "scalar"
#: the kind of a sum over all rows (a weight's gradient): complete only once every program has added its
#: rows, so nothing in the region may read it; the region writes per-program partial sums (see colsum.py)
COLSUM = "colsum"
#: the kind of partial maxima of ``|x|`` over a whole value (``fp8_amax``, the first pass of FP8 quantization):
#: each program folds the maximum of its tile into one of ``P`` slots with an atomic max, so like a column sum
#: it is complete only after the kernel; the region's output starts zeroed (see codegen ``absmax``)
ABSMAX = "absmax"
#: column sums are accumulated by persistent kernels only (rows of at most this many columns)
COLSUM_MAX_N = 16384
_RANK = {SCALAR: 0, ROW: 1, COL: 1, FULL: 2}
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOADABLE = (*_FLOAT, torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_WIDE = (FULL, COL)


def join_kinds(a: str, b: str) -> str:
    """The kind of a value computed from values of kinds ``a`` and ``b``."""
    if a == b:
        return a
    if {a, b} == {ROW, COL} or FULL in (a, b):
        return FULL
    return a if _RANK[a] > _RANK[b] else b


def _static_shape(val: Any) -> tuple[int, ...] | None:
    if not isinstance(val, torch.Tensor):
        return None
    shape = tuple(val.shape)
    return shape if all(type(d) is int for d in shape) else None


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def external_kind(shape: tuple[int, ...], target: tuple[int, ...], has_col: bool) -> str:
    """The kind of a tensor of ``shape`` read broadcast to ``target`` (whose last dim is the column
    dimension when ``has_col``)."""
    aligned = (1,) * (len(target) - len(shape)) + tuple(shape)
    row_dims = aligned[:-1] if has_col else aligned
    varies_col = has_col and len(aligned) > 0 and aligned[-1] > 1
    varies_row = any(d > 1 for d in row_dims)
    if varies_col and varies_row:
        return FULL
    return COL if varies_col else ROW if varies_row else SCALAR


@dataclass
class Region:
    """A set of ops fused into one kernel, and what the code generator needs to know about them."""

    index: int
    R: int
    N: int | None
    device: torch.device
    ops: list[BoundOp] = field(default_factory=list)
    kinds: dict[int, str] = field(default_factory=dict)  # proxy id -> kind, for values made here
    widths: dict[int, int] = field(default_factory=dict)  # proxy id -> columns, for full/col values
    has_col: dict[int, bool] = field(default_factory=dict)  # op id -> its output's last dim is the column
    produced: dict[int, Proxy] = field(default_factory=dict)
    reads: set[int] = field(default_factory=set)  # ids of external proxies read
    inputs: list[Proxy] = field(default_factory=list)
    outputs: list[Proxy] = field(default_factory=list)
    trailing_views: list[BoundOp] = field(default_factory=list)  # views of outputs, re-run outside
    out_strides: dict[int, tuple[int, ...]] = field(default_factory=dict)  # output proxy id -> strides to store with
    partial_of: dict[int, BoundOp] = field(default_factory=dict)  # partial-sums output id -> its column-sum op
    programs: int | None = None  # grid size of a kernel with column sums (a grid-stride loop over rows)
    into_buffer: dict[int, tuple] = field(default_factory=dict)  # output id -> (shape, stride, offset) in a cat result

    @property
    def name(self) -> str:
        """``fusion<k>``."""
        return f"fusion{self.index}"

    @property
    def compute_ops(self) -> int:
        """Ops that move or compute data (not views or constants)."""
        return sum(1 for op in self.ops if op.target not in fops.VIEWS and op.target not in fops.CONSTANTS)

    @property
    def column_sums(self) -> list[BoundOp]:
        """The ops that sum a value over all rows (kind :data:`COLSUM`)."""
        return [op for op in self.ops if self.kinds.get(id(op.outputs[0])) == COLSUM]

    @property
    def absmax_ops(self) -> list[BoundOp]:
        """The ``fp8_amax`` ops folded into the region (kind :data:`ABSMAX`)."""
        return [op for op in self.ops if self.kinds.get(id(op.outputs[0])) == ABSMAX]

    @property
    def has_reduction(self) -> bool:
        """Whether any op reduces over the columns."""
        return any(op.target in fops.REDUCTIONS for op in self.ops)

    def width(self, p: Proxy) -> int | None:
        """Columns of internal value ``p`` (``None`` for row and scalar values)."""
        return self.widths.get(id(p))


def _last_dim_arg(op: BoundOp, position: int, keyword: str, default: Any, ndim: int) -> int | None:
    dim = op.args[position] if len(op.args) > position else op.kwargs.get(keyword, default)
    return dim % ndim if isinstance(dim, int) and ndim > 0 else None


def column_sum_dims(op: BoundOp) -> bool:
    """Whether ``op`` is ``sum(x, dims)`` over every dimension of ``x`` but the last."""
    if op.target is not torch.ops.aten.sum.dim_IntList or len(op.args) < 2 or set(op.kwargs) - {"keepdim"}:
        return False
    x, dims = op.args[0], op.args[1]
    if not isinstance(x, Proxy) or not x.is_tensor or not isinstance(dims, (list, tuple)):
        return False
    nd = len(x.shape)
    return nd >= 2 and sorted(d % nd for d in dims) == list(range(nd - 1))


def _role(op: BoundOp) -> str | None:
    t = op.target
    if op.is_method or op.unpack or op.outputs[0] is None:
        return None
    if column_sum_dims(op):
        return "colreduce"
    if fops.is_absmax_partials(t):
        return "absmax"
    try:
        if t in fops.POINTWISE:
            return "pointwise"
        if t in fops.REDUCTIONS:
            return "reduction"
        if t in fops.VIEWS:
            return "view"
        if t in fops.COLUMN_MOVES:  # before CONSTANTS, which holds slice_backward for its empty case
            if t is torch.ops.aten.slice_backward.default and op.args[0].val.numel() == 0:
                return "constant"  # the gradient of an empty slice: zeros
            return "column"
        if t in fops.CONSTANTS:
            return "constant"
        if t in fops.IOTA:
            return "iota"
    except TypeError:
        return None
    return None


def _check_operands(op: BoundOp, role: str) -> bool:
    """Static shapes, supported dtypes, one device, and arguments the code generator handles."""
    out = op.outputs[0].val
    out_shape = _static_shape(out)
    if out_shape is None or _numel(out_shape) == 0:
        return False
    if role == "colreduce":
        return out.dtype in _FLOAT and op.args[0].val.dtype in _FLOAT and _static_shape(op.args[0].val) is not None
    if role == "absmax":
        x = op.args[0] if op.args else None
        return (
            isinstance(x, Proxy) and x.is_tensor and x.val.dtype in _FLOAT and out.dtype == torch.float32
            and out.dim() == 1 and _static_shape(x.val) is not None and x.val.device == out.device
        )
    if role == "iota":
        return out.dim() == 1 and out.dtype in (torch.int64, torch.int32) and fops.iota_params(op) is not None
    int_ok = (role in ("view", "constant") or (role == "pointwise" and op.target in fops.INT_EXACT)) and out.dtype in (
        torch.int64, torch.int32
    )
    if (out.dtype not in (*_FLOAT, torch.bool) and not int_ok) or (role == "reduction" and out.dtype not in _FLOAT):
        return False
    for p in op.input_proxies():
        shape = _static_shape(p.val)
        if shape is None or p.val.dtype not in _LOADABLE or p.val.device != out.device:
            return False
        if role == "pointwise" and torch.broadcast_shapes(shape, out_shape) != out_shape:
            return False
    if role == "pointwise":
        try:
            return fops.POINTWISE[op.target](op, lambda i: f"a{i}") is not None
        except (IndexError, KeyError, TypeError, AttributeError):
            return False
    if role == "reduction":
        x = op.args[0]
        if not isinstance(x, Proxy) or not x.is_tensor or len(x.shape) == 0:
            return False
        dims = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
        if dims is None:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        nd = len(x.shape)
        return [d % nd for d in dims] == [nd - 1] and set(op.kwargs) <= {"dtype", "keepdim"}
    if role == "constant":
        value = fops.CONSTANTS[op.target](op)
        return isinstance(value, (int, float, bool)) and set(op.kwargs) <= {
            "dtype", "layout", "device", "pin_memory", "memory_format"
        }
    if role == "column":
        return column_move(op) is not None
    return True


def column_move(op: BoundOp) -> tuple[str, Any] | None:
    """How a ``cat`` / ``slice`` / ``slice_backward`` along the last dim maps columns, or ``None``.

    Returns ``("cat", [(piece, offset, width), ...])``, ``("slice", (src, start, width))`` or
    ``("pad", (src, start, width))`` (the source sits at columns ``start .. start+width`` of zeros).
    """
    out = op.outputs[0].val
    nd = out.dim()
    if nd == 0:
        return None
    if op.target is torch.ops.aten.cat.default:
        tensors = op.args[0]
        if _last_dim_arg(op, 1, "dim", 0, nd) != nd - 1 or not isinstance(tensors, (list, tuple)):
            return None
        pieces, offset = [], 0
        for t in tensors:
            if not isinstance(t, Proxy) or not t.is_tensor or t.val.dim() != nd:
                return None
            width = int(t.shape[-1])
            if width:
                pieces.append((t, offset, width))
            offset += width
        return ("cat", pieces) if pieces and offset == out.shape[-1] else None
    src = op.args[0]
    if not isinstance(src, Proxy) or not src.is_tensor or src.val.dim() != nd:
        return None
    if op.target is torch.ops.aten.slice.Tensor:
        if _last_dim_arg(op, 1, "dim", 0, nd) != nd - 1:
            return None
        size = int(src.shape[-1])
        start = op.args[2] if len(op.args) > 2 else op.kwargs.get("start", 0)
        end = op.args[3] if len(op.args) > 3 else op.kwargs.get("end", size)
        step = op.args[4] if len(op.args) > 4 else op.kwargs.get("step", 1)
        if step != 1 or not isinstance(start, int) or not isinstance(end, int | None):
            return None
        start, end = slice(start, end).indices(size)[:2]
        return ("slice", (src, start, max(0, end - start))) if end - start == out.shape[-1] else None
    if op.target is torch.ops.aten.slice_backward.default:
        _, sizes, dim, start, end, step = op.args[:6]
        if dim % nd != nd - 1 or step != 1:
            return None
        size = int(sizes[-1])
        start, end = slice(start, end).indices(size)[:2]
        return ("pad", (src, start, end - start)) if end - start == src.shape[-1] else None
    return None


class _Former:
    def __init__(self, trace: Trace, allow_cpu: bool) -> None:
        self.trace = trace
        self.allow_cpu = allow_cpu
        self.regions: list[Region] = []
        self.region_of: dict[int, Region] = {}  # op id -> region
        self.producer_region: dict[int, Region] = {}  # proxy id -> region producing it
        self.depends: dict[int, frozenset[int]] = {}  # proxy id -> regions it (transitively) depended on when made
        self.region_deps: dict[int, set[int]] = {}  # region index -> regions its external inputs depend on
        self.readers: dict[int, list[Region]] = {}  # proxy id -> regions reading it
        self.merged_into: dict[int, int] = {}  # region index -> the region it was merged into
        self.position: dict[int, int] = {id(op): k for k, op in enumerate(trace.ops)}
        self.producer_op: dict[int, BoundOp] = {}
        self.first_consumer: dict[int, BoundOp] = {}
        for op in trace.ops:
            for p in op.input_proxies():
                self.first_consumer.setdefault(id(p), op)
            for p in op.output_proxies():
                self.producer_op[id(p)] = op

    def find(self, index: int) -> int:
        """The live region that region ``index`` now belongs to."""
        while index in self.merged_into:
            index = self.merged_into[index]
        return index

    def depends_on(self, p: Proxy, region: Region) -> bool:
        """Whether ``p`` (transitively) depends on ``region``'s outputs.

        ``depends`` records the regions ``p`` depended on when it was made; regions grow afterwards, and a region
        that has since come to read another region's outputs passes that dependency on: the walk follows
        :attr:`region_deps` (what each region's inputs depend on) from there."""
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
    def _wide(region: Region, shape: tuple[int, ...]) -> str | None:
        """``full`` / ``col`` if a value of ``shape`` can vary along columns in ``region``."""
        if len(shape) == 0 or shape[-1] <= 1:
            return None
        rows = _numel(shape) // shape[-1]
        if rows == region.R:
            return FULL
        return COL if rows == 1 else None

    def _classify(
        self, region: Region, op: BoundOp, out_shape: tuple[int, ...], externals: list[Proxy], internal: list[str]
    ) -> tuple[str, bool] | None:
        """(kind, has_col) of a pointwise op's output in ``region``."""
        wide = self._wide(region, out_shape)
        if any(k in _WIDE for k in internal):
            if wide is None:
                return None
            has_col = True
        elif ROW in internal and len(out_shape) == 1 and _numel(out_shape) == region.R:
            has_col = False  # elementwise with a per-row value: a 1-D result (and operand) is per row too
        elif wide is not None and any(
            external_kind(_static_shape(p.val), out_shape, True) in _WIDE for p in externals
        ):
            has_col = True
        elif _numel(out_shape) == region.R or _numel(out_shape) == 1:
            has_col = False
        else:
            return None
        kind = SCALAR
        for k in internal:
            kind = join_kinds(kind, k)
        for p in externals:
            kind = join_kinds(kind, external_kind(_static_shape(p.val), out_shape, has_col))
        if kind in _WIDE and self._wide(region, out_shape) is None:
            return None
        if kind == ROW and _numel(out_shape) != region.R and not has_col:
            return None
        if kind == FULL and self._wide(region, out_shape) != FULL:
            return None
        return kind, has_col

    def _input_width(self, region: Region, p: Proxy) -> tuple[str, int] | None:
        """(kind, width) of a column-varying operand of a column move (internal or loaded)."""
        if id(p) in region.produced:
            kind = region.kinds[id(p)]
            return (kind, region.widths[id(p)]) if kind in _WIDE else None
        shape = _static_shape(p.val)
        kind = self._wide(region, shape)
        return (kind, shape[-1]) if kind is not None else None

    def _try_join(self, region: Region, op: BoundOp, role: str) -> tuple[str, bool, int | None] | None:
        """(kind, has_col, width) if ``op`` can join ``region``; ``None`` otherwise."""
        fit = self._fit(region, op, role)
        if fit is not None and region.absmax_ops:
            wider = fit[2] if fit[0] in _WIDE else None
            if role == "reduction":
                wider = _static_shape(op.args[0].val)[-1]
            if wider is not None and wider > (region.N or 0):
                return None  # partial maxima cover the region's full width: it may not grow
        return fit

    def _fit(self, region: Region, op: BoundOp, role: str) -> tuple[str, bool, int | None] | None:
        out_shape = _static_shape(op.outputs[0].val)
        if op.outputs[0].val.device != region.device:
            return None
        for p in op.input_proxies():  # joining must not create a cycle
            if id(p) not in region.produced and self.depends_on(p, region):
                return None
            if region.kinds.get(id(p)) in (COLSUM, ABSMAX):  # complete only after the kernel: read outside
                return None
        if role == "colreduce":
            x = op.args[0]
            width = _static_shape(x.val)[-1]
            if id(x) not in region.produced or region.kinds[id(x)] != FULL or region.widths.get(id(x)) != width:
                return None
            if region.N != width or width > COLSUM_MAX_N or _numel(_static_shape(x.val)) != region.R * width:
                return None
            return COLSUM, True, width
        if role == "absmax":  # over a full-width value the region computes (never over a loaded input)
            x = op.args[0]
            if id(x) not in region.produced or region.kinds[id(x)] != FULL or region.widths.get(id(x)) != region.N:
                return None
            if _numel(_static_shape(x.val)) != region.R * region.N or region.N > COLSUM_MAX_N:
                return None
            return ABSMAX, False, None
        if role == "view":
            src = op.args[0]
            if not isinstance(src, Proxy) or id(src) not in region.produced:
                return None
            kind, width = region.kinds[id(src)], region.widths.get(id(src))
            if op.target is torch.ops.aten.expand.default and kind in (ROW, COL, SCALAR):
                return kind, kind == COL, width
            if kind in _WIDE:
                ok = out_shape[-1:] == (width,) and self._wide(region, out_shape) == kind
            else:
                ok = kind == SCALAR or _numel(out_shape) == region.R
            return (kind, kind in _WIDE, width) if ok else None
        if role == "constant":
            return SCALAR, False, None
        if role == "iota":  # a column index: varies along the columns of a region whose rows it does not have
            width = out_shape[-1]
            return (COL, True, width) if width > 1 and region.N is not None and width <= region.N else None
        if role == "reduction":
            x = op.args[0]
            x_shape = _static_shape(x.val)
            if self._wide(region, x_shape) != FULL and not (
                id(x) in region.produced and region.kinds[id(x)] in (ROW, SCALAR) and _numel(x_shape) == region.R * x_shape[-1]
            ):
                return None
            return (ROW, False, None) if _numel(out_shape) == region.R else None
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
            if id(p) in region.produced and region.kinds[id(p)] in _WIDE and region.widths[id(p)] != out_shape[-1]:
                return None
        externals = [p for p in op.input_proxies() if id(p) not in region.produced]
        fit = self._classify(region, op, out_shape, externals, internal)
        if fit is None:
            return None
        kind, has_col = fit
        for p in op.input_proxies():
            if id(p) in region.produced and not self._reads_as_its_kind(region, p, out_shape, has_col):
                return None
        return kind, has_col, (out_shape[-1] if kind in _WIDE else None)

    def _effective_shape(self, region: Region, p: Proxy) -> tuple[int, ...]:
        """``p``'s shape with the dimensions an ``expand`` made (constant along them) set to 1."""
        shape = _static_shape(p.val)
        op = self.producer_op.get(id(p))
        if op is None or op.target is not torch.ops.aten.expand.default or id(op.args[0]) not in region.produced:
            return shape
        src = self._effective_shape(region, op.args[0])
        return (1,) * (len(shape) - len(src)) + src

    def _reads_as_its_kind(self, region: Region, p: Proxy, target: tuple[int, ...], has_col: bool) -> bool:
        """Whether internal value ``p``, broadcast against an op output of shape ``target``, is indexed the way its
        kind says: a ``row`` value by the region's row index, a ``col`` value by the column, a ``full`` value by
        both. A value is kept by kind, not by shape, so a read that broadcasts it differently (a ``[10, 5]`` value
        whose 50 elements happen to equal the region's 50 rows, read against ``[5, 10, 5]``) must not join."""
        kind = region.kinds[id(p)]
        if kind == SCALAR:
            return True
        return external_kind(self._effective_shape(region, p), target, has_col) == kind

    def _new_region(self, op: BoundOp, role: str) -> Region | None:
        out = op.outputs[0].val
        if out.device.type == "cpu" and not self.allow_cpu:
            return None
        shape = _static_shape(out)
        if role == "reduction":
            x_shape = _static_shape(op.args[0].val)
            rows = _numel(x_shape) // x_shape[-1]
        elif role in ("pointwise", "column") and len(shape) > 0 and shape[-1] > 1:
            rows = _numel(shape) // shape[-1]
            if rows == 1:
                return None  # a lone [n] value (a weight's .float()): left for the region that reads it
        elif role == "pointwise" and _numel(shape) > 1:
            rows = _numel(shape)
        else:
            return None
        region = Region(len(self.regions), rows, None, out.device)
        self.regions.append(region)
        return region

    def _add(self, region: Region, op: BoundOp, kind: str, has_col: bool, width: int | None) -> None:
        region.ops.append(op)
        out = op.outputs[0]
        region.kinds[id(out)] = kind
        if kind in _WIDE:
            region.widths[id(out)] = width
            region.N = max(region.N or 0, width)
        if op.target in fops.REDUCTIONS:
            region.N = max(region.N or 0, _static_shape(op.args[0].val)[-1])
        region.has_col[id(op)] = has_col
        region.produced[id(out)] = out
        for p in op.input_proxies():
            if id(p) not in region.produced:
                region.reads.add(id(p))
                self.readers.setdefault(id(p), []).append(region)
                self.region_deps.setdefault(region.index, set()).update(self.depends.get(id(p), ()))
        self.region_of[id(op)] = region
        self.producer_region[id(out)] = region

    def _reads_indirectly(self, reader: Region, source: Region) -> bool:
        """Whether ``reader`` reads a value computed outside both regions from ``source``'s outputs."""
        for op in reader.ops:
            for p in op.input_proxies():
                if id(p) in reader.produced or id(p) in source.produced:
                    continue
                if self.depends_on(p, source):
                    return True
        return False

    @staticmethod
    def _reads_after_kernel(reader: Region, source: Region) -> bool:
        """Whether ``reader`` reads a value of ``source`` that is complete only after the kernel (column sums,
        partial maxima): merged, the reads would see a partial value."""
        return any(
            source.kinds.get(id(p)) in (COLSUM, ABSMAX) for op in reader.ops for p in op.input_proxies()
        )

    def _try_merge(self, into: Region, other: Region) -> bool:
        """Merge ``other`` into ``into`` when their rows agree and no path leaves and re-enters them."""
        if into is other or into.device != other.device or into.R != other.R:
            return False
        for r in (into, other):
            if (r.column_sums or r.absmax_ops) and max(into.N or 0, other.N or 0) != r.N:
                return False  # column sums and partial maxima need the whole region at their width
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
        into.reads = (into.reads | other.reads) - set(into.produced)
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

    def _pull_in_producers(self, region: Region, op: BoundOp) -> None:
        """Move into ``region`` the fusible producers of ``op``'s inputs that no region took (a weight's
        ``.float()``, a zero fill, a column index ``arange`` and its ``unsqueeze``) when ``op`` is their
        output's first reader: nothing outside has read it yet, so no cycle can arise."""
        pulled = False
        for p in op.input_proxies():
            pulled = self._pull(region, p, op, depth=0) or pulled
        if pulled:
            region.ops.sort(key=lambda o: self.position[id(o)])

    def _pull(self, region: Region, p: Proxy, reader: BoundOp, depth: int) -> bool:
        q = self.producer_op.get(id(p))
        if q is None or id(q) in self.region_of or id(p) in region.produced or q.executor or depth > 1:
            return False
        if self.first_consumer.get(id(p)) is not reader:
            return False
        q_role = _role(q)
        if q_role not in ("pointwise", "constant", "iota", "view") or not _check_operands(q, q_role):
            return False
        if q_role == "view":
            # Only the views of a column index (``arange(n).unsqueeze(0)``): leading unit dims, same length,
            # so once the index is in the region the view is sure to join too (no half-pulled chain).
            src = q.args[0]
            src_op = self.producer_op.get(id(src)) if isinstance(src, Proxy) else None
            out_shape = _static_shape(q.outputs[0].val)
            if src_op is None or _role(src_op) != "iota" or out_shape is None:
                return False
            if out_shape[-1] != src.shape[-1] or _numel(out_shape) != src.shape[-1]:
                return False
            if not self._pull(region, src, q, depth + 1):  # the index first (q must be its first reader)
                return False
        elif any(id(x) in region.produced or self.producer_region.get(id(x)) is not None for x in q.input_proxies()):
            return False  # only producers whose own inputs come from outside every region
        fit = self._try_join(region, q, q_role)
        if fit is None:
            return False
        self._add(region, q, *fit)
        self.depends[id(p)] = self.depends.get(id(p), frozenset()) | {region.index}
        return True

    # ------------------------------------------------------------------ main loop
    def run(self) -> list[Region]:
        for op in self.trace.ops:
            role = _role(op) if not op.executor else None
            placed = None
            if role is not None and _check_operands(op, role):
                candidates: list[Region] = []
                for p in op.input_proxies():
                    r = self.producer_region.get(id(p))
                    if r is not None and r not in candidates:
                        candidates.append(r)
                if role != "view":
                    for p in op.input_proxies():
                        for r in self.readers.get(id(p), []):
                            if r not in candidates:
                                candidates.append(r)
                for region in candidates:
                    fit = self._try_join(region, op, role)
                    if fit is not None:
                        self._add(region, op, *fit)
                        placed = region
                        break
                if placed is not None and role != "view":
                    self._pull_in_producers(placed, op)
                    for p in op.input_proxies():
                        other = self.producer_region.get(id(p))
                        if other is not None and other is not placed:
                            self._try_merge(placed, other)
                if placed is None and role in ("pointwise", "reduction", "column"):
                    region = self._new_region(op, role)
                    if region is not None:
                        fit = self._try_join(region, op, role)
                        if fit is None:
                            self.regions.pop()
                        else:
                            self._add(region, op, *fit)
                            self._pull_in_producers(region, op)
                            placed = region
            deps: set[int] = set()
            for p in op.input_proxies():
                deps |= self.depends.get(id(p), frozenset())
            if placed is not None:
                deps.add(placed.index)
            for p in op.output_proxies():
                self.depends[id(p)] = frozenset(deps)
        return [r for r in self.regions if r.ops]


def _finish(region: Region, used_outside: set[int]) -> None:
    """Compute the region's inputs and outputs; outputs made by views are re-viewed outside."""
    producer = {id(op.outputs[0]): op for op in region.ops}
    seen: set[int] = set()
    for op in region.ops:
        for p in op.input_proxies():
            if id(p) not in region.produced and id(p) not in seen:
                seen.add(id(p))
                region.inputs.append(p)
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
    region.outputs = list(outputs.values())
    order = {id(op): i for i, op in enumerate(region.ops)}
    region.trailing_views = sorted(trailing.values(), key=lambda v: order[id(v)])


def form_regions(trace: Trace, *, allow_cpu: bool | None = None) -> list[Region]:
    """The fusion regions of ``trace`` (each with at least two ops that compute or move data), in order.

    Args:
        trace: a post-autograd trace; ops already claimed by an executor are left alone.
        allow_cpu: fuse CPU tensors too (default: when ``TRITON_INTERPRET=1``).
    """
    if allow_cpu is None:
        allow_cpu = os.environ.get("TRITON_INTERPRET", "0") == "1"
    regions = [r for r in _Former(trace, allow_cpu).run() if r.compute_ops >= 2]
    in_region = {id(op): r for r in regions for op in r.ops}
    used_outside: set[int] = {id(p) for p in trace.output_proxies()}
    for op in trace.ops:
        owner = in_region.get(id(op))
        for p in op.input_proxies():
            if owner is None or id(p) not in owner.produced:
                used_outside.add(id(p))
    for k, region in enumerate(regions):
        region.index = k
        _finish(region, used_outside)
    return [r for r in regions if r.outputs]


def contract(trace: Trace, fused: dict[int, BoundOp], regions: list[Region]) -> list[BoundOp]:
    """The trace's ops with each region replaced by its fused op (``fused[region.index]``), followed by
    the views of its outputs; ordered topologically, otherwise as close to the original order as possible."""
    in_region = {id(op): r for r in regions for op in r.ops}
    nodes: list[tuple[int, list[BoundOp]]] = []  # (first position, ops) per node
    node_of_region: dict[int, int] = {}
    for pos, op in enumerate(trace.ops):
        r = in_region.get(id(op))
        if r is None:
            nodes.append((pos, [op]))
        elif r.index not in node_of_region:
            node_of_region[r.index] = len(nodes)
            nodes.append((pos, [fused[r.index], *r.trailing_views]))
    producer: dict[int, int] = {}
    for k, (_, node_ops) in enumerate(nodes):
        for op in node_ops:
            for p in op.output_proxies():
                producer[id(p)] = k
    consumers: dict[int, set[int]] = {k: set() for k in range(len(nodes))}
    indegree = [0] * len(nodes)
    for k, (_, node_ops) in enumerate(nodes):
        deps = set()
        for op in node_ops:
            for p in op.input_proxies():
                src = producer.get(id(p))
                if src is not None and src != k:
                    deps.add(src)
        for src in deps:
            consumers[src].add(k)
        indegree[k] = len(deps)
    ready = [(nodes[k][0], k) for k in range(len(nodes)) if indegree[k] == 0]
    heapq.heapify(ready)
    ordered: list[BoundOp] = []
    while ready:
        _, k = heapq.heappop(ready)
        ordered.extend(nodes[k][1])
        for c in consumers[k]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, (nodes[c][0], c))
    if len(ordered) != sum(len(n[1]) for n in nodes):
        raise AssertionError("fusion created a cycle between regions; this is a lightning_thunder bug")
    return ordered
