"""Printing a :class:`~lightning_thunder.trace.Trace` as Python source, and compiling that source.

The printed program imports what it uses, defines one function, annotates every value with its
device, dtype and shape, and carries the user's source lines as comments::

    # lightning_thunder trace "forward": dead code elimination (took 0.1 ms)
    import torch
    aten = torch.ops.aten

    def forward(x, fc1_weight):
      # x: "cpu f32[4, 8]"
      # fc1_weight: "cpu f32[16, 8]"
      # model.py:12 in forward: h = self.fc1(x)
      t0 = aten.mm.default(x, t1)  # t0: "cpu f32[4, 16]"
      return (t0,)

Callables that cannot be named by an import (a generated kernel, say) and constants (captured
tensors) are bound by name in the namespace :meth:`TracePrinter.build` executes the source in; the
header lists them.
"""

from __future__ import annotations

import enum
import importlib
import linecache
import math
import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch

from lightning_thunder.trace.proxy import ConstRef, Proxy, describe_value
from lightning_thunder.trace.trace import DELETE, BoundOp, Trace

__all__ = ["TracePrinter", "callable_expression", "source_comment"]

_MODULE_ALIASES = {"_operator": "operator", "builtins": "", "torch._C._VariableFunctions": "torch"}
_FALLBACK_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "torch.Tensor", "operator", "math")
# What each callable prints as. Keyed weakly where the callable allows it, so a generated kernel (bound by name,
# not importable) is not kept alive by having been printed; functions and ops that do not take weak references
# are module-level objects that live as long as the process anyway.
_resolved: weakref.WeakKeyDictionary[Any, tuple[str, str] | None] = weakref.WeakKeyDictionary()
_resolved_strong: dict[Any, tuple[str, str] | None] = {}


def _resolve_path(module: str, qualname: str) -> Any:
    obj = importlib.import_module(module) if module else __builtins__
    if isinstance(obj, dict):  # __builtins__ may be the dict
        obj = obj[qualname.split(".")[0]]
        qualname = ".".join(qualname.split(".")[1:])
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def callable_expression(fn: Any) -> tuple[str, str] | None:
    """``(import_module, expression)`` naming ``fn`` in source, or ``None`` if no import reaches it.

    ``aten.mm.default`` for ATen overloads (with ``aten = torch.ops.aten``), ``torch.ops.<ns>...`` for
    other operator namespaces, ``module.qualname`` for functions that resolve back to ``fn``.
    """
    try:
        cache = _resolved
        if fn in cache:
            return cache[fn]
    except TypeError:  # no weak references to it (or unhashable)
        cache = _resolved_strong
        try:
            if fn in cache:
                return cache[fn]
        except TypeError:  # unhashable callable
            return _compute_expression(fn)
    result = _compute_expression(fn)
    cache[fn] = result
    return result


def _compute_expression(fn: Any) -> tuple[str, str] | None:
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        text = str(fn)
        if text.startswith("aten."):
            return "torch", text
        return "torch", f"torch.ops.{text}"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str) or "<" in name:
        return None
    module = getattr(fn, "__module__", None)
    candidates = []
    if isinstance(module, str):
        candidates.append((_MODULE_ALIASES.get(module, module), name))
    short = getattr(fn, "__name__", name)
    candidates += [(m, short) for m in _FALLBACK_MODULES]
    for mod, qual in candidates:
        try:
            if _resolve_path(mod, qual) is fn:
                return mod, f"{mod}.{qual}" if mod else qual
        except Exception:  # noqa: S112 - any failure just means this spelling does not reach fn
            continue
    return None


def source_comment(meta: dict) -> str | None:
    """``file.py:12 in forward: code`` for the innermost user frame of an FX ``stack_trace``."""
    stack = meta.get("stack_trace")
    if not stack:
        return None
    lines = [ln for ln in stack.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].strip()
        if ln.startswith('File "'):
            try:
                path, rest = ln[len('File "') :].split('", line ', 1)
                lineno, _, func = rest.partition(", in ")
            except ValueError:
                return None
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if code.startswith("File ") or set(code) <= {"^", "~", " "}:
                code = ""
            fname = path.rsplit("/", 1)[-1]
            text = f"{fname}:{lineno} in {func.strip()}"
            return f"{text}: {code}" if code else text
    return None


class TracePrinter:
    """Prints one trace; :meth:`source` gives the text, :meth:`build` the compiled function."""

    def __init__(self, trace: Trace, *, boxed: bool = False) -> None:
        self.trace = trace
        self.boxed = boxed
        self.imports: dict[str, None] = {}
        self.namespace: dict[str, Any] = {}
        self.bound: dict[int, str] = {}
        self._lines: list[str] | None = None

    # ---------------------------------------------------------------------------------- names
    def _bind(self, obj: Any, prefix: str) -> str:
        key = id(obj)
        if key in self.bound:
            return self.bound[key]
        base = getattr(obj, "__name__", None)
        stem = base if isinstance(base, str) and base.isidentifier() else f"_{prefix}"
        name, k = stem, 0
        taken = set(self.namespace) | self.trace.names()
        while name in taken:
            k += 1
            name = f"{stem}{k}"
        self.namespace[name] = obj
        self.bound[key] = name
        return name

    def callable_expr(self, fn: Any) -> str:
        """Source that evaluates to ``fn`` (an import when possible, else a bound name)."""
        resolved = callable_expression(fn)
        if resolved is None:
            return self._bind(fn, "fn")
        module, expr = resolved
        if module:
            self.imports[module] = None
        return expr

    def value_expr(self, x: Any) -> str:
        """Source that evaluates to the argument ``x``."""
        if isinstance(x, Proxy):
            return x.name
        if isinstance(x, ConstRef):
            return x.name
        if x is None or isinstance(x, (bool, str)):
            return repr(x)
        if isinstance(x, int) and not isinstance(x, enum.Enum):
            return repr(x)
        if isinstance(x, float):
            if math.isnan(x) or math.isinf(x):
                return f"float('{x}')"
            return repr(x)
        if isinstance(x, complex):
            return repr(x)
        if x is Ellipsis:
            return "..."
        if isinstance(x, torch.dtype):
            self.imports["torch"] = None
            return str(x)
        if isinstance(x, torch.device):
            self.imports["torch"] = None
            return f"torch.device({str(x)!r})"
        if isinstance(x, (torch.memory_format, torch.layout)):
            self.imports["torch"] = None
            return repr(x)
        if isinstance(x, torch.Size):
            return self.value_expr(tuple(x))
        if type(x) is slice:
            return f"slice({self.value_expr(x.start)}, {self.value_expr(x.stop)}, {self.value_expr(x.step)})"
        if type(x) is tuple:
            inner = ", ".join(self.value_expr(v) for v in x)
            return f"({inner},)" if len(x) == 1 else f"({inner})"
        if type(x) is list:
            return "[" + ", ".join(self.value_expr(v) for v in x) + "]"
        if type(x) is dict and all(isinstance(k, str) for k in x):
            return "{" + ", ".join(f"{k!r}: {self.value_expr(v)}" for k, v in x.items()) + "}"
        if callable(x) and callable_expression(x) is not None:
            return self.callable_expr(x)
        return self._bind(x, "obj")

    # ---------------------------------------------------------------------------------- lines
    def _op_line(self, op: BoundOp) -> str:
        if op.target is DELETE:
            return "del " + ", ".join(self.value_expr(a) for a in op.args)
        args = [self.value_expr(a) for a in op.args]
        kwargs = [f"{k}={self.value_expr(v)}" for k, v in op.kwargs.items()]
        if op.is_method:
            receiver, rest = args[0], args[1:]
            call = f"{receiver}.{op.target}({', '.join(rest + kwargs)})"
        else:
            call = f"{self.callable_expr(op.target)}({', '.join(args + kwargs)})"
        if op.unpack:
            names = [p.name if p is not None else "_" for p in op.outputs]
            lhs = ", ".join(names) + ("," if len(names) == 1 else "")
            line = f"{lhs} = {call}" if names else call
        elif op.outputs[0] is not None:
            line = f"{op.outputs[0].name} = {call}"
        else:
            line = call
        notes = [f'{p.name}: "{p.describe()}"' for p in op.output_proxies()]
        comment = ", ".join(notes)
        if op.executor:
            comment = f"{comment}  [{op.executor}]" if comment else f"[{op.executor}]"
        return f"{line}  # {comment}" if comment else line

    def _region_lines(self, op: BoundOp) -> list[str]:
        if not op.subops:
            return []
        names = ", ".join(sub.name for sub in op.subops)
        notes = getattr(op.target, "notes", None) or []
        return [f"# {op.name}: {len(op.subops)} ops: {names}", *(f"#   {note}" for note in notes)]

    def lines(self) -> list[str]:
        """The source lines of the program (without the trailing newline)."""
        if self._lines is not None:
            return self._lines
        t = self.trace
        body: list[str] = []
        params = [p.name for p in t.inputs]
        if self.boxed:
            signature = f"def {t.fn_name}(args):"
            if params:
                body.append(", ".join(params) + ("," if len(params) == 1 else "") + " = args")
            body.append("args.clear()")
        else:
            signature = f"def {t.fn_name}({', '.join(params)}):"
        for p in t.inputs:
            body.append(f'# {p.name}: "{describe_value(p.val)}"')
        last_source = None
        for op in t.ops:
            src = source_comment(op.meta)
            if src and src != last_source:
                body.append(f"# {src}")
                last_source = src
            body.extend(self._region_lines(op))
            body.append(self._op_line(op))
        body.append(f"return {self.value_expr(t.output)}")
        header = f'# lightning_thunder trace "{t.name}"'
        if t.provenance:
            header += f": {t.provenance}"
        if t.elapsed_ms is not None:
            header += f" (took {t.elapsed_ms:.1f} ms)"
        head = [header]
        for name, value in t.constants.items():
            self.namespace[name] = value
            head.append(f"# constant {name}: {describe_value(value)}")
        for name, value in list(self.namespace.items()):
            if name not in t.constants:
                head.append(f"# bound {name}: {_short_repr(value)}")
        imports = sorted(self.imports)
        head += [f"import {m}" for m in imports]
        if "torch" in self.imports:
            head.append("aten = torch.ops.aten")
        self._lines = [*head, "", signature] + ["  " + ln for ln in body]
        return self._lines

    def source(self) -> str:
        """The program as text."""
        return "\n".join(self.lines()) + "\n"

    def build(self) -> Callable:
        """Execute the program's source and return its function (source kept for tracebacks)."""
        src = self.source()
        filename = f"<lightning_thunder {self.trace.name} {id(self.trace):x}{' boxed' if self.boxed else ''}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # tracebacks show the source
        namespace: dict[str, Any] = {"__name__": "lightning_thunder_generated", "operator": operator}
        namespace.update(self.namespace)
        exec(compile(src, filename, "exec"), namespace)  # noqa: S102 - executing our own generated program
        fn = namespace[self.trace.fn_name]
        if self.boxed:
            fn._boxed_call = True
        fn.__lightning_thunder_trace__ = self.trace
        weakref.finalize(fn, linecache.cache.pop, filename, None)  # the source goes with the program
        return fn


def _short_repr(value: Any) -> str:
    text = getattr(value, "__qualname__", None) or type(value).__name__
    return text if len(text) < 80 else text[:77] + "..."
