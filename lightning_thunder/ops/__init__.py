"""Composite ops that plugins put into traces, with their own autograd.

- :mod:`~lightning_thunder.ops.linear_cross_entropy`: ``cross_entropy(linear(x, W, b), target)`` chunked over the
  tokens, without materializing the logits (what :class:`~lightning_thunder.plugins.FusedLinearCrossEntropy`
  rewrites the output head and loss into).
"""

from lightning_thunder.ops.linear_cross_entropy import default_chunk_size, linear_cross_entropy

__all__ = ["default_chunk_size", "linear_cross_entropy"]
