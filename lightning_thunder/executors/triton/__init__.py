"""The Triton fusion executor: region formation, code generation and the kernel runtime."""

from lightning_thunder.executors.triton.codegen import KernelSpec, generate
from lightning_thunder.executors.triton.executor import FusionExecutor
from lightning_thunder.executors.triton.region import Region, form_regions
from lightning_thunder.executors.triton.runtime import FusedRegion

__all__ = ["FusedRegion", "FusionExecutor", "KernelSpec", "Region", "form_regions", "generate"]
