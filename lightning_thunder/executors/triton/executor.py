"""The Triton fusion executor: claims fusible regions of a trace and runs each as one generated kernel."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from lightning_thunder.executors.base import Executor
from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.catslices import apply_cat_plans, plan_cat_slices
from lightning_thunder.executors.triton.codegen import generate
from lightning_thunder.executors.triton.colsum import ColumnSum, programs_for
from lightning_thunder.executors.triton.layout import choose_output_layouts, free_clone
from lightning_thunder.executors.triton.region import Region, contract, form_regions
from lightning_thunder.executors.triton.runtime import FusedRegion, precompile_all
from lightning_thunder.executors.triton.workspace import share_zeroed_outputs
from lightning_thunder.trace.proxy import Proxy, empty_example
from lightning_thunder.trace.trace import BoundOp, NameGenerator, Trace, timed_pass

__all__ = ["FusionExecutor"]


class FusionExecutor(Executor):
    """Fuses pointwise ops, last-dimension reductions and row-preserving views into Triton kernels.

    Args:
        fuel: fuse at most this many regions over the executor's lifetime (``None``: no limit), to
            bisect a numerics problem to one region.
        autotune: time candidate block sizes on first use of each kernel (CUDA only).
        name: the executor name shown in traces and statistics.
    """

    def __init__(self, fuel: int | None = None, *, autotune: bool = True, name: str = "triton") -> None:
        super().__init__(name)
        if fuel is not None and (not isinstance(fuel, int) or fuel < 0):
            raise ValueError(f"fuel={fuel!r} must be None or a non-negative int")
        self.fuel = fuel
        self.autotune = autotune
        self.fused_so_far = 0

    def decompositions(self) -> dict[Any, Callable]:
        """Composite ops decomposed into fusible pieces (gelu, silu, softmax, their backwards...)."""
        return fops.decompositions()

    def partition_options(self) -> dict[str, Any]:
        """Let the min-cut partitioner recompute values it assumes the backward would materialize: with
        fusion they stay in registers (e.g. the fp32 log-softmax of a loss is recomputed from the bf16
        logits instead of being saved)."""
        return {"ban_recompute_materialized_backward": False}

    def claim(self, trace: Trace) -> Trace:
        """Replace each fusible region of ``trace`` by one op running its generated kernel."""
        with timed_pass() as timer:
            regions = [r for r in form_regions(trace) if r.inputs]
            cpu = any(r.device.type == "cpu" for r in regions)
            if self.fuel is not None:
                regions = regions[: max(0, self.fuel - self.fused_so_far)]
            self.fused_so_far += len(regions)
            freed = choose_output_layouts(trace, regions)
            names = trace.name_generator()
            folded: set[int] = set()
            readers = trace.readers()
            graph_outputs = {id(p) for p in trace.output_proxies()}
            for region in regions:
                folded |= _split_column_sums(readers, graph_outputs, region, names, self.name)
            if folded:
                trace = trace.derive("column sums folded", ops=[op for op in trace.ops if id(op) not in folded])
            plans = plan_cat_slices(trace, regions, names)
            fused: dict[int, BoundOp] = {}
            for region in regions:
                run = FusedRegion(generate(region), autotune=self.autotune)
                outs = tuple(region.outputs)
                fused[region.index] = BoundOp(
                    run,
                    tuple(region.inputs),
                    {},
                    outs,
                    unpack=len(outs) > 1,
                    executor=self.name,
                    label=region.name,
                    subops=tuple(region.ops),
                )
            ops = contract(trace, fused, regions) if regions else list(trace.ops)
            if plans:
                ops = apply_cat_plans(ops, plans, fused, names)
            ops = [free_clone(op) if id(op) in freed else op for op in ops]
            ops = _number_regions(ops, {id(op) for op in ops if op.subops})
            ops = share_zeroed_outputs(ops, names)
            if any(r.device.type == "cuda" for r in regions):
                precompile_all([op.target for op in fused.values()])
        note = f"executor {self.name}: {len(regions)} fused regions"
        if not regions and not cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
            has_cpu = any(p.is_tensor and p.device.type == "cpu" for op in trace.ops for p in op.output_proxies())
            if has_cpu:
                note += " (CPU tensors are fused only under TRITON_INTERPRET=1)"
        return trace.derive(note, ops=ops, elapsed_ms=timer.ms)


def _split_column_sums(
    readers: dict[int, list[BoundOp]],
    graph_outputs: set[int],
    region: Region,
    names: NameGenerator,
    executor: str,
) -> set[int]:
    """Make each column sum of ``region`` a ``[G, N]`` partial-sums output plus a :class:`ColumnSum` op
    (run right after the region) that finishes it; the views and the cast that only follow the sum are
    folded into that op. Returns the ids of the folded ops (to drop from the trace)."""
    sums = region.column_sums
    if not sums:
        return set()
    region.programs = programs_for(region.device, region.R)
    folded: set[int] = set()
    for op in sums:
        out = op.outputs[0]
        n = int(out.val.shape[-1])
        final = out
        # Fold the views, then at most one floating-point cast, that are the sum's only readers.
        while id(final) not in graph_outputs and len(readers.get(id(final), [])) == 1:
            nxt = readers[id(final)][0]
            is_cast = nxt.target in fops.CASTS and nxt.target is not fops.aten.copy.default
            if not (nxt.target in fops.VIEWS or is_cast) or nxt.args[0] is not final or nxt.outputs[0] is None:
                break
            if is_cast and not nxt.outputs[0].val.dtype.is_floating_point:
                break
            folded.add(id(nxt))
            final = nxt.outputs[0]
            if is_cast:
                break
        partial = Proxy(names(f"{out.name}_partial"), empty_example(out.val, (region.programs, n), torch.float32))
        region.outputs[region.outputs.index(out)] = partial
        region.partial_of[id(partial)] = op
        finish = ColumnSum(names("colsum"), tuple(final.val.shape), final.val.dtype)
        region.trailing_views.append(BoundOp(finish, (partial,), {}, (final,), executor=executor))
    return folded


def _number_regions(ops: list[BoundOp], fused_ids: set[int]) -> list[BoundOp]:
    """Name the fused ops ``fusion0, fusion1, ...`` in the order they run."""
    out, k = [], 0
    for op in ops:
        if id(op) in fused_ids:
            name = f"fusion{k}"
            k += 1
            op.target.__name__ = op.target.__qualname__ = name
            op.target.spec.region = name
            op = op.replace(label=name)
        out.append(op)
    return out
