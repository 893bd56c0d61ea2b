"""What :func:`lightning_thunder.compile` returns: a module that *is* the user's module, compiled.

:class:`ThunderModule` shares the user's module's parameter, buffer, submodule and state-dict hook
registries, so ``parameters()``, ``state_dict()`` keys, ``load_state_dict``, ``.to()`` and
``train()/eval()`` behave exactly as on the original; only ``forward`` runs the compiled program.
Attributes it does not have itself (``model.config``, ``model.max_seq_length = ...``) are read from and
written to the original module.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_thunder.capture.state import CompileState

__all__ = ["ThunderModule", "ThunderFunction", "compile_states", "compiled_objects"]

# The registries a ThunderModule shares with the module it wraps.
_SHARED = (
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_OWN = ("_lt_module", "_lt_compiled", "_lt_state", "_lt_backend", "forward")


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


@torch.compiler.disable
def call_compiled(state: CompileState, compiled: Callable, args: tuple, kwargs: dict) -> Any:
    """Run the Dynamo-compiled callable, recording graph breaks and the time of compiling calls.

    Opaque to an enclosing compile: a compiled block inside a module that is compiled again runs its
    own graphs (the outer graph breaks around it) instead of being traced a second time.
    """
    log = _graph_break_log()
    n_breaks, n_graphs = len(log), len(state.records)
    t0 = time.perf_counter()
    state.in_call += 1
    state.calls += 1
    token = state.activate()
    try:
        # Dynamo's DDPOptimizer would split our graph at DDP's bucket boundaries when the compiled module
        # runs inside DDP; compile it whole (DDP then reduces after the compiled backward). Dynamo consults
        # the setting only inside a DDP forward, so the (costly: ~15 us) patch is made only there.
        if DistributedDataParallel._get_active_ddp_module() is not None:
            with torch._dynamo.config.patch(optimize_ddp=False):
                return compiled(*args, **kwargs)
        return compiled(*args, **kwargs)
    finally:
        state.deactivate(token)
        state.in_call -= 1
        if len(state.records) != n_graphs:
            state.call_compile_time_s += time.perf_counter() - t0
        for reason in log[n_breaks:]:
            text = _describe_graph_break(reason)
            if not state.graph_breaks or state.graph_breaks[-1] != text:
                state.graph_breaks.append(text)


class ThunderModule(nn.Module):
    """A compiled ``nn.Module``; see :func:`lightning_thunder.compile`.

    Parameters, buffers, submodules and ``state_dict`` keys are those of the original module (shared,
    not copied), and ``forward`` has the original's signature.
    """

    def __init__(self, module: nn.Module, compiled: Callable, state: CompileState, backend: Any) -> None:
        super().__init__()
        own = self.__dict__
        own["_lt_module"] = module
        own["_lt_compiled"] = compiled
        own["_lt_state"] = state
        own["_lt_backend"] = backend
        for attr in _SHARED:
            own[attr] = getattr(module, attr)
        own["training"] = module.training

        def forward(*args: Any, **kwargs: Any) -> Any:
            return call_compiled(state, compiled, args, kwargs)

        own["forward"] = functools.wraps(module.forward)(forward)

    @property
    def original_module(self) -> nn.Module:
        """The module that was compiled (sharing parameters and submodules with this one)."""
        return self._lt_module

    def train(self, mode: bool = True) -> ThunderModule:
        """Set training mode here, on the original module and on every submodule."""
        super().train(mode)
        self._lt_module.training = mode
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_lt_module"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        own = self.__dict__
        if "_lt_module" not in own or name in _OWN or name in _SHARED or _is_dunder(name):
            # Dunders (``__class__``, which FSDP2's fully_shard reassigns) belong to this object.
            super().__setattr__(name, value)
        elif name == "training":
            own["training"] = value
            own["_lt_module"].training = value
        elif isinstance(value, (nn.Parameter, nn.Module)) or name in own["_parameters"] or name in own["_buffers"] or name in own["_modules"]:
            super().__setattr__(name, value)  # lands in the shared registries
        else:
            setattr(own["_lt_module"], name, value)

    def __delattr__(self, name: str) -> None:
        own = self.__dict__
        if name in own["_parameters"] or name in own["_buffers"] or name in own["_modules"]:
            super().__delattr__(name)
        else:
            delattr(own["_lt_module"], name)

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._lt_module._save_to_state_dict(*args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._lt_module._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

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
        self._lt_compiled = compiled
        self._lt_state = state
        self._lt_backend = backend

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_compiled(self._lt_state, self._lt_compiled, args, kwargs)

    def __repr__(self) -> str:
        return f"ThunderFunction({getattr(self, '__wrapped__', None)!r})"


def compiled_objects(obj: Any) -> list[ThunderModule | ThunderFunction]:
    """The compiled modules/functions behind ``obj``: ``obj`` itself, the one a wrapper holds
    (Lightning's ``_FabricModule``, DDP), or the compiled submodules of a module (regional
    compilation). Raises ``TypeError`` when there are none."""
    if isinstance(obj, (ThunderModule, ThunderFunction)):
        return [obj]
    if isinstance(obj, nn.Module):
        found = [sub for sub in obj.modules() if isinstance(sub, ThunderModule)]
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
