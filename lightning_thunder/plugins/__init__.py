"""Compiler plugins."""

from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.fusion import Fusion

__all__ = ["Fusion", "Plugin"]
