"""Output layouts of fused regions: write a value in the layout its readers want.

Attention code moves heads between dimensions: the gradient of the query, say, comes out of the
backward as ``[B, n_head, T, head_size]`` and is read as ``x.transpose(1, 2).reshape(B, T, C)``, which
AOTAutograd records as ``transpose`` -> ``clone(memory_format=contiguous_format)`` -> view: one more
kernel and one more round trip through memory per tensor. When the transposed value is produced by a
fused region and read only that way, the region can store it directly in the transposed order; the
``clone`` then has nothing left to do and becomes ``aten.contiguous`` (which returns its argument
when it is already contiguous, and copies otherwise, so the result is right either way).

The forward has the mirror image: attention's output ``o`` is read as ``o.transpose(1, 2).reshape(...)``.
The flash and cuDNN kernels allocate ``o`` in the memory order of the query, so when the query is
produced by a region (RoPE) and read only by attention, the region stores it as ``[B, T, H, D]``
and the copy of ``o`` becomes free as well.
"""

from __future__ import annotations

import math

import torch

import dataclasses

from lightning_thunder.executors.triton.plan import FusionPlan
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp

__all__ = ["layout_pass", "free_clone"]

aten = torch.ops.aten


def _permutation(op: BoundOp, source: Proxy) -> list[int] | None:
    """The dims order ``op`` views ``source`` in, for a ``transpose`` or ``permute`` of it."""
    if not op.args or op.args[0] is not source or op.kwargs:
        return None
    nd = len(source.shape)
    if op.target is aten.transpose.int and len(op.args) == 3:
        a, b = (d % nd for d in op.args[1:])
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if op.target is aten.permute.default and len(op.args) == 2:
        perm = [d % nd for d in op.args[1]]
        return perm if sorted(perm) == list(range(nd)) else None
    return None


def _is_contiguous_clone(op: BoundOp, source: Proxy) -> bool:
    fmt = op.kwargs.get("memory_format", torch.contiguous_format)
    return (
        op.target is aten.clone.default
        and len(op.args) == 1
        and op.args[0] is source
        and set(op.kwargs) <= {"memory_format"}
        and fmt in (torch.contiguous_format, None)
    )


#: attention ops whose output takes the memory order of the query (argument 0)
_ATTENTION = {
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(aten, name)
}
_PASSIVE = {aten.detach.default, aten.alias.default}  # readers that do not care about the layout


def _permuted_strides(shape: tuple[int, ...], perm: list[int]) -> tuple[int, ...]:
    """Strides of a tensor of ``shape`` whose view ``permute(perm)`` is contiguous."""
    permuted = [shape[d] for d in perm]
    stride = [0] * len(shape)
    for i, d in enumerate(perm):
        stride[d] = math.prod(permuted[i + 1 :])
    return tuple(stride)


def _permuted_clones(
    view: BoundOp, source: Proxy, readers: dict[int, list[BoundOp]], graph_outputs: set[int]
) -> tuple[list[int], list[BoundOp]] | None:
    """``(perm, clones)`` when ``view`` is a transpose/permute of ``source`` whose result is read only by
    contiguous clones (and is no graph output)."""
    perm = _permutation(view, source)
    z = view.outputs[0]
    if perm is None or z is None or id(z) in graph_outputs:
        return None
    clones = readers[id(z)]
    if not clones or not all(_is_contiguous_clone(c, z) for c in clones):
        return None
    return perm, clones


def _head_merging_clones(o: Proxy, readers: dict[int, list[BoundOp]], graph_outputs: set[int]) -> list[BoundOp] | None:
    """The contiguous clones of ``o.transpose(1, 2)`` when that is all that reads ``o`` (besides detach)."""
    clones: list[BoundOp] = []
    for r in readers[id(o)]:
        if r.target in _PASSIVE:
            continue
        found = _permuted_clones(r, o, readers, graph_outputs)
        if found is None or found[0] != [0, 2, 1, 3]:
            return None
        clones += found[1]
    return clones or None


def layout_pass(plan: FusionPlan) -> FusionPlan:
    """Give region outputs that are only read as ``clone(permute(y))`` the permuted layout (``Output.strides``),
    and mark those clones freed (``FusionPlan.freed``: they become :func:`free_clone`)."""
    trace = plan.trace
    readers = trace.readers()
    graph_outputs = {id(p) for p in trace.output_proxies()}
    freed: set[int] = set(plan.freed)
    regions = []
    for region in plan.regions:
        outputs = []
        for out in region.outputs:
            y = out.proxy
            strides = out.strides
            if strides is None and out.partial_of is None:
                strides = _reader_layout(y, readers, graph_outputs, freed)
            outputs.append(out if strides is out.strides else dataclasses.replace(out, strides=strides))
        changed = any(a is not b for a, b in zip(outputs, region.outputs))
        regions.append(region.replace(outputs=outputs) if changed else region)
    if len(freed) == len(plan.freed):
        return plan
    return plan.replace(regions=regions, freed=frozenset(freed), notes=(*plan.notes, f"layout: {len(freed) - len(plan.freed)} copies freed"))


def _reader_layout(
    y: Proxy, readers: dict[int, list[BoundOp]], graph_outputs: set[int], freed: set[int]
) -> tuple[int, ...] | None:
    """The strides ``y`` should be stored with for its readers (adding the clones that become free to ``freed``),
    or ``None`` to keep it contiguous."""
    if id(y) in graph_outputs or not y.is_tensor:
        return None
    shape = tuple(y.shape)
    if len(shape) < 2 or not all(type(d) is int for d in shape) or not y.val.is_contiguous():
        return None
    if len(readers[id(y)]) == 1:
        found = _permuted_clones(readers[id(y)][0], y, readers, graph_outputs)
        if found is not None and found[0] != list(range(len(shape))):
            perm, clones = found
            freed.update(id(c) for c in clones)
            return _permuted_strides(shape, perm)
    clones = _query_layout_clones(y, readers, graph_outputs)
    if clones:
        freed.update(id(c) for c in clones)
        return _permuted_strides(shape, [0, 2, 1, 3])
    return None


def _query_layout_clones(y: Proxy, readers: dict[int, list[BoundOp]], graph_outputs: set[int]) -> list[BoundOp] | None:
    """For a 4-D contiguous ``y`` read only as the query of attention ops whose outputs are read only as
    ``o.transpose(1, 2)`` + contiguous clone: those clones (they become free once ``y`` is ``[B, T, H, D]``)."""
    if not y.is_tensor or y.val.dim() != 4 or not y.val.is_contiguous() or not all(type(d) is int for d in y.shape):
        return None
    clones: list[BoundOp] = []
    for r in readers[id(y)]:
        if r.target not in _ATTENTION or r.args[0] is not y or any(a is y for a in r.args[1:]) or r.outputs[0] is None:
            return None
        o = r.outputs[0]
        if not o.is_tensor or tuple(o.shape) != tuple(y.shape):
            return None
        found = _head_merging_clones(o, readers, graph_outputs)
        if found is None:
            return None
        clones += found
    return clones or None


def free_clone(op: BoundOp) -> BoundOp:
    """``clone(x, memory_format=contiguous_format)`` -> ``contiguous(x)`` (no copy when ``x`` is contiguous)."""
    return op.replace(target=aten.contiguous.default, kwargs={})
