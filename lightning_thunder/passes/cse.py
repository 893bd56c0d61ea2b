"""Common subexpression elimination for pure, deterministic ops."""

from __future__ import annotations

import math
from typing import Any

from lightning_thunder.passes.purity import is_deterministic, is_pure
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp, Trace, timed_pass
from lightning_thunder.trace.tree import map_structure

__all__ = ["common_subexpression_elimination"]


def _key(x: Any) -> Any:
    """A hashable key for an argument structure (proxies by identity, floats by bits)."""
    if isinstance(x, Proxy):
        return ("proxy", id(x))
    if type(x) in (tuple, list):
        return (type(x).__name__, tuple(_key(v) for v in x))
    if type(x) is dict:
        return ("dict", tuple((k, _key(v)) for k, v in x.items()))
    if type(x) is slice:
        return ("slice", _key(x.start), _key(x.stop), _key(x.step))
    if isinstance(x, float):
        return ("float", math.copysign(1.0, x), repr(x))
    try:
        hash(x)
    except TypeError:
        return ("id", id(x))
    return (type(x).__name__, x)


def common_subexpression_elimination(trace: Trace, *, name: str | None = None) -> Trace:
    """A trace in which a pure, deterministic op repeated on the same inputs is computed once."""
    with timed_pass() as timer:
        replace: dict[int, Proxy] = {}
        seen: dict[Any, BoundOp] = {}

        def sub(x: Any) -> Any:
            return replace.get(id(x), x) if isinstance(x, Proxy) else x

        ops: list[BoundOp] = []
        for op in trace.ops:
            op = op.map_inputs(sub) if replace else op
            if is_pure(op) and is_deterministic(op):
                try:
                    key = (op.target, op.unpack, len(op.outputs), _key(op.args), _key(op.kwargs))
                    hash(key)
                except TypeError:
                    key = None
                if key is not None:
                    prior = seen.get(key)
                    if prior is not None and all(
                        p is None or q is not None for p, q in zip(op.outputs, prior.outputs)
                    ):
                        for p, q in zip(op.outputs, prior.outputs):
                            if p is not None:
                                replace[id(p)] = q
                        continue
                    seen[key] = op
            ops.append(op)
        output = map_structure(sub, trace.output)
    return trace.derive("common subexpression elimination", name=name, ops=ops, output=output, elapsed_ms=timer.ms)
