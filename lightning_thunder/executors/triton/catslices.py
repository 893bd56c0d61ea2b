"""Concatenations written in place: regions store their pieces straight into the ``cat`` result.

Attention's backward ends with the query, key and value gradients put side by side for the matmul
with the fused QKV weight::

    dqkv = cat([dq.transpose(1, 2).reshape(B, T, -1), dk..., dv...], dim=-1)

which is one more kernel reading and writing the whole gradient. When every piece is a fused region's
output read only through views on its way into the ``cat`` (or a tensor that a region with the same
rows can copy), the result is allocated up front (``aten.empty``: no kernel) and each region stores
its piece into its slice of it, through the strides that undo the views. The regions that write run
one after the other, each passing the buffer on (``buf1 = fusion3(..., buf0)``), and the last one's
output is the ``cat``'s result, so nothing reads it before every slice is written.

The ``cat_slices`` pass plans each ``cat`` on its own and applies it only once every piece has found its
writer: an abandoned plan leaves no trace in the regions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from lightning_thunder.executors.triton.kinds import FULL
from lightning_thunder.executors.triton.plan import BufferSlice, CatPlan, FusionPlan, Output, RegionPlan
from lightning_thunder.trace.proxy import Proxy, empty_example
from lightning_thunder.trace.trace import BoundOp, NameGenerator

__all__ = ["cat_slices_pass"]

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default}
_COPIES = {aten.contiguous.default, aten.clone.default}  # same values; the buffer slice replaces the copy


def _undo(op: BoundOp, x: torch.Tensor) -> torch.Tensor | None:
    """The view of ``x`` (a view of ``op``'s output's memory) that ``op``'s input occupies, or ``None``."""
    src = op.args[0]
    try:
        if op.target in _VIEWS or op.target in _COPIES:
            return x.view(tuple(src.shape))
        if op.target is aten.transpose.int:
            return x.transpose(op.args[1], op.args[2])
        if op.target is aten.permute.default:
            perm = [d % x.dim() for d in op.args[1]]
            inverse = [perm.index(i) for i in range(len(perm))]
            return x.permute(inverse)
    except (RuntimeError, IndexError, TypeError):
        return None
    return None


def _chain(piece: Proxy, producer: dict[int, BoundOp], readers: dict[int, list[BoundOp]], outputs: set[int]):
    """``(base, chain)``: follow single-reader views/copies back from ``piece``; ``chain`` is nearest first."""
    chain: list[BoundOp] = []
    p = piece
    while True:
        op = producer.get(id(p))
        if op is None or op.unpack or not op.args or not isinstance(op.args[0], Proxy):
            break
        if (
            op.target not in _VIEWS
            and op.target not in _COPIES
            and op.target not in (aten.transpose.int, aten.permute.default)
        ):
            break
        if op.target is aten.clone.default and set(op.kwargs) - {"memory_format"}:
            break
        src = op.args[0]
        if len(readers.get(id(src), [])) != 1 or id(src) in outputs:
            break
        chain.append(op)
        p = src
    return p, chain


def _depends_on(p: Proxy, targets: set[int], producer: dict[int, BoundOp], limit: int = 4000) -> bool:
    stack, seen = [p], set()
    while stack and len(seen) < limit:
        q = stack.pop()
        if id(q) in targets:
            return True
        if id(q) in seen:
            continue
        seen.add(id(q))
        op = producer.get(id(q))
        if op is not None:
            stack.extend(op.input_proxies())
    return len(seen) >= limit  # too far to tell: assume it does


def cat_slices_pass(plan: FusionPlan, names: NameGenerator) -> FusionPlan:
    """Plan the ``cat`` ops whose pieces regions can store in place (``Output.into`` a :class:`BufferSlice`,
    copies of pieces made elsewhere added to a writing region)."""
    trace = plan.trace
    producer = trace.producers()
    readers = trace.readers()
    outputs = {id(p) for p in trace.output_proxies()}
    regions = {r.index: r for r in plan.regions}
    position = {id(op): k for k, op in enumerate(trace.ops)}
    in_region = {id(op) for r in plan.regions for op in r.ops}
    cats: list[CatPlan] = list(plan.cats)
    taken: set[int] = {i for c in cats for i in c.writers}  # regions already writing into some cat's result
    for cat in trace.ops:
        if cat.target is not aten.cat.default or cat.outputs[0] is None or not cat.args or id(cat) in in_region:
            continue
        out = cat.outputs[0]
        pieces = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if not isinstance(pieces, (list, tuple)) or not out.is_tensor or out.val.dim() == 0:
            continue
        shape = tuple(out.shape)
        if not all(type(d) is int for d in shape) or dim % len(shape) != len(shape) - 1 or not out.val.is_contiguous():
            continue
        found = _plan_one(cat, len(cats), pieces, shape, producer, readers, outputs, regions, position, names, taken)
        if found is None:
            continue
        cat_plan, changed = found
        cats.append(cat_plan)
        regions.update(changed)
        taken |= set(cat_plan.writers)
    if len(cats) == len(plan.cats):
        return plan
    return plan.replace(
        regions=[regions[r.index] for r in plan.regions],
        cats=tuple(cats),
        notes=(*plan.notes, f"cat_slices: {len(cats) - len(plan.cats)} cat results written in place"),
    )


def _plan_one(cat, number, pieces, shape, producer, readers, outputs, regions, position, names, taken):
    """``(CatPlan, changed regions)`` for one ``cat`` or ``None``; nothing is changed unless every piece fits."""
    out = cat.outputs[0]
    buffer = torch.empty(shape, dtype=out.val.dtype, device="meta")
    region_of_output = {
        id(o.proxy): r for r in regions.values() for o in r.outputs if o.partial_of is None and o.into is None
    }
    found: list[tuple[Proxy, tuple, tuple, int, RegionPlan | None]] = []  # base, view shape/stride/offset, region
    removed = {id(cat)}
    offset = 0
    for piece in pieces:
        if not isinstance(piece, Proxy) or not piece.is_tensor or piece.val.dtype != out.val.dtype:
            return None
        width = int(piece.shape[-1])
        if len(readers.get(id(piece), [])) != 1 or id(piece) in outputs:
            return None
        base, chain = _chain(piece, producer, readers, outputs)
        view = buffer.narrow(-1, offset, width)
        if tuple(view.shape) != tuple(piece.shape):
            return None
        for op in chain:
            view = _undo(op, view)
            if view is None:
                return None
        if tuple(view.shape) != tuple(base.shape) or not all(type(d) is int for d in base.shape):
            return None
        if any(f[0] is base for f in found):
            return None
        region = region_of_output.get(id(base))
        if region is not None and (len(readers.get(id(base), [])) != 1 or id(base) in outputs or region.index in taken):
            region = None
        found.append((base, tuple(view.shape), tuple(view.stride()), view.storage_offset(), region))
        removed |= {id(op) for op in chain}
        offset += width
    if offset != shape[-1]:
        return None
    writers = [f[4] for f in found if f[4] is not None]
    if not writers:
        return None
    changed: dict[int, RegionPlan] = {}
    order: list[int] = []
    for base, vshape, vstride, voffset, region in found:
        into = BufferSlice(number, vshape, vstride, voffset)
        if region is None:
            # A tensor made elsewhere: copied by a region that writes another piece (it cannot depend on
            # the cat's result) with the same grid, that does not feed it and runs after it is made.
            host = _host_for(base, [changed.get(w.index, w) for w in writers], producer, position)
            if host is None:
                return None
            target = Proxy(names(f"{base.name}_copy"), empty_example(base.val, vshape, base.val.dtype))
            copy = BoundOp(aten.clone.default, (base,), {}, (target,))
            changed[host.index] = host.replace(
                ops=[*host.ops, copy],
                kinds={**host.kinds, id(target): FULL},
                widths={**host.widths, id(target): vshape[-1]},
                has_col={**host.has_col, id(copy): True},
                produced={**host.produced, id(target): target},
                inputs=host.inputs if any(p is base for p in host.inputs) else [*host.inputs, base],
                outputs=[*host.outputs, Output(target, strides=vstride, into=into)],
            )
            region = host
        else:
            region = changed.get(region.index, region)
            outs = [
                dataclasses.replace(o, strides=vstride, into=into) if o.proxy is base else o for o in region.outputs
            ]
            changed[region.index] = region.replace(outputs=outs)
        if region.index not in order:
            order.append(region.index)
    return CatPlan(cat, frozenset(removed), tuple(order)), changed


def _host_for(base: Proxy, regions: list[RegionPlan], producer: dict[int, BoundOp], position: dict[int, int]):
    """A region whose grid is ``base``'s rows x last dim and that can read ``base`` (runs after it)."""
    shape = tuple(base.shape)
    rows = math.prod(shape[:-1])
    for region in regions:
        if region.R != rows or region.N != shape[-1] or region.partial_outputs or region.device != base.device:
            continue
        if _depends_on(base, set(region.produced), producer):
            continue
        src = producer.get(id(base))
        if src is not None and position.get(id(src), -1) > min(position.get(id(op), 1 << 60) for op in region.ops):
            continue  # made after the region's first op: keep it simple, do not move the region
        return region
    return None


