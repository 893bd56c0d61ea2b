"""What a compiled module or function remembers: one record per compiled graph, and statistics."""

from __future__ import annotations

import itertools
import weakref
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from lightning_thunder.trace.trace import DELETE, Trace

__all__ = ["GraphRecord", "CompileState", "CompileStats", "SharedCode", "current_state", "final_trace"]

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
        frame_compile_id: which compilation of that frame produced the graph (a recompile has a new one).
        subgraph: position among the graphs of one compilation of the frame (Dynamo's DDPOptimizer splits a
            frame's graph at DDP's bucket boundaries and compiles each piece; 0 otherwise).
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
    frame_compile_id: int | None = None
    subgraph: int = 0
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
        eager_calls: calls that ran eagerly, without lightning_thunder and its plugins, because Dynamo ran
            none of the compiled graphs and compiled no new one (its recompile limit; a warning says so).
        eager_fallbacks: why, once per distinct reason (Dynamo's limit and its last guard failure).
    """

    compile_time_s: float
    graphs: int
    graph_breaks: list[str]
    recompiles: list[str]
    fusion_regions: int
    executor_counts: dict[str, int]
    eager_calls: int = 0
    eager_fallbacks: list[str] = field(default_factory=list)


@dataclass
class SharedCode:
    """What the compiled objects calling through one Dynamo code object share (see
    :mod:`lightning_thunder.capture.frames`).

    Attributes:
        name: the code object's name, as Dynamo's messages show it.
        ran_graph: whether a compiled graph has run through it (a later call running none ran eagerly).
        limit_hits: Dynamo's recompile-limit messages for it.
    """

    name: str
    ran_graph: bool = False
    limit_hits: list[str] = field(default_factory=list)


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
        #: Graphs this object's calls ran (its own or shared with other instances of its class), by sequence.
        self.ran: dict[int, GraphRecord] = {}
        self.graph_runs = 0
        #: The code object this object is called through, shared with instances compiled with the same plugins.
        self.shared: SharedCode | None = None
        self.limit_hits: list[str] = []  # Dynamo's recompile-limit messages during this object's calls
        self.eager_calls = 0
        self.eager_fallbacks: list[str] = []
        self.hooks_since: int | None = None  # hook handle ids from here on were created after the first call
        self.hook_mark: int | None = None  # ... and when hooks were last checked (see compiled.check_hooks)
        self.warned_hooks: set[tuple[int, str, int]] = set()

    def note_run(self, record: GraphRecord) -> None:
        """A compiled graph ran during a call of this object."""
        self.graph_runs += 1
        self.ran[record.sequence] = record
        if self.shared is not None:
            self.shared.ran_graph = True

    def new_record(self, frame_id: int | None = None, frame_compile_id: int | None = None) -> GraphRecord:
        """Start the record of a newly captured graph."""
        same_compile = [
            r for r in self.records
            if frame_id is not None and r.frame_id == frame_id and r.frame_compile_id == frame_compile_id
        ]
        record = GraphRecord(
            index=len(self.records), sequence=next(_SEQUENCE), frame_id=frame_id,
            frame_compile_id=frame_compile_id, subgraph=len(same_compile),
        )
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

    def is_recompile(self, frame_id: int | None, frame_compile_id: int | None) -> bool:
        """Whether a graph of this Dynamo frame was compiled here by an earlier compilation of the frame (so this
        one is a recompile; the pieces DDPOptimizer splits one compilation into are not)."""
        same_frame = [r for r in self.records if frame_id is not None and r.frame_id == frame_id]
        return bool(same_frame) and all(r.frame_compile_id != frame_compile_id for r in same_frame)

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
            eager_calls=self.eager_calls,
            eager_fallbacks=list(self.eager_fallbacks),
        )
