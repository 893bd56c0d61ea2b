"""The Triton fusion executor: a pipeline of plan passes, then lowering.

::

    form          regions drawn from the trace (form.py), with the reason each other op is not fused
    fuel          at most ``fuel`` regions over the executor's lifetime (to bisect a numerics problem)
    layout        outputs stored in the layout their readers want (layout.py)
    column_sums   sums over all rows kept in their regions as partial sums (colsum.py)
    cat_slices    cat results written in place by the regions that make their pieces (catslices.py)
    kernel_shapes flat / persistent / grid-stride / column-tiled / looped (shapes.py)
    patterns      one-hot sums, online softmax (patterns.py)
    workspace     zero-initialized partial results share one workspace (workspace.py)
    lower         one generated kernel per region (spec.py, kernels.py), placed in the trace (lower.py)

Each pass takes an immutable :class:`~lightning_thunder.executors.triton.plan.FusionPlan` and returns a new one;
:func:`~lightning_thunder.executors.triton.validate.validate_plan` checks it, and each is its own trace stage
(``forward/fusion:layout``, ...). A pass whose plan fails the checks, or a region whose kernel cannot be
generated, is dropped with a :class:`FusionWarning` (its ops run on PyTorch); with
``LIGHTNING_THUNDER_STRICT_FUSION=1`` (the test suite) it raises instead.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

from lightning_thunder.executors.base import ClaimContext, Executor
from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.catslices import cat_slices_pass
from lightning_thunder.executors.triton.colsum import column_sums_pass
from lightning_thunder.executors.triton.form import form_plan
from lightning_thunder.executors.triton.layout import layout_pass
from lightning_thunder.executors.triton.lower import lower_plan, region_notes
from lightning_thunder.executors.triton.patterns import patterns_pass
from lightning_thunder.executors.triton.plan import FusionPlan
from lightning_thunder.executors.triton.shapes import kernel_shapes_pass
from lightning_thunder.executors.triton.validate import PlanError, render_plan, validate_plan
from lightning_thunder.executors.triton.workspace import workspace_pass
from lightning_thunder.trace.trace import Trace

__all__ = ["FusionExecutor", "FusionWarning", "PASSES"]

#: the plan passes, in order, after ``form`` and ``fuel``
PASSES: tuple[tuple[str, Callable[..., FusionPlan]], ...] = (
    ("layout", lambda plan, names, ex: layout_pass(plan)),
    ("column_sums", lambda plan, names, ex: column_sums_pass(plan, names, ex)),
    ("cat_slices", lambda plan, names, ex: cat_slices_pass(plan, names)),
    ("kernel_shapes", lambda plan, names, ex: kernel_shapes_pass(plan)),
    ("patterns", lambda plan, names, ex: patterns_pass(plan)),
    ("workspace", lambda plan, names, ex: workspace_pass(plan)),
)


class FusionWarning(UserWarning):
    """A fusion pass or a region's code generation failed; that pass's changes (or that region) were dropped and
    the ops run on PyTorch. Always a lightning_thunder bug: please report it with the warning's text."""


def _precompiles(plan: FusionPlan) -> bool:
    """Whether the plan's kernels are compiled before the first step (CUDA; the interpreter compiles nothing)."""
    return any(r.device.type == "cuda" for r in plan.regions)


def _strict() -> bool:
    return os.environ.get("LIGHTNING_THUNDER_STRICT_FUSION", "0") == "1"


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
        if fuel is not None and (type(fuel) is not int or fuel < 0):
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
        return self.claim_stages(trace, ClaimContext())[-1]

    def claim_stages(self, trace: Trace, context: ClaimContext) -> list[Trace]:
        """The plan passes' stage traces (``fusion:form`` ... ``fusion:workspace``) and the claimed trace."""
        excluded: dict[int, str] = {}
        fused_before = self.fused_so_far
        while True:
            stages, plan, failed = self._run(trace, context, excluded)
            if failed is None:
                return stages
            excluded.update(failed)  # a region whose kernel failed: plan again without it
            self.fused_so_far = fused_before

    def _run(
        self, trace: Trace, context: ClaimContext, excluded: dict[int, str]
    ) -> tuple[list[Trace], FusionPlan, dict[int, str] | None]:
        names = trace.name_generator()
        stages: list[Trace] = []
        t0 = time.perf_counter()
        plan = form_plan(trace, epilogues=context.epilogues, exclude=excluded)
        try:
            validate_plan(plan)
        except PlanError as e:
            self._dropped("form", e)
            plan = FusionPlan(trace, (), unfused={id(op): "fusion plan rejected" for op in trace.ops})
        stages.append(self._stage(plan, "form", f"regions formed: {len(plan.regions)}", t0))
        t0 = time.perf_counter()
        plan, note = self._apply_fuel(plan)
        stages.append(self._stage(plan, "fuel", note, t0, unchanged=stages[-1] if note is None else None))
        for name, run in PASSES:
            t0 = time.perf_counter()
            try:
                new = run(plan, names, self.name)
                if new is not plan:
                    validate_plan(new)
            except PlanError as e:
                self._dropped(name, e)
                new = plan
            note = new.notes[-1] if new is not plan and new.notes else None
            stages.append(self._stage(new, name, note, t0, unchanged=stages[-1] if new is plan else None))
            plan = new
        t0 = time.perf_counter()
        failed: dict[int, str] = {}
        kernels = []

        def make_kernel(region):
            from lightning_thunder.executors.triton.runtime import FusedRegion
            from lightning_thunder.executors.triton.spec import generate

            try:
                spec = generate(region)
            except Exception as e:  # noqa: BLE001 - the region runs on PyTorch; the warning names the cause
                if _strict():
                    raise
                reason = f"code generation failed: {type(e).__name__}: {e}"
                warnings.warn(f"{region.name} ({len(region.ops)} ops) is not fused: {reason}", FusionWarning, stacklevel=6)
                failed.update({id(op): reason for op in region.ops})
                return None
            fused = FusedRegion(spec, autotune=self.autotune)
            fused.notes = region_notes(region)
            kernels.append(fused)
            return fused

        try:
            ops = lower_plan(plan, make_kernel, names, self.name) if plan.regions else list(plan.trace.ops)
        except AssertionError as e:  # the lowered program would read a value before it is made
            self._dropped("lower", e)
            plan = FusionPlan(trace, (), unfused={id(op): "fusion dropped: lowering failed" for op in trace.ops})
            ops = list(trace.ops)
        if not failed and _precompiles(plan):
            from lightning_thunder.executors.triton import runtime

            errors = runtime.precompile_all(kernels)
            for region in plan.regions if errors else ():
                fused = next(k for k in kernels if k.spec.region == region.name)
                error = errors.get(fused.spec.kernel_name)
                if error is not None:
                    reason = f"Triton could not compile its kernel: {type(error).__name__}: {str(error)[:300]}"
                    if _strict():
                        raise RuntimeError(f"{region.name}: {reason}") from error
                    warnings.warn(f"{region.name} ({len(region.ops)} ops) is not fused: {reason}", FusionWarning, stacklevel=6)
                    failed.update({id(op): reason for op in region.ops})
        if failed:
            return stages, plan, failed
        note = f"executor {self.name}: {len(plan.regions)} fused regions"
        cpu = any(p.is_tensor and p.device.type == "cpu" for op in trace.ops for p in op.output_proxies())
        if not plan.regions and cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
            note += " (CPU tensors are fused only under TRITON_INTERPRET=1)"
        final = plan.trace.derive(note, ops=ops, elapsed_ms=(time.perf_counter() - t0) * 1e3)
        final.annotations["fusion_plan"] = plan  # read by lightning_thunder.explain
        stages.append(final)
        return stages, plan, None

    def _stage(self, plan: FusionPlan, name: str, note: str | None, t0: float, unchanged: Trace | None = None) -> Trace:
        ms = (time.perf_counter() - t0) * 1e3
        if unchanged is not None:
            stage = unchanged.derive(f"fusion pass {name} (no change)", name=f"fusion:{name}", elapsed_ms=ms)
        else:
            stage = render_plan(plan, f"fusion:{name}", f"fusion pass {name}: {note}", ms)
        stage.annotations["fusion_plan"] = plan
        return stage

    def _apply_fuel(self, plan: FusionPlan) -> tuple[FusionPlan, str | None]:
        if self.fuel is None:
            self.fused_so_far += len(plan.regions)
            return plan, None
        left = max(0, self.fuel - self.fused_so_far)
        kept, cut = plan.regions[:left], plan.regions[left:]
        self.fused_so_far += len(kept)
        if not cut:
            return plan, None
        reason = f"fuel exhausted (fuel={self.fuel}: {self.fused_so_far} regions fused so far)"
        unfused = dict(plan.unfused)
        for r in cut:
            unfused.update({id(op): reason for op in r.ops})
        labels = ", ".join(f"{r.name} (first op {r.ops[0].outputs[0].name})" for r in cut)
        return plan.replace(regions=kept, unfused=unfused), f"{len(kept)} regions kept; fuel stops {labels}"

    @staticmethod
    def _dropped(name: str, error: Exception) -> None:
        if _strict():
            raise error
        warnings.warn(
            f"the fusion step {name!r} produced an invalid plan and was skipped ({error}); the program stays correct "
            "but runs less fused. This is a lightning_thunder bug: please report it",
            FusionWarning,
            stacklevel=6,
        )
