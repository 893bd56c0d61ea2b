"""Decompositions written for fusion: the same math as ATen's, in ops a region can hold.

``nll_loss_forward`` picks each row's target logit with ``torch.gather``, which no region can hold, so
the log-softmax before it has to be written to memory in fp32 (4 bytes x rows x vocabulary) and is then
saved for the backward. Picking with a one-hot mask and a sum over the classes (exact: every other
term is 0) keeps the whole loss in one kernel, leaves nothing vocabulary-sized to save but the
logits, and its backward is a ``where`` instead of a zero-filled tensor plus a scatter.
"""

from __future__ import annotations

import torch

__all__ = ["nll_loss_backward", "nll_loss_forward"]

_NONE, _MEAN, _SUM = 0, 1, 2


def _onehot(self: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``valid`` [N, 1]: target is not ignored, ``onehot`` [N, C]: column == target, never true on an
    ignored row).

    Computed on ``[N, 1]`` (not ``[N]``) targets: a region's grid is rows x columns, and a 1-D value of
    length N could be either; as a column of N rows the masking joins the loss's kernel.
    """
    column = target.unsqueeze(1)
    valid = column != ignore_index
    safe_target = torch.where(valid, column, -1)  # -1 matches no class
    onehot = torch.arange(self.shape[-1], device=self.device).unsqueeze(0) == safe_target
    return valid, onehot


def nll_loss_forward(
    self: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor] | type(NotImplemented):
    """``aten.nll_loss_forward`` for ``[N, C]`` inputs, without ``gather``; other shapes are not handled."""
    if self.dim() != 2 or target.dim() != 1:
        return NotImplemented
    valid, onehot = _onehot(self, target, ignore_index)
    if weight is not None:
        self = self * weight.unsqueeze(0)
    picked = torch.where(onehot, self, 0).sum(-1, keepdim=True)
    result = torch.where(valid, -picked, 0).squeeze(1)
    if reduction == _NONE:
        return result, self.new_full((), 0.0)
    if weight is not None:
        wsum = torch.where(onehot, weight.unsqueeze(0), 0).sum(-1, keepdim=True)
        total_weight = torch.where(valid, wsum, 0).sum()
    else:
        # Counted from the 1-D targets, apart from the loss's kernel: the backward needs the count before
        # its kernel runs, and recomputing it inside that kernel's inputs would tie the two together.
        total_weight = (target != ignore_index).sum().to(self.dtype)
    if reduction == _SUM:
        return result.sum(), total_weight
    return result.sum() / total_weight, total_weight


def nll_loss_backward(
    grad_output: torch.Tensor,
    self: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: int,
    ignore_index: int,
    total_weight: torch.Tensor,
) -> torch.Tensor | type(NotImplemented):
    """``aten.nll_loss_backward`` for ``[N, C]`` inputs as a ``where`` over a one-hot mask (no zero-fill
    and scatter); other shapes are not handled."""
    if self.dim() != 2 or target.dim() != 1:
        return NotImplemented
    _, onehot = _onehot(self, target, ignore_index)
    if reduction == _MEAN:
        grad = grad_output / total_weight
    elif reduction == _SUM:
        grad = grad_output
    else:
        grad = grad_output.unsqueeze(1)
    if weight is not None:
        grad = grad * weight.unsqueeze(0)
    return torch.where(onehot, -grad, 0).to(self.dtype)
