"""``cross_entropy(linear(x, W, b), target)`` chunked over the tokens: no ``[tokens, vocab]`` logits anywhere.

A language model's output head and loss, written the usual way, materialize the logits: for Llama 3.2 1B at
8192 tokens a step that is ``[8192, 128256]`` in bf16 (2.1 GB), an fp32 copy for the loss (4.2 GB) and their
gradients (the same again), ~13 ms of memory-bound loss kernels on an H100. Here the tokens are processed
``chunk_size`` rows at a time (default: the rows whose logits fill :data:`CHUNK_BYTES`, 2048 rows for that
vocabulary in bf16), and for each chunk::

    logits = x_c @ W^T (+ b)                       cuBLAS, into one reused [chunk, V] buffer (compute dtype)
    loss_c, d logits                               one Triton launch (executors/kernels/linear_cross_entropy.py):
                                                   online log-sum-exp, label smoothing, soft-capping, ignore_index;
                                                   the gradient overwrites the logits
    dx_c   = d logits @ W                          cuBLAS, into its rows of dx
    dW    += d logits^T @ x_c                      cuBLAS, accumulated in fp32 (also for bf16/fp16 weights)
    db    += sum_rows d logits                     fp32

so the largest new tensor is one chunk of logits, and the loss reduction (``mean`` over non-ignored targets, or
``sum``) uses a device scalar (no host synchronization).

**Gradients in the forward (Liger-Kernel's choice), not recomputed in the backward.** The gradient of a scalar
loss with respect to the logits does not depend on anything after the loss, so the forward computes ``dx``, ``dW``
and ``db`` for an upstream gradient of 1, and the backward only multiplies them by the upstream gradient. The
alternative, saving the log-sum-exp and recomputing each chunk's logits in the backward, costs a fourth matmul of
``2 * tokens * hidden * vocab`` FLOPs (for the shapes above 4.3 TFLOP, ~6.5 ms of a ~20 ms head) and a second pass
over every chunk. Memory is the same: either way ``dW`` ([V, H]) and ``dx`` ([N, H]) exist from the end of the
loss's forward to the start of the model's backward, which for a loss at the end of the step are the same moment,
the step's peak. What the forward-gradient design costs: a ``[V, H]`` multiply by the upstream gradient in the
backward (one memory pass, ~1 ms for fp32 ``dW`` of that size), and the gradients are computed only when they are
needed (the op is told which inputs require grad, so validation and ``no_grad`` run the forward matmul alone).

The numerics follow eager PyTorch: logits are rounded to the compute dtype (the linear's), the loss and its gradient
are computed in fp32, the gradient is rounded to the compute dtype before the backward matmuls (as the backward of
``.float()`` does), and every matmul accumulates in fp32; ``dW`` is summed over the chunks in fp32 and rounded to the
weight's dtype once. Under autocast the weight (fp32 master weights) is cast to the compute dtype like ``linear``
casts it, and ``dW`` is accumulated straight into an fp32 gradient.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from lightning_thunder.executors.kernels.linear_cross_entropy import chunk_loss_reference, chunk_loss_triton
from lightning_thunder.executors.triton.ops import interpreting

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_op",
    "LinearCrossEntropyFunction",
    "default_chunk_size",
    "CHUNK_BYTES",
]

#: Bytes of logits one chunk may hold (in the compute dtype): 512 MiB, 2048 rows of a 128k vocabulary in bf16.
CHUNK_BYTES = 512 << 20

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum")
_mixed_addmm_works: bool | None = None  # whether this torch's CUDA addmm takes bf16/fp16 operands into fp32


def default_chunk_size(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the largest power of two whose ``[rows, vocab]`` logits in ``dtype`` fit in :data:`CHUNK_BYTES`
    (at least 1)."""
    rows = max(1, CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))
    return 1 << (rows.bit_length() - 1)


def _accumulate_grad_weight(acc: torch.Tensor, g: torch.Tensor, xc: torch.Tensor, first: bool) -> None:
    """``acc (=|+=) g^T @ xc`` with ``acc`` in fp32 (or the operands' dtype); ``first`` overwrites."""
    global _mixed_addmm_works
    beta = 0 if first else 1
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), xc, beta=beta)
        return
    if not acc.is_cuda:  # bf16 products are exact in fp32: the same sums as cuBLAS's fp32 accumulation
        acc.addmm_(g.t().to(acc.dtype), xc.to(acc.dtype), beta=beta)
        return
    if _mixed_addmm_works is not False:
        try:
            torch.addmm(acc, g.t(), xc, out_dtype=acc.dtype, beta=beta, out=acc)
            _mixed_addmm_works = True
            return
        except (RuntimeError, TypeError) as e:
            _mixed_addmm_works = False
            warnings.warn(
                f"linear_cross_entropy: this PyTorch's addmm cannot multiply {g.dtype} operands into a {acc.dtype} "
                f"result ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the weight gradient's "
                f"chunks are multiplied in {g.dtype} and summed in {acc.dtype} instead (one more [vocab, hidden] "
                "buffer and memory pass per chunk)",
                stacklevel=2,
            )
    if first:
        acc.copy_(torch.mm(g.t(), xc))
    else:
        acc.add_(torch.mm(g.t(), xc))


def _check(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, label_smoothing: float,
    softcap: float | None, reduction: str,
) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy expects x [tokens, hidden] and weight [vocab, hidden], got x {list(x.shape)} and "
            f"weight {list(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}] (one per class), got {list(bias.shape)}")
    if target.shape != x.shape[:1] or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"target must hold one int64 class id per token ([{x.shape[0]}]), got {target.dtype} {list(target.shape)}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1]")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap} must be positive (or None for no soft-capping)")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r} is not supported by linear_cross_entropy; use one of {_REDUCTIONS} (for "
            "per-token losses keep F.cross_entropy(..., reduction='none'))"
        )


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    reduction: str,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, weight, bias, target, label_smoothing, softcap, reduction)
    n, hidden = x.shape
    vocab = weight.shape[0]
    dtype, device = x.dtype, x.device
    x, target = x.contiguous(), target.contiguous()
    w = weight.to(dtype)  # autocast's cast of the (fp32) weight; no copy when the dtypes agree
    b = bias.to(dtype) if bias is not None else None
    chunk = max(1, min(chunk_size or default_chunk_size(vocab, dtype), n))
    n_chunks = -(-n // chunk)
    if reduction == "mean":
        scale = (target != ignore_index).sum(dtype=torch.float32).reciprocal()
    else:
        scale = torch.ones((), dtype=torch.float32, device=device)
    grad = grad_input or grad_weight or grad_bias
    losses = torch.empty(n, dtype=torch.float32, device=device)
    gx = torch.empty_like(x) if grad_input else x.new_empty(0)
    acc_dtype = torch.float32 if weight.dtype in _LOW_PRECISION and n_chunks > 1 else weight.dtype
    gw = torch.empty((vocab, hidden), dtype=acc_dtype, device=device) if grad_weight else weight.new_empty(0)
    gb = torch.zeros(vocab, dtype=torch.float32, device=device) if grad_bias else x.new_empty(0)
    use_triton = x.is_cuda or interpreting()
    chunk_loss = chunk_loss_triton if use_triton else chunk_loss_reference
    if not x.is_cuda:  # checked where it costs no GPU synchronization (PyTorch's CUDA kernels assert instead)
        bad = target[(target != ignore_index) & ((target < 0) | (target >= vocab))]
        if bad.numel():
            raise IndexError(
                f"target {bad[0].item()} is out of bounds for {vocab} classes (ignore_index={ignore_index})"
            )
    buffer = torch.empty((chunk, vocab), dtype=dtype, device=device) if n else None
    for k, start in enumerate(range(0, n, chunk)):
        end = min(start + chunk, n)
        xc = x[start:end]
        logits = buffer[: end - start]
        if b is None:
            torch.mm(xc, w.t(), out=logits)
        else:
            torch.addmm(b, xc, w.t(), out=logits)
        chunk_loss(
            logits, target[start:end], losses[start:end], scale,
            ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap, grad=grad,
        )
        if grad_input:
            torch.mm(logits, w, out=gx[start:end])
        if grad_weight:
            _accumulate_grad_weight(gw, logits, xc, first=k == 0)
        if grad_bias:
            gb += logits.sum(0, dtype=torch.float32)
    if grad_weight and n == 0:
        gw.zero_()
    loss = losses.sum()
    if reduction == "mean":
        loss = loss * scale
    return loss, gx, gw.to(weight.dtype), gb.to(bias.dtype) if grad_bias else gb


@torch.library.custom_op("lightning_thunder::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 - the schema inference of older torch reads typing.Optional
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: Optional[float],  # noqa: UP045
    reduction: str,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dx, dW, db)``: the fp32 loss of ``cross_entropy(x @ weight^T + bias, target)`` and, for an upstream
    gradient of 1, the gradients asked for (``grad_*``; an empty tensor for the others). ``x`` is ``[tokens,
    hidden]`` in the compute dtype; ``weight`` ``[vocab, hidden]`` and ``bias`` ``[vocab]`` are cast to it.
    ``chunk_size`` rows per chunk (0: :func:`default_chunk_size`). See the module docstring."""
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are chosen here, not by an enclosing autocast
        return _forward(
            x, weight, bias, target, ignore_index, label_smoothing, softcap, reduction,
            grad_input, grad_weight, grad_bias, chunk_size,
        )


@linear_cross_entropy_op.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, *options: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, label_smoothing, softcap, reduction, grad_input, grad_weight, grad_bias, _ = options
    _check(x, weight, bias, target, label_smoothing, softcap, reduction)
    loss = x.new_empty((), dtype=torch.float32)
    gx = x.new_empty(x.shape) if grad_input else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if grad_weight else weight.new_empty(0)
    gb = bias.new_empty(bias.shape) if grad_bias and bias is not None else x.new_empty(0)
    return loss, gx, gw, gb


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd of :func:`linear_cross_entropy_op`: the forward op computes the gradients (for an upstream gradient
    of 1); the backward scales them. AOTAutograd traces it as the one op in the forward trace and three multiplies
    in the backward trace."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        options: tuple[int, float, float | None, str, int],
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        """The fp32 loss; saves the gradients for the backward."""
        ignore_index, label_smoothing, softcap, reduction, chunk_size = options
        loss, gx, gw, gb = linear_cross_entropy_op(
            x, weight, bias, target, ignore_index, label_smoothing, softcap, reduction, *needs, chunk_size
        )
        ctx.save_for_backward(gx, gw, gb)
        ctx.needs = needs
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """The saved gradients times the upstream gradient."""
        gx, gw, gb = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs
        grads = (gx * grad if need_x else None, gw * grad if need_w else None, gb * grad if need_b else None)
        return (*grads, None, None, None)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float().flatten(0, -2), target.flatten(), ...)`` without the logits.

    Args:
        x: ``[..., hidden]`` (the last hidden states).
        weight: ``[vocab, hidden]``; bias: ``[vocab]`` or ``None``.
        target: class ids, as many as ``x`` has rows (any shape).
        ignore_index: targets with this value count neither in the loss nor in the mean's denominator.
        label_smoothing: PyTorch's definition (``F.cross_entropy``).
        softcap: LitGPT's/Gemma 2's final logit soft-capping ``c``: the loss sees ``c * tanh(logits / c)``.
        reduction: ``"mean"`` (over non-ignored targets; NaN when there are none, as PyTorch) or ``"sum"``.
        dtype: the matmuls' dtype (the linear's output dtype); default: the autocast dtype under autocast, else
            ``x.dtype``. ``weight`` and ``bias`` are cast to it, as autocast does.
        out_dtype: the loss's dtype (default float32).
        chunk_size: tokens per chunk (default :func:`default_chunk_size`).

    Returns:
        The loss, a scalar. The gradients of ``x``, ``weight`` and ``bias`` (those that require grad, with grad
        enabled) are computed in this call and scaled in the backward (see the module docstring).
    """
    device_type = x.device.type
    if dtype is None:
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x2d = x.reshape(-1, x.shape[-1]).to(dtype)
    grad = torch.is_grad_enabled()
    needs = (
        grad and x.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    options = (int(ignore_index), float(label_smoothing), None if softcap is None else float(softcap), reduction,
               int(chunk_size or 0))
    loss = LinearCrossEntropyFunction.apply(x2d, weight, bias, target.reshape(-1), options, needs)
    return loss if out_dtype is None or out_dtype == loss.dtype else loss.to(out_dtype)
