"""Low-overhead launches of ``@triton.jit`` kernels.

``kernel[grid](*args, **meta)`` goes through ``JITFunction.run`` on every call: it binds the arguments,
specializes each one (dtype and 16-byte alignment of tensors, ``== 1`` / ``% 16`` / width of ints),
builds a cache key from all of it, looks the compiled kernel up, and only then launches. On an H100
that is ~30-60 µs of Python per launch; a training step launches hundreds of generated kernels, so
the host falls behind the GPU (measured: 52.8 ms of host issue time in a 61.6 ms FP8 step).

:class:`Launcher` keeps what ``JITFunction.run`` would find: the first call with a given *launch key*
goes through ``JITFunction.run`` (compiling if needed) and records the compiled kernel it returns;
later calls with the same key call the compiled kernel's launcher directly (``CompiledKernel.run``,
the call ``JITFunction.run`` itself ends with). The launch key is at least as fine as Triton's own
specialization, so the recorded kernel is the one Triton would pick:

- each tensor argument: its dtype and whether its address is a multiple of 16;
- each int, bool or ``None`` argument: its value (finer than Triton's ``== 1`` / ``% 16`` / int32 checks,
  and right for constexprs passed positionally);
- any other argument (floats): its type;
- the keyword arguments (constexprs and options such as ``num_warps``), by value;
- the current CUDA device.

The direct path is not taken under ``TRITON_INTERPRET=1`` (no compiled kernel exists), when a Triton
launch hook is installed (profilers such as Proton see every launch through ``JITFunction.run``), or
after the direct call once failed with a ``TypeError`` (a Triton version whose launcher signature
differs): those calls go through ``JITFunction.run`` as before, so results never depend on the path.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Launcher"]


def _hook_set(hook: Any) -> bool:
    # Recent Triton keeps hooks in a `HookChain` (never None; empty when its `calls` list is).
    return hook is not None and bool(getattr(hook, "calls", True))


_knobs: Any = None


def _launch_hooks_installed() -> bool:
    global _knobs
    if _knobs is None:
        try:
            from triton import knobs
        except ImportError:  # an older Triton: no knobs, never take the direct path
            return True
        _knobs = knobs
    runtime = _knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


#: Launch keys recorded per kernel at most (shapes that keep changing would otherwise grow the table).
_MAX_RECORDED = 1024


def _arg_key(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, (int, bool)) or arg is None:
        return (type(arg), arg)
    return (type(arg),)


class Launcher:
    """Launch one ``@triton.jit`` function with low host overhead (see the module docstring).

    Args:
        fn: the ``@triton.jit`` function.

    Example::

        _amax = Launcher(_fp8_amax_kernel)
        _amax((n_programs,), x, partials, R, C, BLOCK_R=64, num_warps=8)   # same as _fp8_amax_kernel[grid](...)
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        # Parameter names in order, with their defaults: the direct call passes every parameter positionally.
        signature = getattr(fn, "signature", None) or inspect.signature(getattr(fn, "fn", fn))
        self._params = [(p.name, p.default) for p in signature.parameters.values()]
        self._kernels: dict[Any, tuple[Any, tuple]] = {}
        self._direct: bool | None = None  # decided at the first call (the environment of the run, not of the import)

    def __call__(self, grid: Sequence[int], *args: Any, **meta: Any) -> None:
        """``fn[grid](*args, **meta)``: positional arguments first, constexprs and options by keyword."""
        self.launch(grid, args, meta, tuple(meta.items()))

    def launch(self, grid: Sequence[int], args: tuple, meta: dict[str, Any], meta_key: tuple) -> None:
        """:meth:`__call__` for a caller that keeps its keywords: ``meta`` and ``meta_key = tuple(meta.items())``
        built once, not per launch."""
        if self._direct is None:
            self._direct = os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.is_available()
        if not self._direct:
            self.fn[tuple(grid)](*args, **meta)
            return
        device = torch._C._cuda_getDevice()  # torch.cuda.current_device() without its Python checks
        key = (device, tuple(map(_arg_key, args)), meta_key)
        entry = self._kernels.get(key)
        if entry is not None and not _launch_hooks_installed():
            kernel, tail = entry
            g0 = grid[0]
            g1 = grid[1] if len(grid) > 1 else 1
            g2 = grid[2] if len(grid) > 2 else 1
            stream = torch._C._cuda_getCurrentRawStream(device)
            try:
                kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
                return
            except TypeError:  # this Triton's launcher takes other arguments: use JITFunction.run from now on
                self._direct = False
                self._kernels.clear()
        kernel = self.fn[tuple(grid)](*args, **meta)
        if (
            entry is None
            and self._direct
            and len(self._kernels) < _MAX_RECORDED
            and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata"))
        ):
            tail = []
            for name, default in self._params[len(args) :]:
                if name in meta:
                    tail.append(meta[name])
                elif default is not inspect.Parameter.empty:
                    tail.append(default)
                else:  # a parameter passed neither way: JITFunction.run would have raised; keep the slow path
                    return
            self._kernels[key] = (kernel, tuple(tail))

    def __repr__(self) -> str:
        return f"Launcher({self.__name__}, {len(self._kernels)} recorded)"
