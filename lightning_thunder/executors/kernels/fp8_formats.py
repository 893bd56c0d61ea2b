"""FP8 formats and the checks every quantization entry point shares; no Triton here, so the FP8 ops and plugin
import on machines without Triton (the kernels in fp8_quant.py / fp8_group_quant.py are imported when used)."""

from __future__ import annotations

import torch

__all__ = ["EPS", "FP8_FORMATS", "amax_partial_count", "check_fp8_input", "empty_scale_inv", "groupable"]

#: Lower bound of amax in the scale computation (amax = 0 would give an infinite scale).
EPS = 1e-12

#: torch dtype -> (largest finite value, mantissa bits, smallest normal exponent, name of the Triton dtype)
FP8_FORMATS: dict[torch.dtype, tuple[float, int, int, str]] = {
    torch.float8_e4m3fn: (448.0, 3, -6, "float8e4nv"),
    torch.float8_e5m2: (57344.0, 2, -14, "float8e5"),
}

_sm_counts: dict[int, int] = {}


def amax_partial_count(device: torch.device) -> int:
    """How many partial maxima a tensorwise amax produces on ``device`` (the length of
    ``fp8_amax_partials_triton``'s result): 4 per SM on CUDA (8 warps each: enough loads in flight to
    stream at full bandwidth); 3 elsewhere, so CPU tests run the loop over several tiles per program."""
    if device.type != "cuda":
        return 3
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * count


def empty_scale_inv(fp8_dtype: torch.dtype) -> float:
    """The inverse scale of a tensor with no elements (its amax, 0, clamped to ``EPS``): what the kernels, which
    launch no program for it, fill in (the PyTorch reference computes the same value)."""
    return 1.0 / (FP8_FORMATS[fp8_dtype][0] / EPS)


def check_fp8_input(x: torch.Tensor, fp8_dtype: torch.dtype | None = None) -> None:
    """Raise a ``ValueError`` unless ``x`` is 2-D and ``fp8_dtype`` (when given) is an FP8 format quantization
    supports: the one check of every quantization entry point (the ops, their CPU references, the kernels)."""
    if x.dim() != 2:
        raise ValueError(f"FP8 quantization expects a 2-D tensor, got shape {tuple(x.shape)}")
    if fp8_dtype is not None and fp8_dtype not in FP8_FORMATS:
        raise ValueError(
            f"FP8 quantization to {fp8_dtype} is not supported; use torch.float8_e4m3fn or torch.float8_e5m2"
        )


def groupable(t: torch.Tensor) -> bool:
    """Whether ``fp8_quantize_group_triton`` takes ``t``: 2-D, contiguous, both dims multiples of 16 (as
    ``torch._scaled_mm`` needs anyway) and a 16-byte aligned address (the kernels assume both to vectorize)."""
    return t.dim() == 2 and t.is_contiguous() and t.shape[0] % 16 == 0 and t.shape[1] % 16 == 0 and t.data_ptr() % 16 == 0
