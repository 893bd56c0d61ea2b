"""The Triton kernel that finishes a column sum (see colsum.py): adds the ``G`` partial rows of each column in a
fixed order and casts to the result's dtype. Imported when a column sum first runs (Triton is needed only then)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_thunder.executors.launch import Launcher

__all__ = ["finish_column_sum"]

# Each program finishes BLOCK_N columns, reading the G partial rows BLOCK_G at a time: N / 32 programs
# (64 for N = 2048) keep the GPU busy where one program per 1024 columns (2 programs) took 54 us on an
# H200 for 264 x 2048 partials.
_BLOCK_N, _BLOCK_G = 32, 64


@triton.jit
def _rtne_bf16(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _column_sum_kernel(part, out, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, RTNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    cmask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)[:, None]
        acc += tl.load(part + g * N + cols, mask=(g < G) & cmask, other=0.0)
    total = tl.sum(acc, axis=0)[None, :]
    if RTNE_BF16:  # the interpreter truncates fp32 -> bf16; round to nearest even as the GPU does
        total = _rtne_bf16(total)
    tl.store(out + cols, total.to(out.dtype.element_ty), mask=cmask)


_COLUMN_SUM = Launcher(_column_sum_kernel)


def finish_column_sum(partials: torch.Tensor, out: torch.Tensor, rtne_bf16: bool) -> None:
    """``out[:] = partials.sum(0)`` (``partials``: ``[G, N]`` fp32; ``out``: ``N`` elements, any float dtype)."""
    G, N = partials.shape
    grid = (triton.cdiv(N, _BLOCK_N),)
    _COLUMN_SUM(grid, partials, out, G, N, BLOCK_G=_BLOCK_G, BLOCK_N=_BLOCK_N, RTNE_BF16=rtne_bf16, num_warps=4)
