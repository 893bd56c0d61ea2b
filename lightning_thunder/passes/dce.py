"""Dead code elimination: drop pure ops whose results nobody reads."""

from __future__ import annotations

from lightning_thunder.passes.purity import is_pure
from lightning_thunder.trace.trace import BoundOp, Trace, timed_pass

__all__ = ["dead_code_elimination"]


def dead_code_elimination(trace: Trace, *, name: str | None = None) -> Trace:
    """A trace without the pure ops whose outputs are unused; unused outputs of kept ops become ``_``."""
    with timed_pass() as timer:
        live = {id(p) for p in trace.output_proxies()}
        kept: list[BoundOp] = []
        for op in reversed(trace.ops):
            outs = op.output_proxies()
            used = any(id(p) in live for p in outs)
            if not used and is_pure(op):
                continue
            if any(p is not None and id(p) not in live for p in op.outputs):
                op = op.replace(outputs=tuple(p if p is not None and id(p) in live else None for p in op.outputs))
            kept.append(op)
            live.update(id(p) for p in op.input_proxies())
        kept.reverse()
    return trace.derive("dead code elimination", name=name, ops=kept, elapsed_ms=timer.ms)
