"""Options of :func:`lightning_thunder.compile`, validated up front."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["CompileOptions"]

_PARTITIONERS = ("min_cut", "default")


@dataclass(frozen=True)
class CompileOptions:
    """Options accepted by :func:`lightning_thunder.compile` as keyword arguments.

    Attributes:
        dynamic: passed to Dynamo: ``None`` specializes on the first shapes and turns a dimension
            dynamic when it changes (torch.compile's default), ``True`` starts dynamic, ``False``
            recompiles for every new shape.
        fullgraph: raise on a graph break instead of splitting the program.
        partitioner: how the joint forward/backward graph is split. ``"min_cut"`` recomputes cheap
            pointwise work in the backward instead of saving it when that saves memory;
            ``"default"`` saves what the backward reads.
        cse: run common subexpression elimination on the forward and backward traces.
    """

    dynamic: bool | None = None
    fullgraph: bool = False
    partitioner: str = "min_cut"
    cse: bool = True

    def __post_init__(self) -> None:
        if self.partitioner not in _PARTITIONERS:
            raise ValueError(f"partitioner={self.partitioner!r} is not one of {list(_PARTITIONERS)}")
        if self.dynamic not in (None, True, False):
            raise ValueError(f"dynamic={self.dynamic!r} must be None, True or False")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> CompileOptions:
        """Build options from ``compile(**options)``; unknown names raise naming the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"lightning_thunder.compile got unknown option(s) {unknown}; valid options are {valid}")
        return cls(**options)
