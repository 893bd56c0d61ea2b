"""What Dynamo compiles for lightning_thunder, and how a call learns that it ran eagerly.

Dynamo keeps its compiled graphs, and its recompile limit (``torch._dynamo.config.recompile_limit``, 8), per
Python *code object*. Once a code object has that many graphs, a call whose inputs match none of them runs
eagerly, with a single log line the first time: the plugins (fusion, FP8, ...) silently stop applying. So:

- **One code object per (backend, class)**: :func:`module_caller` gives each backend (each set of plugin
  instances and options, see :func:`~lightning_thunder.capture.backend.get_backend`) its own function calling the
  module, and :func:`function_for` its own copy of a compiled function. Instances of a class compiled with the same
  plugins still share their graphs (every transformer block runs one); a tenth model of a sweep compiled with new
  plugins no longer inherits a budget the first nine used up.
- **Every graph run is recorded**: :class:`DynamoBackend`, what Dynamo is handed for a backend, wraps each compiled
  graph so a call notes which graph ran for which compiled module (:meth:`CompileState.note_run`). A call that ran
  none of them while graphs of its code object did run before ran eagerly: it is warned about and counted in
  ``compile_stats(cm).eager_calls`` / ``eager_fallbacks`` (see :func:`note_eager_call`).
- **The limit applies per set of plugins**: code objects of the user's own (a ``forward`` Dynamo compiles after a
  graph break, and its resume functions) are shared by every set of plugins that compiles the class, each adding
  its graphs. During a call, the limit is raised to Dynamo's limit times the number of plugin sets that compiled the
  class (:func:`recompile_budget`), so each set keeps the budget it would have alone.
- **Dynamo's limit message is read**: a logging filter on Dynamo's frame converter records the "hit
  config.recompile_limit" warning, with Dynamo's last reason, in the state of the call that hit it.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
import sys
import types
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_thunder.capture.state import CompileState, SharedCode, current_state

__all__ = [
    "DynamoBackend",
    "dynamo_backend",
    "function_for",
    "install_limit_filter",
    "module_caller",
    "note_eager_call",
    "recompile_budget",
    "user_stacklevel",
]

_SERIAL = itertools.count()
_LIMIT_MESSAGE = "torch._dynamo hit config."
#: Per compiled class (or function) label: the plugin sets (backends) that compiled a graph of it.
_PLUGIN_SETS: dict[str, weakref.WeakSet] = defaultdict(weakref.WeakSet)


def recompile_budget(label: str) -> int:
    """The recompile limit for the frames a call of a compiled ``label`` compiles: Dynamo's limit times the number
    of plugin sets that compiled ``label`` (at least one), as they share the class's own code objects."""
    import torch

    return torch._dynamo.config.recompile_limit * max(1, len(_PLUGIN_SETS.get(label, ())))


class DynamoBackend:
    """The ``torch.compile`` backend Dynamo is given for one :class:`~lightning_thunder.capture.ThunderBackend`
    (one per backend, so Dynamo still shares graphs between everything compiled with it).

    It runs the backend and wraps each compiled graph so that running it records the graph in the state of the
    compiled module or function whose call is running. It also holds the backend's code objects (callers per
    module class, copies per function).
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.serial = next(_SERIAL)
        self.callers: dict[type, Callable] = {}
        self.functions: dict[Callable, Callable] = {}
        self.shared: dict[Callable, SharedCode] = {}

    def __call__(self, gm: Any, example_inputs: Sequence[Any]) -> Callable:
        state = current_state() or self.backend.orphan_state
        before = len(state.records)
        compiled = self.backend(gm, example_inputs)
        if len(state.records) <= before:  # nothing recorded (should not happen): leave the graph unwrapped
            return compiled
        record = state.records[before]
        _PLUGIN_SETS[state.label].add(self)

        def run(*args: Any) -> Any:
            current = current_state()
            if current is not None:
                current.note_run(record)
            return compiled(*args)

        # Keeps AOTAutograd's attributes (its calling convention, ``named_parameters``, ...) on the wrapper.
        return functools.update_wrapper(run, compiled, assigned=(), updated=("__dict__",))

    def __deepcopy__(self, memo: dict) -> DynamoBackend:
        # Shared, like the backend itself (Lightning deep-copies torch.compile's keyword arguments).
        return self

    def __repr__(self) -> str:
        return f"DynamoBackend({self.backend!r})"

    def shared_code(self, fn: Callable, name: str) -> SharedCode:
        """What every compiled object calling through ``fn`` (a code object of this backend) shares."""
        if fn not in self.shared:
            self.shared[fn] = SharedCode(name)
        return self.shared[fn]


def dynamo_backend(backend: Any) -> DynamoBackend:
    """The :class:`DynamoBackend` of ``backend``, created once (kept on the backend, which lives as long as
    something compiled with it)."""
    wrapper = backend.__dict__.get("_lt_dynamo_backend")
    if wrapper is None:
        wrapper = backend.__dict__["_lt_dynamo_backend"] = DynamoBackend(backend)
    return wrapper


def module_caller(cls: type, backend: Any) -> Callable:
    """A function ``call(module, *args, **kwargs) -> module(*args, **kwargs)`` with its own code object for
    ``cls`` and ``backend``: what Dynamo compiles for modules of that class compiled with that backend.

    Why not ``torch.compile(module)``: its ``OptimizedModule`` forwards attribute writes to the module, so
    Lightning's wrapper of ``torch.compile`` stores its kwargs (our backend) on the user's module, where they break
    pickling. Why not ``module.__call__``: Dynamo skips frames in ``torch.nn`` files, so ``nn.Sequential`` would
    silently run eagerly. Why one code object per class and backend: Dynamo keeps its compiled graphs and its
    recompile budget per code object; instances of a class compiled with the same plugins share graphs, while
    other classes and other plugins neither collide with them nor use up their budget.
    """
    entry = dynamo_backend(backend)
    caller = entry.callers.get(cls)
    if caller is None:

        def call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return module(*args, **kwargs)

        # The backend's serial tells the code objects apart in Dynamo's messages ("call_Block_3").
        name = "call_" + "".join(ch if ch.isalnum() else "_" for ch in cls.__qualname__) + f"_{entry.serial}"
        names = {"co_name": name, **({"co_qualname": name} if hasattr(call.__code__, "co_qualname") else {})}
        call.__code__ = call.__code__.replace(**names)
        call.__name__ = call.__qualname__ = name
        caller = entry.callers[cls] = call
    return caller


def function_for(fn: Callable, backend: Any) -> Callable:
    """``fn`` with a code object of its own for ``backend`` (a copy of a Python function, or of a bound method's
    function, rebound), so that compiling one function with several sets of plugins gives each its own Dynamo
    budget. Other callables (``functools.partial``, objects with ``__call__``, builtins) are returned as they are."""
    entry = dynamo_backend(backend)
    func = fn.__func__ if inspect.ismethod(fn) else fn
    if not isinstance(func, types.FunctionType):
        return fn
    copy = entry.functions.get(func)
    if copy is None:
        copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                                  func.__closure__)
        copy.__kwdefaults__ = func.__kwdefaults__
        copy.__dict__.update(func.__dict__)
        functools.update_wrapper(copy, func, updated=())
        del copy.__wrapped__  # Dynamo must run the copy, not unwrap it to the shared original
        entry.functions[func] = copy
    return types.MethodType(copy, fn.__self__) if inspect.ismethod(fn) else copy


_INTERNAL = tuple(
    os.path.dirname(mod.__file__) + os.sep
    for mod in (sys.modules["lightning_thunder"], sys.modules["torch"])
    if getattr(mod, "__file__", None)
)


def user_stacklevel() -> int:
    """The ``stacklevel`` of a ``warnings.warn`` call made here that points at the first frame outside
    lightning_thunder and torch (the user's line that called the compiled module)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def note_eager_call(state: CompileState, hit: str | None, partly: bool = False) -> None:
    """Record, and warn about, a call of ``state``'s compiled object that ran none of its compiled graphs while
    graphs of its code object ran before, or during which Dynamo reported its recompile limit (``hit``; with
    ``partly``, after a graph of the call ran: the code after a graph break ran eagerly)."""
    shared = state.shared
    if hit is None and (shared is None or not shared.ran_graph):
        return  # never ran a graph: an empty program, or a frame Dynamo skips, not a fallback
    import torch

    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    if stance == "force_eager":
        return  # asked for: torch.compiler.set_stance("force_eager")
    limit = torch._dynamo.config.recompile_limit
    if hit is None and shared is not None and shared.limit_hits:
        hit = shared.limit_hits[-1]
    if hit is not None:
        reason = f"Dynamo's recompile limit was reached ({hit})"
    elif stance != "default":
        reason = f"torch.compiler.set_stance({stance!r}) is in effect and none of the compiled graphs matched"
    else:
        reason = (
            "none of the graphs compiled for it matched the inputs and Dynamo compiled no new one (most likely its "
            f"recompile limit, torch._dynamo.config.recompile_limit={limit}, was reached earlier)"
        )
    first = not state.eager_fallbacks or state.eager_fallbacks[-1] != reason
    state.eager_calls += 1
    if first:
        state.eager_fallbacks.append(reason)
        warnings.warn(
            f"lightning_thunder: a call of the compiled {state.label} ran eagerly"
            f"{' after a graph break' if partly else ''}, without lightning_thunder and its plugins: {reason}. "
            "compile_stats(...).eager_calls counts such calls. "
            "Fixes: dynamic=None or True for "
            "inputs whose shapes change, fewer variants of the inputs (dtypes, grad mode), or a larger "
            "torch._dynamo.config.recompile_limit",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


class _LimitFilter(logging.Filter):
    """Passes every record on; records Dynamo's "hit config.recompile_limit" warning in the running call's state."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_LIMIT_MESSAGE):
            state = current_state()
            if state is not None:
                args = record.args if isinstance(record.args, tuple) else ()
                if len(args) >= 4:
                    text = f"config.{args[0]}={args[1]} for {args[2]}; Dynamo's last reason: {str(args[3]).strip()}"
                else:
                    text = record.getMessage().splitlines()[0]
                state.limit_hits.append(text)
                if state.shared is not None and f"'{state.shared.name}'" in text:
                    state.shared.limit_hits.append(text)
        return True


_FILTER = _LimitFilter()


def install_limit_filter() -> None:
    """Attach the filter to Dynamo's frame-converter logger (once; it passes every record on unchanged)."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
