"""Running generated kernels: an on-disk source cache, a small autotuner, and the fused-region callable.

Generated sources are written to ``$LIGHTNING_THUNDER_CACHE`` (default ``~/.cache/lightning_thunder``)
under ``kernels/<name>.py`` and imported from there, so Triton's own on-disk cache (keyed by source)
lets a second process skip Triton compilation. The autotuner times each candidate block
configuration once per kernel and device and remembers the winner in ``autotune.json`` beside them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lightning_thunder.executors.launch import Launcher
from lightning_thunder.executors.triton.spec import KernelSpec

__all__ = ["FusedRegion", "RegionCall", "cache_dir", "load_kernel_module", "precompile_all"]

_modules: dict[str, ModuleType] = {}
_tuned: dict[str, dict[str, int]] | None = None
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where generated kernels and autotuning results are kept."""
    root = os.environ.get("LIGHTNING_THUNDER_CACHE") or os.path.join(Path.home(), ".cache", "lightning_thunder")
    return Path(root)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_kernel_module(name: str, source: str) -> ModuleType:
    """Import generated ``source`` as a module (Triton's ``@jit`` needs a real file to read)."""
    with _lock:
        module = _modules.get(name)
        if module is not None:
            return module
        path = cache_dir() / "kernels" / f"{name}.py"
        if not path.exists() or path.read_text() != source:
            _write_atomic(path, source)
        module_name = f"lightning_thunder_kernels.{name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _modules[name] = module
        return module


def _tuned_configs() -> dict[str, dict[str, int]]:
    global _tuned
    if _tuned is None:
        path = cache_dir() / "autotune.json"
        try:
            _tuned = json.loads(path.read_text())
        except (OSError, ValueError):
            _tuned = {}
    return _tuned


def _remember(key: str, config: dict[str, int]) -> None:
    table = _tuned_configs()
    table[key] = config
    try:
        _write_atomic(cache_dir() / "autotune.json", json.dumps(table, indent=1, sort_keys=True))
    except OSError:  # a read-only home: keep the result for this process only
        pass


class FusedRegion:
    """The callable a fused region's op runs: allocates the outputs and launches the kernel.

    Args:
        spec: the generated kernel.
        autotune: time the candidate block configurations on first use (CUDA only).
    """

    def __init__(self, spec: KernelSpec, *, autotune: bool = True) -> None:
        self.spec = spec
        self.__name__ = spec.region
        self.__qualname__ = spec.region
        self.autotune = autotune
        self._kernel: Callable | None = None
        self._launcher: Launcher | None = None
        self._config: dict[str, int] | None = None
        self._launch_args: tuple[tuple[int, ...], dict[str, int], tuple] | None = None  # grid, keywords of _config
        self.notes: list[str] = []  # printed under the region's line in traces (kernel shape, patterns, layouts)

    @property
    def source(self) -> str:
        """The generated Triton source."""
        return self.spec.source

    def kernel(self) -> Callable:
        """The Triton kernel (imported from the on-disk cache on first use)."""
        if self._kernel is None:
            module = load_kernel_module(self.spec.kernel_name, self.spec.source)
            self._kernel = getattr(module, self.spec.kernel_name)
            self._launcher = Launcher(self._kernel)
        return self._kernel

    def precompile(self) -> None:
        """Compile the kernel for each candidate configuration without running it (CUDA only)."""
        kernel = self.kernel()
        dtypes: list[Any] = []
        for arg in self.spec.inputs + self.spec.outputs:
            dtypes.append(arg.dtype)
            dtypes += [16] * len(arg.stride_dims)  # a stride: specialized like any multiple of 16
        dtypes += [16] * self.spec.symbols  # the sizes of symbolic dimensions likewise
        for config in self.spec.configs:
            meta = {k: v for k, v in config.items() if k != "num_warps"}
            kernel.warmup(*dtypes, grid=(1,), num_warps=config["num_warps"], **meta)

    def _launch(
        self, config: dict[str, int], inputs: tuple, outputs: list[torch.Tensor], symbols: tuple = (), R: int | None = None
    ) -> None:
        args: list[Any] = []
        for arg, t in zip(self.spec.inputs, inputs):
            args.append(t)
            args += [t.stride(j) for j in arg.stride_dims]
        for arg, t in zip(self.spec.outputs, outputs):
            args.append(t)
            args += [t.stride(j) for j in arg.stride_dims]
        args += symbols
        launch = self._launch_args if config is self._config else None
        if launch is None:
            keywords = {"num_warps": config["num_warps"], **{k: v for k, v in config.items() if k != "num_warps"}}
            launch = (self.spec.grid(config, R), keywords, tuple(keywords.items()))
            if config is self._config and R is None:  # the chosen configuration: grid and keywords computed once
                self._launch_args = launch
        grid, keywords, keywords_key = launch
        if R is not None:  # a symbolic row count: the grid of this launch's rows
            grid = self.spec.grid(config, R)
        self._launcher.launch(grid, tuple(args), keywords, keywords_key)

    def _pick(self, inputs: tuple, outputs: list[torch.Tensor], symbols: tuple = (), R: int | None = None) -> dict[str, int]:
        configs = self.spec.configs
        device = outputs[0].device if outputs else inputs[0].device
        if device.type != "cuda" or not self.autotune or len(configs) == 1:
            return max(configs, key=lambda c: c.get("BLOCK", 0) + c.get("BLOCK_M", 0) * c.get("BLOCK_N", 0))
        key = f"{self.spec.kernel_name}:{torch.cuda.get_device_name(device)}"
        known = _tuned_configs().get(key)
        if known in configs:
            return known
        from triton.testing import do_bench

        timings = []
        for config in configs:
            try:
                ms = do_bench(lambda c=config: self._launch(c, inputs, outputs, symbols, R), warmup=2, rep=10)
            except Exception:  # noqa: BLE001 - a config that fails to compile (registers) is skipped
                continue
            timings.append((ms, config))
        if not timings:
            raise RuntimeError(f"no block configuration of {self.spec.region} compiled; configs: {configs}")
        best = min(timings, key=lambda t: t[0])[1]
        _remember(key, best)
        return best

    def __call__(self, *inputs: torch.Tensor) -> Any:
        outputs = self.run(inputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def run(self, inputs: tuple, into: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Launch the kernel on ``inputs``; output ``k`` is written into ``into[k]`` where given (a slice
        of a buffer, with the strides the kernel was generated for), else into a new tensor."""
        self.kernel()
        symbols: tuple = ()
        R = None
        sizes = [(arg.shape, arg.stride) for arg in self.spec.outputs]
        if self.spec.symbols:  # the ints after the tensors: the sizes of the symbolic dimensions
            symbols = tuple(int(v) for v in inputs[len(inputs) - self.spec.symbols :])
            inputs = inputs[: len(inputs) - self.spec.symbols]
            if self.spec.sizes is not None:
                R, sizes = self.spec.sizes(*symbols)
        if not all(t.is_contiguous() for arg, t in zip(self.spec.inputs, inputs) if arg.contiguous):
            # The kernel was specialized for contiguous tensors (what the trace said they would be).
            inputs = tuple(t.contiguous() if arg.contiguous else t for arg, t in zip(self.spec.inputs, inputs))
        device = inputs[0].device
        into = into or {}
        outputs = [
            into[k]
            if k in into
            else torch.zeros(shape, dtype=arg.dtype, device=device)
            if arg.zeroed
            else torch.empty_strided(shape, stride, dtype=arg.dtype, device=device)
            for k, (arg, (shape, stride)) in enumerate(zip(self.spec.outputs, sizes))
        ]
        if self._config is None:
            self._config = self._pick(inputs, outputs, symbols, R)
        self._launch(self._config, inputs, outputs, symbols, R)
        return outputs

    def __repr__(self) -> str:
        return f"FusedRegion({self.spec.region}, {self.spec.mode}, R={self.spec.R}, N={self.spec.N})"


class RegionCall:
    """The callable of a region some of whose outputs are stored into slices of tensors passed as extra arguments
    after its inputs: a ``cat``'s result (passed on: returned last, after the outputs still returned) and zeroed
    workspaces. It shows as the region (its name, kernel spec and source).

    Args:
        fused: the region's kernel.
        n_inputs: how many of the arguments are the kernel's inputs (the buffers follow).
        slices: output index -> ``(argument index, shape, stride, offset)`` of the slice it is stored into.
        keep: output indices still returned.
        passed_on: the argument index of the buffer returned last (``None``: none).
    """

    def __init__(
        self, fused: FusedRegion, n_inputs: int, slices: dict[int, tuple], keep: list[int], passed_on: int | None
    ) -> None:
        self.fused = fused
        self.__qualname__ = fused.__qualname__  # printed in the trace header as the region's name
        self.n_inputs = n_inputs
        self.slices = slices
        self.keep = keep
        self.passed_on = passed_on

    @property
    def spec(self) -> KernelSpec:
        """The kernel spec."""
        return self.fused.spec

    @property
    def source(self) -> str:
        """The generated Triton source."""
        return self.fused.source

    @property
    def notes(self) -> list[str]:
        """The region's notes (see :class:`FusedRegion`)."""
        return self.fused.notes

    @property
    def __name__(self) -> str:
        return self.fused.__name__

    @__name__.setter
    def __name__(self, value: str) -> None:
        self.fused.__name__ = self.fused.__qualname__ = value

    def __call__(self, *args: torch.Tensor) -> Any:
        inputs = args[: self.n_inputs]
        into = {}
        for k, (arg, shape, stride, offset) in self.slices.items():
            buffer = args[arg]
            into[k] = buffer.as_strided(shape, stride, buffer.storage_offset() + offset)
        outs = self.fused.run(tuple(inputs), into)
        kept = [outs[k] for k in self.keep]
        if self.passed_on is not None:
            kept.append(args[self.passed_on])
        return kept[0] if len(kept) == 1 else tuple(kept)

    def __repr__(self) -> str:
        return f"RegionCall({self.fused!r})"


def precompile_all(regions: list[FusedRegion], workers: int | None = None) -> dict[str, BaseException]:
    """Compile the kernels of ``regions`` in parallel threads (Triton's compiler and ``ptxas`` run outside the GIL), so
    the first step does not compile them one after another. Returns kernel name -> the error of each kernel Triton
    could not compile (the executor then runs that region's ops on PyTorch)."""
    from concurrent.futures import ThreadPoolExecutor

    unique = list({r.spec.kernel_name: r for r in regions}.values())
    if not unique:
        return {}
    workers = workers or min(len(unique), max(1, (os.cpu_count() or 2) - 1), 16)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [(r, pool.submit(r.precompile)) for r in unique]
    return {r.spec.kernel_name: f.exception() for r, f in futures if f.exception() is not None}
