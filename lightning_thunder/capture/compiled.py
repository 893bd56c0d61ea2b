"""What :func:`lightning_thunder.compile` returns: a module that *is* the user's module, compiled.

:class:`ThunderModule` shares the user's module's parameter, buffer, submodule and state-dict hook
registries (it is a :class:`ModuleView`), so ``parameters()``, ``state_dict()`` keys, ``load_state_dict``,
``.to()`` and ``train()/eval()`` behave exactly as on the original; only ``forward`` runs the compiled program.
Attributes it does not have itself (``model.config``, ``model.max_seq_length = ...``) are read from and
written to the original module.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_thunder.capture.frames import note_eager_call, recompile_budget, user_stacklevel
from lightning_thunder.capture.state import CompileState, current_state

__all__ = [
    "ModuleView",
    "ThunderModule",
    "ThunderFunction",
    "call_compiled",
    "check_hooks",
    "compile_states",
    "compiled_objects",
    "ddp_graph_splitting",
    "COMPILED_METHODS",
    "SHARED_REGISTRIES",
]

#: Attribute (in a module's ``__dict__``) holding the :class:`ThunderFunction` compiled from the module's methods, by
#: method name: the Trainer strategies compile a LightningModule's ``training_step`` & co. there, and
#: :func:`compiled_objects` finds them.
COMPILED_METHODS = "_lt_compiled_methods"

#: The registries a :class:`ModuleView` shares with the module it wraps.
SHARED_REGISTRIES = (
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


_WARNED_SMALL_BUCKETS = "_lt_warned_small_buckets"  # set on a DDP module once its bucket size was warned about


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _graph_break_log() -> list:
    try:
        return torch._dynamo.utils.graph_break_reasons
    except AttributeError:  # pragma: no cover - private list moved; graph breaks go unrecorded
        return []


def _describe_graph_break(reason: Any) -> str:
    """``<what> - <explanation> (at file.py:12: code)`` from Dynamo's multi-line graph break reason."""
    lines = [ln.strip() for ln in str(getattr(reason, "reason", reason)).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else "unknown reason"
    explanation = next((ln for ln in lines[1:] if ln.startswith("Explanation:")), None)
    if explanation:
        text += " - " + explanation[len("Explanation:") :].strip()
    stack = getattr(reason, "user_stack", None) or []
    if stack:
        frame = stack[-1]
        text += f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {(frame.line or '').strip()})"
    return text


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def check_hooks(state: CompileState, module: nn.Module | None) -> None:
    """Warn once per hook registered on ``module`` or a submodule after the first call of the compiled module.

    Dynamo traces the hooks a module has when a graph is captured and does not guard on them afterwards
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a hook added later does not run in the compiled graphs
    (as with ``torch.compile``). Hooks on the compiled module itself run outside the graphs and always work. The
    check costs nothing until a hook handle is created anywhere (``RemovableHandle.next_id`` moves).
    """
    mark = RemovableHandle.next_id
    if state.hooks_since is None:  # the first call: the hooks present now are captured with the graphs
        state.hooks_since = state.hook_mark = mark
        return
    state.hook_mark = mark
    if module is None:
        return
    late = []
    for name, sub in module.named_modules():
        for kind in _HOOK_DICTS:
            for handle_id in sub.__dict__.get(kind) or ():
                key = (id(sub), kind, handle_id)
                if handle_id >= state.hooks_since and key not in state.warned_hooks:
                    state.warned_hooks.add(key)
                    late.append(f"{kind.strip('_').replace('_', ' ')[:-1]} on {name or 'the module'} "
                                f"({type(sub).__name__})")
    if late:
        warnings.warn(
            f"lightning_thunder: {', '.join(late)} registered after the first call of the compiled {state.label} "
            "will not run: the compiled graphs keep the hooks present when they were captured (as with "
            "torch.compile). Register hooks before the first call, or on the compiled module itself "
            "(cm.register_forward_hook(...) runs outside the graphs).",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def ddp_graph_splitting(module: nn.Module | None) -> dict[str, Any]:
    """The Dynamo config for a compiled call running inside DDP's forward (or compiling a DDP ``module``): none, so
    Dynamo's DDPOptimizer splits the graph at DDP's bucket boundaries and each piece is compiled on its own; each
    bucket's all-reduce then starts as soon as the backward of its piece has run, overlapping the rest of the backward.
    Dynamo cannot split buckets smaller than DDP's first bucket (1 MB): then ``optimize_ddp=False`` keeps the graph
    whole, gradients are all-reduced after its backward, and a warning (once per DDP module) says so."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel._get_active_ddp_module() if dist.is_available() else None
    if ddp is None and isinstance(module, DistributedDataParallel):
        ddp = module
    first = getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 0)
    if ddp is None or ddp.bucket_bytes_cap >= first:
        return {}
    if not getattr(ddp, _WARNED_SMALL_BUCKETS, False):
        setattr(ddp, _WARNED_SMALL_BUCKETS, True)
        warnings.warn(
            f"DDP's bucket_cap_mb={ddp.bucket_bytes_cap / 2**20:g} is below its first bucket's "
            f"{first / 2**20:g} MB, which Dynamo's DDPOptimizer cannot split at: the compiled backward runs as one "
            "graph and every gradient is all-reduced after it (no overlap with the backward); use bucket_cap_mb >= "
            f"{first / 2**20:g} to overlap",
            stacklevel=3,
        )
    return {"optimize_ddp": False}


@torch.compiler.disable
def call_compiled(
    state: CompileState, compiled: Callable, args: tuple, kwargs: dict, module: nn.Module | None = None
) -> Any:
    """Run the Dynamo-compiled callable, recording graph breaks, the time of compiling calls, and calls that ran
    eagerly (see :mod:`lightning_thunder.capture.frames`); warn about hooks added after the first call.

    Opaque to an enclosing compile: a compiled block inside a module that is compiled again runs its
    own graphs (the outer graph breaks around it) instead of being traced a second time.
    """
    if RemovableHandle.next_id != state.hook_mark:
        check_hooks(state, module)
    log = _graph_break_log()
    n_breaks, n_graphs, n_runs, n_hits = len(log), len(state.records), state.graph_runs, len(state.limit_hits)
    t0 = time.perf_counter()
    # Under DDP the graph is split at DDP's buckets (see ddp_graph_splitting). The recompile limit applies per set
    # of plugins (see capture/frames.py); a nested compiled call keeps the outer call's.
    config = ddp_graph_splitting(module)
    if current_state() is None:
        config["recompile_limit"] = recompile_budget(state.label)
    state.in_call += 1
    state.calls += 1
    token = state.activate()
    try:
        if config:  # (patching Dynamo's config costs ~15 us of host time: only when there is something to set)
            with torch._dynamo.config.patch(**config):
                out = compiled(*args, **kwargs)
        else:
            out = compiled(*args, **kwargs)
    finally:
        state.deactivate(token)
        state.in_call -= 1
        if len(state.records) != n_graphs:
            state.call_compile_time_s += time.perf_counter() - t0
        for reason in log[n_breaks:]:
            text = _describe_graph_break(reason)
            if not state.graph_breaks or state.graph_breaks[-1] != text:
                state.graph_breaks.append(text)
    hit = state.limit_hits[-1] if len(state.limit_hits) > n_hits else None
    ran_graph = state.graph_runs != n_runs or len(state.records) != n_graphs
    if hit is not None or not ran_graph:  # a limit hit after a graph ran: the rest of the call (a resume) ran eagerly
        note_eager_call(state, hit, partly=ran_graph)
    return out


class ModuleView(nn.Module):
    """A module that *is* another module for parameters, buffers, submodules and state-dict keys and hooks: it shares
    their registries (:data:`SHARED_REGISTRIES`) instead of registering the module as a child. ``train()``/``eval()``
    reach the wrapped module, and attributes the view does not have are read from and written to it. Subclasses
    name where they keep the wrapped module (``_target``) and their own attributes (``_own``), and define
    ``forward``.

    Args:
        module: the wrapped module.
    """

    #: The ``__dict__`` key of the wrapped module.
    _target: str = "_view_module"
    #: Attribute names that belong to the view itself (written to it, never to the wrapped module).
    _own: tuple[str, ...] = ()

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        own = self.__dict__
        own[self._target] = module
        for attr in SHARED_REGISTRIES:
            own[attr] = getattr(module, attr)
        own["training"] = module.training

    def train(self, mode: bool = True) -> ModuleView:
        """Set training mode here, on the wrapped module and on every submodule."""
        super().train(mode)
        self.__dict__[type(self)._target].training = mode
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__[type(self)._target], name)

    def __setattr__(self, name: str, value: Any) -> None:
        own, target = self.__dict__, type(self)._target
        if target not in own or name == target or name in self._own or name in SHARED_REGISTRIES or _is_dunder(name):
            # Dunders (``__class__``, which FSDP2's fully_shard reassigns) belong to this object.
            super().__setattr__(name, value)
        elif name == "training":
            own["training"] = value
            own[target].training = value
        elif isinstance(value, (nn.Parameter, nn.Module)) or name in own["_parameters"] or name in own["_buffers"] or name in own["_modules"]:
            super().__setattr__(name, value)  # lands in the shared registries
        else:
            setattr(own[target], name, value)

    def __delattr__(self, name: str) -> None:
        own = self.__dict__
        if name in own["_parameters"] or name in own["_buffers"] or name in own["_modules"]:
            super().__delattr__(name)
        else:
            delattr(own[type(self)._target], name)

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__[type(self)._target]._save_to_state_dict(*args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__[type(self)._target]._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""


class ThunderModule(ModuleView):
    """A compiled ``nn.Module``; see :func:`lightning_thunder.compile`.

    Parameters, buffers, submodules and ``state_dict`` keys are those of the original module (shared,
    not copied), and ``forward`` has the original's signature.
    """

    _target = "_lt_module"
    _own = ("_lt_compiled", "_lt_state", "_lt_backend", "forward")

    def __init__(self, module: nn.Module, compiled: Callable, state: CompileState, backend: Any) -> None:
        super().__init__(module)
        own = self.__dict__
        own["_lt_compiled"] = compiled
        own["_lt_state"] = state
        own["_lt_backend"] = backend

        def forward(*args: Any, **kwargs: Any) -> Any:
            return call_compiled(state, compiled, args, kwargs, module)

        own["forward"] = functools.wraps(module.forward)(forward)

    @property
    def original_module(self) -> nn.Module:
        """The module that was compiled (sharing parameters and submodules with this one)."""
        return self._lt_module

    def __reduce__(self) -> tuple:
        # Pickling (``ddp_spawn``, ``copy.deepcopy``) carries the original module and the plugins; the
        # copy is compiled again on arrival. The compiled graphs themselves are never serialized.
        import dataclasses

        from lightning_thunder.api import compile as lt_compile

        backend = self._lt_backend
        options = dataclasses.asdict(backend.options)
        return (functools.partial(lt_compile, **options), (self._lt_module, list(backend.plugins)))

    def __repr__(self) -> str:
        return f"ThunderModule({self._lt_module!r})"


class ThunderFunction:
    """A compiled function; see :func:`lightning_thunder.compile`. Calls it with the same arguments."""

    def __init__(self, fn: Callable, compiled: Callable, state: CompileState, backend: Any) -> None:
        functools.update_wrapper(self, fn)
        if hasattr(fn, "__code__"):
            # What Lightning's `is_overridden` compares once it has unwrapped a wrapper of this (FSDP's
            # `register_fsdp_forward_method` around a compiled `training_step`).
            self.__code__ = fn.__code__
        self._lt_compiled = compiled
        self._lt_state = state
        self._lt_backend = backend

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_compiled(self._lt_state, self._lt_compiled, args, kwargs)

    def __reduce__(self) -> tuple:
        # As ThunderModule: a copy (``copy.deepcopy`` of a LightningModule whose steps are compiled, e.g. the meta copy
        # ThroughputMonitor measures FLOPs on) compiles a copy of the function again, lazily, at its first call. A bound
        # method is copied with its object, so it stays bound to the copy.
        import dataclasses

        from lightning_thunder.api import compile as lt_compile

        backend = self._lt_backend
        options = dataclasses.asdict(backend.options)
        return (functools.partial(lt_compile, **options), (self.__wrapped__, list(backend.plugins)))

    def __repr__(self) -> str:
        return f"ThunderFunction({getattr(self, '__wrapped__', None)!r})"


def compiled_objects(obj: Any) -> list[ThunderModule | ThunderFunction]:
    """The compiled modules/functions behind ``obj``: ``obj`` itself, the one a wrapper holds
    (Lightning's ``_FabricModule``, DDP), or the compiled submodules of a module (regional
    compilation) and its compiled methods (:data:`COMPILED_METHODS`). Raises ``TypeError`` when there are none."""
    if isinstance(obj, (ThunderModule, ThunderFunction)):
        return [obj]
    if isinstance(obj, nn.Module):
        found: list[ThunderModule | ThunderFunction] = [sub for sub in obj.modules() if isinstance(sub, ThunderModule)]
        found += [
            fn for sub in obj.modules() for fn in sub.__dict__.get(COMPILED_METHODS, {}).values()
            if isinstance(fn, ThunderFunction)
        ]
        for attr in ("_forward_module", "module", "_orig_mod"):
            inner = obj.__dict__.get(attr) or obj.__dict__.get("_modules", {}).get(attr)
            if not found and isinstance(inner, nn.Module) and inner is not obj:
                try:
                    found = compiled_objects(inner)
                except TypeError:
                    continue
        if found:
            return found
    raise TypeError(
        f"{type(obj).__name__} object was not compiled by lightning_thunder: pass the module or function "
        "that lightning_thunder.compile() returned"
    )


def compile_states(obj: Any) -> list[CompileState]:
    """The distinct :class:`CompileState` objects behind ``obj`` (see :func:`compiled_objects`)."""
    states: dict[int, CompileState] = {}
    for compiled in compiled_objects(obj):
        states.setdefault(id(compiled._lt_state), compiled._lt_state)
    return list(states.values())
