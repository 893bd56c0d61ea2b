"""FP8 quantization as PyTorch custom ops, so traces show where amax, scale and cast happen.

``torch.ops.lightning_thunder.fp8_quantize(x, dtype, rowwise) -> (q, scale_inv)`` and
``torch.ops.lightning_thunder.fp8_quantize_with_transpose(x, dtype, rowwise) -> (q, scale_inv, q_t,
scale_inv_t)`` quantize a 2-D tensor with dynamic scales::

    amax      = max |x|            over the tensor, or over each row when ``rowwise``
    scale     = MAX / max(amax, EPS)          MAX: 448 (e4m3fn), 57344 (e5m2); EPS = 1e-12
    q         = fp8(clamp(x * scale, -MAX, MAX))     round to nearest even, saturating
    scale_inv = 1 / scale                      x ~= q * scale_inv

``..._with_transpose`` also returns ``x^T`` quantized (contiguous, scaled per row of ``x^T`` when
``rowwise``): the layout the backward matmuls read.

Tensorwise, :func:`quantize` and :func:`quantize_with_transpose` record the two passes as two ops, so a
fusion region that computes ``x`` can take over the first::

    partials = fp8_amax(x)                                   [P] fp32 partial maxima of |x|
    q, scale_inv[, q_t, scale_inv_t] = fp8_cast[_with_transpose](x, partials, dtype)

``fp8_amax`` alone runs a pass over ``x``; inside a fusion region (the RMSNorm or SwiGLU that produces
``x``) each program folds the maximum of what it stores into the partials instead, and the separate
read of ``x`` disappears. Either way ``max(partials) = max |x|``, so the scales and FP8 values are the same. On CUDA the ops run the two-pass Triton kernel
of :mod:`lightning_thunder.executors.kernels.fp8_quant`; elsewhere :func:`quantize_reference`, the same
math in PyTorch (the two agree bit for bit; tests check it). References: Micikevicius et al., "FP8
Formats for Deep Learning" (arXiv:2209.05433); torchao.float8's dynamic scaling.
"""

from __future__ import annotations

import math

import torch

from lightning_thunder.executors.kernels.fp8_formats import (
    EPS,
    FP8_FORMATS,
    amax_partial_count,
    check_fp8_input,
    groupable,
)

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
    "fp8_amax_op",
    "fp8_cast_op",
    "fp8_cast_with_transpose_op",
    "fp8_amax_kernel",
    "fp8_cast_kernel",
    "fp8_cast_with_transpose_kernel",
    "fp8_quantize_group_kernel",
    "fp8_amax_group",
    "fp8_cast_group",
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


def _amax(a: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``a.amax()`` (``dim=None``) or ``a.amax(dim, keepdim=True)``, with 0 for a maximum over no elements (an
    empty batch; ``amax`` itself refuses them)."""
    if dim is None:
        return a.amax() if a.numel() else a.new_zeros(())
    if a.shape[dim] == 0:
        shape = list(a.shape)
        shape[dim] = 1
        return a.new_zeros(shape)
    return a.amax(dim=dim, keepdim=True)


def quantize_reference(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool, transpose: bool = False
) -> tuple[torch.Tensor, ...]:
    """The quantization math in plain PyTorch (CPU, emulation, and the reference the kernel is tested against).

    Returns ``(q, scale_inv)`` or, with ``transpose``, ``(q, scale_inv, q_t, scale_inv_t)``; shapes as for
    :func:`quantize` / :func:`quantize_with_transpose`.
    """
    x32 = x.float().contiguous()
    a = x32.abs()
    if not rowwise:
        return _tensorwise_reference(x32, _amax(a, None), dtype, transpose)
    scale = _scale(_amax(a, 1), dtype)  # [R, 1]
    q = _cast(x32, scale, dtype)
    scale_inv = scale.reciprocal()
    if not transpose:
        return q, scale_inv
    scale_t = _scale(_amax(a, 0), dtype)  # [1, C]: per row of x^T
    q_t = _cast(x32, scale_t, dtype).t().contiguous()
    return q, scale_inv, q_t, scale_t.reciprocal().reshape(-1, 1)


def _tensorwise_reference(
    x32: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, transpose: bool
) -> tuple[torch.Tensor, ...]:
    """The tensorwise scale and cast of fp32 ``x32`` given its ``amax`` (0-d), in PyTorch."""
    scale = _scale(amax, dtype)
    q = _cast(x32, scale, dtype)
    scale_inv = scale.reciprocal()
    return (q, scale_inv, q.t().contiguous(), scale_inv.clone()) if transpose else (q, scale_inv)


def _run(x: torch.Tensor, dtype: torch.dtype, rowwise: bool, transpose: bool) -> tuple[torch.Tensor, ...]:
    if x.is_cuda:
        from lightning_thunder.executors.kernels.fp8_quant import fp8_quantize_triton

        return fp8_quantize_triton(x, dtype, rowwise, transpose)  # checks its input
    check_fp8_input(x, dtype)
    return quantize_reference(x, dtype, rowwise, transpose)


@torch.library.custom_op("lightning_thunder::fp8_quantize", mutates_args=())
def fp8_quantize_op(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [R, C], scale_inv)``: ``x`` quantized to ``dtype`` (scale per tensor: 0-d, or per row: ``[R, 1]``)."""
    return _run(x, dtype, rowwise, transpose=False)  # type: ignore[return-value]


@fp8_quantize_op.register_fake
def _(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_fp8_input(x, dtype)
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
    check_fp8_input(x, dtype)
    R, C = x.shape
    q = x.new_empty((R, C), dtype=dtype)
    q_t = x.new_empty((C, R), dtype=dtype)
    scale_inv = x.new_empty((R, 1) if rowwise else (), dtype=torch.float32)
    scale_inv_t = x.new_empty((C, 1) if rowwise else (), dtype=torch.float32)
    return q, scale_inv, q_t, scale_inv_t


def _amax_partials(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from lightning_thunder.executors.kernels.fp8_quant import fp8_amax_partials_triton

        return fp8_amax_partials_triton(x)  # checks its input
    check_fp8_input(x)
    partials = torch.zeros(amax_partial_count(x.device), device=x.device, dtype=torch.float32)
    partials[0] = _amax(x.detach().float().abs(), None)
    return partials


def _cast_from_partials(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype, transpose: bool
) -> tuple[torch.Tensor, ...]:
    if x.is_cuda:
        from lightning_thunder.executors.kernels.fp8_quant import fp8_cast_triton

        return fp8_cast_triton(x, partials, dtype, transpose)  # checks its input
    check_fp8_input(x, dtype)
    return _tensorwise_reference(x.float().contiguous(), partials.max(), dtype, transpose)


@torch.library.custom_op("lightning_thunder::fp8_amax", mutates_args=())
def fp8_amax_op(x: torch.Tensor) -> torch.Tensor:
    """Partial maxima of ``|x|`` (fp32 ``[P]``, ``max`` of them = ``amax(|x|)``): the first pass of tensorwise
    quantization, which a fusion region producing ``x`` may compute instead (see the module docstring)."""
    return _amax_partials(x)


@fp8_amax_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    check_fp8_input(x)
    return x.new_empty((amax_partial_count(x.device),), dtype=torch.float32)


@torch.library.custom_op("lightning_thunder::fp8_cast", mutates_args=())
def fp8_cast_op(x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)``: ``x`` scaled by ``MAX / max(partials)`` and cast to ``dtype`` (tensorwise)."""
    return _cast_from_partials(x, partials, dtype, transpose=False)  # type: ignore[return-value]


@fp8_cast_op.register_fake
def _(x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    check_fp8_input(x, dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("lightning_thunder::fp8_cast_with_transpose", mutates_args=())
def fp8_cast_with_transpose_op(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale_inv, q_t, scale_inv_t)``: :func:`fp8_cast_op` of ``x`` and of ``x^T`` in one read of ``x``."""
    return _cast_from_partials(x, partials, dtype, transpose=True)  # type: ignore[return-value]


@fp8_cast_with_transpose_op.register_fake
def _(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_fp8_input(x, dtype)
    R, C = x.shape
    return (
        x.new_empty((R, C), dtype=dtype),
        x.new_empty((), dtype=torch.float32),
        x.new_empty((C, R), dtype=dtype),
        x.new_empty((), dtype=torch.float32),
    )


def quantize(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)`` for a 2-D ``x``: the ``fp8_amax`` and ``fp8_cast`` ops (tensorwise), or the
    ``lightning_thunder::fp8_quantize`` op (rowwise)."""
    if not rowwise:
        return torch.ops.lightning_thunder.fp8_cast(x, torch.ops.lightning_thunder.fp8_amax(x), dtype)
    return torch.ops.lightning_thunder.fp8_quantize(x, dtype, rowwise)


def quantize_with_transpose(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale_inv, q_t, scale_inv_t)`` for a 2-D ``x``: the ``fp8_amax`` and ``fp8_cast_with_transpose``
    ops (tensorwise), or the ``lightning_thunder::fp8_quantize_with_transpose`` op (rowwise)."""
    if not rowwise:
        partials = torch.ops.lightning_thunder.fp8_amax(x)
        return torch.ops.lightning_thunder.fp8_cast_with_transpose(x, partials, dtype)
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


def fp8_amax_kernel(x: torch.Tensor) -> torch.Tensor:
    """What runs ``fp8_amax`` in final traces where no fusion region took it over (``[fp8]``): the partial-max
    Triton kernel on CUDA, the reference elsewhere."""
    return _amax_partials(x)


def fp8_cast_kernel(x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """What runs ``fp8_cast`` in final traces (``[fp8]``); see :func:`fp8_amax_kernel`."""
    return _cast_from_partials(x, partials, dtype, transpose=False)


def fp8_cast_with_transpose_kernel(x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """What runs ``fp8_cast_with_transpose`` in final traces (``[fp8]``); see :func:`fp8_amax_kernel`."""
    return _cast_from_partials(x, partials, dtype, transpose=True)


def fp8_quantize_group_kernel(*tensors: torch.Tensor, dtype: torch.dtype, transpose: bool) -> tuple[torch.Tensor, ...]:
    """Tensorwise quantization of several 2-D contiguous tensors in one call: what runs the weights' ``fp8_amax`` +
    ``fp8_cast[_with_transpose]`` pairs of a forward trace, grouped by the FP8 plugin (``[fp8]``). Returns the
    outputs of each tensor's cast op, one tensor after another, flat; the values are those of the separate ops.
    On CUDA three launches for all tensors (:mod:`~lightning_thunder.executors.kernels.fp8_group_quant`; a tensor
    that kernel cannot address, such as a misaligned view, is quantized on its own); elsewhere the reference,
    tensor by tensor."""
    together = [t for t in tensors if t.is_cuda and groupable(t)]
    from lightning_thunder.executors.kernels.fp8_group_quant import fp8_quantize_group_triton

    quantized = dict(zip(map(id, together), fp8_quantize_group_triton(together, dtype, transpose)))
    groups = [
        quantized[id(t)] if id(t) in quantized else _cast_from_partials(t, _amax_partials(t), dtype, transpose)
        for t in tensors
    ]
    return tuple(out for group in groups for out in group)


def fp8_amax_group(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``max |t|`` of each tensor (0 for an empty one) as one fp32 ``[len(tensors)]`` tensor, in one grouped op
    (``torch._foreach_norm`` with ``ord=inf``: one multi-tensor launch on CUDA). The first half of
    :func:`fp8_cast_group`'s tensorwise quantization, separate so the maxima can be reduced over ranks between."""
    if not tensors:
        raise ValueError("fp8_amax_group needs at least one tensor")
    nonempty = [t for t in tensors if t.numel()]
    norms = torch._foreach_norm(nonempty, ord=math.inf, dtype=torch.float32) if nonempty else []
    if len(nonempty) == len(tensors):
        return torch.stack(norms)
    found = iter(norms)
    zero = tensors[0].new_zeros((), dtype=torch.float32)
    return torch.stack([next(found) if t.numel() else zero for t in tensors])


def fp8_cast_group(
    tensors: list[torch.Tensor], amax: torch.Tensor, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(q, scale_inv)`` of each 2-D tensor, scaled by ``MAX / max(amax[g], EPS)`` and cast to ``dtype``: the
    second pass of tensorwise quantization with maxima given (fp32 ``[len(tensors)]``; for FSDP's FP8 all-gather,
    the maximum of each whole weight over all ranks, so every rank's shard gets the same scale). The values are those
    of ``fp8_cast`` with ``partials = amax[g:g+1]``, bit for bit. On CUDA one launch for every tensor the grouped
    kernel takes (:func:`~lightning_thunder.executors.kernels.fp8_group_quant.fp8_quantize_group_triton`), the
    others one by one; elsewhere the PyTorch reference."""
    for t in tensors:
        check_fp8_input(t, dtype)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(tensors)
    together = [g for g, t in enumerate(tensors) if t.is_cuda and t.numel() and groupable(t)]
    if together:
        from lightning_thunder.executors.kernels.fp8_group_quant import fp8_quantize_group_triton

        # (No index tensor built on the host: uploading it would wait for the GPU.)
        chosen = amax if len(together) == len(tensors) else torch.stack([amax[g] for g in together])
        quantized = fp8_quantize_group_triton([tensors[g] for g in together], dtype, False, amax=chosen)
        for g, (q, scale_inv) in zip(together, quantized):
            out[g] = (q, scale_inv)
    for g, t in enumerate(tensors):
        if out[g] is not None:
            continue
        if t.numel() == 0 or not t.is_cuda:  # the reference (an empty shard still gets the whole weight's scale)
            out[g] = _tensorwise_reference(t.float().contiguous(), amax[g], dtype, False)  # type: ignore[assignment]
        else:
            out[g] = _cast_from_partials(t, amax[g : g + 1], dtype, False)  # type: ignore[assignment]
    return out  # type: ignore[return-value]
