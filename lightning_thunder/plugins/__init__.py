"""Compiler plugins."""

from lightning_thunder.plugins.base import Plugin

__all__ = ["Plugin"]
