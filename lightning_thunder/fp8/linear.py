"""The FP8 linear op: ``y = x @ w^T + b`` with FP8 matmuls in the forward and in both backward matmuls.

``fp8_linear(x, weight, bias, recipe=..., emulate=...)`` is a drop-in for ``torch.nn.functional.linear``.
It is what the :class:`~lightning_thunder.plugins.FP8` compiler plugin puts in place of ``linear`` in
the torch-level trace, and what :class:`~lightning_thunder.fp8.FP8Linear` modules call eagerly. Its
autograd function is written in PyTorch ops, so AOTAutograd traces it into the forward and backward
ATen traces, where each step shows::

    forward   x -> (x_q e4m3, x_scale_inv [, x_q^T for dW])          fp8_amax + fp8_cast[_with_transpose]
              w -> (w_q e4m3, w_scale_inv [, w_q^T for dX])
              y = _scaled_mm(x_q, w_q^T, x_scale_inv, w_scale_inv)  (+ bias), fp32 accumulation
    backward  dy -> (dy_q e5m2, dy_scale_inv, dy_q^T, dyT_scale_inv)
              dX = _scaled_mm(dy_q, w_q,   ...)        contracted over out_features
              dW = _scaled_mm(dy_q^T, x_q, ...)        contracted over the tokens
              db = sum(dy, 0)

The forward saves only the FP8 transposed copies (``x_q^T``, ``w_q^T``) and scales for the backward:
half the bytes of the bf16 input. Forward operands are e4m3 (precision), gradients e5m2 (range), as in
Micikevicius et al. (arXiv:2209.05433) and torchao.float8. ``torch._scaled_mm`` needs every dimension to
be a multiple of 16: in_/out_features are checked by the plugin's filter, and a token count that is not
is padded with zero rows (which change neither the amax nor the result).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from lightning_thunder.fp8.config import check_recipe
from lightning_thunder.fp8.dtensor import fp8_linear_dtensor, is_dtensor
from lightning_thunder.fp8.matmul import fp8_mm_t
from lightning_thunder.fp8.quantize import E4M3, E5M2, quantize, quantize_with_transpose
from lightning_thunder.fp8.weights import FP8GatheredWeight

__all__ = ["fp8_linear", "FP8LinearFunction"]


def _quantize(x: torch.Tensor, dtype: torch.dtype, rowwise: bool, with_transpose: bool) -> tuple[Any, ...]:
    if with_transpose:
        return quantize_with_transpose(x, dtype, rowwise)
    q, scale_inv = quantize(x, dtype, rowwise)
    return q, scale_inv, None, None


class FP8LinearFunction(torch.autograd.Function):
    """``x [M, K] @ weight [N, K]^T + bias [N]`` with FP8 matmuls forward and backward (see the module docstring).

    The forward quantizes the transposed copies only for the gradients that are needed
    (``ctx.needs_input_grad``), so inference does one quantization per operand. A weight FSDP all-gathered in FP8
    (:class:`~lightning_thunder.fp8.weights.FP8GatheredWeight`, tensorwise) is used as it is: its FP8 values and
    scale feed the forward matmul, and the backward transposes the FP8 values (FSDP gathers them again for the
    backward, so nothing of the weight stays alive in between).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rowwise: bool, emulate: bool
    ) -> torch.Tensor:
        """``[M, N]`` in ``x.dtype``; saves the FP8 ``x^T``/``w^T`` the backward reads (or the gathered FP8 ``w``)."""
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x_q, x_s, x_qt, x_st = _quantize(x, E4M3, rowwise, with_transpose=need_dw)
        ctx.gathered = isinstance(weight, FP8GatheredWeight)
        if ctx.gathered:
            if rowwise:
                raise ValueError(
                    "a weight all-gathered in FP8 has one scale for the whole tensor (tensorwise); recipe='rowwise' "
                    "needs the bf16 all-gather (all_gather='bf16')"
                )
            w_q, w_s = weight._data, weight._scale_inv
            w_qt, w_st = (w_q, w_s) if need_dx else (None, None)  # transposed in the backward
        else:
            w_q, w_s, w_qt, w_st = _quantize(weight, E4M3, rowwise, with_transpose=need_dx)
        y = fp8_mm_t(x_q, x_s, w_q, w_s, out_dtype=x.dtype, bias=bias, emulate=emulate, use_fast_accum=True)
        ctx.save_for_backward(x_qt, x_st, w_qt, w_st)
        ctx.rowwise, ctx.emulate = rowwise, emulate
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """``dx = dy @ w``, ``dW = dy^T @ x`` with ``dy`` in e5m2; ``db = sum(dy)`` in high precision."""
        x_qt, x_st, w_qt, w_st = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if ctx.gathered and need_dx:
            w_qt = w_qt.t().contiguous()  # the gathered FP8 weight [N, K] -> [K, N]; same scale
        rowwise, emulate = ctx.rowwise, ctx.emulate
        dx = dw = db = None
        if need_dx and need_dw:
            g_q, g_s, g_qt, g_st = quantize_with_transpose(grad, E5M2, rowwise)
        elif need_dx:
            g_q, g_s = quantize(grad, E5M2, rowwise)
        elif need_dw:
            g_qt, g_st = quantize(grad.t(), E5M2, rowwise)  # dy^T, scaled along the tokens
        if need_dx:
            dx = fp8_mm_t(g_q, g_s, w_qt, w_st, out_dtype=ctx.x_dtype, emulate=emulate)
        if need_dw:
            dw = fp8_mm_t(g_qt, g_st, x_qt, x_st, out_dtype=ctx.w_dtype, emulate=emulate)
        if need_db:
            db = grad.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    recipe: str = "tensorwise",
    emulate: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.linear`` with FP8 matmuls (forward and backward); see the module docstring.

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]``; both multiples of 16 unless ``emulate``.
        bias: ``[out_features]`` or ``None``.
        recipe: ``"tensorwise"`` or ``"rowwise"`` scaling (:data:`~lightning_thunder.fp8.config.RECIPES`).
        emulate: quantize/dequantize with the same scales but multiply in ``x``'s dtype (any device).

    Under ``torch.autocast`` the operands are cast to the autocast dtype first, as ``linear`` would be. A
    tensor-parallel ``DTensor`` weight runs on each rank's shard (:mod:`lightning_thunder.fp8.dtensor`).
    """
    if is_dtensor(weight):
        return fp8_linear_dtensor(x, weight, bias, recipe=recipe, emulate=emulate)
    rowwise = check_recipe(recipe) == "rowwise"
    if not emulate and x.device.type != "cuda":
        raise RuntimeError(
            f"fp8_linear got a {x.device.type} tensor: the FP8 matmul (torch._scaled_mm) runs on CUDA GPUs of compute "
            "capability >= 8.9; set emulate=True to run the same quantize/dequantize numerics on this device"
        )
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    *lead, k = x.shape
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    pad = 0 if emulate else (-m) % 16  # torch._scaled_mm contracts over the tokens for dW
    if pad:
        x2d = F.pad(x2d, (0, 0, 0, pad))
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        y2d = FP8LinearFunction.apply(x2d, weight, bias, rowwise, emulate)
    if pad:
        y2d = y2d[:m]
    return y2d.reshape(*lead, weight.shape[0])
