"""Hand-written Triton kernels for hot spots the fusion regions cannot express, one kernel per file.

- :mod:`~lightning_thunder.executors.kernels.fp8_quant`: dynamic FP8 quantization (amax, scale, saturating
  cast, optional transposed copy).
"""
