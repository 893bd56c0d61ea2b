"""The code generator's common part: how a region's values become Triton expressions over a tile.

A value that varies along columns is computed for the tile's columns ``cols``; ``cat``, ``slice`` and
``slice_backward`` along the last dimension ask for their operands at shifted columns (``cols + s``), so a
value may be emitted once per shift it is needed at. Values narrower than the grid are masked to their width
wherever they are loaded, reduced or stored.

Every tensor is addressed through its strides (contiguous ones baked in as constants) and its broadcast
against the value it feeds, so inputs may be non-contiguous, expanded or of lower rank. Values of 16/32-bit
floats are computed in fp32 and rounded to the output dtype when stored. The kernel shapes (flat, rows,
looped; see shapes.py) are subclasses in kernels.py that write the header and the body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.kinds import (
    COL,
    FULL,
    ROW,
    SCALAR,
    WIDE,
    column_move,
    dims,
    external_kind,
    gt1,
    is_static,
    numel,
)
from lightning_thunder.executors.triton.plan import OneHotSum, RegionPlan
from lightning_thunder.executors.triton.shapes import storage_kind
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp

__all__ = ["KernelWriter", "TensorArg", "ColAt"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_LOW = (torch.float16, torch.bfloat16)


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
    zeroed: bool = False  # outputs: allocated filled with zeros (partial results folded in with atomics)

    def stride_expr(self, j: int) -> Any:
        """The stride of dimension ``j``: a number (a sympy expression for a symbolic shape) when contiguous, else the
        name of the stride argument."""
        if self.contiguous:
            return math.prod(self.shape[j + 1 :])
        return f"{self.name}_s{j}"


@dataclass(frozen=True)
class ColAt:
    """A column given per row (``[BLOCK_M, 1]`` index ``expr``, plus ``offset``) instead of ``cols + shift``:
    where a one-hot sum evaluates its summand."""

    expr: str
    offset: int = 0

    def __add__(self, k: int) -> ColAt:
        return ColAt(self.expr, self.offset + k)

    def __sub__(self, k: int) -> ColAt:
        return ColAt(self.expr, self.offset - k)


def col_expr(shift: int | ColAt) -> str:
    """The column index expression at ``shift``."""
    if isinstance(shift, ColAt):
        return shift.expr if shift.offset == 0 else f"({shift.expr} + {shift.offset})"
    return "cols" if shift == 0 else f"(cols + {shift})" if shift > 0 else f"(cols - {-shift})"


class KernelWriter:
    """Writes one region's kernel; subclasses (kernels.py) implement :meth:`header` and :meth:`body`.

    Attributes:
        mode: ``flat``, ``persistent`` or ``looped`` (how tiles are laid out: ``[BLOCK]`` or ``[BLOCK_M, BLOCK_N]``).
        first: the condition under which exactly one program runs a line (stores of per-column and scalar values).
    """

    mode = "persistent"

    def __init__(self, region: RegionPlan, args: dict[str, TensorArg]) -> None:
        self.region = region
        self.R = region.R
        self.N = region.N or 1
        self.args = args
        self.lines: list[str] = []
        self.indent = 1
        self.counter = 0
        self.header_end = 0
        self.base_indent = 1
        self.first = "(pid == 0)"
        self.index_vars: dict[tuple, str] = {}
        self.scope: dict[Any, str] = {}  # memo for the current scope (a pass of a looped kernel)
        self.top: dict[Any, str] = {}  # values computed once per program (rows, scalars)
        self.literals: set[str] = set()
        self.inputs = {id(p): k for k, p in enumerate(region.inputs) if p.is_tensor}  # tensors come first
        # Symbolic dimensions (dynamic shapes) are kernel arguments sym0, sym1... (the ints after the tensors).
        self.symbol_names = {
            p.val.node.expr: sympy.Symbol(f"sym{k}") for k, p in enumerate(q for q in region.inputs if not q.is_tensor)
        }
        self.producer = {id(op.outputs[0]): op for op in region.ops}
        self.onehots = {id(p.sum_op): p for p in region.patterns if isinstance(p, OneHotSum)}
        self.outputs = {id(o.proxy): k for k, o in enumerate(region.outputs)}

    # ----------------------------------------------------------------------------- basics
    def render(self, x: Any) -> str:
        """Source for a size: an int, a symbolic dimension (sympy, in terms of the ``sym<k>`` arguments), or a name."""
        if isinstance(x, str):
            return x
        if is_static(x):
            return str(x)
        return f"({sympy.sstr(x.xreplace(self.symbol_names))})"

    def emit(self, line: str) -> None:
        """Write ``line`` at the current indentation."""
        self.lines.append("    " * self.indent + line)

    def emit_top(self, line: str) -> None:
        """Emit a line that only depends on the rows, at the top of the kernel (of the row loop)."""
        self.lines.insert(self.header_end, "    " * self.base_indent + line)
        self.header_end += 1

    def new(self, prefix: str = "v") -> str:
        """A fresh variable name."""
        self.counter += 1
        return f"{prefix}{self.counter}"

    def kind(self, p: Proxy) -> str:
        """The kind of internal value ``p``."""
        return self.region.kinds[id(p)]

    def row_index(self, dims: tuple[int, ...], i: int) -> str:
        key = (dims, i)
        if key in self.index_vars:
            return self.index_vars[key]
        inner = math.prod(dims[i + 1 :])
        if len(dims) == 1 or (i == 0 and inner == 1):
            expr = "rows"
        elif i == 0:
            expr = f"(rows // {self.render(inner)})"
        elif inner == 1:
            expr = f"(rows % {self.render(dims[i])})"
        else:
            expr = f"((rows // {self.render(inner)}) % {self.render(dims[i])})"
        name = f"r{len(self.index_vars)}"
        self.emit_top(f"{name} = {expr}")
        self.index_vars[key] = name
        return name

    def address(
        self, arg: str, shape: tuple[int, ...], target: tuple[int, ...], has_col: bool, tile: str | None = None,
        shift: int | ColAt = 0,
    ) -> str:
        """The element offset of tensor ``arg`` (of ``shape``) read or written as ``target``, at column
        ``cols + shift``. With ``tile`` (a kind), the offset is padded with ``rows * 0`` / ``cols * 0`` so that it
        has that kind's tile shape even where the tensor has no extent along rows or columns."""
        offset = len(target) - len(shape)
        row_dims = target[:-1] if has_col else target
        spec = self.args[arg]
        col = col_expr(shift)
        if spec.contiguous and tuple(shape) == tuple(target) and gt1(math.prod(shape)):
            fast = self.contiguous_address(shape, has_col, tile, shift, col)
            if fast is not None:
                return fast
        terms = []
        uses_row = uses_col = False
        for j, size in enumerate(shape):
            if not gt1(size):
                continue
            i = j + offset
            stride = self.render(spec.stride_expr(j))
            if has_col and i == len(target) - 1:
                terms.append(col if stride == "1" else f"{col} * {stride}")
                uses_col = True
            else:
                index = self.row_index(tuple(row_dims), i)
                terms.append(index if stride == "1" else f"{index} * {stride}")
                uses_row = True
        return " + ".join(terms + self.tile_padding(tile, uses_row, uses_col, not terms)) or "0"

    def contiguous_address(self, shape, has_col, tile, shift, col) -> str | None:
        """The row-major position of a contiguous tensor read or written at its own shape (``None``: no shortcut)."""
        if has_col and shape[-1] > 1 and gt1(math.prod(shape[:-1])):
            return f"rows * {shape[-1]} + {col}"
        if not has_col and tile in (None, ROW):
            return "rows"
        return None

    def tile_padding(self, tile: str | None, uses_row: bool, uses_col: bool, empty: bool) -> list[str]:
        """Terms that give an address the tile shape of ``tile``."""
        terms = []
        if tile in (ROW, FULL) and not uses_row:
            terms.append("rows * 0")
        if tile in (COL, FULL) and not uses_col:
            terms.append("cols * 0")
        return terms

    #: the mask of the tile's rows (the flat kernel's ``fmask`` covers rows and columns at once)
    row_mask = "rmask"
    #: the mask of the grid's columns at full width (``None``: the row mask covers it)
    full_width_mask: str | None = "cmask"
    #: what a per-column value's mask needs besides its columns (the flat kernel: the elements that exist)
    col_mask: str | None = None

    def mask(self, kind: str, width: int | None = None, shift: int | ColAt = 0) -> str | None:
        """The mask of a tile of ``kind`` whose columns ``cols + shift`` must lie in ``[0, width)``."""
        if kind == SCALAR:
            return None
        parts = []
        if kind in (FULL, ROW):
            parts.append(self.row_mask)
        if kind in WIDE:
            width = self.N if width is None else width
            col = col_expr(shift)
            if isinstance(shift, ColAt):
                parts.append(f"({col} >= 0) & ({col} < {width})")
            elif width < self.N or shift > 0:
                parts.append(f"({col} < {width})")
            elif self.full_width_mask is not None:
                parts.append(self.full_width_mask)
            if not isinstance(shift, ColAt) and shift < 0:
                parts.append(f"({col} >= 0)")
            if kind == COL and self.col_mask is not None:
                parts.append(self.col_mask)
        return " & ".join(parts) if parts else None

    def valid(self, p: Proxy) -> str:
        """The mask of the tile's elements that internal value ``p`` has (for epilogues)."""
        kind = self.kind(p)
        return self.mask(kind, self.region.widths.get(id(p))) or "True"

    def tile_reduce(self, expr: str, fn: str) -> str:
        """``expr`` (a tile) reduced to one value with ``tl.<fn>`` (for epilogues)."""
        return f"tl.{fn}(tl.{fn}({expr}, axis=1), axis=0)"

    # ----------------------------------------------------------------------------- values
    def load(self, p: Proxy, target: tuple[int, ...], has_col: bool, shift: int | ColAt = 0) -> str:
        shape = dims(p.val)
        kind = external_kind(shape, target, has_col)
        if kind not in WIDE:
            shift = 0
        memo = self.top if kind == SCALAR or (kind == ROW and self.mode != "looped") else self.scope
        key = ("load", id(p), target, has_col, shift)
        if key in memo:
            return memo[key]
        k = self.inputs[id(p)]
        addr = self.address(f"in{k}", shape, target, has_col, shift=shift)
        width = shape[-1] if kind in WIDE else None
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

    def operand(self, op: BoundOp, x: Any, shift: int | ColAt = 0) -> str:
        """The expression of argument ``x`` of ``op`` at ``shift``."""
        if isinstance(x, Proxy):
            if id(x) in self.producer:
                return self.value(x, shift)
            if op.target in fops.REDUCTIONS or op.target in fops.COLUMN_MOVES:
                return self.load(x, dims(x.val), True, shift)
            return self.load(x, dims(op.outputs[0].val), self.region.has_col[id(op)], shift)
        if x is None:
            return "None"
        return fops.literal(x)

    def value(self, p: Proxy, shift: int | ColAt = 0) -> str:
        """The variable holding internal value ``p`` at columns ``cols + shift`` in the current scope."""
        if self.kind(p) not in WIDE:
            shift = 0
        key = (id(p), shift)
        for memo in (self.scope, self.top):
            if key in memo:
                return memo[key]
        op = self.producer[id(p)]
        if op.target in fops.VIEWS:
            name = self.value(op.args[0], shift)
        elif op.target in fops.CONSTANTS and (op.target not in fops.COLUMN_MOVES or numel(dims(op.args[0].val)) == 0):
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
            index = col_expr(shift)
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
            where = "" if not shift else f" at {col_expr(shift)}" if isinstance(shift, ColAt) else f" at cols{shift:+d}"
            self.emit(f"{name} = {expr}  # {op.name}" + where)
        memo = self.top if self.kind(p) in (ROW, SCALAR) and self.mode == "looped" else self.scope
        memo[key] = name
        return name

    def column_move(self, op: BoundOp, shift: int | ColAt) -> str:
        """``cat`` / ``slice`` / ``slice_backward`` along the last dimension, at ``cols + shift``."""
        how, spec = column_move(op)
        name = self.new()
        col = col_expr(shift)
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

    # ----------------------------------------------------------------------------- reductions
    def reduction_mask(self, op: BoundOp) -> str:
        width = int(op.args[0].val.shape[-1])
        return self.mask(FULL, width) or "fmask"

    def reduce(self, op: BoundOp) -> str:
        """A reduction over the columns of whole rows held in the tile."""
        combine, _ = fops.REDUCTIONS[op.target]
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

    def onehot_value(self, op: BoundOp) -> str:
        """The value of one-hot sum ``op``: its summand at the row's index column (see patterns.py)."""
        pattern = self.onehots[id(op)]
        index = self.operand(pattern.eq_op, pattern.index)
        col = self.new("tc")
        self.emit(f"{col} = {index}.to(tl.int32)")
        at = self.value(pattern.summand, ColAt(col))
        total = f"tl.where(({col} >= 0) & ({col} < {pattern.width}), {at}, 0.0)"
        return self.emit_reduced(op, total, f" (one-hot: the summand at column {col})")

    # ----------------------------------------------------------------------------- stores
    def tile(self, kind: str) -> str:
        return {FULL: "[BLOCK_M, BLOCK_N]", ROW: "[BLOCK_M, 1]", COL: "[1, BLOCK_N]"}[kind]

    def store_mask(self, kind: str, width: int | None) -> str | None:
        return self.mask(kind, width)

    def store(self, k: int, p: Proxy) -> None:
        """Store internal value ``p`` into output argument ``out<k>``."""
        kind = storage_kind(self.region, p)
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
        shape = dims(p.val)
        addr = self.address(f"out{k}", shape, shape, kind in WIDE, tile=kind if kind != SCALAR else None)
        if kind == SCALAR:
            self.emit(f"if {self.first}:")
            self.emit(f"    tl.store(out{k} + 0, {stored})")
            return
        mask = self.store_mask(kind, shape[-1] if kind in WIDE else None)
        if kind == COL and self.mode != "flat":  # every program computes the same values: the first one writes them
            self.emit(f"if {self.first}:")
            self.emit(f"    tl.store(out{k} + {addr}, {stored}, mask={mask})")
            return
        self.emit(f"tl.store(out{k} + {addr}, {stored}, mask={mask})")

    def fold_epilogue(self, op: BoundOp) -> None:
        """Let ``op``'s epilogue fold this program's tile into its output (nothing if the output is unread)."""
        k = self.outputs.get(id(op.outputs[0]))
        if k is not None:
            self.region.epilogues[id(op)].emit(self, op, f"out{k}")

    def store_outputs(self) -> None:
        """Store every output that holds values of the region (not partial results)."""
        for k, o in enumerate(self.region.outputs):
            if o.partial_of is None:
                self.store(k, o.proxy)

    # ----------------------------------------------------------------------------- to override
    def header(self, params: list[str]) -> None:
        raise NotImplementedError

    def body(self) -> None:
        raise NotImplementedError

    def emit_ops(self, sums: dict[int, int]) -> None:
        """Every op's value over the tile, in order (persistent and flat kernels): column sums accumulated into
        ``csum<k>``, epilogues folded, reductions and row values computed; full values are computed where stored."""
        for op in self.region.ops:
            out = op.outputs[0]
            if id(op) in sums:
                x = self.value(op.args[0])
                self.emit(f"csum{sums[id(op)]} += tl.sum(tl.where(fmask, {x}, 0.0), axis=0)[None, :]  # {op.name}")
            elif id(op) in self.region.epilogues:
                self.fold_epilogue(op)
            elif id(op) in self.onehots:
                self.scope[(id(out), 0)] = self.onehot_value(op)
            elif op.target in fops.REDUCTIONS:
                self.scope[(id(out), 0)] = self.reduce(op)
            elif self.kind(out) in (ROW, SCALAR) or op.target in fops.VIEWS:
                self.value(out)
