"""Reading a compiled model's final traces: which graphs a training step runs, how many kernels they
launch, and how many bytes of activations they save for the backward.

A model may hold several compiled modules (regional compilation: one per transformer block, all
sharing the graphs the first block compiled). For each compiled module, the *training graphs* are the
latest forward+backward graph of each Dynamo frame (one per graph-break segment); graphs compiled for
inference (``torch.no_grad``, validation) and superseded recompiles are not part of a training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_thunder.api import last_backward_traces, last_traces
from lightning_thunder.capture.compiled import ThunderFunction, ThunderModule, compile_states, compiled_objects
from lightning_thunder.capture.state import CompileState, GraphRecord, final_trace
from lightning_thunder.trace import DELETE, Proxy, Trace
from lightning_thunder.trace.tree import iter_leaves

__all__ = [
    "TrainingGraph",
    "calls",
    "compiled_parts",
    "kernel_count",
    "model_activation_bytes",
    "saved_activation_bytes",
    "training_graphs",
]

Compiled = ThunderModule | ThunderFunction


@dataclass(frozen=True)
class TrainingGraph:
    """The executable traces of one graph a training step runs.

    Attributes:
        forward: the final forward trace; returns the user outputs, then the values saved for backward.
        backward: the final backward trace (its inputs: the saved values, then ``tangents_*``).
        parameter_names: the forward's input names that are the module's parameters and buffers.
    """

    forward: Trace
    backward: Trace
    parameter_names: frozenset[str]


def compiled_parts(model: Any) -> list[Compiled]:
    """The modules/functions compiled by lightning_thunder inside ``model`` (the model itself, the one a
    wrapper holds, or its compiled submodules); empty when there are none."""
    if model is None:
        return []
    try:
        return compiled_objects(model)
    except TypeError:
        return []


def _is_final(traces: list[Trace]) -> bool:
    return final_trace(traces) is not None


def _latest_training_records(state: CompileState) -> list[GraphRecord]:
    latest: dict[Any, GraphRecord] = {}
    for record in state.records:
        if record.inference or not _is_final(record.forward_traces) or not _is_final(record.backward_traces):
            continue
        key = (record.frame_id, record.subgraph) if record.frame_id is not None else ("graph", record.index)
        if key not in latest or record.sequence > latest[key].sequence:
            latest[key] = record
    return sorted(latest.values(), key=lambda r: r.sequence)


def training_graphs(part: Compiled, siblings: list[Compiled] | None = None) -> list[TrainingGraph]:
    """The graphs one call of ``part`` runs in a training step (empty before its first backward).

    A compiled instance that reuses the graphs another instance of its class compiled has no records of
    its own; they are looked up in ``siblings`` (the other compiled parts of the same model) by label,
    else through :func:`lightning_thunder.last_traces`.
    """
    states = compile_states(part)
    graphs: list[TrainingGraph] = []
    for state in states:
        owner = state
        if not state.records:
            owner = next(
                (s for sib in siblings or [] for s in compile_states(sib) if s.label == state.label and s.records),
                state,
            )
        names = frozenset(owner.tensor_names().values())
        for record in _latest_training_records(owner):
            graphs.append(TrainingGraph(final_trace(record.forward_traces), final_trace(record.backward_traces), names))
    if graphs or any(s.records for s in states):
        return graphs
    try:  # graphs compiled by an instance outside this model: the public API finds the latest one
        fw, bw = last_traces(part), last_backward_traces(part)
    except RuntimeError:
        return []
    if _is_final(fw) and _is_final(bw):
        names = frozenset(n for s in states for n in s.tensor_names().values())
        graphs.append(TrainingGraph(final_trace(fw), final_trace(bw), names))
    return graphs


def calls(part: Compiled) -> int:
    """How many times ``part`` has been called."""
    return sum(state.calls for state in compile_states(part))


def _is_view(target: Any) -> bool:
    return bool(getattr(target, "is_view", False))


def kernel_count(trace: Trace) -> int:
    """Kernels one run of ``trace`` launches, counted from the program: a fused region is one kernel;
    an op producing a tensor is one, unless it is a view (no kernel); ``del`` and size arithmetic are
    none. (A library call can launch more than one kernel; this is the program's count, not a
    profiler's.)"""
    count = 0
    for op in trace.ops:
        if op.target is DELETE:
            continue
        if op.subops:
            count += 1
        elif not _is_view(op.target) and any(p.is_tensor for p in op.output_proxies()):
            count += 1
    return count


def _nbytes(proxy: Proxy) -> int:
    val = proxy.val
    if not isinstance(val, torch.Tensor):
        return 0
    try:
        return int(val.numel()) * val.element_size()
    except (RuntimeError, TypeError):  # symbolic sizes (dynamic shapes) have no byte count
        return 0


def saved_activation_bytes(graph: TrainingGraph) -> int:
    """Bytes of the tensors ``graph``'s forward saves for its backward, parameters and buffers (and views
    of them, which share their memory) left out.

    Method: the backward's inputs are the saved values followed by ``tangents_*``, so the last
    ``len(backward.inputs) - #tangents`` outputs of the forward are the saved values; each counts
    ``numel × element_size`` of its example (fake) tensor. Inputs of the graph that are not parameters
    (the batch, or the activations a previous compiled block produced) count: the autograd graph keeps
    them alive for the backward.
    """
    fw, bw = graph.forward, graph.backward
    n_tangents = sum(1 for p in bw.inputs if p.name.startswith("tangents"))
    n_saved = len(bw.inputs) - n_tangents
    leaves = list(iter_leaves(fw.output))
    saved = leaves[len(leaves) - n_saved :] if n_saved else []
    aliases_of_parameters = {id(p) for p in fw.inputs if p.name in graph.parameter_names}
    for op in fw.ops:
        if _is_view(op.target) and any(id(p) in aliases_of_parameters for p in op.input_proxies()):
            aliases_of_parameters.update(id(p) for p in op.output_proxies())
    seen: set[int] = set()
    total = 0
    for value in saved:
        if isinstance(value, Proxy) and id(value) not in aliases_of_parameters and id(value) not in seen:
            seen.add(id(value))
            total += _nbytes(value)
    return total


def model_activation_bytes(model: nn.Module | None) -> int | None:
    """Bytes of activations one training step of ``model`` saves for backward, summed over its compiled
    parts and their graphs (each part counted once per call, assuming one call per step); ``None``
    when nothing in ``model`` is compiled by lightning_thunder or no backward has run yet."""
    parts = compiled_parts(model)
    per_part = [training_graphs(part, parts) for part in parts]
    if not any(per_part):
        return None
    return sum(saved_activation_bytes(g) for graphs in per_part for g in graphs)
