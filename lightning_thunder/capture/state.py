"""What a compiled module or function remembers: one record per compiled graph, and statistics."""

from __future__ import annotations

import itertools
import weakref
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from lightning_thunder.trace.trace import DELETE, Trace

__all__ = ["GraphRecord", "CompileState", "CompileStats", "current_state", "final_trace"]

_SEQUENCE = itertools.count()

#: The state of the compiled callable whose call is running (compiles triggered by it are recorded there).
_CURRENT: ContextVar[CompileState | None] = ContextVar("lightning_thunder_current_state", default=None)


def current_state() -> CompileState | None:
    """The :class:`CompileState` of the compiled module or function being called, if any."""
    return _CURRENT.get()


@dataclass
class GraphRecord:
    """The traces of one captured graph (Dynamo compiles one per graph break and per recompile).

    Attributes:
        index: position among the graphs compiled for this module/function.
        sequence: process-wide compile order (to find the most recent graph across modules).
        frame_id: Dynamo's id of the Python frame (function) the graph was captured from.
        torch_traces: the torch-level trace and one per pre-autograd plugin.
        forward_traces: the forward after autograd, then one per post-autograd pass, ending with the
            final executable trace.
        backward_traces: likewise for the backward (empty for inference graphs; the final stages
            appear once the first backward has run, since AOTAutograd compiles it lazily).
        inference: whether the graph was compiled without autograd.
        compile_time_s: time spent in our backend for this graph (forward and backward).
        recompile_reason: why Dynamo recompiled, when this graph is a recompile.
        user_outputs: how many leading outputs of the training forward go to the caller (the rest are saved
            for the backward); ``None`` before partitioning and for inference graphs.
    """

    index: int
    sequence: int = 0
    frame_id: int | None = None
    torch_traces: list[Trace] = field(default_factory=list)
    forward_traces: list[Trace] = field(default_factory=list)
    backward_traces: list[Trace] = field(default_factory=list)
    inference: bool = False
    compile_time_s: float = 0.0
    recompile_reason: str | None = None
    user_outputs: int | None = None

    def final_traces(self) -> list[Trace]:
        """The final forward and backward traces compiled so far (see :func:`final_trace`)."""
        return [t for t in (final_trace(self.forward_traces), final_trace(self.backward_traces)) if t is not None]


def final_trace(traces: list[Trace]) -> Trace | None:
    """The ``"<stage>/final"`` trace of a stage's history: every op claimed by an executor, ``del`` statements
    inserted. It is the last trace, or comes just before the stages a plugin's ``transform_final`` added (which
    run it in another form: ``CUDAGraphs`` replays runs of its ops as CUDA graphs). ``None`` until compiled."""
    return next((t for t in reversed(traces) if t.name.endswith("/final")), None)


@dataclass
class CompileStats:
    """Statistics of a compiled module or function (see :func:`lightning_thunder.compile_stats`).

    Attributes:
        compile_time_s: wall time of the calls that compiled something (Dynamo capture, AOTAutograd,
            our passes, and that call's own execution), plus backward compilation.
        graphs: number of graphs compiled (each graph break and recompile adds one).
        graph_breaks: the reasons Dynamo gave for each graph break.
        recompiles: the reasons for each recompilation (guard failures).
        fusion_regions: regions run by a fused kernel in the final traces.
        executor_counts: executor name -> number of ops it runs in the final traces (ops of a fused
            region count individually).
    """

    compile_time_s: float
    graphs: int
    graph_breaks: list[str]
    recompiles: list[str]
    fusion_regions: int
    executor_counts: dict[str, int]


class CompileState:
    """What one compiled module or function has compiled, and its statistics.

    Args:
        label: what was compiled (the module class or function name), used to find the graphs that
            another compiled instance of the same class compiled and this one reuses.
    """

    def __init__(self, label: str = "", module: Any = None) -> None:
        self.label = label
        self._module_ref = weakref.ref(module) if module is not None else None
        self.records: list[GraphRecord] = []
        self.graph_breaks: list[str] = []
        self.recompiles: list[str] = []
        self.call_compile_time_s = 0.0
        self.backward_compile_time_s = 0.0
        self.in_call = 0  # > 0 while a call of the compiled callable runs (its time already counts)
        self.calls = 0

    def new_record(self, frame_id: int | None = None) -> GraphRecord:
        """Start the record of a newly captured graph."""
        record = GraphRecord(index=len(self.records), sequence=next(_SEQUENCE), frame_id=frame_id)
        self.records.append(record)
        return record

    def tensor_names(self) -> dict[int, str]:
        """``id(tensor) -> name`` for the compiled module's parameters and buffers (``fc1.weight`` ->
        ``fc1_weight``), so traces call them by the names users know."""
        module = self._module_ref() if self._module_ref is not None else None
        if module is None:
            return {}
        names: dict[int, str] = {}
        for qualname, tensor in [*module.named_parameters(), *module.named_buffers()]:
            name = qualname.replace(".", "_")
            names.setdefault(id(tensor), name if name[0].isalpha() else "_" + name)
        return names

    def argument_names(self) -> dict[str, str]:
        """Dynamo's names for the call's arguments (``args_0``, ``kwargs_mask``) -> the names of the
        module's ``forward`` parameters (``x``, ``mask``)."""
        import inspect

        module = self._module_ref() if self._module_ref is not None else None
        if module is None:
            return {}
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            return {}
        names = {}
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for i, name in enumerate(positional):
            names[f"args_{i}"] = name
        for p in params:
            if p.kind is not p.VAR_POSITIONAL and p.kind is not p.VAR_KEYWORD:
                names[f"kwargs_{p.name}"] = p.name
        return names

    def discard(self, record: GraphRecord) -> None:
        """Forget a record whose compilation did not complete (Dynamo will restart or fail)."""
        if record in self.records:
            self.records.remove(record)
            if record.recompile_reason and record.recompile_reason in self.recompiles:
                self.recompiles.remove(record.recompile_reason)

    def has_frame(self, frame_id: int | None) -> bool:
        """Whether a graph of this Dynamo frame was compiled here before (so a new one is a recompile)."""
        return frame_id is not None and any(r.frame_id == frame_id for r in self.records)

    def activate(self) -> object:
        """Make this the current state (returns a token for :meth:`deactivate`)."""
        return _CURRENT.set(self)

    @staticmethod
    def deactivate(token: object) -> None:
        """Restore the state that was current before :meth:`activate`."""
        _CURRENT.reset(token)  # type: ignore[arg-type]

    def last_record(self) -> GraphRecord | None:
        """The most recently captured graph, if any."""
        return self.records[-1] if self.records else None

    def stats(self) -> CompileStats:
        """Summarize the records."""
        counts: Counter[str] = Counter()
        regions = 0
        for record in self.records:
            for trace in record.final_traces():
                for op in trace.ops:
                    if op.target is DELETE or not op.executor:
                        continue
                    if op.subops:
                        regions += 1
                        counts[op.executor] += len(op.subops)
                    else:
                        counts[op.executor] += 1
        return CompileStats(
            compile_time_s=self.call_compile_time_s + self.backward_compile_time_s,
            graphs=len(self.records),
            graph_breaks=list(self.graph_breaks),
            recompiles=list(self.recompiles),
            fusion_regions=regions,
            executor_counts=dict(counts),
        )
