"""Deterministic ``aten.embedding_dense_backward`` in two launches: a zero fill and one Triton kernel.

The gradient of an embedding lookup ``y[t] = W[idx[t]]`` scatters the output gradient back::

    grad_W[r] = sum_{t : idx[t] == r, r != padding_idx} grad_output[t]      (rows never hit stay 0)

PyTorch's CUDA implementation sorts the indices, finds segment boundaries with scans, reduces partial
segments and sums those: about 29 kernel launches per call (sort passes, scans, memsets), which dominate
for the small-to-medium token counts of a training step. ``index_add_``/atomic scatters avoid the sort but
add floating-point values in whatever order the hardware serializes them: not reproducible run to run.

Here the work is one program per token ``t`` (and per block of ``BLOCK_D`` columns; grid
``(T, cdiv(D, BLOCK_D))``), with no atomics and no sort:

1. ``r = idx[t]``; exit if ``r == padding_idx`` (``-1``: none) or ``r`` is outside ``[0, num_weights)``.
2. Ownership: scan the earlier tokens ``t' < t`` in blocks of ``SCAN_T`` indices, from ``t`` backwards
   (a repeat is usually close), stopping at the first block holding ``r``. If one does, exit: the first
   occurrence of ``r`` owns row ``r``, so every row is written by exactly one program.
3. The owner scans ``t' >= t`` in blocks of ``SCAN_T`` indices (an int tile, read from L2); a block
   with no match costs one reduction. In a block with matches, the matches are ranked (a prefix sum)
   and gathered ``TILE_T`` at a time: a ``[TILE_T, BLOCK_D]`` tile of ``grad_output`` rows (rows past
   the last match masked: no memory traffic) is summed over tokens into an fp32 accumulator. A block
   whose every token matches skips the ranking and walks contiguous tiles in a pipelined loop.
4. The accumulator is cast to the gradient's dtype and stored to ``grad_W[r, cols]``.

The summation order depends on the indices alone (groups of ``TILE_T`` matches in ascending token
order, a fixed tree inside each group), so results are bitwise identical run to run. Sums are in fp32
for fp16/bf16 too, as in PyTorch, whose order differs: results agree to rounding, not bit for bit.

Cost: each owner scans all ``T`` indices and each non-owner scans back to the previous repeat, so index
traffic is about ``U * T`` loads per column block (``U`` distinct indices), served from L2: quadratic
in ``T``. A row hit by ``k`` tokens is summed by one program (``k / TILE_T`` dependent steps), so a very
hot row makes the tail of the launch. Measured on one H200 (bf16, 128256 x 2048 table, Triton 3.6,
including the zero fill; PyTorch 2.11 in brackets): T = 8192 uniform indices 0.33 ms (0.50), Zipf(1.1)
0.43 ms (0.41), one index for all tokens 0.95 ms (0.38); T = 32768 uniform 1.7 ms (1.15), Zipf 1.2 ms
(0.79). Offsets are int64 (``num_weights * D`` and strided token offsets may exceed int32);
``grad_output`` is read through its strides when ``indices`` has at most 2 dimensions (a transposed
``[S, B, D]`` view costs no copy), else through ``reshape`` (a copy if it is not a view).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lightning_thunder.executors.launch import Launcher

__all__ = ["embedding_dense_backward", "precompile", "supported"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)

# Indices per ownership/match scan step, the widest column block (D = 2048 in one block: the index scans
# are repeated per block), elements of one [TILE_T, BLOCK_D] gradient tile, warps per program. Tuned on
# an H200 (module docstring); larger tiles spill or overflow the pipelined loop's shared memory in fp32.
_SCAN_T, _MAX_BLOCK_D, _TILE_ELEMS, _NUM_WARPS = 1024, 2048, 16384, 8
_MAX_TOKENS = 2**31 - 1 - 2 * _SCAN_T  # token positions are int32 in the kernel (CUDA grid x limit too)


@triton.jit
def _load_rows(grad_ptr, tt, row_ok, S, stride_b, stride_s, col_off, col_ok):
    """Gradient rows of tokens ``tt`` where ``row_ok`` (others 0, not read): a ``[TILE_T, BLOCK_D]`` tile."""
    row_off = (tt // S).to(tl.int64) * stride_b + (tt % S).to(tl.int64) * stride_s
    return tl.load(grad_ptr + row_off[:, None] + col_off, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _embedding_dense_backward_kernel(
    grad_ptr,  # [T, D] gradient, as [T // S, S, D] with strides (stride_b, stride_s, stride_d)
    idx_ptr,  # [T] int32/int64 indices, contiguous
    out_ptr,  # [num_weights, D] contiguous, zero-filled
    T,
    D,
    S,  # tokens per leading row of the gradient (T for a 1-D view)
    stride_b,
    stride_s,
    stride_d,
    num_weights,
    padding_idx,
    SCAN_T: tl.constexpr,
    TILE_T: tl.constexpr,
    STAGES: tl.constexpr,  # software-pipelining depth of the all-match loop (its tiles stage through smem)
    BLOCK_D: tl.constexpr,
):
    """Program ``(t, j)``: if token ``t`` is the first occurrence of its index ``r``, write
    ``out[r, j-th column block] = sum of grad[t'] over tokens t' with idx[t'] == r``; else nothing."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    r = tl.load(idx_ptr + t)
    if (r == padding_idx) | (r < 0) | (r >= num_weights):
        return

    # Ownership: is r among the tokens before t? Scan backwards, stop at the first block that has it.
    scan = tl.arange(0, SCAN_T)
    seen = t * 0
    end = t
    while (end > 0) & (seen == 0):
        ts = end - SCAN_T + scan
        ok = ts >= 0
        ids = tl.load(idx_ptr + ts, mask=ok, other=0)
        seen = tl.sum((ok & (ids == r)).to(tl.int32), axis=0)
        end -= SCAN_T
    if seen > 0:
        return

    # Owner: sum the gradient rows of every token t' >= t with idx[t'] == r, in ascending token order.
    # Per scan block, the matches are ranked (prefix sum) and gathered TILE_T at a time: however scattered
    # the matches, each step loads TILE_T of them (a [TILE_T, BLOCK_D] tile, rows past the last masked).
    kk = tl.arange(0, TILE_T)
    col_off = cols.to(tl.int64)[None, :] * stride_d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(t, T, SCAN_T):
        ts = start + scan
        ok = ts < T
        match = (ok & (tl.load(idx_ptr + ts, mask=ok, other=0) == r)).to(tl.int32)
        count = tl.sum(match, axis=0)
        if count == tl.minimum(T - start, SCAN_T):  # every token matches: contiguous tiles, pipelined
            for j in tl.range(0, count, TILE_T, num_stages=STAGES):
                tt = start + j + kk
                g = _load_rows(grad_ptr, tt, j + kk < count, S, stride_b, stride_s, col_off, col_ok)
                acc += tl.sum(g.to(tl.float32), axis=0)
        elif count > 0:
            rank = tl.where(match != 0, tl.cumsum(match, axis=0) - 1, -1)  # 0, 1, ... at the matches
            for j in range(0, count, TILE_T):
                want = j + kk
                tt = tl.sum(tl.where(rank[None, :] == want[:, None], ts[None, :], 0), axis=1)  # [TILE_T]
                g = _load_rows(grad_ptr, tt, want < count, S, stride_b, stride_s, col_off, col_ok)
                acc += tl.sum(g.to(tl.float32), axis=0)
    out = out_ptr + r.to(tl.int64) * D + cols
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _pipeline_stages(device: torch.device, tile_bytes: int) -> int:
    """3 stages (2 tiles buffered in shared memory) where the device has room, else fewer (1: none)."""
    if device.type != "cuda":
        return 3  # the interpreter ignores it
    smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 49152)
    buffers = (smem - 16384) // tile_bytes  # 16 KiB left for the reductions' scratch
    return int(max(1, min(3, buffers + 1)))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def supported(
    grad_output: torch.Tensor,
    indices: torch.Tensor,
    num_weights: int,
    padding_idx: int,
    scale_grad_by_freq: bool,
) -> bool:
    """Whether :func:`embedding_dense_backward` takes the Triton path for these arguments.

    Requires: ``scale_grad_by_freq`` False; ``grad_output`` fp32/fp16/bf16 and ``indices`` int64/int32
    on the same CUDA device (or on the CPU under ``TRITON_INTERPRET=1``); static int sizes (no SymInt);
    ``grad_output.shape[:-1] == indices.shape``; fewer than about 2**31 tokens.
    """
    if scale_grad_by_freq or not isinstance(grad_output, torch.Tensor) or not isinstance(indices, torch.Tensor):
        return False
    if grad_output.dtype not in _FLOAT_DTYPES or indices.dtype not in _INDEX_DTYPES:
        return False
    device = grad_output.device
    if indices.device != device:
        return False
    if not (device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    if not (_is_int(num_weights) and _is_int(padding_idx) and num_weights >= 0):
        return False
    if not all(_is_int(s) for s in (*grad_output.shape, *indices.shape)):
        return False
    if grad_output.dim() < 1 or tuple(grad_output.shape[:-1]) != tuple(indices.shape):
        return False
    return indices.numel() <= _MAX_TOKENS


_LAUNCH = Launcher(_embedding_dense_backward_kernel)


def _launch_parameters(grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int):
    """``(grad_output as read, scalar args, meta-parameters, grid)`` of the kernel launch."""
    D = grad_output.shape[-1]
    T = indices.numel()
    if indices.dim() == 2:
        S = indices.shape[1]
        stride_b, stride_s, stride_d = grad_output.stride()
    else:  # read as [1, T, D]
        grad = grad_output.reshape(T, D)
        S, stride_b, (stride_s, stride_d) = T, 0, grad.stride()
        grad_output = grad
    block_d = min(triton.next_power_of_2(D), _MAX_BLOCK_D)
    tile_t = max(1, min(32, _TILE_ELEMS // block_d))
    stages = _pipeline_stages(grad_output.device, tile_t * block_d * grad_output.element_size())
    args = (T, D, S, stride_b, stride_s, stride_d, num_weights, padding_idx)
    meta = {"SCAN_T": _SCAN_T, "TILE_T": tile_t, "STAGES": stages, "BLOCK_D": block_d, "num_warps": _NUM_WARPS}
    return grad_output, args, meta, (T, triton.cdiv(D, block_d))


def precompile(grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int):
    """A function that compiles the kernel for these arguments without running it (example values are
    enough: shapes, strides, dtypes), so the first backward need not wait for Triton; ``None`` off CUDA.
    The launch parameters are worked out now; the returned function only calls Triton (it may run on
    another thread)."""
    if grad_output.device.type != "cuda" or indices.numel() == 0 or grad_output.shape[-1] == 0:
        return None
    grad, args, meta, _ = _launch_parameters(grad_output, indices, num_weights, padding_idx)
    dtypes = (grad.dtype, indices.dtype, grad.dtype)
    return lambda: _embedding_dense_backward_kernel.warmup(*dtypes, *args, grid=(1,), **meta)


def embedding_dense_backward(
    grad_output: torch.Tensor,
    indices: torch.Tensor,
    num_weights: int,
    padding_idx: int,
    scale_grad_by_freq: bool,
) -> torch.Tensor:
    """``torch.ops.aten.embedding_dense_backward.default`` with the same signature and semantics.

    Args:
        grad_output: ``[*indices.shape, D]`` gradient of the embedding output, any strides.
        indices: token indices in ``[0, num_weights)`` (int64 or int32), any shape.
        num_weights: rows of the embedding table.
        padding_idx: tokens with this index contribute nothing (``-1``: no padding).
        scale_grad_by_freq: scale each row by the inverse count of its index (PyTorch path only).

    Returns:
        ``[num_weights, D]`` in ``grad_output``'s dtype, contiguous. When :func:`supported` is False this is
        PyTorch's own kernel (sort-based, fp32 accumulation); else the deterministic Triton kernel of the
        module docstring (fp32 accumulation, bitwise reproducible). Out-of-range indices, an error in
        PyTorch, are skipped by the Triton kernel.
    """
    if not supported(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
        return torch.ops.aten.embedding_dense_backward.default(
            grad_output, indices, num_weights, padding_idx, scale_grad_by_freq
        )
    D = grad_output.shape[-1]
    # Launch 1 of 2: the zero fill (rows no token hits, and padding_idx's row, stay 0).
    out = torch.zeros((num_weights, D), device=grad_output.device, dtype=grad_output.dtype)
    T = indices.numel()
    if T == 0 or D == 0 or num_weights == 0:
        return out
    idx = indices.reshape(T)  # a copy only if the indices are not contiguous-viewable
    grad_output, args, meta, grid = _launch_parameters(grad_output, indices, num_weights, padding_idx)
    # Launch 2 of 2: one program per (token, column block); see the module docstring.
    _LAUNCH(grid, grad_output, idx, out, *args, **meta)
    return out
