"""Which ops may be removed when unused, or merged when repeated."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx.node

from lightning_thunder.trace.trace import DELETE, BoundOp

__all__ = ["is_pure", "is_deterministic"]

_PURE_PYTHON = {
    getattr(operator, n)
    for n in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "getitem",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift",
    )
} | {math.sqrt, math.floor, math.ceil, math.exp, math.log, math.trunc}
for _name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "_sym_sqrt"):
    if hasattr(torch, _name):
        _PURE_PYTHON.add(getattr(torch, _name))


def _side_effectful(target: Any) -> bool:
    return target in getattr(torch.fx.node, "_side_effectful_functions", ())


def is_pure(op: BoundOp) -> bool:
    """Whether ``op`` only computes its outputs (so it may be dropped when nobody reads them).

    ATen overloads are pure unless their schema writes an argument or FX lists them as side
    effectful (asserts, ``_print``); of other callables only arithmetic on numbers is known pure.
    """
    target = op.target
    if target is DELETE or op.is_method:
        return False
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and not _side_effectful(target)
    try:
        return target in _PURE_PYTHON
    except TypeError:  # unhashable callable
        return False


def is_deterministic(op: BoundOp) -> bool:
    """Whether two calls of ``op`` on the same inputs give the same result (no random numbers)."""
    target = op.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded not in target.tags
    return True
