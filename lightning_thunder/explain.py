"""``lightning_thunder.explain(cm)``: what the fusion executor did with each compiled graph, and why every op it did
not fuse runs on PyTorch."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["explain", "Explanation", "GraphExplanation"]


@dataclass
class GraphExplanation:
    """One compiled forward or backward graph.

    Attributes:
        graph: the graph's index among the compiled graphs of the module or function.
        stage: ``"forward"`` or ``"backward"``.
        regions: ``(name, kernel shape, [op names], notes)`` per fused region.
        unfused: ``(value name, op name, reason)`` per op left to other executors (mostly ``torch``).
        fused: whether a fusion executor ran on this graph.
    """

    graph: int
    stage: str
    regions: list[tuple[str, str | None, list[str], list[str]]] = field(default_factory=list)
    unfused: list[tuple[str, str, str]] = field(default_factory=list)
    fused: bool = True

    def reasons(self) -> Counter:
        """How many ops are left out for each reason."""
        return Counter(reason for _, _, reason in self.unfused)

    def __str__(self) -> str:
        head = f"graph {self.graph} {self.stage}: "
        if not self.fused:
            return head + "no fusion executor ran (add lightning_thunder.plugins.Fusion(); on CPU it fuses only under TRITON_INTERPRET=1)"
        lines = [head + f"{len(self.regions)} fused regions, {len(self.unfused)} ops not fused"]
        for name, kernel, ops, notes in self.regions:
            lines.append(f"  {name} ({kernel}): {len(ops)} ops: {', '.join(ops)}")
            lines += [f"    {note}" for note in notes]
        if self.unfused:
            lines.append("  not fused:")
            for value, op, reason in self.unfused:
                lines.append(f"    {value} = {op}: {reason}")
        return "\n".join(lines)


@dataclass
class Explanation:
    """:func:`explain`'s answer: one :class:`GraphExplanation` per compiled forward/backward graph (``str()`` prints
    them all)."""

    graphs: list[GraphExplanation]

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self.graphs) if self.graphs else "nothing compiled yet"


def _plan_of(traces: list) -> Any:
    return next((t.annotations["fusion_plan"] for t in reversed(traces) if "fusion_plan" in t.annotations), None)


def _explain_stage(index: int, stage: str, traces: list) -> GraphExplanation | None:
    from lightning_thunder.capture.state import final_trace

    if final_trace(traces) is None:
        return None
    plan = _plan_of(traces)
    if plan is None:
        return GraphExplanation(index, stage, fused=False)
    from lightning_thunder.executors.triton.lower import region_notes

    regions = [(r.name, r.kernel, [op.name for op in r.ops], region_notes(r)) for r in plan.regions]
    unfused = []
    for op in plan.trace.ops:
        reason = plan.unfused.get(id(op))
        if reason is None:
            continue
        outs = op.output_proxies()
        unfused.append((outs[0].name if outs else "_", op.name, reason))
    return GraphExplanation(index, stage, regions, unfused)


def explain(cm: Any) -> Explanation:
    """What the fusion executor did with every graph compiled for ``cm``: the fused regions (their ops, kernel
    shape, patterns and output layouts) and, for every op left out, why.

    Example::

        cm = lightning_thunder.compile(model, plugins=[Fusion()])
        cm(x).sum().backward()
        print(lightning_thunder.explain(cm))
        # graph 0 forward: 3 fused regions, 14 ops not fused
        #   fusion0 (persistent): 7 ops: aten.pow.Tensor_Scalar, aten.mean.dim, ...
        #   not fused:
        #     t8 = aten.mm.default: no Triton lowering
    """
    from lightning_thunder.capture.compiled import compile_states

    graphs = []
    for state in compile_states(cm):
        for record in state.records:
            for stage, traces in (("forward", record.forward_traces), ("backward", record.backward_traces)):
                found = _explain_stage(record.index, stage, traces)
                if found is not None:
                    graphs.append(found)
    return Explanation(graphs)
