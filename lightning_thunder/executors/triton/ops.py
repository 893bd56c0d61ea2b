"""Which ATen ops the Triton fusion executor can put in a region, and the Triton code for each.

Three families:

- pointwise ops (``aten.mul.Tensor``, ``aten.exp.default``, casts, comparisons, ``where``...): an emitter
  turns the op's argument expressions into one Triton expression;
- reductions over the last dimension (``sum``, ``mean``, ``amax``, ``amin``);
- views that keep the last dimension (``view``, ``unsqueeze``, ``expand``...): inside a region they
  change nothing (a region computes on a [rows, columns] grid and these only regroup rows).

Values are computed in fp32 for fp16/bf16/fp32 inputs (fp64 stays fp64); an explicit cast to
fp16/bf16 rounds (``x.to(tl.bfloat16).to(tl.float32)``) so later ops see the rounded value, as in eager.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch

from lightning_thunder.trace.trace import BoundOp

__all__ = [
    "POINTWISE",
    "REDUCTIONS",
    "VIEWS",
    "CONSTANTS",
    "COLUMN_MOVES",
    "CASTS",
    "IOTA",
    "INT_EXACT",
    "iota_params",
    "compute_type",
    "literal",
    "tl_dtype",
    "decompositions",
]

aten = torch.ops.aten
prims = torch.ops.prims

_TL = {
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
    torch.bool: "tl.int1",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
}
_NAN = "tl.PropagateNan.ALL"


def tl_dtype(dtype: torch.dtype) -> str:
    """The Triton spelling of a torch dtype (raises KeyError for unsupported ones)."""
    return _TL[dtype]


def compute_type(dtype: torch.dtype) -> str:
    """The type values of ``dtype`` are computed in: fp32 for 16/32-bit floats, else the dtype itself."""
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return "tl.float32"
    return _TL[dtype]


def literal(x: Any) -> str:
    """A Python scalar as Triton source."""
    if isinstance(x, bool):
        return "True" if x else "False"
    if isinstance(x, int):
        return repr(x)
    if isinstance(x, float):
        if math.isnan(x):
            return 'float("nan")'
        if math.isinf(x):
            return 'float("inf")' if x > 0 else 'float("-inf")'
        return repr(x)
    raise TypeError(f"not a scalar literal: {x!r}")


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_interpreting = interpreting


# An emitter gets the op and `a(i)` (argument i as an expression) and returns an expression, or None
# when this use of the op is not supported (the op then stays on the torch executor).
Emitter = Callable[[BoundOp, Callable[[int], str]], "str | None"]


def _alpha(op: BoundOp, rhs: str) -> str:
    alpha = op.kwargs.get("alpha", 1)
    return rhs if alpha == 1 else f"({literal(alpha)} * {rhs})"


def _unary(fn: str) -> Emitter:
    return lambda op, a: f"{fn}({a(0)})"


def _binary(sym: str) -> Emitter:
    return lambda op, a: f"({a(0)} {sym} {a(1)})"


def _tanh(op: BoundOp, a: Callable[[int], str]) -> str:
    if _interpreting():  # libdevice has no interpreter implementation
        return f"(2.0 * tl.sigmoid(2.0 * {a(0)}) - 1.0)"
    return f"libdevice.tanh({a(0)})"


def _log1p(op: BoundOp, a: Callable[[int], str]) -> str:
    return f"tl.log(1.0 + {a(0)})" if _interpreting() else f"libdevice.log1p({a(0)})"


def _expm1(op: BoundOp, a: Callable[[int], str]) -> str:
    return f"(tl.exp({a(0)}) - 1.0)" if _interpreting() else f"libdevice.expm1({a(0)})"


def _pow(op: BoundOp, a: Callable[[int], str]) -> str | None:
    p = op.args[1]
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return None
    x = a(0)
    if p == 0.5:
        return f"tl.sqrt({x})"
    if p == -0.5:
        return f"tl.rsqrt({x})"
    if float(p).is_integer() and -4 <= p <= 4:
        n = int(p)
        if n == 0:
            return f"({x} * 0.0 + 1.0)"
        prod = " * ".join([f"{x}"] * abs(n))
        return f"({prod})" if n > 0 else f"(1.0 / ({prod}))"
    return None


def _clamp(op: BoundOp, a: Callable[[int], str]) -> str | None:
    lo = op.args[1] if len(op.args) > 1 else op.kwargs.get("min")
    hi = op.args[2] if len(op.args) > 2 else op.kwargs.get("max")
    expr = a(0)
    if lo is not None:
        if not isinstance(lo, (int, float)):
            return None
        expr = f"tl.maximum({expr}, {literal(float(lo))}, propagate_nan={_NAN})"
    if hi is not None:
        if not isinstance(hi, (int, float)):
            return None
        expr = f"tl.minimum({expr}, {literal(float(hi))}, propagate_nan={_NAN})"
    return expr


def cast(expr: str, dtype: torch.dtype) -> str:
    """``expr`` (in its compute type) converted to ``dtype``'s value, in ``dtype``'s compute type."""
    if dtype == torch.bfloat16 and interpreting():
        return f"_rtne_bf16({expr}.to(tl.float32))"  # the interpreter truncates; round to nearest even
    if dtype in (torch.float16, torch.bfloat16):
        return f"{expr}.to({_TL[dtype]}).to(tl.float32)"
    if dtype == torch.bool:
        return f"({expr} != 0)"
    return f"{expr}.to({compute_type(dtype)})"


def _to_copy(op: BoundOp, a: Callable[[int], str]) -> str | None:
    allowed = {"dtype", "memory_format", "layout", "device", "pin_memory", "non_blocking"}
    if set(op.kwargs) - allowed or len(op.args) != 1:
        return None
    src = op.args[0]
    out = op.outputs[0]
    if out is None or getattr(src, "val", None) is None:
        return None
    if out.val.device != src.val.device or op.kwargs.get("layout") not in (None, torch.strided):
        return None
    return cast(a(0), out.val.dtype)


def _convert(op: BoundOp, a: Callable[[int], str]) -> str | None:
    return cast(a(0), op.args[1])


def _where(op: BoundOp, a: Callable[[int], str]) -> str:
    return f"tl.where({a(0)}, {a(1)}, {a(2)})"


def _masked_fill(op: BoundOp, a: Callable[[int], str]) -> str:
    return f"tl.where({a(1)}, {a(2)}, {a(0)})"


def _copy(op: BoundOp, a: Callable[[int], str]) -> str | None:
    if op.kwargs.get("non_blocking"):
        return None
    return cast(a(1), op.outputs[0].val.dtype)


#: pointwise op -> emitter
POINTWISE: dict[Any, Emitter] = {
    aten.add.Tensor: lambda op, a: f"({a(0)} + {_alpha(op, a(1))})",
    aten.add.Scalar: lambda op, a: f"({a(0)} + {_alpha(op, a(1))})",
    aten.sub.Tensor: lambda op, a: f"({a(0)} - {_alpha(op, a(1))})",
    aten.sub.Scalar: lambda op, a: f"({a(0)} - {_alpha(op, a(1))})",
    aten.rsub.Scalar: lambda op, a: f"({a(1)} - {_alpha(op, a(0))})",
    aten.rsub.Tensor: lambda op, a: f"({a(1)} - {_alpha(op, a(0))})",
    aten.mul.Tensor: _binary("*"),
    aten.mul.Scalar: _binary("*"),
    aten.div.Tensor: _binary("/"),
    aten.div.Scalar: _binary("/"),
    aten.neg.default: lambda op, a: f"(-{a(0)})",
    aten.reciprocal.default: lambda op, a: f"(1.0 / {a(0)})",
    aten.exp.default: _unary("tl.exp"),
    aten.exp2.default: _unary("tl.exp2"),
    aten.log.default: _unary("tl.log"),
    aten.log2.default: _unary("tl.log2"),
    aten.log1p.default: _log1p,
    aten.expm1.default: _expm1,
    aten.sqrt.default: _unary("tl.sqrt"),
    aten.rsqrt.default: _unary("tl.rsqrt"),
    aten.sin.default: _unary("tl.sin"),
    aten.cos.default: _unary("tl.cos"),
    aten.tanh.default: _tanh,
    aten.sigmoid.default: _unary("tl.sigmoid"),
    aten.erf.default: _unary("tl.erf"),
    aten.abs.default: _unary("tl.abs"),
    aten.floor.default: _unary("tl.floor"),
    aten.ceil.default: _unary("tl.ceil"),
    aten.relu.default: lambda op, a: f"tl.maximum({a(0)}, 0.0, propagate_nan={_NAN})",
    aten.pow.Tensor_Scalar: _pow,
    aten.maximum.default: lambda op, a: f"tl.maximum({a(0)}, {a(1)}, propagate_nan={_NAN})",
    aten.minimum.default: lambda op, a: f"tl.minimum({a(0)}, {a(1)}, propagate_nan={_NAN})",
    aten.clamp_min.default: lambda op, a: f"tl.maximum({a(0)}, {a(1)}, propagate_nan={_NAN})",
    aten.clamp_max.default: lambda op, a: f"tl.minimum({a(0)}, {a(1)}, propagate_nan={_NAN})",
    aten.clamp.default: _clamp,
    aten.where.self: _where,
    aten.masked_fill.Scalar: _masked_fill,
    aten.eq.Tensor: _binary("=="),
    aten.eq.Scalar: _binary("=="),
    aten.ne.Tensor: _binary("!="),
    aten.ne.Scalar: _binary("!="),
    aten.lt.Tensor: _binary("<"),
    aten.lt.Scalar: _binary("<"),
    aten.le.Tensor: _binary("<="),
    aten.le.Scalar: _binary("<="),
    aten.gt.Tensor: _binary(">"),
    aten.gt.Scalar: _binary(">"),
    aten.ge.Tensor: _binary(">="),
    aten.ge.Scalar: _binary(">="),
    aten.logical_not.default: lambda op, a: f"({a(0)} == 0)",
    aten.logical_and.default: lambda op, a: f"(({a(0)} != 0) & ({a(1)} != 0))",
    aten.logical_or.default: lambda op, a: f"(({a(0)} != 0) | ({a(1)} != 0))",
    # Fused for bool results only (see region._check_operands), written as the logical ops: Triton's interpreter
    # rejects ``&`` between a block of bools and a 0-d bool loaded from a scalar tensor.
    aten.bitwise_and.Tensor: lambda op, a: f"(({a(0)} != 0) & ({a(1)} != 0))",
    aten.bitwise_or.Tensor: lambda op, a: f"(({a(0)} != 0) | ({a(1)} != 0))",
    aten.isnan.default: lambda op, a: f"({a(0)} != {a(0)})",
    aten._to_copy.default: _to_copy,
    prims.convert_element_type.default: _convert,
    aten.clone.default: lambda op, a: a(0),
    aten.copy.default: _copy,
}

#: ops that convert dtypes (their emitters already round to the target dtype)
CASTS = {aten._to_copy.default, prims.convert_element_type.default, aten.copy.default}

#: Ops whose result only depends on the dtype/shape of their inputs: they become a literal.
CONSTANTS: dict[Any, Callable[[BoundOp], Any]] = {
    aten.scalar_tensor.default: lambda op: op.args[0],
    aten.full.default: lambda op: op.args[1],
    aten.full_like.default: lambda op: op.args[1],
    aten.zeros_like.default: lambda op: 0,
    aten.ones_like.default: lambda op: 1,
    aten.fill.Scalar: lambda op: op.args[1],
    aten.slice_backward.default: lambda op: 0,  # only for an empty slice's gradient (see region._role)
}

#: ``arange`` over the last dimension: its value at column ``c`` is ``start + c * step`` (never loaded).
IOTA = {aten.arange.default, aten.arange.start, aten.arange.start_step}


def iota_params(op: BoundOp) -> tuple[int, int] | None:
    """``(start, step)`` of an integer ``arange`` op, or ``None`` when it is not one a region computes."""
    if op.target not in IOTA or set(op.kwargs) - {"dtype", "layout", "device", "pin_memory"}:
        return None
    args = op.args
    if not args or not all(type(a) is int for a in args):
        return None
    if op.target is aten.arange.default:
        return (0, 1) if len(args) == 1 else None
    if op.target is aten.arange.start:
        return (args[0], 1) if len(args) == 2 else None
    return (args[0], args[2]) if len(args) == 3 else None


#: pointwise ops whose integer results are exact selections or comparisons (allowed to yield integers)
INT_EXACT = {aten.where.self}

#: reduction op -> (combine kind, whether the result is divided by the reduced size)
REDUCTIONS: dict[Any, tuple[str, bool]] = {
    aten.sum.dim_IntList: ("sum", False),
    aten.mean.dim: ("sum", True),
    aten.amax.default: ("max", False),
    aten.amin.default: ("min", False),
}

#: views that only regroup dimensions (allowed inside a region when they keep the last dimension)
VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.expand.default,
    aten.alias.default,
    aten.detach.default,
}

#: ops that move values between column ranges of the last dimension (see ``region.column_move``)
COLUMN_MOVES = {aten.cat.default, aten.slice.Tensor, aten.slice_backward.default}

# Composite ops AOTAutograd should decompose so their pieces can be fused (gelu -> erf, mul, add...).
_DECOMPOSE = [
    aten.gelu,
    aten.gelu_backward,
    aten.silu,
    aten.silu_backward,
    aten.sigmoid_backward,
    aten.tanh_backward,
    aten.threshold_backward,
    aten.hardtanh_backward,
    aten.leaky_relu,
    aten.leaky_relu_backward,
    aten._softmax,
    aten._softmax_backward_data,
    aten._log_softmax,
    aten._log_softmax_backward_data,
    aten.rsub,
    aten.addcmul,
    aten.addcdiv,
    aten.lerp,
    aten.softplus,
    aten.softplus_backward,
    aten.mse_loss,
    aten.mse_loss_backward,
    aten.native_dropout_backward,
]


def decompositions() -> dict[Any, Callable]:
    """The decomposition table the fusion executor asks AOTAutograd to apply."""
    from torch._decomp import get_decompositions

    from lightning_thunder.executors.triton import decompositions as ours

    table = get_decompositions(_DECOMPOSE)
    table[aten.nll_loss_forward.default] = ours.nll_loss_forward
    table[aten.nll_loss_backward.default] = ours.nll_loss_backward
    return table
