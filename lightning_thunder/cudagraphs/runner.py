"""Replaying a segment of a program as a CUDA graph: static inputs and outputs, one memory pool per device.

:class:`SegmentRunner` is the callable a ``cudagraph_segment<k>`` op of a trace runs. On a call whose inputs no
captured graph accepts, it captures one (after a warm-up run on the pool's stream), up to ``max_graphs``; on
later calls it replays a graph that accepts them:

- *static* inputs are used where they are: parameters and buffers (Dynamo marks them, as it does tensors passed to
  ``torch._dynamo.mark_static_address``) and outputs of graphs of the same pool (their memory never moves). A graph
  accepts a call only if each static input is at the address it was captured with. A parameter whose memory moves
  between calls (FSDP gathers parameters into new memory) is copied from then on instead;
- other tensor inputs are copied into buffers the graph reads (and copied back after the replay when the segment
  writes into them); numbers must equal the captured ones;
- outputs the caller receives (the loss, gradients) are copied out of the graph's memory into new tensors, so the
  next replay never changes a tensor the caller holds. Values saved for the backward and values read later in the
  same program are handed out where the graph wrote them, not copied; the graph is then *in use* until every
  tensor handed out is gone (AOTAutograd frees saved values when the backward ran). A graph in use is not
  replayed: another graph is captured for the call (two forwards before one backward, the blocks of a model that
  share one compiled block) or, beyond ``max_graphs``, the segment runs uncaptured, with a warning;
- an output that is a view of an input is returned as the same view of the caller's tensor.

All graphs one :class:`GraphPool` holds share its memory pool (like torch.compile's CUDA graph trees): the
intermediate values of a forward and of its backward use the same memory. A graph's outputs stay reserved for it,
but a graph captured later may have put its outputs where an earlier graph keeps intermediate values, so a graph
is replayed only while no graph captured after it is in use (:meth:`GraphPool.may_replay`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CUDAGraphsWarning", "CapturedGraph", "GraphCaptureError", "GraphPool", "SegmentRunner", "capture_cuda_graph"]


class CUDAGraphsWarning(UserWarning):
    """A segment runs uncaptured (capture failed, or more graphs would be needed than allowed), or the plugin has
    nothing to capture (a CPU model)."""


class GraphCaptureError(RuntimeError):
    """Recording a segment failed (an op synchronized with the host during the capture, say); the segment then runs
    uncaptured. Errors of the warm-up run are the program's own and are raised as they are."""


def _use_count(cdata: int) -> int:
    return torch._C._storage_Use_Count(cdata)


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its elements without gaps or overlaps (then ``empty_like`` keeps its strides)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _marked_static(t: torch.Tensor) -> bool:
    """A parameter, a buffer Dynamo lifted, or a tensor passed to ``torch._dynamo.mark_static_address``."""
    return isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None


class GraphPool:
    """The memory pool, capture stream and capture order of the graphs one plugin captures on one device.

    Args:
        device: the CUDA device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle: Any = None  # torch.cuda.graph_pool_handle(), made at the first capture
        self.stream: Any = None  # the one stream every capture into the pool uses (the allocator ties blocks to it)
        self.captured = 0
        self.stable: set[int] = set()  # storage addresses that never move: graphs' outputs and static inputs
        self._busy: list[CapturedGraph] = []

    def next_position(self) -> int:
        """The capture order of the next graph."""
        self.captured += 1
        return self.captured - 1

    def handed_out(self, graph: CapturedGraph) -> None:
        """``graph`` handed out tensors that may still be in use."""
        if not graph.busy:
            graph.busy = True
            self._busy.append(graph)

    def may_replay(self, graph: CapturedGraph) -> bool:
        """Whether replaying ``graph`` leaves every tensor in use intact: neither its own outputs nor those of a
        graph captured after it are still in use."""
        for other in list(self._busy):
            if other.position < graph.position:
                continue
            if other.in_use():
                return False
            other.busy = False
            self._busy.remove(other)
        return True

    def reserved_bytes(self) -> int:
        """Bytes of device memory the pool holds (its segments in the caching allocator; 0 before a capture)."""
        if self.handle is None or not torch.cuda.is_available():
            return 0
        handle = tuple(self.handle)
        return sum(
            seg.get("total_size", 0)
            for seg in torch.cuda.memory_snapshot()
            if tuple(seg.get("segment_pool_id", ()) or ()) == handle
        )


def capture_cuda_graph(
    pool: GraphPool, fn: Callable, warm_inputs: Sequence[Any], inputs: Sequence[Any]
) -> tuple[Any, Sequence[Any]]:
    """Warm ``fn`` up on the pool's stream with ``warm_inputs``, then capture ``fn(*inputs)`` into the pool.

    The warm-up does what must not happen during a capture (Triton compiling and autotuning, cuBLAS choosing
    algorithms); the CUDA random state is restored afterwards, so the first replay draws what an uncaptured call
    would. cuBLAS workspaces are released before and after the capture (as torch.compile's CUDA graph trees do),
    so the workspace a captured matmul uses lives in the pool, not in memory cuBLAS may later hand elsewhere.
    Returns the graph and the outputs it writes (its static outputs).
    """
    device = pool.device
    with torch.cuda.device(device):
        if pool.handle is None:
            pool.handle = torch.cuda.graph_pool_handle()
            pool.stream = torch.cuda.Stream(device)
        stream = pool.stream
        rng = torch.cuda.get_rng_state(device)
        try:
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                warm = fn(*warm_inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            del warm
            graph = torch.cuda.CUDAGraph()
            torch._C._cuda_clearCublasWorkspaces()
            caller_stream = torch.cuda.current_stream(device)
            try:
                with torch.cuda.graph(graph, pool=pool.handle, stream=stream, capture_error_mode="thread_local"):
                    outputs = fn(*inputs)
            except Exception as e:
                # torch.cuda.graph leaves its stream current when ending the capture raises: restore the caller's.
                torch.cuda.set_stream(caller_stream)
                _end_generator_capture(pool, stream, caller_stream)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise GraphCaptureError(f"{type(e).__name__}: {first[:200]}") from e
            finally:
                torch._C._cuda_clearCublasWorkspaces()
        finally:
            torch.cuda.set_rng_state(rng, device)
    return graph, outputs


def _end_generator_capture(pool: GraphPool, stream: torch.cuda.Stream, caller_stream: torch.cuda.Stream) -> None:
    """After a capture that failed, run an empty one: a capture's end is where CUDA's random generators leave
    capture mode, and a failed end skips it, so the next random op outside any graph would raise ("Offset increment
    outside graph capture"). The empty capture begins and ends cleanly and puts them back."""
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph(), pool=pool.handle, stream=stream, capture_error_mode="thread_local"):
            pass
    except Exception:  # noqa: BLE001 - best effort: the original capture error is what the caller reports
        torch.cuda.set_stream(caller_stream)


# How each output of a graph reaches the caller.
_VALUE, _COPY, _COPY_STORAGE, _ALIAS, _INPUT_VIEW = range(5)


@dataclass
class CapturedGraph:
    """One captured graph of a segment and what its replays need (see the module docstring).

    Attributes:
        position: capture order in its pool.
        graph: the ``torch.cuda.CUDAGraph``.
        static: ``(input position, address)`` of each input used where it is.
        copied: input positions copied into :attr:`buffers` before each replay.
        shapes: the shape of each copied input (a call with other shapes is not accepted).
        values: ``(input position, value)`` of each non-tensor input.
        write_back: ``(input position, buffer)`` copied back into the caller's tensor after each replay.
        outputs: the static outputs (held for the graph's lifetime).
        plan: per output, how it reaches the caller (``(kind, ...)``).
        sources: the tensors copied out after each replay (outputs, or byte views of their storage).
        tracked: ``(storage handle, use count when nothing is handed out)`` of the memory handed out.
    """

    position: int
    graph: Any
    static: list[tuple[int, int]]
    copied: list[int]
    buffers: list[torch.Tensor]
    shapes: list[tuple[int, ...]]
    values: list[tuple[int, Any]]
    write_back: list[tuple[int, torch.Tensor]]
    outputs: list[Any]
    plan: list[tuple]
    sources: list[torch.Tensor]
    tracked: list[tuple[int, int]] = field(default_factory=list)
    static_refs: list[tuple[int, Any]] = field(default_factory=list)  # (position, weak reference) of static inputs
    view_strides: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # inputs an output is a view of
    busy: bool = False

    def accepts(self, args: Sequence[Any]) -> bool:
        """Whether a call with ``args`` can replay this graph."""
        for i, ptr in self.static:
            if args[i].data_ptr() != ptr:
                return False
        for i, shape in zip(self.copied, self.shapes):
            if args[i].shape != shape:
                return False
        for i, value in self.values:
            if type(args[i]) is not type(value) or args[i] != value:
                return False
        for i, stride in self.view_strides:
            if args[i].stride() != stride:
                return False
        return True

    def in_use(self) -> bool:
        """Whether a tensor this graph handed out still exists."""
        count = torch._C._storage_Use_Count
        for cdata, base in self.tracked:
            if count(cdata) > base:
                return True
        return False

    def replay(self, args: Sequence[Any], pool: GraphPool) -> tuple:
        """Copy the inputs in, replay, copy back what the graph wrote into copied inputs, hand the outputs out."""
        if len(self.buffers) == 1:
            self.buffers[0].copy_(args[self.copied[0]])
        elif self.buffers:
            torch._foreach_copy_(self.buffers, [args[i] for i in self.copied])
        self.graph.replay()
        for i, buffer in self.write_back:
            args[i].copy_(buffer)
        fresh: list[torch.Tensor] = []
        if self.sources:
            fresh = [torch.empty_like(s) for s in self.sources]
            if len(fresh) == 1:
                fresh[0].copy_(self.sources[0])
            else:
                torch._foreach_copy_(fresh, self.sources)
        out: list[Any] = []
        outputs = self.outputs
        for entry in self.plan:  # (kind, ...): see _output_plan
            kind = entry[0]
            if kind == _ALIAS:
                out.append(outputs[entry[1]].detach())
            elif kind == _COPY:
                out.append(fresh[entry[1]])
            elif kind == _VALUE:
                out.append(entry[1])
            elif kind == _COPY_STORAGE:
                _, k, dtype, size, stride, offset = entry
                src = fresh[k]
                out.append(torch.empty(0, dtype=dtype, device=src.device).set_(src.untyped_storage(), offset, size, stride))
            else:  # _INPUT_VIEW
                _, i, size, stride, offset, _ = entry
                arg = args[i]
                out.append(arg.as_strided(size, stride, arg.storage_offset() + offset))
        if self.tracked:
            pool.handed_out(self)
        return tuple(out)


class SegmentRunner:
    """The callable of one ``cudagraph_segment<k>`` op (see the module docstring).

    Args:
        name: the segment's name (``cudagraph_segment0``), for messages.
        fn: the segment's program (runs it uncaptured).
        pool: the pool its graphs go to.
        copy_outputs: positions of the outputs that go back to the caller (copied out after each replay).
        written: input positions the segment writes into.
        max_graphs: graphs it may capture; beyond that it runs uncaptured.
        where: the graph and stage, for messages (``"graph 0 forward"``).
        notes: printed under the op in the trace.
        capture: captures a graph (default: :func:`capture_cuda_graph`).
    """

    #: A second CUDAGraphs plugin leaves segments alone (see :func:`~lightning_thunder.cudagraphs.capture_blocker`).
    cudagraph_unsafe = "already replayed as a CUDA graph (by another CUDAGraphs plugin)"

    def __init__(
        self,
        name: str,
        fn: Callable,
        pool: GraphPool,
        *,
        copy_outputs: frozenset[int],
        written: frozenset[int] = frozenset(),
        max_graphs: int = 16,
        where: str = "",
        notes: Sequence[str] = (),
        capture: Callable | None = None,
    ) -> None:
        self.__name__ = self.__qualname__ = name
        self.fn = fn
        self.pool = pool
        self.copy_outputs = copy_outputs
        self.written = written
        self.max_graphs = max_graphs
        self.where = where
        self.notes = list(notes)
        self._capture_graph = capture
        self.graphs: list[CapturedGraph] = []
        self.volatile: set[int] = set()  # static-looking inputs whose memory moves between calls: copied instead
        self.disabled: str | None = None  # why this segment runs uncaptured from now on
        self.uncaptured_reasons: list[str] = []  # why calls ran uncaptured (each reason once)
        self.replays = 0
        self.uncaptured_calls = 0

    def __repr__(self) -> str:
        return f"SegmentRunner({self.__name__}, {len(self.graphs)} graphs)"

    def __call__(self, *args: Any) -> tuple:
        # The earliest graph that fits: a graph captured later than one in use may not replay, so calls made while
        # earlier outputs are in use (several forwards before their backwards) take the graphs in capture order.
        for graph in self.graphs:
            if graph.accepts(args) and self.pool.may_replay(graph):
                self.replays += 1
                return graph.replay(args, self.pool)
        graph = self._capture(args) if self._may_capture() else None
        if graph is None:
            self.uncaptured_calls += 1
            return tuple(self.fn(*args))
        self.replays += 1
        return graph.replay(args, self.pool)

    # ------------------------------------------------------------------------------ capturing
    def _may_capture(self) -> bool:
        """Whether a new graph may be captured now; if not, warns (once) why the call runs uncaptured."""
        if self.disabled is not None:
            return False
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self._warn("the caller is capturing a CUDA graph itself: this segment runs inside that capture")
            return False
        if len(self.graphs) >= self.max_graphs:
            self._warn(
                f"it would need more than max_graphs={self.max_graphs} captured graphs (new input addresses or "
                "shapes, or its outputs still in use: e.g. several forwards before their backward); raise "
                "CUDAGraphs(max_graphs=...) if this is expected"
            )
            return False
        return True

    def _capture(self, args: Sequence[Any]) -> CapturedGraph | None:
        self._find_volatile(args)
        pool = self.pool
        inputs: list[Any] = []
        warm_inputs: list[Any] = []
        static, copied, buffers, shapes, values, refs = [], [], [], [], [], []
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                values.append((i, a))
                inputs.append(a)
                warm_inputs.append(a)
            elif i not in self.volatile and (_marked_static(a) or _storage_ptr(a) in pool.stable):
                static.append((i, a.data_ptr()))
                refs.append((i, weakref.ref(a)))
                inputs.append(a)
                warm_inputs.append(a.clone() if i in self.written else a)  # the warm-up must not change it
            else:
                # An expanded (overlapping) input gets a dense buffer of its values: a copy cannot write into overlaps.
                if _dense(a):
                    buffer = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device=a.device)
                else:
                    buffer = torch.empty(a.size(), dtype=a.dtype, device=a.device)
                buffer.copy_(a)
                copied.append(i)
                buffers.append(buffer)
                shapes.append(a.shape)
                inputs.append(buffer)
                warm_inputs.append(buffer)
        try:
            capture = self._capture_graph or capture_cuda_graph
            graph, outputs = capture(pool, self.fn, warm_inputs, inputs)
        except GraphCaptureError as e:  # an op that cannot be captured: run uncaptured from now on, and say why
            self.disabled = f"capturing it failed ({e})"
            self._warn(self.disabled + "; if an op synchronizes with the host, list it in CUDAGraphs(skip_ops=[...])")
            return None
        del warm_inputs
        outputs = list(outputs)
        inputs_by_storage = {_storage_ptr(t): i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)}
        plan, sources, handed = self._output_plan(outputs, inputs, args, inputs_by_storage)
        captured = CapturedGraph(
            position=pool.next_position(),
            graph=graph,
            static=static,
            copied=copied,
            buffers=buffers,
            shapes=shapes,
            values=values,
            write_back=[(i, b) for i, b in zip(copied, buffers) if i in self.written],
            outputs=outputs,
            plan=plan,
            sources=sources,
            static_refs=refs,
        )
        captured.view_strides = [(p[1], p[5]) for p in plan if p[0] == _INPUT_VIEW]
        del inputs, inputs_by_storage
        # What counts as "nothing handed out": the references the graph itself holds (outputs, views for copying).
        captured.tracked = [(cdata, _use_count(cdata)) for cdata in handed]
        pool.stable.update(_storage_ptr(args[i]) for i, _ in static)
        pool.stable.update(_storage_ptr(o) for o, p in zip(outputs, plan) if p[0] in (_COPY, _COPY_STORAGE, _ALIAS))
        self.graphs.append(captured)
        return captured

    def _output_plan(
        self, outputs: list[Any], inputs: list[Any], args: Sequence[Any], inputs_by_storage: dict[int, int]
    ) -> tuple[list[tuple], list[torch.Tensor], list[int]]:
        """How each output reaches the caller, the tensors copied out, and the storages handed out."""
        plan: list[tuple] = []
        sources: list[torch.Tensor] = []
        source_of: dict[int, int] = {}
        handed: dict[int, int] = {}
        copied_storages = [
            _storage_ptr(o) for j, o in enumerate(outputs) if j in self.copy_outputs and isinstance(o, torch.Tensor)
        ]
        for j, o in enumerate(outputs):
            if not isinstance(o, torch.Tensor):
                plan.append((_VALUE, o))
                continue
            ptr = _storage_ptr(o)
            i = inputs_by_storage.get(ptr)
            if i is not None and inputs[i].stride() == args[i].stride():
                # a view of an input (of its buffer, laid out like the caller's tensor): the same view of the caller's
                base = inputs[i]
                plan.append((_INPUT_VIEW, i, o.size(), o.stride(), o.storage_offset() - base.storage_offset(), base.stride()))
                continue
            if j not in self.copy_outputs:
                storage = o.untyped_storage()
                handed.setdefault(ptr, storage._cdata)
                plan.append((_ALIAS, j))
                continue
            whole = _dense(o) and o.storage_offset() == 0 and storage_nbytes(o) == o.numel() * o.element_size()
            if whole and copied_storages.count(ptr) == 1:
                plan.append((_COPY, len(sources)))
                sources.append(o)
                continue
            if ptr not in source_of:
                source_of[ptr] = len(sources)
                sources.append(torch.empty(0, dtype=torch.uint8, device=o.device).set_(o.untyped_storage()))
            plan.append((_COPY_STORAGE, source_of[ptr], o.dtype, o.size(), o.stride(), o.storage_offset()))
        return plan, sources, list(handed.values())

    def _find_volatile(self, args: Sequence[Any]) -> None:
        """Inputs that are the same tensor as when a graph was captured, at another address: copy them from now on."""
        for graph in self.graphs:
            for (i, ptr), (_, ref) in zip(graph.static, graph.static_refs):
                a = args[i]
                if ref() is a and a.data_ptr() != ptr:
                    self.volatile.add(i)

    def _warn(self, why: str) -> None:
        if why in self.uncaptured_reasons:
            return
        self.uncaptured_reasons.append(why)
        warnings.warn(
            f"CUDAGraphs: {self.__name__} of {self.where} runs uncaptured: {why}", CUDAGraphsWarning, stacklevel=3
        )

    def static_bytes(self) -> int:
        """Bytes held by its graphs' inputs buffers and outputs (whether in the pool or not)."""
        seen: set[int] = set()
        total = 0
        for graph in self.graphs:
            for t in [*graph.buffers, *graph.outputs]:
                if isinstance(t, torch.Tensor) and _storage_ptr(t) not in seen:
                    seen.add(_storage_ptr(t))
                    total += storage_nbytes(t)
        return total


def storage_nbytes(t: torch.Tensor) -> int:
    """The bytes of ``t``'s storage."""
    return t.untyped_storage().nbytes()
