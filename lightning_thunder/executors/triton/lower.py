"""Lowering a fusion plan: each region becomes one op running its generated kernel, placed where its inputs
are ready (:func:`contract`), with the ``cat`` results and zeroed workspaces its outputs are stored into
allocated before their first writer and passed from writer to writer."""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from lightning_thunder.executors.triton.layout import free_clone
from lightning_thunder.executors.triton.plan import BufferSlice, FusionPlan, RegionPlan, WorkspaceSlice
from lightning_thunder.executors.triton.runtime import FusedRegion, RegionCall
from lightning_thunder.trace.proxy import Proxy, empty_example
from lightning_thunder.trace.trace import BoundOp, NameGenerator, Trace

__all__ = ["contract", "lower_plan", "region_notes", "check_defined_before_use"]

aten = torch.ops.aten


def contract(trace: Trace, region_ops: dict[int, BoundOp], regions: tuple[RegionPlan, ...]) -> list[BoundOp]:
    """The trace's ops with each region replaced by its op (``region_ops[region.index]``), followed by its trailing
    ops; ordered topologically, otherwise as close to the original order as possible. Raises ``AssertionError``
    if the regions form a cycle."""
    in_region = {id(op): r for r in regions for op in r.ops}
    nodes: list[tuple[int, list[BoundOp]]] = []  # (first position, ops) per node
    node_of_region: dict[int, int] = {}
    for pos, op in enumerate(trace.ops):
        r = in_region.get(id(op))
        if r is None:
            nodes.append((pos, [op]))
        elif r.index not in node_of_region:
            node_of_region[r.index] = len(nodes)
            nodes.append((pos, [region_ops[r.index], *r.trailing]))
    producer: dict[int, int] = {}
    for k, (_, node_ops) in enumerate(nodes):
        for op in node_ops:
            for p in op.output_proxies():
                producer[id(p)] = k
    consumers: dict[int, set[int]] = {k: set() for k in range(len(nodes))}
    indegree = [0] * len(nodes)
    for k, (_, node_ops) in enumerate(nodes):
        deps = set()
        for op in node_ops:
            for p in op.input_proxies():
                src = producer.get(id(p))
                if src is not None and src != k:
                    deps.add(src)
        for src in deps:
            consumers[src].add(k)
        indegree[k] = len(deps)
    ready = [(nodes[k][0], k) for k in range(len(nodes)) if indegree[k] == 0]
    heapq.heapify(ready)
    ordered: list[BoundOp] = []
    while ready:
        _, k = heapq.heappop(ready)
        ordered.extend(nodes[k][1])
        for c in consumers[k]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, (nodes[c][0], c))
    if len(ordered) != sum(len(n[1]) for n in nodes):
        raise AssertionError("the fusion regions form a cycle")
    return ordered


def region_notes(region: RegionPlan) -> list[str]:
    """The lines a region's trace comment adds: kernel shape and grid, patterns, output layouts and destinations."""
    notes = []
    if region.kernel is not None:
        notes.append(f"kernel: {region.kernel}, R={region.R}, N={region.N}")
    notes += [p.describe() for p in region.patterns]
    notes += [f"{region.epilogues[id(op)].name} epilogue folds {op.outputs[0].name}" for op in region.epilogue_ops]
    notes += [f"{o.proxy.name}: {o.describe()}" for o in region.outputs if o.describe()]
    return notes


def check_defined_before_use(inputs: tuple[Proxy, ...], ops: list[BoundOp]) -> None:
    """Raise ``AssertionError`` naming the first value read before any op defines it."""
    defined = {id(p) for p in inputs}
    for op in ops:
        for p in op.input_proxies():
            if id(p) not in defined:
                raise AssertionError(f"{op.name} reads {p.name} before it is defined")
        defined.update(id(p) for p in op.output_proxies())


def lower_plan(
    plan: FusionPlan, make_kernel: Callable[[RegionPlan], FusedRegion], names: NameGenerator, executor: str
) -> list[BoundOp]:
    """The ops of ``plan.trace`` with every region of ``plan`` running its kernel (``make_kernel(region)``)."""
    trace = plan.trace
    fused = {r.index: make_kernel(r) for r in plan.regions}
    plain = {
        r.index: BoundOp(
            fused[r.index], r.inputs, {}, tuple(r.output_proxies), unpack=len(r.outputs) > 1, executor=executor,
            label=r.name, subops=r.ops,
        )
        for r in plan.regions
    }
    ops = contract(trace, plain, plan.regions)
    order = {id(op): k for k, op in enumerate(ops)}
    position = {r.index: order[id(plain[r.index])] for r in plan.regions}
    extra_args: dict[int, list[Proxy]] = {r.index: [] for r in plan.regions}
    passed: dict[int, tuple[int, Proxy]] = {}  # region index -> (index among extra args, proxy returned last)
    insert_before: dict[int, list[BoundOp]] = {}
    for number, cat in enumerate(plan.cats):
        out = cat.cat.outputs[0]
        val = out.val
        writers = sorted(cat.writers, key=lambda i: position[i])
        buf = Proxy(names(f"{out.name}_buffer"), val)
        alloc = BoundOp(aten.empty.memory_format, (list(val.shape),), {"dtype": val.dtype, "device": val.device}, (buf,))
        insert_before.setdefault(id(plain[writers[0]]), []).append(alloc)
        for k, index in enumerate(writers):
            nxt = out if k == len(writers) - 1 else Proxy(names(f"{out.name}_buffer"), val)
            passed[index] = (len(extra_args[index]), nxt)
            extra_args[index].append(buf)
            buf = nxt
    workspace_arg: dict[tuple[int, int], int] = {}  # (region index, workspace number) -> index among extra args
    for number, size in enumerate(plan.workspaces):
        users = sorted(
            (r for r in plan.regions if any(isinstance(o.into, WorkspaceSlice) and o.into.workspace == number for o in r.outputs)),
            key=lambda r: position[r.index],
        )
        if not users:
            continue
        example = users[0].output_proxies[0].val
        ws = Proxy(names("workspace"), empty_example(example, (size,), torch.float32))
        zeros = BoundOp(aten.zeros.default, ([size],), {"dtype": torch.float32, "device": users[0].device}, (ws,))
        insert_before.setdefault(id(plain[users[0].index]), []).append(zeros)
        for r in users:
            workspace_arg[(r.index, number)] = len(extra_args[r.index])
            extra_args[r.index].append(ws)
    replace: dict[int, BoundOp] = {}
    for r in plan.regions:
        extras = extra_args[r.index]
        if not extras:
            continue
        n_in = len(r.inputs)
        slices: dict[int, tuple] = {}
        keep: list[int] = []
        for k, o in enumerate(r.outputs):
            if isinstance(o.into, BufferSlice):
                slices[k] = (n_in + passed[r.index][0], o.into.shape, o.into.stride, o.into.offset)
                continue
            keep.append(k)
            if isinstance(o.into, WorkspaceSlice):
                arg = n_in + workspace_arg[(r.index, o.into.workspace)]
                slices[k] = (arg, tuple(o.proxy.shape), (1,), o.into.offset)
        passed_on = n_in + passed[r.index][0] if r.index in passed else None
        outs = [r.outputs[k].proxy for k in keep] + ([passed[r.index][1]] if r.index in passed else [])
        call = RegionCall(fused[r.index], n_in, slices, keep, passed_on)
        replace[id(plain[r.index])] = plain[r.index].replace(
            target=call, args=(*r.inputs, *extras), outputs=tuple(outs), unpack=len(outs) > 1
        )
    removed = set().union(*(c.removed for c in plan.cats)) if plan.cats else set()
    result = []
    for op in ops:
        if id(op) in removed:
            continue
        result.extend(insert_before.get(id(op), ()))
        op = replace.get(id(op), op)
        result.append(free_clone(op) if id(op) in plan.freed else op)
    check_defined_before_use(trace.inputs, result)
    return result
