"""The fusion executor's plan passes one at a time, on small ATen traces (``make_fx``) and hand-built plans: what each
pass changes, that it never changes the plan it was given, and that the validator rejects the plans the passes
must never produce."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lightning_thunder.executors.triton import PASSES, FusionExecutor, PlanError, form_plan, validate_plan
from lightning_thunder.executors.triton.catslices import cat_slices_pass
from lightning_thunder.executors.triton.colsum import ColumnSum, column_sums_pass
from lightning_thunder.executors.triton.kinds import FULL, ROW
from lightning_thunder.executors.triton.layout import layout_pass
from lightning_thunder.executors.triton.patterns import patterns_pass
from lightning_thunder.executors.triton.plan import BufferSlice, CatPlan, OneHotSum, OnlineSoftmax, WorkspaceSlice
from lightning_thunder.executors.triton.shapes import kernel_shapes_pass
from lightning_thunder.executors.triton.workspace import workspace_pass
from lightning_thunder.trace import trace_from_fx

aten = torch.ops.aten


def _trace(fn, *args):
    from lightning_thunder.executors.triton.ops import decompositions

    return trace_from_fx(make_fx(fn, decomposition_table=decompositions())(*args), name="forward", provenance="make_fx")


def _plan(fn, *args):
    plan = form_plan(_trace(fn, *args), allow_cpu=True)
    validate_plan(plan)
    return plan


def _names(plan):
    return plan.trace.name_generator()


def _op_names(region):
    return [str(op.target) for op in region.ops]


# ------------------------------------------------------------------------------------------------- form
def test_form_kinds_and_grid_of_a_norm():
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    plan = _plan(norm, torch.randn(4, 6, 32), torch.randn(32))
    (region,) = plan.regions
    assert (region.R, region.N) == (24, 32)
    kinds = {op.outputs[0].name: region.kinds[id(op.outputs[0])] for op in region.ops}
    mean = next(op for op in region.ops if op.target is aten.mean.dim).outputs[0].name
    assert kinds[mean] == ROW and list(kinds.values())[-1] == FULL
    assert [p.name for p in region.inputs] == ["x_1", "w_1"] and len(region.outputs) == 1


def test_form_keeps_a_coincident_broadcast_out_of_the_region_that_would_misread_it():
    """``a < b`` over [10, 5] has as many elements as the [5, 10, 5] region has rows; read against [5, 10, 5] it must
    broadcast along dim 0, so it cannot live in that region as a per-row value."""
    plan = _plan(lambda x, a, b: torch.where((x < a) & (a < b), x, 0.0), torch.randn(5, 10, 5), torch.randn(10, 5), torch.randn(10, 5))
    region_of = {id(op): r.index for r in plan.regions for op in r.ops}
    lt_small = next(op for op in plan.trace.ops if op.target is aten.lt.Tensor and tuple(op.outputs[0].shape) == (10, 5))
    both = next(op for op in plan.trace.ops if op.target is aten.bitwise_and.Tensor)
    assert region_of.get(id(lt_small)) is None or region_of.get(id(lt_small)) != region_of.get(id(both))


def test_form_records_why_each_op_is_left_out():
    plan = _plan(lambda x, m: ((x * 2).sin() @ m).sum(-1), torch.randn(8, 16), torch.randn(16, 16))
    reasons = {op.target: plan.unfused[id(op)] for op in plan.trace.ops if id(op) in plan.unfused}
    assert reasons[aten.mm.default] == "no Triton lowering"
    assert reasons[aten.sum.dim_IntList].startswith("alone")


def test_form_excludes_ops_it_is_told_to():
    trace = _trace(lambda x: (x * 2).sin().cos(), torch.randn(8, 16))
    sin = next(op for op in trace.ops if op.target is aten.sin.default)
    plan = form_plan(trace, allow_cpu=True, exclude={id(sin): "code generation failed: test"})
    assert all(sin not in r.ops for r in plan.regions)
    assert plan.unfused[id(sin)] == "code generation failed: test"


# ------------------------------------------------------------------------------------------------- passes
def test_layout_stores_a_transposed_read_in_the_order_it_is_read():
    def fn(x):
        return (x * 2).sin().transpose(1, 2).contiguous().view(2, 4, 24)

    plan = _plan(fn, torch.randn(2, 3, 4, 8))
    new = layout_pass(plan)
    assert new is not plan and plan.regions[0].outputs[0].strides is None  # the input plan is unchanged
    (out,) = new.regions[0].outputs
    assert out.strides == (96, 8, 24, 1)
    assert len(new.freed) == 1 and next(iter(new.freed)) in {id(op) for op in plan.trace.ops if op.target is aten.clone.default}


def test_column_sums_become_partial_outputs_with_a_finisher():
    def fn(x, w):
        y = x * w
        return y, y.sum(0)

    plan = _plan(fn, torch.randn(12, 8), torch.randn(8))
    new = column_sums_pass(plan, _names(plan), "triton")
    (region,) = new.regions
    partials = [o for o in region.outputs if o.partial_of is not None]
    assert len(partials) == 1 and tuple(partials[0].proxy.shape) == (region.programs, 8)
    assert isinstance(region.trailing[-1].target, ColumnSum)
    assert plan.regions[0].programs is None and all(o.partial_of is None for o in plan.regions[0].outputs)


def test_column_sum_finisher_does_not_fold_an_expand():
    def fn(x):
        return x * x.sum(0, keepdim=True)

    trace = _trace(lambda x, g: torch.autograd.grad(fn(x), x, g)[0], torch.randn(7, 2, requires_grad=True), torch.randn(7, 2))
    plan = form_plan(trace, allow_cpu=True)
    new = column_sums_pass(plan, _names(plan), "triton")
    for region in new.regions:
        for op in region.trailing:
            if isinstance(op.target, ColumnSum):
                assert op.target.shape == (1, 2) or op.target.shape == (2,)


def test_cat_slices_abandoned_plan_leaves_no_trace():
    """A cat whose second piece no region can write is abandoned whole: the first piece's region keeps its layout
    and returns the piece; the second cat, written in place, gets only its own pieces."""

    def fn(q, x, w):
        y1, y2, y3 = (q * 2).sin(), (q * 3).cos(), (q * 4).tanh()
        heads = lambda y: y.transpose(1, 2).reshape(2, 4, 24)  # noqa: E731
        return torch.cat([heads(y1), x @ w], -1), torch.cat([heads(y2), heads(y3)], -1)

    plan = layout_pass(_plan(fn, torch.randn(2, 3, 4, 8), torch.randn(2, 4, 16), torch.randn(16, 24)))
    new = cat_slices_pass(plan, _names(plan))
    validate_plan(new)
    assert len(new.cats) == 1
    (region,) = new.regions
    into = [o for o in region.outputs if isinstance(o.into, BufferSlice)]
    assert len(into) == 2 and {o.into.offset for o in into} == {0, 24}
    kept = [o for o in region.outputs if o.into is None]
    assert len(kept) == 1 and kept[0].strides == (96, 8, 24, 1)  # the layout pass's choice survives


def test_kernel_shapes():
    cases = {
        "flat": (lambda x: (x * 2).sin(), [torch.randn(8, 16)]),
        "persistent": (lambda x: x / x.sum(-1, keepdim=True).exp(), [torch.randn(8, 16)]),
        "looped": (lambda x: (x * 2).softmax(-1), [torch.randn(2, 20000)]),
    }
    for expected, (fn, args) in cases.items():
        plan = kernel_shapes_pass(_plan(fn, *args))
        assert [r.kernel for r in plan.regions] == [expected], expected
    grads = _plan(lambda x, w: ((x * w).sin(), (x * w).sum(0)), torch.randn(8, 16), torch.randn(16))
    grads = kernel_shapes_pass(column_sums_pass(grads, _names(grads), "triton"))
    assert grads.regions[0].kernel == "grid-stride"
    wide = _plan(lambda x, b: ((x + b).sin(), (x + b).sum(0)), torch.randn(4, 4096), torch.randn(4096))
    wide = kernel_shapes_pass(column_sums_pass(wide, _names(wide), "triton"))
    assert wide.regions[0].kernel == "column-tiled"


def test_patterns_one_hot_and_online_softmax():
    def loss(logits, t):
        return torch.nn.functional.cross_entropy(logits * 1.0, t, reduction="none")

    logits, t = torch.randn(4, 20000), torch.randint(0, 20000, (4,))
    plan = patterns_pass(kernel_shapes_pass(form_plan(_trace(loss, logits, t), allow_cpu=True)))
    patterns = [p for r in plan.regions for p in r.patterns]
    assert any(isinstance(p, OnlineSoftmax) for p in patterns)
    assert any(isinstance(p, OneHotSum) for p in patterns)


def test_workspace_gives_zeroed_outputs_disjoint_slices():
    from lightning_thunder.fp8.epilogue import AbsmaxEpilogue
    from lightning_thunder.fp8.quantize import E4M3, E5M2, quantize

    def fn(x, w, m):
        h = (x * w).sin().reshape(-1, 48)
        g = ((h @ m) * 2).cos()  # the matmul between keeps two regions
        return h, *quantize(h, E4M3, False), g, *quantize(g, E5M2, False)

    trace = _trace(fn, torch.randn(3, 16, 48), torch.randn(48), torch.randn(48, 48))
    plan = form_plan(trace, allow_cpu=True, epilogues=[AbsmaxEpilogue()])
    assert len(plan.regions) == 2 and all(r.epilogues for r in plan.regions)
    new = workspace_pass(plan)
    validate_plan(new)
    slices = sorted((o.into.offset, o.proxy.val.numel()) for r in new.regions for o in r.outputs if isinstance(o.into, WorkspaceSlice))
    assert len(slices) == 2 and len(new.workspaces) == 1
    assert slices[0][0] + slices[0][1] <= slices[1][0] and slices[1][0] % 4 == 0  # disjoint, 16-byte aligned
    assert all(o.into is None for r in plan.regions for o in r.outputs)  # the input plan is unchanged


def test_passes_never_change_the_plan_they_are_given():
    def fn(x, w):
        y = (x * w).sin()
        return y.transpose(0, 1).contiguous(), (x * w).sum(0)

    plan = _plan(fn, torch.randn(12, 8), torch.randn(8))
    for name, run in PASSES:
        before = repr(plan)
        new = run(plan, _names(plan), "triton")
        assert repr(plan) == before, f"pass {name} changed its input"
        validate_plan(new)
        plan = new
    assert plan.regions[0].kernel == "grid-stride" and plan.freed


def test_claim_records_a_stage_per_pass():
    from lightning_thunder.executors import ClaimContext

    trace = _trace(lambda x: (x * 2).sin().cos(), torch.randn(8, 16))
    stages = FusionExecutor().claim_stages(trace, ClaimContext())
    names = [s.name for s in stages]
    assert names == ["fusion:form", "fusion:fuel", *(f"fusion:{n}" for n, _ in PASSES), "forward"]
    assert "fusion0(" in stages[0].python() and "kernel: flat" in stages[-1].python()


# ------------------------------------------------------------------------------------------------- validator
def _bad(plan, **changes):
    region = plan.regions[0].replace(**changes)
    return plan.with_region(region)


def test_validator_rejects_broken_plans():
    plan = kernel_shapes_pass(_plan(lambda x, w: ((x * w).sin(), (x * w).sum(-1)), torch.randn(8, 16), torch.randn(16)))
    region = plan.regions[0]
    with pytest.raises(PlanError, match="neither made here nor an input"):
        validate_plan(_bad(plan, inputs=region.inputs[:1]))
    with pytest.raises(PlanError, match="is not made in the region"):
        validate_plan(_bad(plan, outputs=[dataclasses.replace(region.outputs[0], proxy=region.inputs[0])]))
    with pytest.raises(PlanError, match="stored twice"):
        validate_plan(_bad(plan, outputs=[region.outputs[0], region.outputs[0]]))
    # workspace slices that overlap
    outs = [dataclasses.replace(o, into=WorkspaceSlice(0, 0)) for o in region.outputs]
    with pytest.raises(PlanError, match="overlaps"):
        validate_plan(_bad(plan, outputs=outs).replace(workspaces=(1024,)))
    with pytest.raises(PlanError, match="does not exist"):
        validate_plan(_bad(plan, outputs=outs[:1] + list(region.outputs[1:])))


def test_validator_rejects_a_cat_with_columns_written_twice_or_not_at_all():
    def fn(q):
        heads = lambda y: y.transpose(1, 2).reshape(2, 4, 24)  # noqa: E731
        return torch.cat([heads((q * 2).sin()), heads((q * 3).cos())], -1)

    plan = layout_pass(_plan(fn, torch.randn(2, 3, 4, 8)))
    plan = cat_slices_pass(plan, _names(plan))
    validate_plan(plan)
    region = plan.regions[0]
    moved = [
        dataclasses.replace(o, into=dataclasses.replace(o.into, offset=0)) if isinstance(o.into, BufferSlice) else o
        for o in region.outputs
    ]
    with pytest.raises(PlanError, match="written twice"):
        validate_plan(plan.with_region(region.replace(outputs=moved)))
    with pytest.raises(PlanError, match="writers"):
        validate_plan(plan.replace(cats=(CatPlan(plan.cats[0].cat, plan.cats[0].removed, ()),)))


def test_layout_stores_a_query_saved_for_backward_in_the_order_attention_reads_it():
    """The query is a graph output of a training forward (saved for the backward); it still gets [B, T, H, D]
    strides, so attention's output (in the query's order) needs no copy to merge the heads."""

    def fn(x, k, v):
        q = (x * 2).sin()
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(2, 16, 32), q

    plan = _plan(fn, torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8))
    from lightning_thunder.executors.triton.layout import _ATTENTION

    if not any(op.target in _ATTENTION for op in plan.trace.ops):
        pytest.fail("sdpa did not lower to a flash/cuDNN-style attention op here; the test needs one")
    new = layout_pass(plan)
    (out,) = [o for r in new.regions for o in r.outputs if tuple(o.proxy.shape) == (2, 4, 16, 8)]
    assert out.strides == (512, 8, 32, 1) and len(new.freed) == 1


def test_validator_rejects_a_column_sum_narrower_than_its_grid():
    plan = _plan(lambda x, w: ((x * w).sin(), (x * w).sum(0)), torch.randn(8, 16), torch.randn(16))
    (region,) = plan.regions
    assert region.column_sums
    with pytest.raises(PlanError, match="folds a value 16 wide in a grid of 32 columns"):
        validate_plan(plan.with_region(region.replace(N=32)))
