"""Executors: who runs each op of the final traces.

An executor looks at a post-autograd trace and *claims* ops (or whole regions, replacing them with
one op that runs a generated kernel) by returning a new trace whose claimed ops carry its name.
Executors run in order; the :class:`~lightning_thunder.executors.TorchExecutor` comes last and
claims everything left, so an op no other executor wants always runs on PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_thunder.trace.trace import BoundOp, Trace, timed_pass

__all__ = ["ClaimContext", "Executor", "OpExecutor"]


@dataclass(frozen=True)
class ClaimContext:
    """What the compiler tells an executor besides the trace it claims from.

    Attributes:
        stage: ``"forward"`` or ``"backward"``.
        epilogues: the :class:`~lightning_thunder.executors.triton.epilogues.Epilogue` objects the compiling
            plugins declare (:meth:`lightning_thunder.Plugin.fusion_epilogues`).
    """

    stage: str = "forward"
    epilogues: tuple[Any, ...] = ()


class Executor:
    """Base class of executors. Subclasses set :attr:`name` and override :meth:`claim`.

    Args:
        name: the executor's name, shown in final traces (``[torch]``) and in ``executor_counts``.
    """

    def __init__(self, name: str) -> None:
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"executor name must be alphanumeric (underscores allowed), got {name!r}")
        self.name = name

    def claim(self, trace: Trace) -> Trace:
        """Return ``trace`` with the ops this executor runs marked (``op.executor = self.name``) or
        replaced by ops that run its kernels. Ops already claimed (``op.executor`` set) are left alone."""
        return trace

    def claim_stages(self, trace: Trace, context: ClaimContext) -> list[Trace]:
        """The traces of claiming ``trace``, stage by stage; the last one is the claimed trace.

        An executor that works in several steps (the fusion executor's plan passes) returns one trace per step,
        each named after it (``"fusion:layout"``: the compiler shows it as ``"forward/fusion:layout"``). The default
        is :meth:`claim` alone.
        """
        return [self.claim(trace)]

    def decompositions(self) -> dict[Any, Callable]:
        """ATen decompositions this executor wants AOTAutograd to apply (op -> decomposition)."""
        return {}

    def partition_options(self) -> dict[str, Any]:
        """``torch._functorch.config`` settings to apply while the forward/backward are partitioned
        (e.g. which recomputation heuristics suit this executor's kernels). Applied only for the
        partition call, then restored; names this torch version lacks are ignored."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class OpExecutor(Executor):
    """An executor that runs selected ops with its own implementations.

    Args:
        name: executor name.
        implementations: op target (e.g. ``torch.ops.aten.gelu.default``) -> callable taking the same
            arguments.
        checkers: optional op target -> predicate on the :class:`BoundOp`; the op is claimed only
            where the predicate is true (e.g. only for bf16 inputs).

    Example::

        fast_gelu = OpExecutor("fastgelu", {torch.ops.aten.gelu.default: my_gelu})
    """

    def __init__(
        self,
        name: str,
        implementations: Mapping[Any, Callable],
        checkers: Mapping[Any, Callable[[BoundOp], bool]] | None = None,
    ) -> None:
        super().__init__(name)
        self.implementations = dict(implementations)
        self.checkers = dict(checkers or {})

    def claim(self, trace: Trace) -> Trace:
        """Replace each unclaimed op with an implementation here (and whose checker agrees)."""
        with timed_pass() as timer:
            ops = []
            for op in trace.ops:
                impl = None if op.executor or op.is_method else self._lookup(op.target)
                check = self.checkers.get(op.target) if impl is not None else None
                if impl is not None and (check is None or check(op)):
                    op = op.replace(target=impl, executor=self.name, label=op.name)
                ops.append(op)
        return trace.derive(f"executor {self.name}", ops=ops, elapsed_ms=timer.ms)

    def _lookup(self, target: Any) -> Callable | None:
        try:
            return self.implementations.get(target)
        except TypeError:
            return None
