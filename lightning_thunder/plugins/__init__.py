"""Compiler plugins."""

from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.blocks import checkpoint_block, compile_blocks, find_block_class, find_blocks
from lightning_thunder.plugins.ddp import DDP
from lightning_thunder.plugins.fsdp import FSDP

__all__ = ["DDP", "FSDP", "Plugin", "checkpoint_block", "compile_blocks", "find_block_class", "find_blocks"]
