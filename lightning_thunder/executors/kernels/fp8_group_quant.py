"""Tensorwise FP8 quantization of many tensors in three launches: the weights of a whole forward at once.

Quantizing each weight on its own costs two kernel launches, five allocations and the Python around
them (about 60 µs of host time on an H100 host); a Llama-3.2-1B forward has 40 weights, so the host
spends ~2.4 ms on it while the GPU, whose FP8 matmuls are fast, waits. The weights are graph inputs,
known when the forward starts, so one call quantizes all of them (the same math as
:mod:`~lightning_thunder.executors.kernels.fp8_quant`, bit for bit)::

    amax[g]          = max |w_g|                  one program per 64 x 128 tile of any w_g, atomic max per g
    q_g (, q_g^T)    = fp8(clamp(w_g * MAX / max(amax[g], EPS)))       one program per tile again
    scale_inv[g]     = 1 / scale[g]

Each program finds its tensor through small device tables (tile -> tensor, tensor -> first tile, rows,
columns, output offset) built once per list of shapes and cached, and a table of the input addresses, cached
per set of addresses (the parameters an optimizer updates in place keep theirs). Weights that move (FSDP
allocates a block's gathered weights anew at every all-gather) get their addresses uploaded from pinned memory
without waiting: a blocking upload would synchronize the host with the GPU at every block. The outputs are views
of three allocations (all
``q``, all ``q^T``, all scales at 16-byte aligned offsets, as cuBLAS wants). The tensors must be 2-D
and contiguous, with dims that are multiples of 16 and 16-byte aligned addresses (parameters of FP8 layers
are); the caller quantizes other tensors one by one.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from lightning_thunder.executors.kernels.fp8_quant import (
    _BLOCK_C,
    _BLOCK_R,
    _NUM_WARPS,
    _div,
    _interpret,
    _round_to_fp8_grid,
)
from lightning_thunder.executors.kernels.fp8_formats import EPS, FP8_FORMATS, check_fp8_input, empty_scale_inv, groupable
from lightning_thunder.executors.launch import Launcher

__all__ = ["fp8_quantize_group_triton", "groupable"]

#: Floats between two scales in the scales buffer: 16 bytes, cuBLAS's alignment for scale pointers.
_SCALE_STRIDE = 4


@triton.jit
def _tile_of(pid, tile_tensor_ptr, first_tile_ptr, rows_ptr, cols_ptr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tensor ``g`` of tile ``pid``, that tensor's shape, and the tile's row and column indices."""
    g = tl.load(tile_tensor_ptr + pid)
    local = pid - tl.load(first_tile_ptr + g)
    # Dims are multiples of 16 (checked by the caller): without the hint, addresses computed from loaded sizes
    # defeat vectorized loads and stores (measured: 3x slower on an H200).
    R = tl.multiple_of(tl.load(rows_ptr + g), 16)
    C = tl.multiple_of(tl.load(cols_ptr + g), 16)
    tiles_c = tl.cdiv(C, BLOCK_C)
    rows = (local // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (local % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    return g, R, C, rows, cols


@triton.jit
def _fp8_group_amax_kernel(
    tile_tensor_ptr,  # int32 [T]: the tensor of each tile
    first_tile_ptr,  # int32 [G]: each tensor's first tile
    rows_ptr,  # int32 [G]
    cols_ptr,  # int32 [G]
    src_ptr,  # int64 [G]: each tensor's address
    amax_ptr,  # fp32 [G], zeroed: max |w_g| (atomic max of non-negative values)
    IN_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tile's maximum of ``|w_g|``, folded into ``amax[g]``."""
    g, R, C, rows, cols = _tile_of(tl.program_id(0), tile_tensor_ptr, first_tile_ptr, rows_ptr, cols_ptr, BLOCK_R, BLOCK_C)
    src = tl.multiple_of(tl.load(src_ptr + g).to(tl.pointer_type(IN_DTYPE)), 16)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(src + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.atomic_max(amax_ptr + g, tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0), sem="relaxed")


@triton.jit
def _fp8_group_cast_kernel(
    tile_tensor_ptr,
    first_tile_ptr,
    rows_ptr,
    cols_ptr,
    src_ptr,
    offset_ptr,  # int64 [G]: each tensor's first element in q_ptr / q_t_ptr
    amax_ptr,  # fp32 [G]
    q_ptr,  # FP8 [sum of sizes]: every q_g, row-major
    q_t_ptr,  # FP8 [sum of sizes]: every q_g^T, row-major (unused unless TRANSPOSE)
    scale_inv_ptr,  # fp32 [G * 2 * SCALE_STRIDE]: scale_inv of q_g at 2g * SCALE_STRIDE, of q_g^T after it
    IN_DTYPE: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXP: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ROUND_IN_FP32: tl.constexpr,
    SCALE_STRIDE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tile of ``q_g = fp8(clamp(w_g * scale_g))`` (and of ``q_g^T``); tile 0 of each tensor writes its scales."""
    pid = tl.program_id(0)
    g, R, C, rows, cols = _tile_of(pid, tile_tensor_ptr, first_tile_ptr, rows_ptr, cols_ptr, BLOCK_R, BLOCK_C)
    src = tl.multiple_of(tl.load(src_ptr + g).to(tl.pointer_type(IN_DTYPE)), 16)
    offset = tl.multiple_of(tl.load(offset_ptr + g), 16)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(src + rows64[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _div(FP8_MAX, tl.maximum(tl.load(amax_ptr + g), EPS))
    y = tl.minimum(tl.maximum(x * scale, -FP8_MAX), FP8_MAX)
    if ROUND_IN_FP32:
        y = _round_to_fp8_grid(y, MANTISSA, MIN_EXP)
    q = y.to(OUT_DTYPE, fp_downcast_rounding="rtne")
    tl.store(q_ptr + offset + rows64[:, None] * C + cols[None, :], q, mask=mask)
    if TRANSPOSE:
        tl.store(q_t_ptr + offset + cols.to(tl.int64)[None, :] * R + rows64[:, None], q, mask=mask)
    if pid == tl.load(first_tile_ptr + g):
        tl.store(scale_inv_ptr + 2 * g * SCALE_STRIDE, _div(1.0, scale))
        if TRANSPOSE:
            tl.store(scale_inv_ptr + (2 * g + 1) * SCALE_STRIDE, _div(1.0, scale))


_AMAX = Launcher(_fp8_group_amax_kernel)
_CAST = Launcher(_fp8_group_cast_kernel)
_TL_IN = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class _Tables:
    """The device tables of one list of shapes (see the module docstring) and where each output starts; the
    address tables of the sets of tensors of those shapes seen last."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        device = self.device = tensors[0].device
        tiles = [triton.cdiv(t.shape[0], _BLOCK_R) * triton.cdiv(t.shape[1], _BLOCK_C) for t in tensors]
        first, offsets, total_tiles, total = [], [], 0, 0
        for t, n in zip(tensors, tiles):
            first.append(total_tiles)
            offsets.append(total)
            total_tiles += n
            total += t.numel()
        self.tiles, self.numel, self.offsets = total_tiles, total, offsets
        ints = {"dtype": torch.int32, "device": device}
        self.first_tile = torch.tensor(first, **ints)
        self.tile_tensor = torch.repeat_interleave(torch.arange(len(tensors), **ints), torch.tensor(tiles, device=device))
        self.rows = torch.tensor([t.shape[0] for t in tensors], **ints)
        self.cols = torch.tensor([t.shape[1] for t in tensors], **ints)
        self.offset = torch.tensor(offsets, dtype=torch.int64, device=device)
        self._sources: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def sources(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """int64 ``[G]`` on the device: each tensor's address (uploaded without synchronizing when new)."""
        addresses = tuple(t.data_ptr() for t in tensors)
        src = self._sources.get(addresses)
        if src is None:
            host = torch.tensor(addresses, dtype=torch.int64)
            if self.device.type == "cuda":  # pinned: the copy is queued on the stream, the host goes on
                host = host.pin_memory()
            src = self._sources[addresses] = host.to(self.device, non_blocking=True)
            if len(self._sources) > _MAX_TABLES:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(addresses)
        return src


_TABLES: OrderedDict[tuple, _Tables] = OrderedDict()
_MAX_TABLES = 16  # lists of shapes remembered (one per compiled forward, usually), and address sets per list


def _tables(tensors: list[torch.Tensor]) -> _Tables:
    key = tuple((t.shape, t.dtype, t.device) for t in tensors)
    tables = _TABLES.get(key)
    if tables is None:
        tables = _TABLES[key] = _Tables(tensors)
        if len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tables


def fp8_quantize_group_triton(
    tensors: list[torch.Tensor], fp8_dtype: torch.dtype, transpose: bool, amax: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, ...]]:
    """Tensorwise FP8 quantization of each of ``tensors`` (2-D, contiguous, one dtype and device), in three
    launches (a zero fill, the amax pass, the cast pass), or only the cast pass when ``amax`` is given.

    Returns, per tensor, ``(q, scale_inv)`` or, with ``transpose``, ``(q, scale_inv, q_t, scale_inv_t)``:
    the values :func:`~lightning_thunder.executors.kernels.fp8_quant.fp8_quantize_triton` returns, bit for bit
    (``q``, ``q_t`` and the scales are views of shared buffers).

    ``amax``: fp32 ``[len(tensors)]``, the maxima to scale by instead of each tensor's own (FSDP's FP8 all-gather
    scales each shard by the maximum of the whole weight over all ranks); no tensor may be empty then.
    """
    if not tensors:
        return []
    first = tensors[0]
    check_fp8_input(first, fp8_dtype)
    for t in tensors:
        if not groupable(t) or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                "fp8_quantize_group_triton takes 2-D contiguous tensors of one dtype and device, dims multiples of "
                f"16, 16-byte aligned; got {tuple(t.shape)} {t.dtype} on {t.device} (contiguous={t.is_contiguous()}, "
                f"address % 16 = {t.data_ptr() % 16}) beside {first.dtype} on {first.device}"
            )
    if first.dtype not in _TL_IN:
        raise ValueError(f"fp8_quantize_group_triton quantizes {list(_TL_IN)}, got {first.dtype}")
    fp8_max, mantissa, min_exp, tl_name = FP8_FORMATS[fp8_dtype]
    tl_dtype = getattr(tl, tl_name)
    device = first.device
    tables = _tables(tensors)
    q_all = torch.empty(tables.numel, device=device, dtype=fp8_dtype)
    q_t_all = torch.empty(tables.numel, device=device, dtype=fp8_dtype) if transpose else q_all
    scales = torch.empty(len(tensors) * 2 * _SCALE_STRIDE, device=device, dtype=torch.float32)
    given = amax is not None
    if given:
        if amax.shape != (len(tensors),) or amax.dtype != torch.float32 or amax.device != device or any(
            t.numel() == 0 for t in tensors
        ):
            raise ValueError(
                f"amax must be fp32 [{len(tensors)}] on {device} for non-empty tensors, got {amax.dtype} "
                f"{tuple(amax.shape)} on {amax.device}"
            )
        amax = amax.contiguous()
    else:
        amax = torch.zeros(len(tensors), device=device, dtype=torch.float32)
    if tables.tiles:
        common = (tables.tile_tensor, tables.first_tile, tables.rows, tables.cols, tables.sources(tensors))
        if not given:
            _AMAX((tables.tiles,), *common, amax, IN_DTYPE=_TL_IN[first.dtype], BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
                  num_warps=_NUM_WARPS)
        _CAST(
            (tables.tiles,), *common, tables.offset, amax, q_all, q_t_all, scales, IN_DTYPE=_TL_IN[first.dtype],
            FP8_MAX=fp8_max, EPS=EPS, MANTISSA=mantissa, MIN_EXP=min_exp, OUT_DTYPE=tl_dtype, TRANSPOSE=transpose,
            ROUND_IN_FP32=_interpret(), SCALE_STRIDE=_SCALE_STRIDE, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
            num_warps=_NUM_WARPS,
        )
    if any(t.numel() == 0 for t in tensors):  # no tile wrote their scales: those of an all-zero tensor
        for g, t in enumerate(tensors):
            if t.numel() == 0:
                scales[2 * g * _SCALE_STRIDE : (2 * g + 2) * _SCALE_STRIDE].fill_(empty_scale_inv(fp8_dtype))
    # The views in a few C++ calls (the host time of this op is what it exists to save).
    sizes = [t.numel() for t in tensors]
    scale_views = scales.view(2 * len(tensors), _SCALE_STRIDE)[:, 0].unbind(0)  # 0-d: q_0's, q_0^T's, q_1's...
    out = []
    for g, (t, q, q_t) in enumerate(zip(tensors, q_all.split(sizes), q_t_all.split(sizes))):
        R, C = t.shape
        s, s_t = scale_views[2 * g], scale_views[2 * g + 1]
        out.append((q.view(R, C), s, q_t.view(C, R), s_t) if transpose else (q.view(R, C), s))
    return out
