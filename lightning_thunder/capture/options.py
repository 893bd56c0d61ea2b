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
        # Checked by type, not truthiness: ``fullgraph="no"`` or ``cse=None`` would otherwise pass as a setting.
        _check_type("dynamic", self.dynamic, "None, True or False", allow_none=True)
        _check_type("fullgraph", self.fullgraph, "True or False")
        _check_type("cse", self.cse, "True or False")
        if not isinstance(self.partitioner, str):
            raise TypeError(
                f"partitioner={self.partitioner!r} must be a string, one of {list(_PARTITIONERS)}; "
                f"got {type(self.partitioner).__name__}"
            )
        if self.partitioner not in _PARTITIONERS:
            raise ValueError(f"partitioner={self.partitioner!r} is not one of {list(_PARTITIONERS)}")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> CompileOptions:
        """Build options from ``compile(**options)``; unknown names raise naming the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"lightning_thunder.compile got unknown option(s) {unknown}; valid options are {valid}")
        return cls(**options)


def _check_type(name: str, value: Any, allowed: str, *, allow_none: bool = False) -> None:
    """Raise ``TypeError`` naming the option and the value unless it is a bool (or ``None`` when allowed)."""
    if isinstance(value, bool) or (allow_none and value is None):
        return
    raise TypeError(
        f"lightning_thunder.compile option {name}={value!r} must be {allowed}, got {type(value).__name__}"
        + (f"; did you mean {name}={_bool_hint(value)}?" if _bool_hint(value) is not None else "")
    )


def _bool_hint(value: Any) -> bool | None:
    """The bool a user probably meant (``"no"`` -> ``False``, ``1`` -> ``True``), if it is clear."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None
