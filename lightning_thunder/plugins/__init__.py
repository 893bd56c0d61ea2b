"""Compiler plugins: fusion, grouped-query attention, fused output head + loss, FP8, CUDA graphs, parallelism (FSDP,
DDP, TensorParallel) and helpers for block-wise (regional) compilation."""

from lightning_thunder.plugins.base import FinalContext, Plugin
from lightning_thunder.plugins.blocks import checkpoint_block, compile_blocks, find_block_class, find_blocks
from lightning_thunder.plugins.cudagraphs import CUDAGraphs, CUDAGraphStats, CUDAGraphsWarning
from lightning_thunder.plugins.ddp import DDP
from lightning_thunder.plugins.fp8 import FP8, LinearInfo, default_filter
from lightning_thunder.plugins.fsdp import FSDP
from lightning_thunder.plugins.fusion import Fusion
from lightning_thunder.plugins.gqa import NativeGQA
from lightning_thunder.plugins.linear_cross_entropy import FusedLinearCrossEntropy
from lightning_thunder.plugins.tensor_parallel import TensorParallel

__all__ = [
    "CUDAGraphStats",
    "CUDAGraphs",
    "CUDAGraphsWarning",
    "DDP",
    "FP8",
    "FSDP",
    "FinalContext",
    "FusedLinearCrossEntropy",
    "Fusion",
    "LinearInfo",
    "NativeGQA",
    "Plugin",
    "TensorParallel",
    "checkpoint_block",
    "compile_blocks",
    "default_filter",
    "find_block_class",
    "find_blocks",
]
