"""Del insertion: free every intermediate right after its last use, so peak memory tracks eager."""

from __future__ import annotations

import torch

from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import DELETE, BoundOp, Trace, timed_pass

__all__ = ["insert_deletions"]


def _holds_memory(p: Proxy) -> bool:
    return not isinstance(p.val, (int, float, torch.SymInt, torch.SymFloat, torch.SymBool))


def insert_deletions(trace: Trace, *, name: str | None = None) -> Trace:
    """A trace with ``del`` statements after the last use of each value that is not returned.

    Inputs are deleted too: with the boxed calling convention the caller's references are gone, so
    a saved activation is freed in the backward as soon as its last reader ran.
    """
    with timed_pass() as timer:
        returned = {id(p) for p in trace.output_proxies()}
        last_use: dict[int, int] = {}
        for i, op in enumerate(trace.ops):
            for p in op.input_proxies():
                last_use[id(p)] = i
        dying: dict[int, list[Proxy]] = {}
        for p in trace.inputs:
            if id(p) not in returned and _holds_memory(p):
                dying.setdefault(last_use.get(id(p), -1), []).append(p)
        for i, op in enumerate(trace.ops):
            for p in op.output_proxies():
                if id(p) not in returned and _holds_memory(p):
                    dying.setdefault(last_use.get(id(p), i), []).append(p)
        ops: list[BoundOp] = []
        if dying.get(-1):
            ops.append(BoundOp(DELETE, tuple(dying[-1])))
        for i, op in enumerate(trace.ops):
            ops.append(op)
            if dying.get(i):
                ops.append(BoundOp(DELETE, tuple(dying[i])))
    return trace.derive("del insertion (frees each value after its last use)", name=name, ops=ops, elapsed_ms=timer.ms)
