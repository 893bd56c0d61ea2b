"""Dynamic FP8 quantization of a 2-D tensor: amax, scale and saturating cast in two Triton passes.

Math (Micikevicius et al., "FP8 Formats for Deep Learning", 2022, arXiv:2209.05433; the recipe of
torchao.float8 and NVIDIA Transformer Engine): for an FP8 format with largest finite value ``MAX``
(e4m3fn: 448, e5m2: 57344) and a group ``G`` of elements sharing one scale (the whole tensor, or
one row)::

    amax_G      = max_{i in G} |x_i|                       (fp32)
    scale_G     = MAX / max(amax_G, EPS)                   (EPS = 1e-12 guards amax = 0)
    q_i         = fp8(clamp(x_i * scale_G, -MAX, MAX))     (round to nearest even, saturating)
    scale_inv_G = 1 / scale_G                              (what ``torch._scaled_mm`` multiplies by)

so ``x_i ~= q_i * scale_inv_G`` and the largest element of each group lands on ``MAX``.

A group-wide maximum must be known before any element is scaled, so the work is two passes over
``x`` (one launch each). Tensorwise, :func:`_fp8_amax_partial_kernel` runs a fixed number of programs
(a few per SM), each reducing ``|x|`` over the tiles ``pid, pid + P, ...`` to one partial maximum, and
the cast pass reduces those ``P`` partials again in every program: no atomics on one address, no
zero-filled buffer (one launch fewer), deterministic. The two passes are separate entry points
(:func:`fp8_amax_partials_triton`, :func:`fp8_cast_triton`) because the cast accepts any ``P`` partial
maxima: a fusion region that computes ``x`` writes them itself. Rowwise, :func:`_fp8_amax_kernel` combines tile
maxima per row (and per column) with atomic max into a zeroed buffer. :func:`_fp8_cast_kernel` then
scales, clamps and casts, writing the FP8 tensor
row-major and, on request, also transposed (``q^T``, contiguous), which is the layout the backward
matmuls need (``torch._scaled_mm`` wants its second operand column-major). For the rowwise recipe
the transposed copy is scaled per row of ``x^T`` (per column of ``x``), so both layouts are scaled
along the dimension their matmul contracts.

The input may be any 2-D strided tensor (a transposed view reads without a copy). Values are
computed in fp32; scales use correctly rounded division, so they equal PyTorch's bit for bit. Under
``TRITON_INTERPRET=1`` (CPU tests) the cast first rounds in fp32 to the FP8 grid, because the
interpreter's own fp32 -> fp8 conversion drops the carry when rounding up crosses a power of two
(Triton 3.9: 125 -> 64 in e4m3); on the GPU the hardware conversion rounds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lightning_thunder.executors.kernels.fp8_formats import (
    EPS,
    FP8_FORMATS,
    amax_partial_count,
    check_fp8_input,
    empty_scale_inv,
)
from lightning_thunder.executors.launch import Launcher

__all__ = [
    "fp8_quantize_triton",
    "fp8_amax_partials_triton",
    "fp8_cast_triton",
    "amax_partial_count",
    "check_fp8_input",
    "empty_scale_inv",
    "FP8_FORMATS",
    "EPS",
]

# Tile of x each program handles: 64 rows x 128 columns (bf16: 256-byte rows, coalesced loads).
_BLOCK_R, _BLOCK_C, _NUM_WARPS = 64, 128, 8


@triton.jit
def _fp8_amax_kernel(
    x_ptr,  # [R, C] input, any strides
    amax_ptr,  # fp32 [R], zero-initialized: per-row amax
    amax_t_ptr,  # fp32 [C], zero-initialized: per-column amax (with the transposed copy)
    R,
    C,
    stride_r,  # elements to move one row
    stride_c,  # elements to move one column
    COLUMNS: tl.constexpr,  # also amax per column (rowwise scaling of x^T)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rowwise: tile maxima of ``|x|`` combined per row into ``amax`` (and per column into ``amax_t``) with
    atomic max (values are >= 0). Tensorwise uses :func:`_fp8_amax_partial_kernel`."""
    # Axis 0 walks the columns: programs that run together read neighbouring segments of the same rows.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    col_ok = cols < C
    offsets = rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
    x = tl.load(x_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    a = tl.abs(x.to(tl.float32))
    tl.atomic_max(amax_ptr + rows, tl.max(a, axis=1), mask=row_ok)
    if COLUMNS:
        tl.atomic_max(amax_t_ptr + cols, tl.max(a, axis=0), mask=col_ok)


@triton.jit
def _fp8_amax_partial_kernel(
    x_ptr,  # [R, C] input, any strides
    partial_ptr,  # fp32 [P]: one maximum of |x| per program (P = the grid)
    R,
    C,
    stride_r,
    stride_c,
    TILES_C,  # tiles along the columns
    N_TILES,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program ``pid`` of ``P``: the maximum of ``|x|`` over tiles ``pid, pid + P, ...`` (row-major tile order,
    so programs running together read neighbouring segments of the same rows)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for t in range(pid, N_TILES, tl.num_programs(0)):
        rows = (t // TILES_C) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (t % TILES_C) * BLOCK_C + tl.arange(0, BLOCK_C)
        offsets = rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
        x = tl.load(x_ptr + offsets, mask=(rows < R)[:, None] & (cols < C)[None, :], other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
    tl.store(partial_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _div(numerator, denominator):
    """``numerator / denominator`` in fp32, correctly rounded (``/`` may be approximate on the GPU), so the
    scales equal PyTorch's bit for bit."""
    return tl.math.div_rn(tl.zeros_like(denominator) + numerator, denominator)


@triton.jit
def _round_to_fp8_grid(y, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """``y`` (fp32, |y| <= MAX) rounded to nearest even on the FP8 grid, in fp32: adding and subtracting
    ``2^(e + 23 - MANTISSA)`` (``e`` = the exponent of ``y``, at least ``MIN_EXP`` so subnormals keep a
    fixed step) makes the fp32 adder round away exactly the bits FP8 lacks."""
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP)
    magic = ((e + (150 - MANTISSA)) << 23).to(tl.float32, bitcast=True)
    r = (tl.abs(y) + magic) - magic
    return tl.where(bits < 0, -r, r)


@triton.jit
def _fp8_cast_kernel(
    x_ptr,  # [R, C] input, any strides
    q_ptr,  # [R, C] FP8 output, contiguous
    q_t_ptr,  # [C, R] FP8 output (x^T quantized), contiguous; unused unless TRANSPOSE
    amax_ptr,  # fp32: [P] partial maxima (tensorwise), or [R] row maxima (rowwise)
    amax_t_ptr,  # [C] fp32 per-column amax (ROWWISE and TRANSPOSE)
    scale_inv_ptr,  # [1] or [R] fp32 output: 1 / scale
    scale_inv_t_ptr,  # [1] or [C] fp32 output: 1 / scale of the transposed copy
    R,
    C,
    stride_r,
    stride_c,
    P,  # tensorwise: how many partial maxima amax_ptr holds
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXP: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    ROWWISE: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ROUND_IN_FP32: tl.constexpr,  # interpreter: round to the FP8 grid before the cast (see module doc)
    BLOCK_P: tl.constexpr,  # a power of two >= P
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``q = fp8(clamp(x * scale))`` row-major, and ``q_t`` = the same for ``x^T`` when ``TRANSPOSE``."""
    # Tiles in the reverse order of the amax pass: the first ones read are the last ones that pass read,
    # the most likely to still be in L2.
    pid_c = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_r = tl.num_programs(1) - 1 - tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_r + cols64[None, :] * stride_c, mask=mask, other=0.0)
    x = x.to(tl.float32)

    if ROWWISE:
        amax = tl.load(amax_ptr + rows, mask=row_ok, other=1.0)
        scale = _div(FP8_MAX, tl.maximum(amax, EPS))  # [BLOCK_R]
        y = x * scale[:, None]
        if pid_c == 0:
            tl.store(scale_inv_ptr + rows, _div(1.0, scale), mask=row_ok)
    else:
        partials = tl.load(amax_ptr + tl.arange(0, BLOCK_P), mask=tl.arange(0, BLOCK_P) < P, other=0.0)
        amax = tl.max(partials, axis=0)
        scale = _div(FP8_MAX, tl.maximum(amax, EPS))
        y = x * scale
        if (pid_r == 0) & (pid_c == 0):
            tl.store(scale_inv_ptr, _div(1.0, scale))
            if TRANSPOSE:
                tl.store(scale_inv_t_ptr, _div(1.0, scale))
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    if ROUND_IN_FP32:
        y = _round_to_fp8_grid(y, MANTISSA, MIN_EXP)
    tl.store(q_ptr + rows64[:, None] * C + cols64[None, :], y.to(OUT_DTYPE, fp_downcast_rounding="rtne"), mask=mask)

    if TRANSPOSE:
        if ROWWISE:
            amax_t = tl.load(amax_t_ptr + cols, mask=col_ok, other=1.0)
            scale_t = _div(FP8_MAX, tl.maximum(amax_t, EPS))  # [BLOCK_C]
            y_t = tl.minimum(tl.maximum(x * scale_t[None, :], -FP8_MAX), FP8_MAX)
            if ROUND_IN_FP32:
                y_t = _round_to_fp8_grid(y_t, MANTISSA, MIN_EXP)
            if pid_r == 0:
                tl.store(scale_inv_t_ptr + cols, _div(1.0, scale_t), mask=col_ok)
        else:
            y_t = y
        # q_t[c, r]: Triton's coalescing pass stages the tile through shared memory for this store.
        q_t = y_t.to(OUT_DTYPE, fp_downcast_rounding="rtne")
        tl.store(q_t_ptr + cols64[None, :] * R + rows64[:, None], q_t, mask=mask)


_AMAX = Launcher(_fp8_amax_kernel)
_AMAX_PARTIAL = Launcher(_fp8_amax_partial_kernel)
_CAST = Launcher(_fp8_cast_kernel)
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp8_amax_partials_triton(x: torch.Tensor) -> torch.Tensor:
    """The first pass of tensorwise quantization: ``P`` = :func:`amax_partial_count` partial maxima of ``|x|``
    (fp32 ``[P]``; their maximum is ``amax(|x|)``; programs without tiles write 0)."""
    check_fp8_input(x)
    R, C = x.shape
    n_partials = amax_partial_count(x.device)
    partials = torch.empty(n_partials, device=x.device, dtype=torch.float32)
    tiles = triton.cdiv(R, _BLOCK_R) * triton.cdiv(C, _BLOCK_C)
    _AMAX_PARTIAL(
        (n_partials,), x, partials, R, C, x.stride(0), x.stride(1), triton.cdiv(C, _BLOCK_C), tiles,
        BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS,
    )
    return partials


def _grid(R: int, C: int) -> tuple[int, int]:
    grid = (triton.cdiv(C, _BLOCK_C), triton.cdiv(R, _BLOCK_R))  # one program per 64 x 128 tile
    if grid[1] > 65535:  # CUDA's limit on the second grid dimension
        raise ValueError(f"FP8 quantization supports at most {65535 * _BLOCK_R} rows, got {R}")
    return grid


def fp8_cast_triton(
    x: torch.Tensor, partials: torch.Tensor, fp8_dtype: torch.dtype, transpose: bool
) -> tuple[torch.Tensor, ...]:
    """The second pass of tensorwise quantization: the scale from ``max(partials)`` (any fp32 ``[P]`` whose
    maximum is ``amax(|x|)``: :func:`fp8_amax_partials_triton`'s, or partial maxima a fusion region wrote),
    then the saturating cast. Returns ``(q, scale_inv)`` or, with ``transpose``, ``(q, scale_inv, q_t,
    scale_inv_t)``; every output is its own tensor (custom-op outputs may not alias; cuBLAS wants 16-byte
    aligned scale pointers)."""
    check_fp8_input(x, fp8_dtype)
    R, C = x.shape
    device = x.device
    q = torch.empty((R, C), device=device, dtype=fp8_dtype)
    scale_inv = torch.empty((), device=device, dtype=torch.float32)
    if transpose:
        q_t = torch.empty((C, R), device=device, dtype=fp8_dtype)
        scale_inv_t = torch.empty((), device=device, dtype=torch.float32)
    else:
        q_t, scale_inv_t = q, scale_inv
    if x.numel() == 0:
        scale_inv.fill_(empty_scale_inv(fp8_dtype))
        scale_inv_t.fill_(empty_scale_inv(fp8_dtype))
    else:
        n_partials = partials.numel()
        meta, meta_key = _cast_meta(fp8_dtype, transpose, n_partials)
        args = (x, q, q_t, partials, partials, scale_inv, scale_inv_t, R, C, x.stride(0), x.stride(1), n_partials)
        _CAST.launch(_grid(R, C), args, meta, meta_key)
    return (q, scale_inv, q_t, scale_inv_t) if transpose else (q, scale_inv)


_cast_metas: dict[tuple, tuple[dict, tuple]] = {}


def _cast_meta(fp8_dtype: torch.dtype, transpose: bool, n_partials: int) -> tuple[dict, tuple]:
    """The tensorwise cast kernel's keywords (and their launch key), built once per format, layout and P."""
    interpret = _interpret()
    key = (fp8_dtype, transpose, n_partials, interpret)
    found = _cast_metas.get(key)
    if found is None:
        fp8_max, mantissa, min_exp, tl_name = FP8_FORMATS[fp8_dtype]
        tl_dtype = getattr(tl, tl_name)
        meta = {
            "FP8_MAX": fp8_max, "EPS": EPS, "MANTISSA": mantissa, "MIN_EXP": min_exp, "OUT_DTYPE": tl_dtype,
            "ROWWISE": False, "TRANSPOSE": transpose, "ROUND_IN_FP32": interpret,
            "BLOCK_P": triton.next_power_of_2(n_partials), "BLOCK_R": _BLOCK_R, "BLOCK_C": _BLOCK_C,
            "num_warps": _NUM_WARPS,
        }
        found = _cast_metas[key] = (meta, tuple(meta.items()))
    return found


def fp8_quantize_triton(
    x: torch.Tensor, fp8_dtype: torch.dtype, rowwise: bool, transpose: bool
) -> tuple[torch.Tensor, ...]:
    """Quantize a 2-D tensor to FP8 with dynamic scales (see the module docstring for the math).

    Args:
        x: ``[R, C]`` fp32/bf16/fp16, any strides.
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        rowwise: one scale per row (``[R, 1]``); else one for the tensor (0-d).
        transpose: also return ``x^T`` quantized (``[C, R]`` contiguous) and its scales (0-d, or ``[C, 1]``
            per row of ``x^T`` when ``rowwise``).

    Returns:
        ``(q, scale_inv)``, or ``(q, scale_inv, q_t, scale_inv_t)`` with ``transpose``; ``q`` is ``[R, C]``
        contiguous and ``x ~= q * scale_inv``.
    """
    check_fp8_input(x, fp8_dtype)
    if not rowwise:
        return fp8_cast_triton(x, fp8_amax_partials_triton(x), fp8_dtype, transpose)
    fp8_max, mantissa, min_exp, tl_name = FP8_FORMATS[fp8_dtype]
    tl_dtype = getattr(tl, tl_name)
    R, C = x.shape
    device = x.device
    q = torch.empty((R, C), device=device, dtype=fp8_dtype)
    q_t = torch.empty((C, R), device=device, dtype=fp8_dtype) if transpose else q
    # amax buffers (zero: atomic max of non-negative values), then the inverse scales.
    amax_all = torch.zeros(R + (C if transpose else 0), device=device, dtype=torch.float32)
    amax, amax_t = amax_all[:R], (amax_all[R:] if transpose else amax_all)
    scale_inv = torch.empty((R, 1), device=device, dtype=torch.float32)
    scale_inv_t = torch.empty((C, 1), device=device, dtype=torch.float32) if transpose else scale_inv
    if x.numel() == 0:
        scale_inv.fill_(empty_scale_inv(fp8_dtype))
        scale_inv_t.fill_(empty_scale_inv(fp8_dtype))
        return (q, scale_inv, q_t, scale_inv_t) if transpose else (q, scale_inv)
    grid = _grid(R, C)
    stride_r, stride_c = x.stride()
    _AMAX(
        grid, x, amax, amax_t, R, C, stride_r, stride_c,
        COLUMNS=transpose, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS,
    )
    _CAST(
        grid, x, q, q_t, amax, amax_t, scale_inv, scale_inv_t, R, C, stride_r, stride_c, 1,
        FP8_MAX=fp8_max, EPS=EPS, MANTISSA=mantissa, MIN_EXP=min_exp, OUT_DTYPE=tl_dtype,
        ROWWISE=True, TRANSPOSE=transpose, ROUND_IN_FP32=_interpret(),
        BLOCK_P=1, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS,
    )
    return (q, scale_inv, q_t, scale_inv_t) if transpose else (q, scale_inv)
