"""FP8 training: the quantization ops, the FP8 matmul, the FP8 linear op and module.

- :mod:`~lightning_thunder.fp8.quantize`: the quantization custom ops (tensorwise: ``fp8_amax`` partial maxima,
  then ``fp8_cast[_with_transpose]``; rowwise: ``fp8_quantize[_with_transpose]``; Triton kernels on CUDA) and
  their PyTorch reference.
- :mod:`~lightning_thunder.fp8.matmul`: ``torch._scaled_mm`` or its emulation.
- :mod:`~lightning_thunder.fp8.linear`: :func:`fp8_linear` and its autograd function.
- :mod:`~lightning_thunder.fp8.module`: :class:`FP8Linear` and the in-place ``nn.Linear`` swap.
- :mod:`~lightning_thunder.fp8.config`: recipes and the hardware check.
- :mod:`~lightning_thunder.fp8.fsdp`: FP8 all-gather under FSDP2 (:class:`FP8AllGather`), with the tensor subclasses
  of :mod:`~lightning_thunder.fp8.weights` (the sharded weight FSDP2 gathers, the FP8 weight it produces, and the
  shard used in place on one rank).

Users normally reach these through :class:`lightning_thunder.plugins.FP8` (compiler plugin) or
:class:`lightning_thunder.ThunderFP8` (Lightning precision plugin).
"""

from lightning_thunder.fp8.config import RECIPES, check_fp8_hardware, check_recipe
from lightning_thunder.fp8.fsdp import ALL_GATHER_CHOICES, FP8AllGather
from lightning_thunder.fp8.linear import FP8LinearFunction, fp8_linear
from lightning_thunder.fp8.matmul import fp8_mm_t
from lightning_thunder.fp8.module import FP8Linear, restore_linears, swap_linears
from lightning_thunder.fp8.quantize import (
    E4M3,
    E5M2,
    dequantize,
    fp8_amax_group,
    fp8_cast_group,
    fp8_max,
    quantize_reference,
)
from lightning_thunder.fp8.weights import (
    FP8GatheredWeight,
    FP8ShardedWeight,
    OneRankShard,
    ShardWrapper,
    keep_state_dict_plain,
)

__all__ = [
    "ALL_GATHER_CHOICES",
    "E4M3",
    "E5M2",
    "FP8AllGather",
    "FP8GatheredWeight",
    "FP8Linear",
    "FP8LinearFunction",
    "FP8ShardedWeight",
    "OneRankShard",
    "ShardWrapper",
    "RECIPES",
    "check_fp8_hardware",
    "check_recipe",
    "dequantize",
    "fp8_amax_group",
    "fp8_cast_group",
    "fp8_linear",
    "fp8_max",
    "fp8_mm_t",
    "keep_state_dict_plain",
    "quantize_reference",
    "restore_linears",
    "swap_linears",
]
