"""FP8 settings shared by the compiler plugin, the linear op and the precision plugin: the recipes and the
hardware check."""

from __future__ import annotations

import torch

__all__ = ["RECIPES", "check_recipe", "check_fp8_hardware", "MIN_CAPABILITY"]

#: Scaling recipes. ``"tensorwise"``: one scale per tensor for inputs, weights and gradients (the
#: fastest; torchao's default). ``"rowwise"``: one scale per row of each operand along the contracted
#: dimension (more accurate with outliers; ``torch._scaled_mm`` with ``[M, 1]`` x ``[1, N]`` scales).
RECIPES = ("tensorwise", "rowwise")

#: FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x).
MIN_CAPABILITY = (8, 9)


def check_recipe(recipe: str) -> str:
    """Return ``recipe`` if it is one of :data:`RECIPES`, else raise ``ValueError`` naming them."""
    if recipe not in RECIPES:
        raise ValueError(f"FP8 recipe={recipe!r} is not supported; choose one of {list(RECIPES)}")
    return recipe


def check_fp8_hardware(emulate: bool) -> None:
    """Raise ``RuntimeError`` unless ``emulate`` or the current CUDA device has FP8 tensor cores (≥ 8.9).

    The message names the way out: ``emulate=True`` runs the same quantize/dequantize numerics with
    bf16/fp32 matmuls, on any device (tests, CPU).
    """
    if emulate:
        return
    way_out = (
        "set emulate=True to run the same quantize/dequantize numerics with bf16/fp32 matmuls "
        "(for tests and CPU; no speed-up)"
    )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"FP8 needs a CUDA GPU with compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"(Ada, Hopper, Blackwell), and CUDA is not available; {way_out}"
        )
    capability = tuple(torch.cuda.get_device_capability())
    if capability < MIN_CAPABILITY:
        index = torch.cuda.current_device()
        raise RuntimeError(
            f"FP8 needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper, Blackwell), "
            f"but cuda:{index} ({torch.cuda.get_device_name(index)}) has {capability[0]}.{capability[1]}; {way_out}"
        )
