"""The FP8 matmul: ``torch._scaled_mm`` on Hopper/Ada/Blackwell, or its emulation in high precision.

All three matmuls of a linear layer have the form ``A @ B^T`` with both operands stored row-major
along the contracted dimension (``y = x @ w^T``, ``dx = dy @ (w^T)^T``, ``dw = (dy^T) @ (x^T)^T``), so one
function serves them: :func:`fp8_mm_t` takes ``a [P, Q]`` and ``b_t [S, Q]`` (FP8, contiguous) with their
inverse scales (0-d per tensor, or ``[P, 1]`` / ``[S, 1]`` per row) and returns ``a @ b_t^T`` ``[P, S]``:

    out[p, s] = sum_q (a[p, q] * a_scale_inv[p]) * (b_t[s, q] * b_scale_inv[s])

``torch._scaled_mm(a, b_t.t(), ...)`` computes exactly this with fp32 accumulation (``b_t.t()`` is the
column-major second operand it requires; dimensions must be multiples of 16). The emulation
dequantizes both operands in fp32 (``q * scale_inv``), casts them to the output dtype and multiplies
in that dtype: the same quantization error, with the matmul's rounding of the output dtype.
"""

from __future__ import annotations

import torch

from lightning_thunder.fp8.quantize import dequantize

__all__ = ["fp8_mm_t"]


def fp8_mm_t(
    a: torch.Tensor,
    a_scale_inv: torch.Tensor,
    b_t: torch.Tensor,
    b_scale_inv: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    emulate: bool = False,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """``(a * a_scale_inv) @ (b_t * b_scale_inv)^T (+ bias)`` in ``out_dtype`` (see the module docstring).

    Args:
        a: ``[P, Q]`` FP8, row-major.
        a_scale_inv: fp32, 0-d (tensorwise) or ``[P, 1]`` (rowwise).
        b_t: ``[S, Q]`` FP8, row-major (so ``b_t.t()`` is column-major).
        b_scale_inv: fp32, 0-d or ``[S, 1]``; rowwise needs both scales rowwise.
        out_dtype: the result dtype.
        bias: ``[S]``, added to every row.
        emulate: dequantize and multiply in ``out_dtype`` instead of calling ``torch._scaled_mm``.
        use_fast_accum: let the FP8 tensor cores accumulate in reduced precision (forward only, as torchao).
    """
    if emulate:
        out = dequantize(a, a_scale_inv, out_dtype) @ dequantize(b_t, b_scale_inv, out_dtype).t()
        return out if bias is None else out + bias.to(out_dtype)
    rowwise = a_scale_inv.dim() > 0
    # Rowwise scaling produces bf16 only; a bias goes into the epilogue only where torch supports it.
    mm_dtype = torch.bfloat16 if rowwise else out_dtype
    fused_bias = bias is not None and not rowwise and bias.dtype == mm_dtype and mm_dtype == torch.bfloat16
    out = torch._scaled_mm(
        a,
        b_t.t(),
        scale_a=a_scale_inv,
        scale_b=b_scale_inv.t() if rowwise else b_scale_inv,  # rowwise: [1, S]
        bias=bias if fused_bias else None,
        out_dtype=mm_dtype,
        use_fast_accum=use_fast_accum,
    )
    if bias is not None and not fused_bias:
        out = out + bias.to(mm_dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)
