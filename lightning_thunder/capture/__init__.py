"""Capture: the Dynamo backend, the AOTAutograd bridge, compiled wrappers and their records."""

from lightning_thunder.capture.backend import ThunderBackend, get_backend
from lightning_thunder.capture.compiled import ThunderFunction, ThunderModule, compile_states
from lightning_thunder.capture.errors import CaptureError
from lightning_thunder.capture.options import CompileOptions
from lightning_thunder.capture.state import CompileState, CompileStats, GraphRecord

__all__ = [
    "CaptureError",
    "CompileOptions",
    "CompileState",
    "CompileStats",
    "GraphRecord",
    "ThunderBackend",
    "ThunderFunction",
    "ThunderModule",
    "compile_states",
    "get_backend",
]
