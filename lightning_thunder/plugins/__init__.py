"""Compiler plugins: fusion, grouped-query attention, FP8, CUDA graphs, parallelism (FSDP, DDP) and helpers for block-wise
(regional) compilation."""

from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.base import FinalContext
from lightning_thunder.plugins.blocks import checkpoint_block, compile_blocks, find_block_class, find_blocks
from lightning_thunder.plugins.cudagraphs import CUDAGraphs, CUDAGraphStats, CUDAGraphsWarning
from lightning_thunder.plugins.ddp import DDP
from lightning_thunder.plugins.fp8 import FP8, LinearInfo, default_filter
from lightning_thunder.plugins.fsdp import FSDP
from lightning_thunder.plugins.fusion import Fusion
from lightning_thunder.plugins.gqa import NativeGQA

__all__ = [
    "CUDAGraphStats",
    "CUDAGraphs",
    "CUDAGraphsWarning",
    "DDP",
    "FP8",
    "FSDP",
    "FinalContext",
    "Fusion",
    "LinearInfo",
    "NativeGQA",
    "Plugin",
    "checkpoint_block",
    "compile_blocks",
    "default_filter",
    "find_block_class",
    "find_blocks",
]
