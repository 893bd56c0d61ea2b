"""Triton source for a fusion region.

Three kernel shapes, chosen from the region:

- ``flat``: no reduction. One program handles ``BLOCK`` consecutive elements of the R x N grid; the
  row and column of each element come from its flat index.
- ``persistent``: reductions over rows of at most 16384 columns. One program handles ``BLOCK_M``
  whole rows held in registers; every value is computed once.
- ``looped``: reductions over longer rows (a 128k vocabulary). One program handles ``BLOCK_M`` rows
  and walks them in ``BLOCK_N`` column chunks: one pass per level of dependent reductions (reductions
  that do not depend on each other share a pass), then a last pass that writes the full-size outputs.

A ``persistent`` region that also sums values over all of its rows (a weight's gradient, see colsum.py)
runs a fixed grid of programs, each looping over its share of the row blocks and accumulating the
column sums in registers; it writes one row of partial sums per program.

A sum over the columns of ``where(arange == t, v, 0)`` (a loss picking each row's target) is not a pass
over the row: it is ``v`` evaluated at column ``t`` (:class:`ColAt`), one load per row.

A value that varies along columns is computed for the tile's columns ``cols``; ``cat``, ``slice`` and
``slice_backward`` along the last dimension ask for their operands at shifted columns (``cols + s``),
so a value may be emitted once per shift it is needed at. Values narrower than the grid are masked
to their width wherever they are loaded, reduced or stored.

Every tensor is addressed through its strides (contiguous ones baked in as constants) and its
broadcast against the value it feeds, so inputs may be non-contiguous, expanded or of lower rank.
Values of 16/32-bit floats are computed in fp32 and rounded to the output dtype when stored.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.region import COL, FULL, ROW, SCALAR, Region, column_move, external_kind
from lightning_thunder.trace.printing import source_comment
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp

__all__ = ["KernelSpec", "TensorArg", "generate", "choose_mode", "PERSISTENT_MAX_N"]

#: Rows up to this many columns are reduced in registers; longer rows are walked in chunks.
PERSISTENT_MAX_N = 16384
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_LOW = (torch.float16, torch.bfloat16)
_WIDE = (FULL, COL)

_PRELUDE = '''\
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    libdevice = None


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _rtne_bf16(x):
    # fp32 -> nearest-even bf16 value (still fp32). Used under TRITON_INTERPRET=1, whose conversion
    # to bf16 truncates; GPUs round to nearest even natively.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
'''


@dataclass
class TensorArg:
    """A tensor the kernel reads or writes.

    Contiguous tensors (the common case) get their strides baked into the kernel as constants, which
    lets Triton see contiguous, vectorizable accesses; the launcher makes a contiguous copy in the rare
    case that a tensor arrives otherwise. Other tensors pass one stride argument per dimension of size > 1.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stride_dims: list[int]  # dims with a stride argument (empty when contiguous)
    stride: tuple[int, ...] = ()  # outputs: the strides to allocate with
    contiguous: bool = False
    zeroed: bool = False  # outputs: allocated filled with zeros (partial maxima the kernel folds in with atomics)

    def stride_expr(self, j: int) -> str:
        """The source for the stride of dimension ``j``."""
        if self.contiguous:
            return str(math.prod(self.shape[j + 1 :]))
        return f"{self.name}_s{j}"


@dataclass
class KernelSpec:
    """A generated kernel and how to launch it."""

    region: str
    kernel_name: str
    source: str
    mode: str
    R: int
    N: int
    inputs: list[TensorArg]
    outputs: list[TensorArg]
    configs: list[dict[str, int]] = field(default_factory=list)
    programs: int | None = None  # fixed grid of a kernel with column sums
    column_tiled: bool = False  # a kernel with column sums that also splits the columns (grid axis 1)

    def grid(self, config: dict[str, int]) -> tuple[int, ...]:
        """The launch grid for ``config``."""
        if self.programs is not None:
            if self.column_tiled:
                return (self.programs, math.ceil(self.N / config["BLOCK_N"]))
            return (self.programs,)
        if self.mode == "flat":
            return (math.ceil(self.R * self.N / config["BLOCK"]),)
        return (math.ceil(self.R / config["BLOCK_M"]),)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


#: Regions with column sums and rows wider than this split the columns across programs when they can
#: (see :func:`column_tiled`); narrower ones keep whole rows in one program (RMSNorm gradients).
COLUMN_TILE_MIN_N = 2048


def column_tiled(region: Region) -> bool:
    """Whether a region with column sums splits its columns across a second grid axis: rows wider than
    :data:`COLUMN_TILE_MIN_N`, and nothing in the region needs whole rows (no reductions over the columns
    besides the column sums, no moves along the columns, no column index).

    A whole row of 16384 columns in one program (a bias gradient over an MLP's intermediate size) keeps
    tiles and the column accumulators far beyond the registers; with the columns split, each program
    accumulates ``BLOCK_N`` columns over its share of the rows. (The code generator also requires every
    output but the partial sums to be stored per element or per column.)"""
    if not region.partial_of or (region.N or 0) <= COLUMN_TILE_MIN_N:
        return False
    sums = {id(op) for op in region.column_sums}
    for op in region.ops:
        if id(op) in sums:
            continue
        if op.target in fops.REDUCTIONS or op.target in fops.COLUMN_MOVES or op.target in fops.IOTA:
            return False
    return True


def _configs(mode: str, R: int, N: int, tiled: bool = False) -> list[dict[str, int]]:
    """Candidate launch configurations, the heuristic choice first (at most two: autotuning compiles each)."""
    if tiled:  # column-tiled grid-stride kernels: 4096-8192 elements per tile
        return [{"BLOCK_M": 8, "BLOCK_N": 512, "num_warps": 4}, {"BLOCK_M": 16, "BLOCK_N": 512, "num_warps": 8}]
    if mode == "flat":
        total = R * N
        if total <= 1 << 16:
            return [{"BLOCK": 1024, "num_warps": 4}]
        return [{"BLOCK": 2048, "num_warps": 8}, {"BLOCK": 1024, "num_warps": 4}]
    if mode == "persistent":
        bn = _next_pow2(N)
        # About 2048-4096 elements per program; never more rows than exist.
        bm = max(1, min(_next_pow2(R), 4096 // bn))
        warps = 4 if bm * bn <= 2048 else 8 if bm * bn <= 8192 else 16
        first = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}
        if bm > 1:
            return [first, {"BLOCK_M": bm // 2, "BLOCK_N": bn, "num_warps": max(4, warps // 2)}]
        return [first]
    return [{"BLOCK_M": 1, "BLOCK_N": 2048, "num_warps": 8}, {"BLOCK_M": 1, "BLOCK_N": 4096, "num_warps": 8}]


@dataclass(frozen=True)
class ColAt:
    """A column given per row (``[BLOCK_M, 1]`` index ``expr``, plus ``offset``) instead of ``cols + shift``:
    where a one-hot sum evaluates its summand (see ``_Writer.onehot_sums``)."""

    expr: str
    offset: int = 0

    def __add__(self, k: int) -> ColAt:
        return ColAt(self.expr, self.offset + k)

    def __sub__(self, k: int) -> ColAt:
        return ColAt(self.expr, self.offset - k)


def _col(shift: int | ColAt) -> str:
    """The column index expression at ``shift``."""
    if isinstance(shift, ColAt):
        return shift.expr if shift.offset == 0 else f"({shift.expr} + {shift.offset})"
    return "cols" if shift == 0 else f"(cols + {shift})" if shift > 0 else f"(cols - {-shift})"


class _Writer:
    def __init__(self, region: Region, mode: str) -> None:
        self.region = region
        self.mode = mode
        self.R = region.R
        self.N = region.N or 1
        self.lines: list[str] = []
        self.indent = 1
        self.counter = 0
        self.header_end = 0
        self.index_vars: dict[tuple, str] = {}
        self.scope: dict[Any, str] = {}  # memo for the current scope (a pass of a looped kernel)
        self.top: dict[Any, str] = {}  # values computed once per program (rows, scalars)
        self.literals: set[str] = set()
        self.inputs = {id(p): k for k, p in enumerate(region.inputs)}
        self.args: dict[str, TensorArg] = {}  # filled by generate()
        self.producer = {id(op.outputs[0]): op for op in region.ops}
        self.depth: dict[int, int] = {}
        self.onehots = self.onehot_sums()
        # fp8_amax ops: output id -> op (each program folds the maximum of |x| over its tile into a slot)
        self.absmax = {id(op.outputs[0]): op for op in region.absmax_ops}
        # Column sums: a grid-stride loop over row blocks (see colsum.py); its body is one level deeper.
        self.grid_stride = bool(region.partial_of)
        # Split columns only if every full-size output is stored per column (per-row values would be
        # written by each column block).
        self.column_tiled = column_tiled(region) and all(
            self.storage_kind(p) in (FULL, COL)
            for p in region.outputs
            if id(p) not in region.partial_of and id(p) not in self.absmax
        )
        self.base_indent = 2 if self.grid_stride else 1
        self.first = "(rb == 0)" if self.grid_stride else "(pid == 0)"

    # ----------------------------------------------------------------------------- basics
    def emit(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def emit_top(self, line: str) -> None:
        """Emit a line that only depends on the rows, at the top of the kernel (of the row loop)."""
        self.lines.insert(self.header_end, "    " * self.base_indent + line)
        self.header_end += 1

    def new(self, prefix: str = "v") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def kind(self, p: Proxy) -> str:
        return self.region.kinds[id(p)]

    def row_index(self, dims: tuple[int, ...], i: int) -> str:
        key = (dims, i)
        if key in self.index_vars:
            return self.index_vars[key]
        inner = math.prod(dims[i + 1 :])
        if len(dims) == 1 or (i == 0 and inner == 1):
            expr = "rows"
        elif i == 0:
            expr = f"(rows // {inner})"
        elif inner == 1:
            expr = f"(rows % {dims[i]})"
        else:
            expr = f"((rows // {inner}) % {dims[i]})"
        name = f"r{len(self.index_vars)}"
        self.emit_top(f"{name} = {expr}")
        self.index_vars[key] = name
        return name

    def address(
        self,
        arg: str,
        shape: tuple[int, ...],
        target: tuple[int, ...],
        has_col: bool,
        tile: str | None = None,
        shift: int = 0,
    ) -> str:
        """The element offset of tensor ``arg`` (of ``shape``) read or written as ``target``, at column
        ``cols + shift``.

        With ``tile`` (a kind), the offset is padded with ``rows * 0`` / ``cols * 0`` so that it has
        that kind's tile shape even where the tensor has no extent along rows or columns.
        """
        offset = len(target) - len(shape)
        row_dims = target[:-1] if has_col else target
        spec = self.args[arg]
        col = _col(shift)
        if spec.contiguous and tuple(shape) == tuple(target) and math.prod(shape) > 1:
            # Same shape, contiguous: the row-major position itself.
            if (
                self.mode == "flat"
                and has_col
                and isinstance(shift, int)
                and shift == 0
                and self.region.N is not None
                and math.prod(shape) == self.R * self.N
            ):
                return "i"
            if has_col and shape[-1] > 1 and math.prod(shape[:-1]) > 1:
                return f"rows * {shape[-1]} + {col}"
            if not has_col and tile in (None, ROW):
                return "rows"
        terms = []
        uses_row = uses_col = False
        for j, size in enumerate(shape):
            if size <= 1:
                continue
            i = j + offset
            stride = spec.stride_expr(j)
            if has_col and i == len(target) - 1:
                terms.append(col if stride == "1" else f"{col} * {stride}")
                uses_col = True
            else:
                index = self.row_index(tuple(row_dims), i)
                terms.append(index if stride == "1" else f"{index} * {stride}")
                uses_row = True
        if tile in (ROW, FULL) and not uses_row:
            terms.append("rows * 0")
        if tile in (COL, FULL) and not uses_col and self.mode != "flat":
            terms.append("cols * 0")
        if tile is not None and self.mode == "flat" and not terms:
            terms.append("i * 0")
        return " + ".join(terms) or "0"

    def mask(self, kind: str, width: int | None = None, shift: int = 0) -> str | None:
        """The mask of a tile of ``kind`` whose columns ``cols + shift`` must lie in ``[0, width)``."""
        if kind == SCALAR:
            return None
        parts = []
        if kind in (FULL, ROW):
            parts.append("rmask" if self.mode != "flat" else "fmask")
        if kind in _WIDE:
            width = self.N if width is None else width
            col = _col(shift)
            if isinstance(shift, ColAt):
                parts.append(f"({col} >= 0) & ({col} < {width})")
            elif width < self.N or shift > 0:
                parts.append(f"({col} < {width})")
            elif self.mode != "flat":
                parts.append("cmask")
            if not isinstance(shift, ColAt) and shift < 0:
                parts.append(f"({col} >= 0)")
            if kind == COL and self.mode == "flat":
                parts.append("fmask")
        return " & ".join(parts) if parts else None

    # ----------------------------------------------------------------------------- values
    def load(self, p: Proxy, target: tuple[int, ...], has_col: bool, shift: int = 0) -> str:
        shape = tuple(p.val.shape)
        kind = external_kind(shape, target, has_col)
        if kind not in _WIDE:
            shift = 0
        memo = self.top if kind == SCALAR or (kind == ROW and self.mode != "looped") else self.scope
        key = ("load", id(p), target, has_col, shift)
        if key in memo:
            return memo[key]
        k = self.inputs[id(p)]
        addr = self.address(f"in{k}", shape, target, has_col, shift=shift)
        width = shape[-1] if kind in _WIDE else None
        mask = self.mask(kind, width, shift)
        other = "0.0" if p.val.dtype.is_floating_point else "0"
        load = f"tl.load(in{k} + {addr})" if mask is None else f"tl.load(in{k} + {addr}, mask={mask}, other={other})"
        if p.val.dtype in _FLOATS:
            load += ".to(tl.float32)"
        name = self.new("x")
        if memo is self.top and self.indent > self.base_indent:
            self.emit_top(f"{name} = {load}")
        else:
            self.emit(f"{name} = {load}")
        memo[key] = name
        return name

    def operand(self, op: BoundOp, x: Any, shift: int = 0) -> str:
        if isinstance(x, Proxy):
            if id(x) in self.producer:
                return self.value(x, shift)
            out = op.outputs[0]
            if op.target in fops.REDUCTIONS:
                return self.load(x, tuple(x.val.shape), True, shift)
            if op.target in fops.COLUMN_MOVES:
                return self.load(x, tuple(x.val.shape), True, shift)
            return self.load(x, tuple(out.val.shape), self.region.has_col[id(op)], shift)
        if x is None:
            return "None"
        return fops.literal(x)

    def value(self, p: Proxy, shift: int = 0) -> str:
        """The variable holding internal value ``p`` at columns ``cols + shift`` in the current scope."""
        if self.kind(p) not in _WIDE:
            shift = 0
        key = (id(p), shift)
        for memo in (self.scope, self.top):
            if key in memo:
                return memo[key]
        op = self.producer[id(p)]
        if op.target in fops.VIEWS:
            name = self.value(op.args[0], shift)
        elif op.target in fops.CONSTANTS and (op.target not in fops.COLUMN_MOVES or op.args[0].val.numel() == 0):
            value = fops.CONSTANTS[op.target](op)
            if p.val.dtype == torch.bool:
                name = fops.literal(bool(value))
            elif p.val.dtype.is_floating_point:
                name = fops.literal(float(value))
            else:
                name = fops.literal(int(value))
            self.literals.add(name)
        elif op.target in fops.IOTA:
            start, step = fops.iota_params(op)
            index = _col(shift)
            index = index if step == 1 else f"({index} * {step})"
            name = self.new()
            self.emit(f"{name} = ({index} + {start}).to({fops.tl_dtype(p.val.dtype)})  # {op.name}")
        elif op.target in fops.REDUCTIONS:
            raise AssertionError(f"reduction {p.name} used before it was computed")
        elif op.target in fops.COLUMN_MOVES:
            name = self.column_move(op, shift)
        else:
            expr = fops.POINTWISE[op.target](op, lambda i: self.operand(op, op.args[i], shift))
            if p.val.dtype in _LOW and op.target not in fops.CASTS:
                # Round to the op's dtype as eager does after every op: later ops (a comparison with
                # a stored bf16 value, say) must see exactly the values eager would.
                expr = fops.cast(expr, p.val.dtype)
            name = self.new()
            where = "" if not shift else f" at {_col(shift)}" if isinstance(shift, ColAt) else f" at cols{shift:+d}"
            self.emit(f"{name} = {expr}  # {op.name}" + where)
        memo = self.top if self.kind(p) in (ROW, SCALAR) and self.mode == "looped" else self.scope
        memo[key] = name
        return name

    def column_move(self, op: BoundOp, shift: int) -> str:
        """``cat`` / ``slice`` / ``slice_backward`` along the last dimension, at ``cols + shift``."""
        how, spec = column_move(op)
        name = self.new()
        col = _col(shift)
        if how == "slice":
            src, start, _ = spec
            self.emit(f"{name} = {self.operand(op, src, shift + start)}  # {op.name}")
        elif how == "pad":
            src, start, width = spec
            inner = self.operand(op, src, shift - start)
            self.emit(f"{name} = tl.where(({col} >= {start}) & ({col} < {start + width}), {inner}, 0.0)  # {op.name}")
        else:
            *rest, (last, last_offset, _) = spec
            expr = self.operand(op, last, shift - last_offset)
            for piece, offset, width in reversed(rest):
                expr = f"tl.where({col} < {offset + width}, {self.operand(op, piece, shift - offset)}, {expr})"
            self.emit(f"{name} = {expr}  # {op.name}")
        return name

    def reduction_mask(self, op: BoundOp) -> str:
        width = int(op.args[0].val.shape[-1])
        return self.mask(FULL, width) or "fmask"

    def reduce(self, op: BoundOp) -> str:
        combine, is_mean = fops.REDUCTIONS[op.target]
        x = self.operand(op, op.args[0])
        fill = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}[combine]
        masked = f"tl.where({self.reduction_mask(op)}, {x}, {fill})"
        if combine == "sum":
            total = f"tl.sum({masked}, axis=1)[:, None]"
        else:
            total = f"tl.reduce({masked}, 1, _{combine}_nan)[:, None]"
        return self.emit_reduced(op, total)

    def emit_reduced(self, op: BoundOp, total: str, note: str = "") -> str:
        """Emit reduction ``op``'s result from ``total`` (its combined value): divided by the reduced size
        for a mean, rounded to a 16-bit result dtype. Returns the variable."""
        if fops.REDUCTIONS[op.target][1]:  # a mean
            total = f"({total} / {float(op.args[0].val.shape[-1])!r})"
        if op.outputs[0].val.dtype in _LOW:
            total = fops.cast(total, op.outputs[0].val.dtype)
        name = self.new("red")
        self.emit(f"{name} = {total}  # {op.name}{note}")
        return name

    def _through_views(self, p: Any) -> Any:
        while isinstance(p, Proxy) and id(p) in self.producer and self.producer[id(p)].target in fops.VIEWS:
            p = self.producer[id(p)].args[0]
        return p

    def softmax_pairs(self) -> dict[int, BoundOp]:
        """``sum`` op id -> the ``amax`` op, for ``s = sum(exp(f - amax(f)))``: one online pass computes both."""
        aten = torch.ops.aten
        pairs = {}
        for op in self.region.ops:
            if op.target is not aten.sum.dim_IntList:
                continue
            e = self._through_views(op.args[0])
            e_op = self.producer.get(id(e)) if isinstance(e, Proxy) else None
            if e_op is None or e_op.target is not aten.exp.default:
                continue
            d = self._through_views(e_op.args[0])
            d_op = self.producer.get(id(d)) if isinstance(d, Proxy) else None
            if d_op is None or d_op.target is not aten.sub.Tensor or d_op.kwargs.get("alpha", 1) != 1:
                continue
            f, m = d_op.args[0], self._through_views(d_op.args[1])
            m_op = self.producer.get(id(m)) if isinstance(m, Proxy) else None
            if m_op is not None and m_op.target is aten.amax.default and m_op.args[0] is f:
                pairs[id(op)] = m_op
        return pairs

    def _is_zero(self, x: Any) -> bool:
        x = self._through_views(x)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return x == 0
        op = self.producer.get(id(x)) if isinstance(x, Proxy) else None
        if op is None or op.target not in fops.CONSTANTS or op.target in fops.COLUMN_MOVES:
            return False
        return fops.CONSTANTS[op.target](op) == 0

    def _is_column_index(self, x: Any) -> int | None:
        """The width of ``x`` when it is (a view of) an in-region ``arange(width)``."""
        x = self._through_views(x)
        op = self.producer.get(id(x)) if isinstance(x, Proxy) else None
        if op is None or op.target not in fops.IOTA or fops.iota_params(op) != (0, 1):
            return None
        return int(op.outputs[0].val.shape[-1])

    @staticmethod
    def _row_constant(x: Any) -> bool:
        """Whether ``x`` is a tensor that does not vary along the columns (last dim 1, or a scalar)."""
        return isinstance(x, Proxy) and x.is_tensor and (x.val.dim() == 0 or x.val.shape[-1] == 1)

    def _onehot_index(self, cond: Any) -> tuple[Proxy, BoundOp, int] | None:
        """``(t, eq_op, width)`` when ``cond`` is ``arange(width) == t`` (``t`` one column per row), possibly
        and-ed with a condition that is constant along the row."""
        aten = torch.ops.aten
        cond = self._through_views(cond)
        op = self.producer.get(id(cond)) if isinstance(cond, Proxy) else None
        if op is None or len(op.args) != 2 or op.kwargs:
            return None
        a, b = op.args
        if op.target is aten.eq.Tensor:
            for index, t in ((a, b), (b, a)):
                width = self._is_column_index(index)
                if width is not None and self._row_constant(t) and not t.val.dtype.is_floating_point:
                    return t, op, width
            return None
        if op.target in (aten.bitwise_and.Tensor, aten.logical_and.default):
            for c, other in ((a, b), (b, a)):
                found = self._onehot_index(c)
                if found is not None and self._row_constant(other):
                    return found
        return None

    def onehot_sums(self) -> dict[int, tuple[Proxy, Proxy, BoundOp, int]]:
        """``sum`` op id -> ``(summand, t, eq_op, width)`` for a sum over the columns of
        ``where(arange(width) == t [& row condition], v, 0)``: only column ``t`` can be nonzero, so the
        sum is the summand evaluated at that one column (a loss picking each row's target logit), with
        no pass over the row."""
        aten = torch.ops.aten
        found = {}
        for op in self.region.ops:
            if op.target is not aten.sum.dim_IntList or set(op.kwargs) - {"keepdim"}:
                continue
            x = op.args[0]
            w = self._through_views(x)
            w_op = self.producer.get(id(w)) if isinstance(w, Proxy) else None
            if w_op is None or w_op.target is not aten.where.self or len(w_op.args) != 3:
                continue
            if not self._is_zero(w_op.args[2]):
                continue
            index = self._onehot_index(w_op.args[0])
            if index is not None:
                found[id(op)] = (x, *index)
        return found

    def onehot_value(self, op: BoundOp) -> str:
        """The value of one-hot sum ``op`` (see :meth:`onehot_sums`)."""
        x, t, eq_op, width = self.onehots[id(op)]
        index = self.operand(eq_op, t)
        col = self.new("tc")
        self.emit(f"{col} = {index}.to(tl.int32)")
        at = self.value(x, ColAt(col))
        total = f"tl.where(({col} >= 0) & ({col} < {width}), {at}, 0.0)"
        return self.emit_reduced(op, total, f" (one-hot: the summand at column {col})")

    def reduction_levels(self) -> dict[int, int]:
        """op id -> pass number for each reduction: 1 + the highest pass of the reductions it reads
        (the ``sum`` of an online-softmax pair shares its ``amax``'s pass)."""
        pairs = self.softmax_pairs() if self.mode == "looped" else {}
        depth: dict[int, int] = {}  # proxy id -> reductions that must finish before it is known
        levels: dict[int, int] = {}
        for op in self.region.ops:
            d = max((depth.get(id(p), 0) for p in op.input_proxies()), default=0)
            if op.target in fops.REDUCTIONS and id(op) not in self.onehots:
                d = levels[id(pairs[id(op)])] if id(op) in pairs else d + 1
                levels[id(op)] = d
            depth[id(op.outputs[0])] = d
        self.depth = depth
        self.pairs = pairs
        return levels

    def emit_row_values(self, below: int | None, emitted: set[int]) -> None:
        """Emit at the top level the row and scalar values whose reductions are done."""
        self.scope = self.top
        for op in self.region.ops:
            out = op.outputs[0]
            onehot = id(op) in self.onehots
            if id(op) in emitted or op.target in fops.VIEWS or (op.target in fops.REDUCTIONS and not onehot):
                continue
            if self.kind(out) not in (ROW, SCALAR):
                continue
            if below is not None and self.depth[id(out)] >= below:
                continue
            emitted.add(id(op))
            if onehot:
                self.top[(id(out), 0)] = self.onehot_value(op)
            else:
                self.value(out)
        self.scope = {}

    def reduce_pass(self, reductions: list[BoundOp]) -> None:
        """One chunked pass over the columns accumulating every reduction in ``reductions``.

        An online-softmax pair (``m = amax(f)``, ``s = sum(exp(f - m))``) keeps a running maximum and
        a running sum rescaled whenever the maximum grows (Milakov & Gimelshein, "Online normalizer
        calculation for softmax", 2018), so ``s`` needs no second pass over ``f``.
        """
        pairs = [(op, self.pairs[id(op)]) for op in reductions if id(op) in getattr(self, "pairs", {})]
        paired = {id(o) for pair in pairs for o in pair}
        online = []
        for sum_op, max_op in pairs:
            m_acc, s_acc = self.new("m"), self.new("s")
            self.emit(f'{m_acc} = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)')
            self.emit(f"{s_acc} = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)")
            online.append((sum_op, max_op, m_acc, s_acc))
        accs = []
        for op in reductions:
            if id(op) in paired:
                continue
            combine, _ = fops.REDUCTIONS[op.target]
            fill = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}[combine]
            acc = self.new("acc")
            self.emit(f"{acc} = tl.full([BLOCK_M, BLOCK_N], {fill}, tl.float32)")
            accs.append((op, acc, combine, fill))
        self.open_loop()
        for sum_op, max_op, m_acc, s_acc in online:
            mask = self.reduction_mask(max_op)
            f = self.new("f")
            self.emit(f'{f} = tl.where({mask}, {self.operand(max_op, max_op.args[0])}, float("-inf"))')
            m_new = self.new("m")
            self.emit(f"{m_new} = _max_nan({m_acc}, {f})")
            live = f'({m_new} != float("-inf"))'
            self.emit(f"{s_acc} = {s_acc} * tl.where({live}, tl.exp({m_acc} - {m_new}), 0.0) + tl.where({mask} & {live}, tl.exp({f} - {m_new}), 0.0)")
            self.emit(f"{m_acc} = {m_new}")
        for op, acc, combine, fill in accs:
            x = self.operand(op, op.args[0])
            masked = f"tl.where({self.reduction_mask(op)}, {x}, {fill})"
            if combine == "sum":
                self.emit(f"{acc} += {masked}")
            else:
                self.emit(f"{acc} = _{combine}_nan({acc}, {masked})")
        self.close_loop()
        for sum_op, max_op, m_acc, s_acc in online:
            m_row = self.emit_reduced(max_op, f"tl.reduce({m_acc}, 1, _max_nan)[:, None]", " (online)")
            live = f'({m_acc} != float("-inf"))'
            total = f"tl.sum({s_acc} * tl.where({live}, tl.exp({m_acc} - {m_row}), 0.0), axis=1)[:, None]"
            s_row = self.emit_reduced(sum_op, total, " (online)")
            self.top[(id(max_op.outputs[0]), 0)] = m_row
            self.top[(id(sum_op.outputs[0]), 0)] = s_row
        for op, acc, combine, _ in accs:
            total = f"tl.sum({acc}, axis=1)[:, None]" if combine == "sum" else f"tl.reduce({acc}, 1, _{combine}_nan)[:, None]"
            self.top[(id(op.outputs[0]), 0)] = self.emit_reduced(op, total)

    def open_loop(self) -> None:
        self.emit(f"for c0 in range(0, {self.N}, BLOCK_N):")
        self.indent += 1
        self.emit("cols = c0 + tl.arange(0, BLOCK_N)[None, :]")
        self.emit(f"cmask = cols < {self.N}")
        self.emit("fmask = rmask & cmask")
        self.scope = {}

    def close_loop(self) -> None:
        self.indent -= 1
        self.scope = {}

    # ----------------------------------------------------------------------------- stores
    def storage_kind(self, p: Proxy) -> str:
        value_kind = self.kind(p)
        shape = tuple(p.val.shape)
        numel = math.prod(shape)
        wide_rows = numel // shape[-1] if shape and shape[-1] else None
        fits = {
            SCALAR: numel == 1,
            ROW: numel == self.R,
            COL: self.region.N is not None and len(shape) > 0 and shape[-1] > 1 and wide_rows == 1,
            FULL: self.region.N is not None and len(shape) > 0 and shape[-1] > 1 and wide_rows == self.R,
        }
        if fits[value_kind]:
            return value_kind
        for kind in (FULL, ROW, COL, SCALAR):
            if fits[kind]:
                return kind
        raise AssertionError(f"output {p.name} of shape {shape} does not fit the region grid ({self.R}, {self.N})")

    def tile(self, kind: str) -> str:
        if self.mode == "flat":
            return "[BLOCK]"
        return {FULL: "[BLOCK_M, BLOCK_N]", ROW: "[BLOCK_M, 1]", COL: "[1, BLOCK_N]"}[kind]

    def store(self, k: int, p: Proxy) -> None:
        kind = self.storage_kind(p)
        value = self.value(p)
        dtype = p.val.dtype
        if dtype == torch.bfloat16 and fops.interpreting() and value not in self.literals:
            value = f"_rtne_bf16({value})"
        if value in self.literals:
            stored = f"tl.full({self.tile(kind) if kind != SCALAR else '[]'}, {value}, {fops.tl_dtype(dtype)})"
        elif kind != self.kind(p) and kind != SCALAR:
            stored = f"tl.broadcast_to({value}, {self.tile(kind)}).to({fops.tl_dtype(dtype)})"
        else:
            stored = f"{value}.to({fops.tl_dtype(dtype)})"
        shape = tuple(p.val.shape)
        addr = self.address(f"out{k}", shape, shape, kind in _WIDE, tile=kind if kind != SCALAR else None)
        if kind == SCALAR:
            self.emit(f"if {self.first}:")
            self.emit(f"    tl.store(out{k} + 0, {stored})")
            return
        width = shape[-1] if kind in _WIDE else None
        mask = self.mask(kind, width)
        if self.mode == "flat" and self.region.N is not None:
            if kind == ROW:
                mask = "fmask & (cols == 0)"
            elif kind == COL:
                mask = f"{mask} & (rows == 0)"
        elif kind == COL:  # every program computes the same values: the first one writes them
            self.emit(f"if {self.first}:")
            self.emit(f"    tl.store(out{k} + {addr}, {stored}, mask={mask})")
            return
        self.emit(f"tl.store(out{k} + {addr}, {stored}, mask={mask})")

    def fold_absmax(self, op: BoundOp) -> None:
        """``fp8_amax(x)``: the maximum of ``|x|`` over this program's tile, folded with an atomic max into slot
        ``pid % P`` of the zeroed ``[P]`` output (``x`` as stored: its value rounded to its dtype)."""
        out = op.outputs[0]
        if out not in self.region.outputs:
            return  # nothing reads the partial maxima
        k = self.region.outputs.index(out)
        x = op.args[0]
        slots = int(out.val.shape[0])
        masked = f"tl.where({self.mask(FULL, self.region.widths[id(x)])}, tl.abs({self.value(x)}), 0.0)"
        tile_max = f"tl.max({masked}, axis=0)" if self.mode == "flat" else f"tl.max(tl.max({masked}, axis=1), axis=0)"
        self.emit(f"tl.atomic_max(out{k} + pid % {slots}, {tile_max}, sem='relaxed')  # {op.name}: |{x.name}|")

    # ----------------------------------------------------------------------------- kernels
    def header(self, params: list[str]) -> None:
        r, n = self.R, self.N
        wide = r * n >= 2**30
        pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
        self.lines.append(f"def KERNEL({', '.join(params)}):")
        for op in self.region.ops:
            src = source_comment(op.meta)
            outs = ", ".join(q.name for q in op.output_proxies())
            self.emit(f"# {outs} = {op.name}" + (f"  ({src})" if src else ""))
        self.emit(f"pid = {pid}")
        if self.mode == "flat":
            self.emit("i = pid * BLOCK + tl.arange(0, BLOCK)")
            self.emit(f"fmask = i < {r * n}")
            if self.region.N is None:
                self.emit("rows = i")
            else:
                self.emit(f"rows = i // {n}")
                self.emit(f"cols = i % {n}")
        elif self.grid_stride:
            if self.column_tiled:  # axis 1 picks the columns; every op is per column (see column_tiled)
                self.emit("cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]")
            else:
                self.emit("cols = tl.arange(0, BLOCK_N)[None, :]")
            self.emit(f"cmask = cols < {n}")
            for k, op in enumerate(self.region.column_sums):
                self.emit(f"csum{k} = tl.zeros([1, BLOCK_N], tl.float32)  # {op.name}: this program's rows")
            self.emit(f"for rb in range(pid, tl.cdiv({r}, BLOCK_M), {self.region.programs}):")
            self.indent += 1
            rb = "rb.to(tl.int64)" if wide else "rb"
            self.emit(f"rows = {rb} * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]")
            self.emit(f"rmask = rows < {r}")
            self.emit("fmask = rmask & cmask")
        else:
            self.emit("rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]")
            self.emit(f"rmask = rows < {r}")
            if self.mode == "persistent":
                self.emit("cols = tl.arange(0, BLOCK_N)[None, :]")
                self.emit(f"cmask = cols < {n}")
                self.emit("fmask = rmask & cmask")
        self.header_end = len(self.lines)

    def body(self) -> None:
        region = self.region
        if self.mode in ("flat", "persistent"):
            sums = {id(op): k for k, op in enumerate(region.column_sums)}
            for op in region.ops:
                out = op.outputs[0]
                if id(op) in sums:
                    x = self.value(op.args[0])
                    self.emit(f"csum{sums[id(op)]} += tl.sum(tl.where(fmask, {x}, 0.0), axis=0)[None, :]  # {op.name}")
                elif id(out) in self.absmax:
                    self.fold_absmax(op)
                elif id(op) in self.onehots:
                    self.scope[(id(out), 0)] = self.onehot_value(op)
                elif op.target in fops.REDUCTIONS:
                    self.scope[(id(out), 0)] = self.reduce(op)
                elif self.kind(out) in (ROW, SCALAR) or op.target in fops.VIEWS:
                    self.value(out)
            partials = []
            for k, p in enumerate(region.outputs):
                if id(p) in region.partial_of:
                    partials.append((k, sums[id(region.partial_of[id(p)])]))
                elif id(p) not in self.absmax:
                    self.store(k, p)
            if partials:
                self.indent = 1
                for k, j in partials:
                    self.emit(f"tl.store(out{k} + pid * {self.N} + cols, csum{j}, mask=cmask)")
            return
        if self.absmax:
            raise AssertionError("fp8_amax in a looped kernel: region formation keeps it to rows of <= 16384 columns")
        # looped: reductions grouped by dependency level share one chunked pass each; row values are
        # computed at the top level between passes; a last pass writes the full-size outputs.
        levels = self.reduction_levels()
        emitted: set[int] = set()
        for level in sorted(set(levels.values())):
            self.emit_row_values(below=level, emitted=emitted)
            self.reduce_pass([op for op in region.ops if levels.get(id(op)) == level])
        self.emit_row_values(below=None, emitted=emitted)
        wide = [(k, p) for k, p in enumerate(region.outputs) if self.storage_kind(p) in _WIDE]
        narrow = [(k, p) for k, p in enumerate(region.outputs) if self.storage_kind(p) in (ROW, SCALAR)]
        if wide:
            self.open_loop()
            for k, p in wide:
                self.store(k, p)
            self.close_loop()
        self.scope = self.top
        for k, p in narrow:
            self.store(k, p)


def _tensor_args(
    prefix: str, proxies: list[Proxy], strides: dict[int, tuple[int, ...]] | None = None
) -> list[TensorArg]:
    args = []
    for k, p in enumerate(proxies):
        shape = tuple(p.val.shape)
        stride = tuple(p.val.stride()) if prefix == "out" else ()
        contiguous = bool(p.val.is_contiguous())
        if strides and id(p) in strides:  # a layout chosen for the readers (see layout.py)
            stride, contiguous = strides[id(p)], False
        dims = [] if contiguous else [j for j, s in enumerate(shape) if s > 1]
        args.append(TensorArg(f"{prefix}{k}", shape, p.val.dtype, dims, stride, contiguous))
    return args


def choose_mode(region: Region) -> str:
    """``flat``, ``persistent`` or ``looped`` (see the module docstring)."""
    if not region.has_reduction:
        return "flat"
    return "persistent" if _next_pow2(region.N or 1) <= PERSISTENT_MAX_N else "looped"


def generate(region: Region) -> KernelSpec:
    """Generate the Triton kernel of ``region``."""
    mode = choose_mode(region)
    writer = _Writer(region, mode)
    inputs = _tensor_args("in", region.inputs)
    outputs = _tensor_args("out", region.outputs, region.out_strides)
    for arg, p in zip(outputs, region.outputs):
        arg.zeroed = id(p) in writer.absmax
    writer.args = {a.name: a for a in inputs + outputs}
    params = []
    for arg in inputs + outputs:
        params.append(arg.name)
        params += [f"{arg.name}_s{j}" for j in arg.stride_dims]
    params += ["BLOCK: tl.constexpr"] if mode == "flat" else ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    writer.header(params)
    writer.body()
    body = "\n".join(writer.lines)
    # Named by the code alone, not the comments (they name each layer's own values and source lines): the
    # same region in every layer of a model is one kernel, compiled and autotuned once.
    code = "\n".join(line for line in writer.lines if not line.lstrip().startswith("#"))
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    kernel_name = f"fused_{digest}"
    source = f"{_PRELUDE}\n\n@triton.jit\n" + body.replace("def KERNEL(", f"def {kernel_name}(", 1) + "\n"
    return KernelSpec(
        region=region.name,
        kernel_name=kernel_name,
        source=source,
        mode=mode,
        R=region.R,
        N=region.N or 1,
        inputs=inputs,
        outputs=outputs,
        configs=_configs(mode, region.R, region.N or 1, writer.column_tiled),
        programs=region.programs if region.partial_of else None,
        column_tiled=writer.column_tiled,
    )
