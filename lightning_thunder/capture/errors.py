"""Errors raised when a program cannot be captured or compiled."""

from __future__ import annotations

import traceback

import torch.fx as fx

from lightning_thunder.trace.printing import source_comment

__all__ = ["CaptureError", "locate_failure"]

WORKAROUND = (
    "Workaround: run that code outside the compiled region (move it out of the module or decorate "
    "the function with @torch.compiler.disable), or compile the submodules that work on their own."
)


class CaptureError(RuntimeError):
    """lightning_thunder could not turn (part of) the program into traces.

    The message names the op and the user's source line where they are known, and a workaround.
    """


def locate_failure(exc: BaseException, gm: fx.GraphModule) -> str | None:
    """The generated line of ``gm`` running when ``exc`` was raised, with the user source it came from."""
    code = getattr(type(gm).forward, "__code__", None)
    if code is None:
        return None
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename != code.co_filename or not frame.line:
            continue
        line = frame.line.strip()
        lhs = line.split("=", 1)[0].strip() if "=" in line else ""
        for node in gm.graph.nodes:
            if node.name == lhs:
                src = source_comment(node.meta)
                return f"`{line.split(';')[0]}`" + (f" (from {src})" if src else "")
        return f"`{line}`"
    return None
