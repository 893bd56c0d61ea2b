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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_thunder.executors.triton.region import FULL, Region
from lightning_thunder.executors.triton.runtime import RegionWrapper
from lightning_thunder.trace.proxy import Proxy, empty_example
from lightning_thunder.trace.trace import BoundOp, NameGenerator, Trace

__all__ = ["CatPlan", "IntoBuffer", "apply_cat_plans", "plan_cat_slices"]

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default}
_COPIES = {aten.contiguous.default, aten.clone.default}  # same values; the buffer slice replaces the copy


@dataclass
class CatPlan:
    """How one ``cat`` is replaced by writes into its result."""

    cat: BoundOp
    removed: set[int] = field(default_factory=set)  # ids of the cat and of the view chains into it
    writers: list[Region] = field(default_factory=list)  # regions storing a piece (each once)


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


def plan_cat_slices(trace: Trace, regions: list[Region], names: NameGenerator) -> list[CatPlan]:
    """Find the ``cat`` ops whose pieces regions can store in place, and set those regions up to do so
    (slice strides and offsets in ``region.into_buffer``; copy ops added to host regions)."""
    producer = trace.producers()
    readers = trace.readers()
    outputs = {id(p) for p in trace.output_proxies()}
    region_of_output = {id(p): r for r in regions for p in r.outputs if id(p) not in r.partial_of}
    position = {id(op): k for k, op in enumerate(trace.ops)}
    plans = []
    taken: set[int] = set()  # regions already writing into some cat's result (one buffer per region)
    in_region = {id(op) for r in regions for op in r.ops}
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
        plan = _plan_one(cat, pieces, shape, producer, readers, outputs, region_of_output, position, names, taken)
        if plan is not None:
            plans.append(plan)
            taken |= {id(r) for r in plan.writers}
    return plans


def _plan_one(cat, pieces, shape, producer, readers, outputs, region_of_output, position, names, taken):
    out = cat.outputs[0]
    buffer = torch.empty(shape, dtype=out.val.dtype, device="meta")
    found: list[tuple[Proxy, tuple, tuple, int, Region | None]] = []  # base, view shape/stride/offset, region
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
        if region is not None and (len(readers.get(id(base), [])) != 1 or id(base) in outputs or id(region) in taken):
            region = None
        found.append((base, tuple(view.shape), tuple(view.stride()), view.storage_offset(), region))
        removed |= {id(op) for op in chain}
        offset += width
    if offset != shape[-1]:
        return None
    writers = [f[4] for f in found if f[4] is not None]
    if not writers:
        return None
    plan = CatPlan(cat, removed)
    for base, vshape, vstride, voffset, region in found:
        target = base
        if region is None:
            # A tensor made elsewhere: copied by a region that writes another piece (it cannot depend on
            # the cat's result) with the same grid, that does not feed it and runs after it is made.
            region = _host_for(base, writers, producer, position)
            if region is None:
                return None
            target = Proxy(names(f"{base.name}_copy"), empty_example(base.val, vshape, base.val.dtype))
            copy = BoundOp(aten.clone.default, (base,), {}, (target,))
            region.ops.append(copy)
            region.kinds[id(target)] = FULL
            region.widths[id(target)] = vshape[-1]
            region.has_col[id(copy)] = True
            region.produced[id(target)] = target
            if all(p is not base for p in region.inputs):
                region.inputs.append(base)
            region.outputs.append(target)
        region.out_strides[id(target)] = vstride
        region.into_buffer[id(target)] = (vshape, vstride, voffset)
        if region not in plan.writers:
            plan.writers.append(region)
    return plan


def _host_for(base: Proxy, regions: list[Region], producer: dict[int, BoundOp], position: dict[int, int]):
    """A region whose grid is ``base``'s rows x last dim and that can read ``base`` (runs after it)."""
    shape = tuple(base.shape)
    rows = math.prod(shape[:-1])
    for region in regions:
        if region.R != rows or region.N != shape[-1] or region.partial_of or region.device != base.device:
            continue
        if _depends_on(base, set(region.produced), producer):
            continue
        src = producer.get(id(base))
        if src is not None and position.get(id(src), -1) > min(position.get(id(op), 1 << 60) for op in region.ops):
            continue  # made after the region's first op: keep it simple, do not move the region
        return region
    return None


class IntoBuffer(RegionWrapper):
    """The callable of a region that stores some outputs into slices of a buffer passed as its last
    argument (and returns the buffer last, after the outputs it still returns)."""

    def __init__(self, fused: Any, writes: dict[int, tuple], keep: list[int]) -> None:
        super().__init__(fused)
        self.writes = writes  # output index -> (shape, stride, offset)
        self.keep = keep  # output indices still returned

    def __call__(self, *args: torch.Tensor) -> Any:
        *inputs, buffer = args
        base = buffer.storage_offset()
        into = {
            k: buffer.as_strided(shape, stride, base + offset) for k, (shape, stride, offset) in self.writes.items()
        }
        outs = self.fused.run(tuple(inputs), into)
        kept = [outs[k] for k in self.keep]
        return (*kept, buffer) if kept else buffer


def apply_cat_plans(
    ops: list[BoundOp], plans: list[CatPlan], fused: dict[int, BoundOp], names: NameGenerator
) -> list[BoundOp]:
    """Rewrite the contracted ``ops``: allocate each planned ``cat``'s result before its first writer,
    thread it through the writers (in their order in ``ops``), drop the ``cat`` and the view chains."""
    removed = set().union(*(p.removed for p in plans)) if plans else set()
    replace: dict[int, BoundOp] = {}
    insert_before: dict[int, BoundOp] = {}
    order = {id(op): k for k, op in enumerate(ops)}
    for plan in plans:
        writer_ops = sorted((fused[r.index] for r in plan.writers), key=lambda op: order[id(op)])
        out = plan.cat.outputs[0]
        buf = Proxy(names(f"{out.name}_buffer"), out.val)
        val = out.val
        insert_before[id(writer_ops[0])] = BoundOp(
            aten.empty.memory_format, (list(val.shape),), {"dtype": val.dtype, "device": val.device}, (buf,)
        )
        for k, op in enumerate(writer_ops):
            region = next(r for r in plan.writers if fused[r.index] is op)
            all_outs = list(region.outputs)
            writes = {i: region.into_buffer[id(p)] for i, p in enumerate(all_outs) if id(p) in region.into_buffer}
            keep = [i for i, p in enumerate(all_outs) if id(p) not in region.into_buffer]
            nxt = out if k == len(writer_ops) - 1 else Proxy(names(f"{out.name}_buffer"), val)
            new_outs = [all_outs[i] for i in keep] + [nxt]
            replace[id(op)] = op.replace(
                target=IntoBuffer(op.target, writes, keep),
                args=(*op.args, buf),
                outputs=tuple(new_outs),
                unpack=len(new_outs) > 1,
            )
            buf = nxt
    result = []
    for op in ops:
        if id(op) in removed:
            continue
        if id(op) in insert_before:
            result.append(insert_before[id(op)])
        result.append(replace.get(id(op), op))
    return result
