"""FP8 quantization as two PyTorch custom ops, so traces show where amax, scale and cast happen.

``torch.ops.lightning_thunder.fp8_quantize(x, dtype, rowwise) -> (q, scale_inv)`` and
``torch.ops.lightning_thunder.fp8_quantize_with_transpose(x, dtype, rowwise) -> (q, scale_inv, q_t,
scale_inv_t)`` quantize a 2-D tensor with dynamic scales::

    amax      = max |x|            over the tensor, or over each row when ``rowwise``
    scale     = MAX / max(amax, EPS)          MAX: 448 (e4m3fn), 57344 (e5m2); EPS = 1e-12
    q         = fp8(clamp(x * scale, -MAX, MAX))     round to nearest even, saturating
    scale_inv = 1 / scale                      x ~= q * scale_inv

``..._with_transpose`` also returns ``x^T`` quantized (contiguous, scaled per row of ``x^T`` when
``rowwise``): the layout the backward matmuls read. On CUDA the ops run the two-pass Triton kernel
of :mod:`lightning_thunder.executors.kernels.fp8_quant`; elsewhere :func:`quantize_reference`, the same
math in PyTorch (the two agree bit for bit; tests check it). References: Micikevicius et al., "FP8
Formats for Deep Learning" (arXiv:2209.05433); torchao.float8's dynamic scaling.
"""

from __future__ import annotations

import torch

from lightning_thunder.executors.kernels.fp8_quant import EPS, FP8_FORMATS

__all__ = [
    "E4M3",
    "E5M2",
    "EPS",
    "fp8_max",
    "quantize",
    "quantize_with_transpose",
    "quantize_reference",
    "dequantize",
    "fp8_quantize_op",
    "fp8_quantize_with_transpose_op",
    "fp8_quantize_kernel",
    "fp8_quantize_with_transpose_kernel",
]

#: Forward operands (activations, weights): 4 exponent bits, 3 mantissa bits, largest value 448.
E4M3 = torch.float8_e4m3fn
#: Gradients: 5 exponent bits, 2 mantissa bits, largest value 57344 (more range, less precision).
E5M2 = torch.float8_e5m2


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return FP8_FORMATS[dtype][0]


def _scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A tensor numerator: `float / tensor` is computed as `float * reciprocal(tensor)`, which can differ by an ulp.
    return amax.new_tensor(fp8_max(dtype)) / torch.clamp(amax, min=EPS)


def _cast(x32: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = fp8_max(dtype)
    return torch.clamp(x32 * scale, -limit, limit).to(dtype)


def quantize_reference(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool, transpose: bool = False
) -> tuple[torch.Tensor, ...]:
    """The quantization math in plain PyTorch (CPU, emulation, and the reference the kernel is tested against).

    Returns ``(q, scale_inv)`` or, with ``transpose``, ``(q, scale_inv, q_t, scale_inv_t)``; shapes as for
    :func:`quantize` / :func:`quantize_with_transpose`.
    """
    x32 = x.float().contiguous()
    a = x32.abs()
    amax = a.amax(dim=1, keepdim=True) if rowwise else a.amax()  # [R, 1] or []
    scale = _scale(amax, dtype)
    q = _cast(x32, scale, dtype)
    scale_inv = scale.reciprocal()
    if not transpose:
        return q, scale_inv
    if rowwise:
        scale_t = _scale(a.amax(dim=0, keepdim=True), dtype)  # [1, C]: per row of x^T
        q_t = _cast(x32, scale_t, dtype).t().contiguous()
        return q, scale_inv, q_t, scale_t.reciprocal().reshape(-1, 1)
    return q, scale_inv, q.t().contiguous(), scale_inv.clone()


def _check(x: torch.Tensor, dtype: torch.dtype) -> None:
    if x.dim() != 2:
        raise ValueError(f"FP8 quantization expects a 2-D tensor, got shape {tuple(x.shape)}")
    if dtype not in FP8_FORMATS:
        raise ValueError(f"FP8 quantization to {dtype} is not supported; use torch.float8_e4m3fn or torch.float8_e5m2")


def _run(x: torch.Tensor, dtype: torch.dtype, rowwise: bool, transpose: bool) -> tuple[torch.Tensor, ...]:
    _check(x, dtype)
    if x.is_cuda:
        from lightning_thunder.executors.kernels.fp8_quant import fp8_quantize_triton

        return fp8_quantize_triton(x, dtype, rowwise, transpose)
    return quantize_reference(x, dtype, rowwise, transpose)


@torch.library.custom_op("lightning_thunder::fp8_quantize", mutates_args=())
def fp8_quantize_op(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [R, C], scale_inv)``: ``x`` quantized to ``dtype`` (scale per tensor: 0-d, or per row: ``[R, 1]``)."""
    return _run(x, dtype, rowwise, transpose=False)  # type: ignore[return-value]


@fp8_quantize_op.register_fake
def _(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, dtype)
    R, _ = x.shape
    q = x.new_empty(x.shape, dtype=dtype)
    return q, x.new_empty((R, 1) if rowwise else (), dtype=torch.float32)


@torch.library.custom_op("lightning_thunder::fp8_quantize_with_transpose", mutates_args=())
def fp8_quantize_with_transpose_op(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [R, C], scale_inv, q_t [C, R], scale_inv_t)``: ``x`` and ``x^T`` quantized in one read of ``x``
    (per-row scales of ``x^T`` are per-column scales of ``x``)."""
    return _run(x, dtype, rowwise, transpose=True)  # type: ignore[return-value]


@fp8_quantize_with_transpose_op.register_fake
def _(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, dtype)
    R, C = x.shape
    q = x.new_empty((R, C), dtype=dtype)
    q_t = x.new_empty((C, R), dtype=dtype)
    scale_inv = x.new_empty((R, 1) if rowwise else (), dtype=torch.float32)
    scale_inv_t = x.new_empty((C, 1) if rowwise else (), dtype=torch.float32)
    return q, scale_inv, q_t, scale_inv_t


def quantize(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)`` for a 2-D ``x`` (the ``lightning_thunder::fp8_quantize`` op)."""
    return torch.ops.lightning_thunder.fp8_quantize(x, dtype, rowwise)


def quantize_with_transpose(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale_inv, q_t, scale_inv_t)`` for a 2-D ``x`` (the ``lightning_thunder::fp8_quantize_with_transpose``
    op)."""
    return torch.ops.lightning_thunder.fp8_quantize_with_transpose(x, dtype, rowwise)


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale_inv`` computed in fp32, returned in ``dtype``."""
    return (q.float() * scale_inv).to(dtype)


def fp8_quantize_kernel(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, ...]:
    """What runs ``fp8_quantize`` in final traces (``[fp8]``): the Triton kernel on CUDA, the reference elsewhere,
    called directly rather than through the dispatcher."""
    return _run(x, dtype, rowwise, transpose=False)


def fp8_quantize_with_transpose_kernel(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, ...]:
    """What runs ``fp8_quantize_with_transpose`` in final traces (``[fp8]``); see :func:`fp8_quantize_kernel`."""
    return _run(x, dtype, rowwise, transpose=True)
