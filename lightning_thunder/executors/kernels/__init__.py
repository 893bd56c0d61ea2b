"""Hand-written Triton kernels for hot spots the fusion regions cannot express, one kernel per file.

- :mod:`~lightning_thunder.executors.kernels.fp8_quant`: dynamic FP8 quantization (amax, scale, saturating
  cast, optional transposed copy).
- :mod:`~lightning_thunder.executors.kernels.linear_cross_entropy`: one chunk of logits' cross-entropy and its gradient,
  in place (the per-chunk step of :func:`lightning_thunder.ops.linear_cross_entropy`).
"""
