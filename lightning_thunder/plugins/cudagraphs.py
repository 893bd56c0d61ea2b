"""The CUDAGraphs plugin: replay the compiled forward and backward programs as CUDA graphs.

A training step of a compiled model launches hundreds of kernels; issuing them costs the host tens of
microseconds each (Python, the launch path), and where the GPU finishes a kernel faster than the host issues
the next, the host sets the pace. A CUDA graph replays a recorded sequence of kernels with one launch. Here the
final program of each compiled graph (forward and backward) is cut into *segments* of ops that can be captured
(:mod:`lightning_thunder.cudagraphs.segments`), each captured and replayed by a
:class:`~lightning_thunder.cudagraphs.runner.SegmentRunner`; what cannot be captured runs between segments as
before. The stage ``"forward/CUDAGraphs"`` (and ``"backward/CUDAGraphs"``) of
:func:`lightning_thunder.last_traces` shows the program that runs, with ``cudagraph_segment<k>(...)`` ops.

Outputs that go back to the caller are copied out of the graph's memory after each replay (a training step
returns a loss: one small copy), so nothing the caller holds is overwritten by the next replay; values the forward
saves for the backward are not copied. All graphs of one plugin instance share one memory pool per device.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_thunder.cudagraphs.runner import CUDAGraphsWarning, GraphPool, SegmentRunner
from lightning_thunder.cudagraphs.segments import SegmentPlan, plan_segments, segment_program
from lightning_thunder.passes import insert_deletions
from lightning_thunder.plugins.base import FinalContext, Plugin
from lightning_thunder.trace.trace import DELETE, BoundOp, Trace
from lightning_thunder.trace.tree import iter_leaves

__all__ = ["CUDAGraphs", "CUDAGraphStats", "CUDAGraphsWarning"]

#: Uncaptured ops listed under a segment in the printed trace, at most.
_LISTED = 3


@dataclass(frozen=True)
class CUDAGraphStats:
    """What a :class:`CUDAGraphs` plugin captured and replayed (see :meth:`CUDAGraphs.stats`).

    Attributes:
        segments: segments of the compiled programs (each a ``cudagraph_segment<k>`` op).
        graphs: CUDA graphs captured (a segment captures one per input signature, and one more for each call
            made while its previous outputs are still in use).
        replays: calls that replayed a graph.
        uncaptured_calls: calls of a segment that ran uncaptured (see ``uncaptured``).
        pool_bytes: device memory held by the memory pools the graphs share (intermediate values and outputs).
        static_bytes: bytes of the graphs' outputs and input buffers (most of them inside the pools).
        uncaptured: why a segment ran uncaptured, per ``"<segment> of graph <i> <stage>"``.
    """

    segments: int
    graphs: int
    replays: int
    uncaptured_calls: int
    pool_bytes: int
    static_bytes: int
    uncaptured: dict[str, str] = field(default_factory=dict)


def _check_max_graphs(max_graphs: Any) -> int:
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(
            f"CUDAGraphs(max_graphs={max_graphs!r}): must be an int >= 1 (graphs one segment may capture; "
            "beyond that it runs uncaptured)"
        )
    return max_graphs


def _check_skip_ops(skip_ops: Any) -> frozenset:
    if isinstance(skip_ops, (str, bytes)) or not isinstance(skip_ops, (Sequence, set, frozenset)):
        raise TypeError(
            f"CUDAGraphs(skip_ops={skip_ops!r}): must be a list of ops, e.g. [torch.ops.aten.nonzero.default]"
        )
    ops = []
    for op in skip_ops:
        if isinstance(op, str) or not callable(op):
            raise TypeError(
                f"CUDAGraphs(skip_ops=[..., {op!r}, ...]): each entry must be an op (a callable such as "
                "torch.ops.aten.nonzero.default or torch.ops.aten.nonzero), not a name"
            )
        if isinstance(op, torch._ops.OpOverloadPacket):  # every overload (overloads pickle, packets do not)
            ops += [getattr(op, name) for name in op.overloads()]
        else:
            ops.append(op)
    return frozenset(ops)


def _operator(name: str) -> Any:
    """``torch.ops.aten.nonzero.default`` from ``"aten.nonzero.default"``."""
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def _device(device: torch.device) -> torch.device:
    if device.index is None and torch.cuda.is_available():
        return torch.device(device.type, torch.cuda.current_device())
    return device


def _tensor_devices(trace: Trace) -> set[str]:
    values = [p.val for p in trace.inputs] + [p.val for op in trace.ops for p in op.output_proxies()]
    return {str(v.device) for v in values if isinstance(v, torch.Tensor)}


def _ops(n: int) -> str:
    return f"{n} op" if n == 1 else f"{n} ops"


def _summary(plan: SegmentPlan) -> str:
    return "; ".join(f"{_ops(n)}: {why}" for why, n in plan.reasons().items())


class CUDAGraphs(Plugin):
    """Capture the final forward and backward programs of each compiled graph as CUDA graphs and replay them.

    Use it where the host sets the pace of a step (small models or batches, FP8, many small kernels): a replay
    launches a whole segment at once. Parameters and buffers are read where they are (updating them in place, as
    a fused optimizer does, is fine); other inputs are copied into the graph's buffers; outputs the caller
    receives are copied out; values saved for the backward stay where the forward wrote them (see
    :mod:`lightning_thunder.cudagraphs.runner`). Ops that cannot be captured (``.item()`` and other host reads,
    CPU tensors, data-dependent sizes, collectives, explicit random generators) run uncaptured between segments;
    the ``"<stage>/CUDAGraphs"`` trace names every segment and lists those ops. On a CPU model it captures nothing
    and says so (a :class:`CUDAGraphsWarning` and the trace's header).

    Not a default plugin: it is opt-in until measured faster on the benchmark shapes. Costs: memory for the
    graphs' buffers and outputs (:meth:`stats`, ``pool_bytes``), a capture (a warm-up run plus recording) per
    new input signature, and one graph per forward call whose saved values are still in use.

    Args:
        max_graphs: graphs one segment may capture (input signatures, parameters at new addresses, calls while its
            earlier outputs are in use, e.g. each transformer block of a model compiled block by block); beyond
            that the segment runs uncaptured, with a warning.
        skip_ops: ops never to capture, for an op that synchronizes with the host in a way its schema does not
            say (``torch.ops.aten.foo.default``, or ``torch.ops.aten.foo`` for all its overloads).

    Example::

        cm = lightning_thunder.compile(model, plugins=[*lightning_thunder.default_plugins(), CUDAGraphs()])
        loss = cm(x, y); loss.backward()
        print(lightning_thunder.last_traces(cm)[-1])     # forward/CUDAGraphs: cudagraph_segment0(...)
        print(cm_plugin.stats())                          # graphs, replays, pool size
    """

    def __init__(self, *, max_graphs: int = 16, skip_ops: Sequence[Any] = ()) -> None:
        self.max_graphs = _check_max_graphs(max_graphs)
        self.skip_ops = _check_skip_ops(skip_ops)
        self._reset()

    def _reset(self) -> None:
        self._pools: dict[torch.device, GraphPool] = {}
        self._runners: weakref.WeakSet[SegmentRunner] = weakref.WeakSet()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (ddp_spawn, deepcopy) with its options only: captured graphs never leave their process. Operator
        # overloads do not pickle: they travel by name ("aten.nonzero.default").
        ops = [str(op) if isinstance(op, torch._ops.OpOverload) else op for op in self.skip_ops]
        return {"max_graphs": self.max_graphs, "skip_ops": ops}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_graphs = state["max_graphs"]
        self.skip_ops = frozenset(_operator(op) if isinstance(op, str) else op for op in state["skip_ops"])
        self._reset()

    def __repr__(self) -> str:
        return f"CUDAGraphs(max_graphs={self.max_graphs})"

    # ------------------------------------------------------------------------------ the hook
    def transform_final(self, trace: Trace, context: FinalContext) -> Trace:
        """Replace each run of capturable ops by one ``cudagraph_segment<k>`` op (see the class docstring)."""
        where = f"graph {context.graph_index} {context.stage}"
        plan = plan_segments(trace, self.skip_ops)
        if not plan.segments:
            devices = _tensor_devices(trace)
            if not any(d.startswith("cuda") for d in devices):
                on = ", ".join(sorted(devices)) or "no device (no tensors)"
                why = f"the program runs on {on}; CUDA graphs capture CUDA kernels only (move the model and its inputs to a GPU)"
            else:
                why = "no op can be captured (" + _summary(plan) + ")"
            warnings.warn(f"CUDAGraphs: nothing captured in {where}: {why}", CUDAGraphsWarning, stacklevel=2)
            return trace.derive(f"plugin CUDAGraphs: nothing captured: {why}")
        user = self._user_outputs(trace, context)
        first = {id(seg.ops[0]): seg for seg in plan.segments}
        inside = {id(op) for seg in plan.segments for op in seg.ops}
        after = self._uncaptured_after(trace, plan)
        ops: list[BoundOp] = []
        for op in trace.ops:
            if op.target is DELETE or (id(op) in inside and id(op) not in first):
                continue
            seg = first.get(id(op))
            if seg is None:
                ops.append(op)
                continue
            name = f"cudagraph_segment{seg.index}"
            runner = SegmentRunner(
                name,
                segment_program(trace, seg).python_callable(),
                self._pool(seg.device),
                copy_outputs=frozenset(j for j, p in enumerate(seg.outputs) if id(p) in user),
                written=seg.written,
                max_graphs=self.max_graphs,
                where=where,
                notes=after.get(seg.index, []),
            )
            self._runners.add(runner)
            ops.append(
                BoundOp(runner, seg.inputs, outputs=seg.outputs, unpack=True, executor="cudagraphs", label=name,
                        meta=seg.ops[0].meta, subops=seg.ops)
            )
        program = insert_deletions(trace.derive("", ops=ops), name=trace.name)
        described = ", ".join(f"cudagraph_segment{s.index}: {_ops(len(s.ops))}" for s in plan.segments)
        provenance = f"plugin CUDAGraphs: {len(plan.segments)} segment(s) captured as CUDA graphs ({described})"
        if plan.uncaptured:
            provenance += f"; {_ops(len(plan.uncaptured))} not captured ({_summary(plan)})"
        return program.derive(provenance)

    @staticmethod
    def _user_outputs(trace: Trace, context: FinalContext) -> set[int]:
        """Ids of the proxies the program returns to the caller (copied out of the graph after each replay)."""
        out = trace.output if isinstance(trace.output, (tuple, list)) else (trace.output,)
        return {id(leaf) for leaf in iter_leaves(tuple(out[: context.user_outputs]))}

    @staticmethod
    def _uncaptured_after(trace: Trace, plan: SegmentPlan) -> dict[int, list[str]]:
        """Per segment index, the notes naming the uncaptured ops that run right after it."""
        reasons = {id(op): why for op, why in plan.uncaptured}
        last = {id(seg.ops[-1]): seg.index for seg in plan.segments}
        starts = {id(seg.ops[0]) for seg in plan.segments}
        notes: dict[int, list[str]] = {}
        current: int | None = None
        for op in trace.ops:
            if op.target is DELETE:
                continue
            if id(op) in starts:
                current = None
            if id(op) in last:
                current = last[id(op)]
                notes[current] = []
            elif current is not None and id(op) in reasons:
                lines = notes[current]
                outs = ", ".join(p.name for p in op.output_proxies()) or "_"
                if len(lines) < _LISTED:
                    lines.append(f"then not captured: {outs} = {op.name}: {reasons[id(op)]}")
                elif len(lines) == _LISTED:
                    lines.append("then more ops not captured (see the trace header)")
        return notes

    def _pool(self, device: torch.device) -> GraphPool:
        device = _device(device)
        pool = self._pools.get(device)
        if pool is None:
            pool = self._pools[device] = GraphPool(device)
        return pool

    # ------------------------------------------------------------------------------ reporting
    def stats(self) -> CUDAGraphStats:
        """What was captured and replayed so far, and the memory the graphs hold."""
        runners = list(self._runners)
        return CUDAGraphStats(
            segments=len(runners),
            graphs=sum(len(r.graphs) for r in runners),
            replays=sum(r.replays for r in runners),
            uncaptured_calls=sum(r.uncaptured_calls for r in runners),
            pool_bytes=sum(pool.reserved_bytes() for pool in self._pools.values()),
            static_bytes=sum(r.static_bytes() for r in runners),
            uncaptured={f"{r.__name__} of {r.where}": "; ".join(r.uncaptured_reasons) for r in runners if r.uncaptured_reasons},
        )
