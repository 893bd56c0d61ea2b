"""Cross-entropy of one chunk of logits and its gradient, in place, in one Triton launch.

One program per row ``r`` of a ``[R, V]`` chunk of logits ``l`` (the compute dtype, bf16 or fp32), with
target ``t_r``, label smoothing ``eps`` and optional logit soft-capping ``c`` (Gemma 2, LitGPT's
``final_logit_softcapping``)::

    z_j   = c * tanh(l_j / c)                      (z = l without soft-capping)
    lse   = log sum_j exp(z_j)                     online: one pass, running max m and sum d (Milakov &
                                                   Gimelshein, "Online normalizer calculation for softmax", 2018)
    loss  = (1 - eps) * (lse - z_t) + eps * (lse - mean_j z_j)
    dz_j  = softmax(z)_j - eps / V - (1 - eps) * [j == t]
    dl_j  = scale * dz_j * (1 - (z_j / c)^2)       (the tanh's derivative; 1 without soft-capping)

``scale`` is ``d total / d loss_r``: ``1 / (number of non-ignored targets)`` for a mean, ``1`` for a sum,
read from a device scalar (no host synchronization). A row whose target is ``ignore_index`` gets loss 0 and
gradient 0. Everything is computed in fp32; the gradient is written over the logits in their dtype (as
eager PyTorch rounds ``d logits`` to the logits' dtype before the backward matmuls), so the chunk needs no
second buffer. Pass 1 reads the row once (max, sum of exponentials, sum of ``z`` for smoothing), pass 2
reads it again and writes the gradient: 2 reads + 1 write of the chunk.

The math is that of :func:`torch.nn.functional.cross_entropy` (PyTorch's ``label_smoothing`` definition),
as in Liger-Kernel's ``cross_entropy.py`` and Apple's Cut Cross-Entropy. :func:`chunk_loss_reference` is
the same computation in PyTorch (CPU, and the reference the kernel is tested against).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_thunder.executors.launch import Launcher
from lightning_thunder.executors.triton.ops import interpreting

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - every Triton this project supports has it
    libdevice = None

__all__ = ["chunk_loss_triton", "chunk_loss_reference", "LOGIT_DTYPES"]

#: Logit dtypes the kernel takes.
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Columns per step of a row (32 KB of bf16: long enough to hide latency, short enough not to spill), warps per
# program. One program reads one row; a chunk of 2048 rows of a 128k vocabulary keeps every SM busy.
_BLOCK, _NUM_WARPS = 8192, 16


@triton.jit
def _tanh(x, INTERPRET: tl.constexpr):
    if INTERPRET:  # libdevice has no interpreter implementation
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0
    else:
        return libdevice.tanh(x)


@triton.jit
def _linear_cross_entropy_chunk_kernel(
    logits_ptr,  # [R, V] logits, overwritten with d total / d logits when GRAD
    stride_r,  # elements to move one row of logits
    target_ptr,  # [R] integer class ids
    loss_ptr,  # fp32 [R]: each row's loss (0 for an ignored row)
    scale_ptr,  # fp32 []: d total / d row loss
    V,  # columns (vocabulary size)
    ignore_index,
    label_smoothing,  # eps (used when SMOOTH)
    softcap,  # c (used when SOFTCAP)
    SMOOTH: tl.constexpr,
    SOFTCAP: tl.constexpr,
    GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_r
    t = tl.load(target_ptr + row)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0).to(tl.int64)
    cols = tl.arange(0, BLOCK)

    # Pass 1: running max m and sum d of exp(z - m); the sum of z for label smoothing.
    m = float("-inf")
    d = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = softcap * _tanh(z / softcap, INTERPRET)
        if SMOOTH:
            z_sum += tl.sum(tl.where(mask, z, 0.0), 0)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    z_t = tl.load(base + t_safe).to(tl.float32)
    if SOFTCAP:
        z_t = softcap * _tanh(z_t / softcap, INTERPRET)
    loss = lse - z_t
    if SMOOTH:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / V)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    # Pass 2: the gradient, over the logits.
    if GRAD:
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                th = _tanh(z / softcap, INTERPRET)
                z = softcap * th
            g = tl.exp(z - lse)
            if SMOOTH:
                g = g - label_smoothing / V
                g = tl.where(offs == t_safe, g - (1.0 - label_smoothing), g)
            else:
                g = tl.where(offs == t_safe, g - 1.0, g)
            if SOFTCAP:
                g = g * (1.0 - th * th)
            g = g * scale
            tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


_kernel = Launcher(_linear_cross_entropy_chunk_kernel)


def _check(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype not in LOGIT_DTYPES:
        raise ValueError(
            f"logits must be a 2-D tensor with contiguous rows in one of {LOGIT_DTYPES}, got {logits.dtype} "
            f"{list(logits.shape)} with strides {logits.stride()}"
        )
    rows = logits.shape[0]
    if target.shape != (rows,) or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be int64 or int32 of shape [{rows}], got {target.dtype} {list(target.shape)}")
    if loss.shape != (rows,) or loss.dtype != torch.float32 or not loss.is_contiguous():
        raise ValueError(
            f"loss must be a contiguous float32 tensor of shape [{rows}], got {loss.dtype} {list(loss.shape)}"
        )
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a float32 scalar tensor, got {scale.dtype} {list(scale.shape)}")


def chunk_loss_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    loss: torch.Tensor,
    scale: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    grad: bool,
    block: int | None = None,
) -> None:
    """Write each row's loss to ``loss`` and, with ``grad``, ``scale * d loss / d logits`` over ``logits``.

    Args:
        logits: ``[R, V]`` (rows contiguous), overwritten when ``grad``.
        target: ``[R]`` class ids; rows equal to ``ignore_index`` get loss 0 and gradient 0. Other values must
            lie in ``[0, V)`` (not checked on the GPU, as in PyTorch's kernels).
        loss: fp32 ``[R]``, written.
        scale: fp32 scalar tensor: ``d total / d loss_r`` for the gradient.
        ignore_index, label_smoothing, softcap: as in the module docstring (``softcap=None``: none).
        grad: also compute the gradient.
        block: columns per step (a power of two; default: 8192, fewer for a smaller vocabulary).
    """
    _check(logits, target, loss, scale)
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = block or min(_BLOCK, triton.next_power_of_2(vocab))
    _kernel(
        (rows,),
        logits,
        logits.stride(0),
        target,
        loss,
        scale,
        vocab,
        ignore_index,
        float(label_smoothing),
        float(softcap or 1.0),
        SMOOTH=label_smoothing != 0.0,
        SOFTCAP=softcap is not None,
        GRAD=grad,
        INTERPRET=interpreting(),
        BLOCK=block,
        num_warps=_NUM_WARPS if block >= 4096 else 4,
    )


def chunk_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    loss: torch.Tensor,
    scale: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    grad: bool,
) -> None:
    """:func:`chunk_loss_triton` in PyTorch (same arguments, same math, fp32): the CPU path and the kernel's
    reference."""
    _check(logits, target, loss, scale)
    vocab = logits.shape[1]
    z = logits.float()
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z = th * softcap
    valid = target != ignore_index
    t = torch.where(valid, target, 0).long()
    lse = torch.logsumexp(z, dim=1)
    row_loss = lse - z.gather(1, t[:, None]).squeeze(1)
    if label_smoothing:
        row_loss = (1.0 - label_smoothing) * row_loss + label_smoothing * (lse - z.mean(dim=1))
    loss.copy_(torch.where(valid, row_loss, 0.0))
    if not grad:
        return
    g = torch.exp(z - lse[:, None])
    if label_smoothing:
        g -= label_smoothing / vocab
    g.scatter_add_(1, t[:, None], torch.full_like(g[:, :1], -(1.0 - label_smoothing)))
    if softcap is not None:
        g *= 1.0 - th * th
    g *= torch.where(valid, scale.reshape(()), 0.0)[:, None]
    logits.copy_(g)
