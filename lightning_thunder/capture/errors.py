"""Errors raised when a program cannot be captured or compiled."""

from __future__ import annotations

import re
import traceback

import torch.fx as fx

from lightning_thunder.trace.printing import source_comment
from lightning_thunder.trace.trace import op_display_name

__all__ = ["CaptureError", "locate_failure"]

WORKAROUND = (
    "Workaround: run that code outside the compiled region (move it out of the module or decorate "
    "the function with @torch.compiler.disable), or compile the submodules that work on their own."
)


class CaptureError(RuntimeError):
    """lightning_thunder could not turn (part of) the program into traces.

    The message names the op and the user's source line where they are known, and a workaround.
    """


def _describe_node(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else op_display_name(node.target)
    src = source_comment(node.meta)
    return f"op `{target}` (node {node.name})" + (f", from {src}" if src else "")


def locate_failure(exc: BaseException, gm: fx.GraphModule) -> str | None:
    """The op of ``gm`` running when ``exc`` was raised, with the user source line it came from."""
    text = "\n".join([str(exc), *getattr(exc, "__notes__", [])])
    match = re.search(r"While executing %(\w+)", text)
    if match:
        for node in gm.graph.nodes:
            if node.name == match.group(1):
                return _describe_node(node)
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
                return _describe_node(node)
        return f"`{line}`"
    return None
