"""Which ops of an executable trace a CUDA graph can capture, and the runs of them that are captured (segments).

A CUDA graph records the kernels a stretch of the program launches and replays them later at the same addresses,
without running the Python that launched them. An op cannot be recorded when its result depends on the host
seeing data (``.item()``, an output whose size depends on the values), when it works on CPU tensors (a captured
kernel would keep reading the value the host had at capture), when it is a collective (every rank would have
to replay in lockstep), or when it draws from an explicitly passed ``torch.Generator`` (only the default CUDA
generator is advanced by a replay). Such an op ends a segment; it runs uncaptured, between two segments, every
call. :func:`capture_blocker` gives the reason for one op, :func:`plan_segments` cuts a trace into segments.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_thunder.trace.proxy import ConstRef, Proxy
from lightning_thunder.trace.trace import DELETE, BoundOp, Trace
from lightning_thunder.trace.tree import iter_leaves

__all__ = ["CAPTURE_DEVICES", "SYNCS_INSIDE", "Segment", "SegmentPlan", "capture_blocker", "launches_kernels", "plan_segments", "segment_program"]

#: ATen ops whose result the host reads (a synchronization), beyond those PyTorch tags ``data_dependent_output``.
HOST_READS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "tolist"})


def _embedding_backward_sorts(op: BoundOp) -> bool:
    # PyTorch's CUDA kernel sorts the indices, reading their count on the host, above 3072 of them (or when scaling
    # by frequency); the Fusion plugin's Triton kernel (a different target) does not.
    indices = op.args[1].val if len(op.args) > 1 and isinstance(op.args[1], Proxy) else None
    scale_by_freq = op.args[4] if len(op.args) > 4 else op.kwargs.get("scale_grad_by_freq", False)
    n = indices.numel() if isinstance(indices, torch.Tensor) else None
    return not isinstance(n, int) or n > 3072 or bool(scale_by_freq)


#: ATen ops whose CUDA kernels read device data on the host internally (their schemas do not say so), with the
#: condition under which they do (``None``: always).
SYNCS_INSIDE: dict[str, Any] = {
    "embedding_dense_backward": _embedding_backward_sorts,
    "_embedding_bag_backward": None,
    "_embedding_bag_dense_backward": None,
    "_ctc_loss": None,
    "_ctc_loss_backward": None,
}
#: Operator namespaces of collectives (functional and in-place c10d, DTensor's redistribution).
COLLECTIVE_NAMESPACES = frozenset({"_c10d_functional", "c10d_functional", "c10d", "_dtensor"})
_NUMBERS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)
#: Device types whose kernels a graph captures (tests add "cpu" to run the runtime with an emulated graph).
CAPTURE_DEVICES: tuple[str, ...] = ("cuda",)


@dataclass(frozen=True)
class Segment:
    """A run of consecutive capturable ops of a trace, captured as one CUDA graph.

    Attributes:
        index: position among the trace's segments (the op is named ``cudagraph_segment<index>``).
        ops: the ops, in trace order.
        inputs: the values the ops read that are made before the segment (trace inputs, earlier ops' outputs).
        outputs: the values the ops make that are read after the segment or returned by the trace.
        device: the CUDA device all its tensors are on.
        written: positions in ``inputs`` whose memory the segment writes into (input mutations).
    """

    index: int
    ops: tuple[BoundOp, ...]
    inputs: tuple[Proxy, ...]
    outputs: tuple[Proxy, ...]
    device: torch.device
    written: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SegmentPlan:
    """How a trace splits: its segments, and every op left uncaptured with the reason."""

    segments: tuple[Segment, ...]
    uncaptured: tuple[tuple[BoundOp, str], ...]

    def reasons(self) -> dict[str, int]:
        """Reason -> number of ops left uncaptured for it."""
        counts: dict[str, int] = {}
        for _, why in self.uncaptured:
            counts[why] = counts.get(why, 0) + 1
        return counts


def _value(leaf: Any, constants: Mapping[str, Any]) -> Any:
    if isinstance(leaf, Proxy):
        return leaf.val
    if isinstance(leaf, ConstRef):
        return constants.get(leaf.name)
    return leaf


def _tensors(op: BoundOp, constants: Mapping[str, Any]) -> list[Any]:
    values = [_value(leaf, constants) for leaf in iter_leaves((op.args, op.kwargs))]
    values += [p.val for p in op.output_proxies()]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _schema_name(target: Any) -> tuple[str, str] | None:
    """``(namespace, name)`` of an ATen-style operator overload (``("aten", "nonzero")``), else ``None``."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    namespace, _, name = target._schema.name.partition("::")
    return namespace, name


def _unbacked(value: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    try:
        return bool(free_unbacked_symbols(value))
    except Exception:  # noqa: BLE001 - an example value it cannot read has no symbols we know of
        return False


def capture_blocker(op: BoundOp, constants: Mapping[str, Any] | None = None, skip: Collection[Any] = ()) -> str | None:
    """Why ``op`` cannot be captured in a CUDA graph, or ``None`` when it can.

    Args:
        op: an op of an executable (post-autograd) trace.
        constants: the trace's constants (tensors an op refers to by name).
        skip: op targets the user asked never to capture (:class:`~lightning_thunder.plugins.CUDAGraphs` ``skip_ops``).
    """
    constants = constants or {}
    target = op.target
    if skip:
        try:
            if target in skip or getattr(target, "overloadpacket", None) in skip:
                return "listed in CUDAGraphs(skip_ops=...)"
        except TypeError:  # an unhashable target is in no skip list
            pass
    declared = getattr(target, "cudagraph_unsafe", None)
    if isinstance(declared, str) and declared:
        return declared
    name = _schema_name(target)
    if name is not None:
        namespace, opname = name
        if namespace in COLLECTIVE_NAMESPACES:
            return "a collective (every rank would have to replay its graph in lockstep)"
        if opname in HOST_READS or torch.Tag.data_dependent_output in target.tags:
            return "the host reads a tensor's value (a synchronization, e.g. .item())"
        if opname in SYNCS_INSIDE and (SYNCS_INSIDE[opname] is None or SYNCS_INSIDE[opname](op)):
            return "its CUDA kernel reads device data on the host (a synchronization)"
    for leaf in iter_leaves((op.args, op.kwargs)):
        if isinstance(leaf, torch.Generator):
            return "draws from an explicit torch.Generator (a replay advances only the default CUDA generator)"
    read = [p.val for p in op.input_proxies()]
    if any(isinstance(v, _NUMBERS) and _unbacked(v) for v in read):
        return "takes a number the host read from the device (a replay would reuse the captured one)"
    if any(_unbacked(v) for v in read + [p.val for p in op.output_proxies()]):
        return "a data-dependent size (the shape is known only after the host reads device data)"
    if name is not None and torch.Tag.dynamic_output_shape in target.tags:
        if any(p.val is None for p in op.output_proxies()):
            return "an output whose size may depend on the data, and no example value says otherwise"
    for t in _tensors(op, constants):
        if t.device.type not in CAPTURE_DEVICES:
            return f"works on {t.device.type} tensors (a graph captures CUDA kernels only)"
    for p in op.output_proxies():
        v = p.val
        if v is not None and not isinstance(v, (torch.Tensor, *_NUMBERS)):
            return f"returns a {type(v).__name__} (only tensors and numbers can be replayed)"
    return None


def _device(op: BoundOp, constants: Mapping[str, Any]) -> torch.device | None:
    for t in _tensors(op, constants):
        return t.device
    return None


def _arguments(op: BoundOp) -> list[tuple[Any, Any]]:
    """``(schema argument, value)`` pairs of an op whose target has a schema."""
    schema = op.target._schema
    pairs = []
    for i, arg in enumerate(schema.arguments):
        if i < len(op.args) and not arg.kwarg_only:
            pairs.append((arg, op.args[i]))
        elif arg.name in op.kwargs:
            pairs.append((arg, op.kwargs[arg.name]))
    return pairs


def _writes_and_aliases(op: BoundOp) -> tuple[list[Proxy], dict[int, Proxy]]:
    """The proxies ``op`` writes into, and output proxy id -> the argument proxy that output is a view of."""
    written: list[Proxy] = []
    aliases: dict[int, Proxy] = {}
    if isinstance(op.target, torch._ops.OpOverload):
        by_set: dict[str, Proxy] = {}
        for arg, value in _arguments(op):
            info = arg.alias_info
            if info is None:
                continue
            leaves = [leaf for leaf in iter_leaves(value) if isinstance(leaf, Proxy)]
            if info.is_write:
                written += leaves
            for name in info.before_set:
                if leaves:
                    by_set.setdefault(name, leaves[0])
        returns = op.target._schema.returns
        outs = list(op.outputs) if op.unpack else [op.outputs[0]]
        for ret, out in zip(returns, outs):
            info = ret.alias_info
            if info is None or out is None:
                continue
            base = next((by_set[n] for n in info.before_set if n in by_set), None)
            if base is not None:
                aliases[id(out)] = base
        return written, aliases
    # A fusion region that stores outputs into slices of buffers it is passed (a cat's result, a zeroed workspace).
    slices = getattr(op.target, "slices", None)
    if isinstance(slices, dict) and isinstance(getattr(op.target, "n_inputs", None), int):
        for entry in slices.values():
            arg = op.args[entry[0]] if entry[0] < len(op.args) else None
            if isinstance(arg, Proxy):
                written.append(arg)
        passed_on = getattr(op.target, "passed_on", None)
        if isinstance(passed_on, int) and isinstance(op.args[passed_on], Proxy) and op.output_proxies():
            aliases[id(op.output_proxies()[-1])] = op.args[passed_on]
    return written, aliases


def launches_kernels(op: BoundOp) -> bool:
    """Whether ``op`` may launch GPU work: ``False`` for views (every tensor output aliases an input, nothing is
    written) and for size arithmetic (numbers out, no tensor), ``True`` otherwise."""
    written, aliases = _writes_and_aliases(op)
    if written:
        return True
    outs = op.output_proxies()
    tensors = [p for p in outs if p.is_tensor]
    if tensors:
        return not all(id(p) in aliases for p in tensors)
    return not outs or not all(isinstance(p.val, _NUMBERS) for p in outs)


def plan_segments(trace: Trace, skip: Collection[Any] = ()) -> SegmentPlan:
    """Cut ``trace`` into maximal runs of capturable ops on one CUDA device (``del`` statements ignored).

    A run is captured only if one of its ops launches GPU work (:func:`launches_kernels`): a run of views and size
    arithmetic stays as it is (reason ``"no GPU work to capture"``).
    """
    ops = [op for op in trace.ops if op.target is not DELETE]
    runs: list[tuple[list[BoundOp], torch.device | None]] = []
    uncaptured: list[tuple[BoundOp, str]] = []
    current: list[BoundOp] = []
    device: torch.device | None = None
    for op in ops:
        why = capture_blocker(op, trace.constants, skip)
        where = _device(op, trace.constants) if why is None else None
        if why is not None or (where is not None and device is not None and where != device):
            if current:
                runs.append((current, device))
            current, device = [], None
        if why is not None:
            uncaptured.append((op, why))
            continue
        current.append(op)
        device = device or where
    if current:
        runs.append((current, device))

    last_use: dict[int, int] = {}
    for i, op in enumerate(ops):
        for p in op.input_proxies():
            last_use[id(p)] = i
    returned = {id(p) for p in trace.output_proxies()}
    position = {id(op): i for i, op in enumerate(ops)}
    segments: list[Segment] = []
    for run, run_device in runs:
        if run_device is None or not any(launches_kernels(op) for op in run):
            uncaptured += [(op, "no GPU work to capture (views and size arithmetic)") for op in run]
            continue
        end = position[id(run[-1])]
        made: set[int] = set()
        inputs: dict[int, Proxy] = {}
        roots: dict[int, Proxy] = {}
        written_roots: list[Proxy] = []
        for op in run:
            for p in op.input_proxies():
                if id(p) not in made:
                    inputs.setdefault(id(p), p)
            writes, aliases = _writes_and_aliases(op)
            written_roots += [roots.get(id(p), p) for p in writes]
            for out_id, base in aliases.items():
                roots[out_id] = roots.get(id(base), base)
            made.update(id(p) for p in op.output_proxies())
        outputs = tuple(
            p for op in run for p in op.output_proxies() if id(p) in returned or last_use.get(id(p), -1) > end
        )
        order = list(inputs.values())
        written = frozenset(order.index(p) for p in written_roots if id(p) in inputs)
        segments.append(Segment(len(segments), tuple(run), tuple(order), outputs, run_device, written))
    uncaptured.sort(key=lambda item: position[id(item[0])])
    return SegmentPlan(tuple(segments), tuple(uncaptured))


def segment_program(trace: Trace, segment: Segment) -> Trace:
    """The segment as a program of its own: its inputs in, its outputs (a tuple) out, ``del`` statements inserted."""
    from lightning_thunder.passes import insert_deletions

    name = f"cudagraph_segment{segment.index}"
    program = Trace(
        f"{trace.name.split('/')[0]}/{name}",
        segment.inputs,
        segment.ops,
        tuple(segment.outputs),
        provenance="CUDAGraphs: the ops one CUDA graph captures",
        fn_name=name,
        constants=trace.constants,
    )
    return insert_deletions(program, name=program.name)
