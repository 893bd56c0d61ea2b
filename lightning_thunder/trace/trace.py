"""The trace IR: an ordered list of bound ops over named proxies, printable as runnable Python.

A :class:`Trace` is immutable by convention: every pass builds a new one (sharing the unchanged
:class:`BoundOp` and :class:`Proxy` objects) and stamps it with its own name and provenance, so the
whole history of a compilation can be kept and printed stage by stage.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from lightning_thunder.trace.proxy import ConstRef, Proxy
from lightning_thunder.trace.tree import iter_leaves, map_structure

__all__ = ["BoundOp", "Trace", "DELETE", "NameGenerator", "op_display_name"]


class _Delete:
    """Target of the pseudo-op that frees proxies (printed as ``del a, b``)."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def op_display_name(target: Any) -> str:
    """A short human-readable name for an op target (``aten.mm.default``, ``linear``, ``.view``)."""
    if isinstance(target, str):
        return f".{target}"
    if target is DELETE:
        return "del"
    mod = type(target).__module__
    if mod == "torch._ops":
        return str(target)
    return getattr(target, "__name__", None) or type(target).__name__


class BoundOp:
    """One operation of a trace: ``outputs = target(*args, **kwargs)``.

    Args:
        target: the callable to run, or a method name (``"view"``) called on ``args[0]``, or
            :data:`DELETE`.
        args, kwargs: nested tuples/lists/dicts/slices of :class:`Proxy`, :class:`ConstRef` and constants.
        outputs: the proxies the op defines. ``None`` entries are results nobody uses.
        unpack: ``True`` if the op returns a sequence unpacked into ``outputs``; otherwise the op has
            exactly one output entry (``None`` when the result is discarded).
        executor: name of the executor that runs the op (set by executor assignment).
        meta: free-form metadata (the FX node meta it came from: ``stack_trace``, ``nn_module_stack``).
        label: display name for ops that stand for a region (``fusion0``).
        subops: the constituent ops of a region op, for printing and statistics.
    """

    __slots__ = ("target", "args", "kwargs", "outputs", "unpack", "executor", "meta", "label", "subops")

    def __init__(
        self,
        target: Any,
        args: tuple = (),
        kwargs: dict | None = None,
        outputs: Sequence[Proxy | None] = (None,),
        *,
        unpack: bool = False,
        executor: str | None = None,
        meta: dict | None = None,
        label: str | None = None,
        subops: Sequence[BoundOp] = (),
    ) -> None:
        self.target = target
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.outputs = tuple(outputs)
        self.unpack = unpack
        if not unpack and len(self.outputs) != 1:
            raise ValueError(f"an op that does not unpack has exactly one output entry, got {len(self.outputs)}")
        self.executor = executor
        self.meta = meta if meta is not None else {}
        self.label = label
        self.subops = tuple(subops)

    @property
    def name(self) -> str:
        """The display name of the op (its label for regions)."""
        return self.label or op_display_name(self.target)

    @property
    def is_method(self) -> bool:
        """Whether the op is a method call on its first argument."""
        return isinstance(self.target, str)

    def input_proxies(self) -> list[Proxy]:
        """The proxies this op reads, in argument order, without duplicates."""
        seen: dict[int, Proxy] = {}
        for leaf in iter_leaves((self.args, self.kwargs)):
            if isinstance(leaf, Proxy) and id(leaf) not in seen:
                seen[id(leaf)] = leaf
        return list(seen.values())

    def output_proxies(self) -> list[Proxy]:
        """The proxies this op defines (``None`` entries skipped)."""
        return [p for p in self.outputs if p is not None]

    def replace(self, **changes: Any) -> BoundOp:
        """A copy of this op with some fields changed."""
        fields = {s: getattr(self, s) for s in self.__slots__}
        fields.update(changes)
        target = fields.pop("target")
        args = fields.pop("args")
        kwargs = fields.pop("kwargs")
        outputs = fields.pop("outputs")
        return BoundOp(target, args, kwargs, outputs, **fields)

    def map_inputs(self, fn: Callable[[Any], Any]) -> BoundOp:
        """A copy of this op with every leaf of its arguments replaced by ``fn(leaf)``."""
        return self.replace(args=map_structure(fn, self.args), kwargs=map_structure(fn, self.kwargs))

    def __repr__(self) -> str:
        outs = ", ".join(p.name if p is not None else "_" for p in self.outputs)
        return f"<BoundOp {outs} = {self.name}>"


class NameGenerator:
    """Hands out fresh proxy names that do not clash with the names already used in a trace."""

    def __init__(self, used: Iterable[str] = ()) -> None:
        self._used = set(used)
        self._counters: dict[str, int] = {}

    def __call__(self, prefix: str = "t") -> str:
        """A new name ``<prefix><n>``, never handed out before."""
        n = self._counters.get(prefix, 0)
        while f"{prefix}{n}" in self._used:
            n += 1
        self._counters[prefix] = n + 1
        name = f"{prefix}{n}"
        self._used.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim ``name`` if free, else a fresh variant of it (``name_1``)."""
        base, candidate, k = name, name, 1
        while candidate in self._used:
            candidate = f"{base}_{k}"
            k += 1
        self._used.add(candidate)
        return candidate


class Trace:
    """A program: inputs, an ordered list of :class:`BoundOp`, and an output structure.

    Args:
        name: the stage this trace belongs to (``"torch"``, ``"forward"``, ``"backward"``...).
        inputs: the proxies the program takes, in order.
        ops: the ops, in execution order.
        output: a nested structure of proxies and constants the program returns.
        provenance: what made this trace (printed in its header), e.g. ``"dead code elimination"``.
        fn_name: the name of the printed Python function.
        constants: values the program refers to by name (:class:`ConstRef`), e.g. captured tensors.
        elapsed_ms: how long the pass that made this trace took.
        input_meta: per input name, the FX placeholder metadata it came from (kept for round trips).
        annotations: what the pass that made this trace records about it for later readers (the fusion
            executor's plan, read by :func:`lightning_thunder.explain`); kept by :meth:`renamed`, not by :meth:`derive`.
    """

    def __init__(
        self,
        name: str,
        inputs: Sequence[Proxy],
        ops: Sequence[BoundOp],
        output: Any,
        *,
        provenance: str = "",
        fn_name: str = "forward",
        constants: dict[str, Any] | None = None,
        elapsed_ms: float | None = None,
        input_meta: dict[str, dict] | None = None,
        annotations: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.ops = tuple(ops)
        self.output = output
        self.provenance = provenance
        self.fn_name = fn_name
        self.constants = dict(constants or {})
        self.elapsed_ms = elapsed_ms
        self.input_meta = dict(input_meta or {})
        self.annotations = dict(annotations or {})
        self._callables: dict[bool, Callable] = {}

    # ----------------------------------------------------------------------------------- building
    def derive(
        self,
        provenance: str,
        *,
        name: str | None = None,
        inputs: Sequence[Proxy] | None = None,
        ops: Sequence[BoundOp] | None = None,
        output: Any = ...,
        constants: dict[str, Any] | None = None,
        elapsed_ms: float | None = None,
    ) -> Trace:
        """A new trace made from this one by a pass named ``provenance``; unspecified parts are shared."""
        return Trace(
            self.name if name is None else name,
            self.inputs if inputs is None else inputs,
            self.ops if ops is None else ops,
            self.output if output is ... else output,
            provenance=provenance,
            fn_name=self.fn_name,
            constants=self.constants if constants is None else constants,
            elapsed_ms=elapsed_ms,
            input_meta=self.input_meta,
        )

    def renamed(self, name: str) -> Trace:
        """The same program under another stage name (provenance and timing kept)."""
        return Trace(
            name,
            self.inputs,
            self.ops,
            self.output,
            provenance=self.provenance,
            fn_name=self.fn_name,
            constants=self.constants,
            elapsed_ms=self.elapsed_ms,
            input_meta=self.input_meta,
            annotations=self.annotations,
        )

    def names(self) -> set[str]:
        """Every proxy and constant name used in the trace."""
        used = {p.name for p in self.inputs} | set(self.constants)
        for op in self.ops:
            used.update(p.name for p in op.output_proxies())
        return used

    def name_generator(self) -> NameGenerator:
        """A :class:`NameGenerator` that avoids the names of this trace."""
        return NameGenerator(self.names())

    def readers(self) -> defaultdict[int, list[BoundOp]]:
        """Proxy id -> the ops that read it, in trace order (an unread proxy maps to ``[]``)."""
        readers: defaultdict[int, list[BoundOp]] = defaultdict(list)
        for op in self.ops:
            for p in op.input_proxies():
                readers[id(p)].append(op)
        return readers

    def producers(self) -> dict[int, BoundOp]:
        """Proxy id -> the op that makes it (trace inputs and constants have none)."""
        return {id(p): op for op in self.ops for p in op.output_proxies()}

    def output_proxies(self) -> list[Proxy]:
        """The proxies in the output structure."""
        return [leaf for leaf in iter_leaves(self.output) if isinstance(leaf, Proxy)]

    def iter_ops(self, *, regions: bool = True) -> Iterator[BoundOp]:
        """The ops in order; with ``regions=True`` region ops are expanded into their constituents."""
        for op in self.ops:
            if regions and op.subops:
                yield from op.subops
            else:
                yield op

    # ----------------------------------------------------------------------------------- printing
    def python(self, *, boxed: bool = False) -> str:
        """The trace as a runnable Python program (imports, one function, shape comments).

        With ``boxed=True`` the function takes one list of arguments and clears it, so the caller's
        references die as soon as the program no longer needs them (AOTAutograd's boxed convention).
        """
        from lightning_thunder.trace.printing import TracePrinter

        return TracePrinter(self, boxed=boxed).source()

    def python_callable(self, *, boxed: bool = False) -> Callable:
        """Compile :meth:`python` and return the function it defines (cached)."""
        fn = self._callables.get(boxed)
        if fn is None:
            from lightning_thunder.trace.printing import TracePrinter

            fn = TracePrinter(self, boxed=boxed).build()
            self._callables[boxed] = fn
        return fn

    def __repr__(self) -> str:
        return self.python()

    def __str__(self) -> str:
        return self.python()

    def __len__(self) -> int:
        return len(self.ops)


class timed_pass:
    """Context manager timing a pass: ``with timed_pass() as t: ...; new = trace.derive(..., elapsed_ms=t.ms)``."""

    def __enter__(self) -> timed_pass:
        self._t0 = time.perf_counter()
        self.ms = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.ms = (time.perf_counter() - self._t0) * 1e3


def collect_const_refs(x: Any) -> list[str]:
    """Names of the :class:`ConstRef` leaves of a structure."""
    return [leaf.name for leaf in iter_leaves(x) if isinstance(leaf, ConstRef)]
