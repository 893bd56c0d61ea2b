"""The public entry points: :func:`compile`, :func:`last_traces`, :func:`last_backward_traces`,
:func:`compile_stats`."""

from __future__ import annotations

import builtins
import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_thunder.capture.backend import get_backend
from lightning_thunder.capture.compiled import ThunderFunction, ThunderModule, compile_states
from lightning_thunder.capture.frames import dynamo_backend, function_for, install_limit_filter, module_caller
from lightning_thunder.capture.options import CompileOptions
from lightning_thunder.capture.state import CompileState, CompileStats, GraphRecord
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.trace.trace import Trace

__all__ = ["compile", "last_traces", "last_backward_traces", "compile_stats", "default_plugins", "kernel_sources"]

T = TypeVar("T")


_DEFAULT_PLUGINS: list[Plugin] | None = None


def default_plugins() -> list[Plugin]:
    """The plugins :func:`compile` uses when ``plugins=None`` (the same instances every time).

    With CUDA: ``[NativeGQA(), FusedLinearCrossEntropy(), Fusion()]`` (attention reads grouped keys/values
    without repeated copies; an output head and its loss run chunked, without the logits; generated Triton
    kernels for pointwise and reduction regions). Without CUDA: none, so every op runs on the torch executor.
    """
    global _DEFAULT_PLUGINS
    if _DEFAULT_PLUGINS is None:
        from lightning_thunder.plugins import FusedLinearCrossEntropy, Fusion, NativeGQA

        _DEFAULT_PLUGINS = [NativeGQA(), FusedLinearCrossEntropy(), Fusion()] if torch.cuda.is_available() else []
    return list(_DEFAULT_PLUGINS)


def _check_plugins(plugins: Sequence[Plugin] | None) -> list[Plugin]:
    if plugins is None:
        return default_plugins()
    if isinstance(plugins, Plugin):
        raise TypeError(f"plugins must be a list of Plugin instances; wrap the single plugin: plugins=[{plugins!r}]")
    if isinstance(plugins, (str, bytes)) or not isinstance(plugins, Iterable):
        raise TypeError(
            f"plugins={plugins!r} must be a list of Plugin instances (a {type(plugins).__name__} is not); e.g. "
            "plugins=[Fusion()] with `from lightning_thunder.plugins import Fusion`, or None for default_plugins()"
        )
    checked = []
    for p in plugins:
        if isinstance(p, type) and issubclass(p, Plugin):
            raise TypeError(f"plugins must hold Plugin instances, got the class {p.__name__}; use {p.__name__}()")
        if not isinstance(p, Plugin):
            raise TypeError(f"plugins must hold lightning_thunder.Plugin instances, got {type(p).__name__}: {p!r}")
        checked.append(p)
    return checked


def compile(fn_or_module: T, plugins: Sequence[Plugin] | None = None, **options: Any) -> T:  # noqa: A001
    """Compile a module or function with lightning_thunder.

    Dynamo captures the program (graph breaks and recompiles are handled per subgraph), each graph
    becomes a torch-level :class:`Trace`, pre-autograd plugins rewrite it, AOTAutograd produces
    forward and backward ATen traces, post-autograd plugins and passes rewrite those, executors
    claim ops, and the final traces run as generated Python.

    Args:
        fn_or_module: an ``nn.Module`` or a callable.
        plugins: compiler plugins, applied in order (``None``: :func:`default_plugins`).
        **options: see :class:`~lightning_thunder.capture.CompileOptions` (``dynamic``, ``fullgraph``,
            ``partitioner``, ``cse``). Unknown names raise ``TypeError``.

    Returns:
        For a module, an ``nn.Module`` with the same parameters, buffers, ``state_dict`` keys and forward
        signature (a :class:`~lightning_thunder.capture.ThunderModule`); for a function, a callable.

    Example::

        cm = lightning_thunder.compile(model)
        loss = cm(x).sum(); loss.backward()
        print(lightning_thunder.last_traces(cm)[-1])
    """
    opts = CompileOptions.from_kwargs(options)
    plugin_list = _check_plugins(plugins)
    if isinstance(fn_or_module, (ThunderModule, ThunderFunction)):
        raise TypeError("this object is already compiled by lightning_thunder; compile the original instead")
    backend = get_backend(plugin_list, opts)
    entry = dynamo_backend(backend)  # what Dynamo is given: graphs shared per backend, each run recorded
    install_limit_filter()
    if isinstance(fn_or_module, nn.Module):
        module: nn.Module = fn_or_module
        for p in plugin_list:
            new = p.transform_module(module)
            if not isinstance(new, nn.Module):
                raise TypeError(f"{p.name}.transform_module must return an nn.Module, got {type(new).__name__}")
            module = new
        call = module_caller(type(module), backend)
        caller = torch.compile(call, backend=entry, dynamic=opts.dynamic, fullgraph=opts.fullgraph)
        compiled = functools.partial(caller, module)
        state = CompileState(type(module).__qualname__, module)
        state.shared = entry.shared_code(call, call.__name__)
        return ThunderModule(module, compiled, state, backend)  # type: ignore[return-value]
    if callable(fn_or_module):
        fn = function_for(fn_or_module, backend)
        compiled_fn = torch.compile(fn, backend=entry, dynamic=opts.dynamic, fullgraph=opts.fullgraph)
        state = CompileState(getattr(fn_or_module, "__qualname__", type(fn_or_module).__qualname__))
        if fn is not fn_or_module:
            state.shared = entry.shared_code(getattr(fn, "__func__", fn), fn.__name__)
        return ThunderFunction(fn_or_module, compiled_fn, state, backend)  # type: ignore[return-value]
    raise TypeError(f"lightning_thunder.compile expects an nn.Module or a callable, got {type(fn_or_module).__name__}")


def _last_record(cm: Any, *, with_backward: bool = False) -> GraphRecord:
    """The most recently compiled graph that ran in a call of ``cm`` (compiled by it, or by another instance of
    its class with the same plugins and shared)."""
    states = compile_states(cm)
    records = [r for s in states for r in (*s.records, *s.ran.values()) if r.backward_traces or not with_backward]
    if not records and with_backward and any(s.records or s.ran for s in states):
        raise LookupError("no graph with a backward has been compiled yet (only inference graphs)")
    if not records:
        eager = [f"{s.label}: {s.eager_fallbacks[-1]}" for s in states if s.eager_fallbacks]
        if eager:
            raise RuntimeError(
                "no compiled graph ran for this module or function: its calls ran eagerly, without lightning_thunder "
                f"and its plugins ({'; '.join(eager)}); see compile_stats(...).eager_calls"
            )
        raise RuntimeError(
            "nothing has been compiled yet: traces exist once the compiled module or function has been called"
        )
    return builtins.max(records, key=lambda r: r.sequence)


def last_traces(cm: Any) -> list[Trace]:
    """The traces of the most recently compiled forward graph of ``cm``, stage by stage.

    In order: the torch-level trace from Dynamo, one after each pre-autograd plugin, the forward after
    AOTAutograd, one after each post-autograd plugin and pass, one per executor, and the final
    executable trace (``[-1]``). Each has ``.name`` (``"torch"``, ``"forward/dce"``, ...
    ``"forward/final"``), ``.python()`` and ``.python_callable()``.
    """
    record = _last_record(cm)
    return [*record.torch_traces, *record.forward_traces]


def last_backward_traces(cm: Any) -> list[Trace]:
    """The backward traces of the most recently compiled graph of ``cm`` that has a backward.

    Inference graphs (``torch.no_grad()``, validation) are skipped; the result is empty when only
    inference graphs exist. AOTAutograd compiles the backward at the first ``backward()``, so the
    stages after partitioning appear once a backward has run.
    """
    try:
        return list(_last_record(cm, with_backward=True).backward_traces)
    except LookupError:
        _last_record(cm)  # raises the usual error when nothing at all was compiled
        return []


def compile_stats(cm: Any) -> CompileStats:
    """Compilation statistics of ``cm`` (summed over its compiled submodules for regional compilation).

    See :class:`~lightning_thunder.capture.CompileStats` for the fields.
    """
    states = compile_states(cm)
    if len(states) == 1:
        return states[0].stats()
    parts = [s.stats() for s in states]
    counts: Counter[str] = Counter()
    for part in parts:
        counts.update(part.executor_counts)
    return CompileStats(
        compile_time_s=sum(p.compile_time_s for p in parts),
        graphs=sum(p.graphs for p in parts),
        graph_breaks=[b for p in parts for b in p.graph_breaks],
        recompiles=[r for p in parts for r in p.recompiles],
        fusion_regions=sum(p.fusion_regions for p in parts),
        executor_counts=dict(counts),
        eager_calls=sum(p.eager_calls for p in parts),
        eager_fallbacks=[r for p in parts for r in p.eager_fallbacks],
    )


def kernel_sources(cm: Any) -> dict[str, str]:
    """The generated kernel sources of the most recently compiled graph of ``cm``.

    Keys are ``"<stage>/<region>"`` (``"forward/fusion0"``, ``"backward/fusion2"``); values are the Triton
    source of each fused region of the final forward and backward traces (empty without fusion).
    """
    record = _last_record(cm)
    sources = {}
    for trace in record.final_traces():
        stage = trace.name.split("/")[0]
        for op in trace.ops:
            source = getattr(op.target, "source", None)
            if op.subops and isinstance(source, str):
                sources[f"{stage}/{op.label}"] = source
    return sources
