"""How values of a fusion region vary over its grid, and which ops a region can take.

A region computes on a grid of ``R`` rows by ``N`` columns: the columns are the last dimension of its
widest values, the rows everything before it, in row-major order. Every value in a region has a
*kind* saying which of the two it varies along, and values that vary along columns a *width*:

- ``full``  varies along rows and columns (``x`` of shape [B, T, n]);
- ``row``   varies along rows only (a reduction over the last dimension, ``[B, T, 1]``), indexed by the
  region's row index;
- ``col``   varies along columns only (a weight of shape [n]);
- ``scalar`` varies along neither.

Two more kinds are complete only once the whole kernel has run, so nothing in the region may read them:
``colsum`` (a sum over all rows, a weight's gradient; see colsum.py) and ``epilogue`` (partial results an
:class:`~lightning_thunder.executors.triton.epilogues.Epilogue` folds, such as FP8's partial maxima).

A value is kept by kind, not by shape: a read of an internal value is allowed only where broadcasting its
shape against the reader's output gives exactly the indexing its kind implies (see ``form.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp

__all__ = [
    "FULL", "ROW", "COL", "SCALAR", "COLSUM", "EPILOGUE", "WIDE", "AFTER_KERNEL", "COLSUM_MAX_N",
    "join_kinds", "external_kind", "static_shape", "dims", "dim_of", "strides", "is_static", "gt1", "numel",
    "broadcasts_to", "free_symbols", "column_sum_dims", "column_move", "op_role", "check_operands",
]

FULL, ROW, COL, SCALAR = "full", "row", "col", "scalar"
COLSUM = "colsum"
EPILOGUE = "epilogue"
WIDE = (FULL, COL)
#: kinds whose values are complete only after the kernel: never read inside the region
AFTER_KERNEL = (COLSUM, EPILOGUE)
#: column sums and epilogues are accumulated by kernels holding whole rows (at most this many columns)
COLSUM_MAX_N = 16384
_RANK = {SCALAR: 0, ROW: 1, COL: 1, FULL: 2}
#: float dtypes regions compute (float64 stays on PyTorch: Triton's math functions are fp32-only on GPUs, so a region
#: computing in float64 may not compile there; it may still load a float64 input it casts or compares)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_LOADABLE = (*FLOATS, torch.float64, torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def join_kinds(a: str, b: str) -> str:
    """The kind of a value computed from values of kinds ``a`` and ``b``."""
    if a == b:
        return a
    if {a, b} == {ROW, COL} or FULL in (a, b):
        return FULL
    return a if _RANK[a] > _RANK[b] else b


def static_shape(val: Any) -> tuple[int, ...] | None:
    """The shape of tensor ``val`` when every dimension is a plain int (``None`` otherwise)."""
    if not isinstance(val, torch.Tensor):
        return None
    shape = tuple(val.shape)
    return shape if all(type(d) is int for d in shape) else None


def dim_of(d: Any) -> Any:
    """A dimension as an int, or as a sympy expression when it is symbolic (a ``SymInt`` of a dynamic shape)."""
    if type(d) is int:
        return d
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return int(expr) if expr.is_Integer else expr
    return int(d)


def dims(val: Any) -> tuple[Any, ...] | None:
    """The shape of tensor ``val``, symbolic dimensions as sympy expressions (``None`` for a non-tensor)."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(dim_of(d) for d in val.shape)


def strides(val: torch.Tensor) -> tuple[Any, ...]:
    """The strides of tensor ``val``, symbolic ones as sympy expressions."""
    return tuple(dim_of(s) for s in val.stride())


def is_static(d: Any) -> bool:
    """Whether dimension ``d`` (see :func:`dim_of`) is a plain int."""
    return type(d) is int


def gt1(d: Any) -> bool:
    """Whether dimension ``d`` is larger than 1: a symbolic one always is (Dynamo specializes sizes 0 and 1)."""
    return d > 1 if type(d) is int else True


def numel(shape: tuple[Any, ...]) -> Any:
    """The number of elements of ``shape`` (a sympy expression when a dimension is symbolic)."""
    return math.prod(shape)


def broadcasts_to(shape: tuple[Any, ...], target: tuple[Any, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` exactly (each aligned dimension equal, or 1)."""
    if len(shape) > len(target):
        return False
    return all(d == 1 or d == t for d, t in zip(shape, target[len(target) - len(shape) :]))


def free_symbols(shape: tuple[Any, ...]) -> set:
    """The sympy symbols the dimensions of ``shape`` are made of."""
    found: set = set()
    for d in shape:
        if not is_static(d):
            found |= d.free_symbols
    return found


def external_kind(shape: tuple[int, ...], target: tuple[int, ...], has_col: bool) -> str:
    """The kind of a tensor of ``shape`` read broadcast to ``target`` (whose last dim is the column
    dimension when ``has_col``)."""
    aligned = (1,) * (len(target) - len(shape)) + tuple(shape)
    row_dims = aligned[:-1] if has_col else aligned
    varies_col = has_col and len(aligned) > 0 and gt1(aligned[-1])
    varies_row = any(gt1(d) for d in row_dims)
    if varies_col and varies_row:
        return FULL
    return COL if varies_col else ROW if varies_row else SCALAR


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


def op_role(op: BoundOp, epilogue: Any = None) -> str | None:
    """What ``op`` is to a region: ``pointwise``, ``reduction``, ``colreduce`` (a sum over all rows), ``view``,
    ``constant``, ``iota`` (a column index), ``column`` (a move along the columns), ``epilogue`` (``epilogue`` is
    the :class:`~lightning_thunder.executors.triton.epilogues.Epilogue` that matched it), or ``None``."""
    t = op.target
    if op.is_method or op.unpack or op.outputs[0] is None:
        return None
    if epilogue is not None:
        return "epilogue"
    if op.executor:
        return None
    if column_sum_dims(op):
        return "colreduce"
    try:
        if t in fops.POINTWISE:
            return "pointwise"
        if t in fops.REDUCTIONS:
            return "reduction"
        if t in fops.VIEWS:
            return "view"
        if t in fops.COLUMN_MOVES:  # before CONSTANTS, which holds slice_backward for its empty case
            if t is torch.ops.aten.slice_backward.default and numel(dims(op.args[0].val)) == 0:
                return "constant"  # the gradient of an empty slice: zeros
            return "column"
        if t in fops.CONSTANTS:
            return "constant"
        if t in fops.IOTA:
            return "iota"
    except TypeError:
        return None
    return None


def check_operands(op: BoundOp, role: str, epilogue: Any = None) -> str | None:
    """``None`` when ``op``'s shapes, dtypes and arguments are ones the code generator handles (static shapes,
    supported dtypes, one device); otherwise why not."""
    out = op.outputs[0].val
    out_shape = dims(out)
    if out_shape is None:
        return "its output is not a tensor"
    for p in (op.outputs[0], *op.input_proxies()):
        shape = dims(p.val)
        if shape and not is_static(shape[-1]):
            return f"{p.name}'s last dimension is symbolic ({shape[-1]}); only row counts may be dynamic"
    if numel(out_shape) == 0:
        return "its output is empty"
    if role == "colreduce":
        if out.dtype in FLOATS and op.args[0].val.dtype in FLOATS:
            return None
        return "a sum over rows of a non-float value"
    if role == "epilogue":
        return None if epilogue.accepts(op) else f"the {epilogue.name} epilogue does not take these operands"
    if role == "iota":
        if out.dim() == 1 and out.dtype in (torch.int64, torch.int32) and fops.iota_params(op) is not None:
            return None
        return "an arange that is not an integer column index"
    int_ok = (role in ("view", "constant") or (role == "pointwise" and op.target in fops.INT_EXACT)) and out.dtype in (
        torch.int64, torch.int32
    )
    if out.dtype == torch.float64:
        return "float64 results stay on PyTorch (Triton's math functions are fp32-only on GPUs)"
    if (out.dtype not in (*FLOATS, torch.bool) and not int_ok) or (role == "reduction" and out.dtype not in FLOATS):
        return f"its result dtype {out.dtype} is not computed in regions"
    for p in op.input_proxies():
        shape = dims(p.val)
        if shape is None and role == "view":
            continue  # a symbolic size of a view: the region only regroups the rows, it needs no value for it
        if shape is None:
            return f"input {p.name} is not a tensor"
        if p.val.dtype not in _LOADABLE:
            return f"input {p.name} has dtype {p.val.dtype}"
        if p.val.device != out.device:
            return f"input {p.name} is on {p.val.device}, the result on {out.device}"
        if role == "pointwise" and not broadcasts_to(shape, out_shape):
            return f"input {p.name} {list(shape)} does not broadcast to the result {list(out_shape)}"
    if role == "pointwise":
        try:
            ok = fops.POINTWISE[op.target](op, lambda i: f"a{i}") is not None
        except (IndexError, KeyError, TypeError, AttributeError):
            ok = False
        return None if ok else "these arguments have no Triton expression"
    if role == "reduction":
        x = op.args[0]
        if not isinstance(x, Proxy) or not x.is_tensor or len(x.shape) == 0:
            return "a reduction of a 0-d value"
        reduced = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
        if reduced is None:
            return "a reduction over every dimension"
        reduced = [reduced] if isinstance(reduced, int) else list(reduced)
        nd = len(x.shape)
        if [d % nd for d in reduced] != [nd - 1]:
            return f"a reduction over dims {reduced}, not the last one alone"
        return None if set(op.kwargs) <= {"dtype", "keepdim"} else f"reduction keywords {sorted(op.kwargs)}"
    if role == "constant":
        value = fops.CONSTANTS[op.target](op)
        if isinstance(value, (int, float, bool)) and set(op.kwargs) <= {
            "dtype", "layout", "device", "pin_memory", "memory_format"
        }:
            return None
        return "a constant that is not a scalar fill"
    if role == "column":
        return None if column_move(op) is not None else "a cat/slice along a dimension other than the last"
    return None
