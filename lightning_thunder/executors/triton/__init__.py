"""The Triton fusion executor: plan passes (region formation, layouts, column sums, in-place cats, kernel shapes,
patterns, workspaces), code generation and the kernel runtime. See executor.py for the pipeline."""

from lightning_thunder.executors.triton.epilogues import Epilogue
from lightning_thunder.executors.triton.executor import PASSES, FusionExecutor, FusionWarning
from lightning_thunder.executors.triton.form import form_plan
from lightning_thunder.executors.triton.plan import FusionPlan, Output, RegionPlan
from lightning_thunder.executors.triton.validate import PlanError, validate_plan

__all__ = [
    "Epilogue",
    "FusionExecutor",
    "FusionPlan",
    "FusionWarning",
    "Output",
    "PASSES",
    "PlanError",
    "RegionPlan",
    "form_plan",
    "validate_plan",
]
