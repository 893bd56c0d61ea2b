"""A region's generated kernel and how to launch it: :func:`generate` writes the Triton source for the region's
kernel shape (kernels.py) and the candidate launch configurations."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy

from lightning_thunder.executors.triton.kernels import writer_for
from lightning_thunder.executors.triton.kinds import dims, gt1, is_static, strides
from lightning_thunder.executors.triton.plan import RegionPlan
from lightning_thunder.executors.triton.writer import TensorArg

__all__ = ["KernelSpec", "TensorArg", "generate", "configs_for"]

_PRELUDE = '''\
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    libdevice = None


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _rtne_bf16(x):
    # fp32 -> nearest-even bf16 value (still fp32). Used under TRITON_INTERPRET=1, whose conversion
    # to bf16 truncates; GPUs round to nearest even natively.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
'''


@dataclass
class KernelSpec:
    """A generated kernel and how to launch it."""

    region: str
    kernel_name: str
    source: str
    mode: str  # the kernel shape (shapes.KERNEL_SHAPES)
    R: int
    N: int
    inputs: list[TensorArg]
    outputs: list[TensorArg]
    configs: list[dict[str, int]] = field(default_factory=list)
    programs: int | None = None  # fixed grid of a kernel with column sums
    #: the number of int arguments after the tensors: the values of the symbolic dimensions of a dynamic shape
    symbols: int = 0
    #: for a symbolic shape: symbol values -> (R, ((shape, stride) of each output)); None when everything is static
    sizes: Callable[..., tuple[int, tuple]] | None = None

    @property
    def column_tiled(self) -> bool:
        """Whether a second grid axis splits the columns."""
        return self.mode == "column-tiled"

    def grid(self, config: dict[str, int], R: int | None = None) -> tuple[int, ...]:
        """The launch grid for ``config`` (``R``: the row count of this launch, when it is symbolic)."""
        R = self.R if R is None else R
        if self.programs is not None:
            if self.column_tiled:
                return (self.programs, math.ceil(self.N / config["BLOCK_N"]))
            return (self.programs,)
        if self.mode == "flat":
            return (math.ceil(R * self.N / config["BLOCK"]),)
        return (math.ceil(R / config["BLOCK_M"]),)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def configs_for(kernel: str, R: int, N: int) -> list[dict[str, int]]:
    """Candidate launch configurations, the heuristic choice first (at most two: autotuning compiles each)."""
    if kernel == "column-tiled":  # column-tiled grid-stride kernels: 4096-8192 elements per tile
        return [{"BLOCK_M": 8, "BLOCK_N": 512, "num_warps": 4}, {"BLOCK_M": 16, "BLOCK_N": 512, "num_warps": 8}]
    if kernel == "flat":
        total = R * N
        if total <= 1 << 16:
            return [{"BLOCK": 1024, "num_warps": 4}]
        return [{"BLOCK": 2048, "num_warps": 8}, {"BLOCK": 1024, "num_warps": 4}]
    if kernel in ("persistent", "grid-stride"):
        bn = _next_pow2(N)
        # About 2048-4096 elements per program; never more rows than exist.
        bm = max(1, min(_next_pow2(R), 4096 // bn))
        warps = 4 if bm * bn <= 2048 else 8 if bm * bn <= 8192 else 16
        first = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}
        if bm > 1:
            return [first, {"BLOCK_M": bm // 2, "BLOCK_N": bn, "num_warps": max(4, warps // 2)}]
        return [first]
    return [{"BLOCK_M": 1, "BLOCK_N": 2048, "num_warps": 8}, {"BLOCK_M": 1, "BLOCK_N": 4096, "num_warps": 8}]


def _tensor_args(prefix: str, proxies: list, chosen_strides: list[tuple[int, ...] | None]) -> list[TensorArg]:
    args = []
    for k, (p, chosen) in enumerate(zip(proxies, chosen_strides)):
        shape = dims(p.val)
        stride = strides(p.val) if prefix == "out" else ()
        contiguous = bool(p.val.is_contiguous())
        if chosen is not None:  # a layout chosen for the readers (layout.py) or a slice of a buffer (catslices.py)
            stride, contiguous = chosen, False
        stride_dims = [] if contiguous else [j for j, s in enumerate(shape) if gt1(s)]
        args.append(TensorArg(f"{prefix}{k}", shape, p.val.dtype, stride_dims, stride, contiguous))
    return args


def _hint(size: Any) -> int:
    """A size to pick launch configurations by: the size itself, or 8192 rows for a symbolic one."""
    return size if is_static(size) else 8192


def _sizes_function(R: Any, outputs: list[TensorArg], symbol_names: dict) -> Callable[..., tuple[int, tuple]] | None:
    """``(sym0, sym1, ...) -> (R, ((shape, stride) per output))`` for a region with symbolic sizes (``None`` if none)."""
    values = [R, *(d for a in outputs for d in (*a.shape, *a.stride))]
    if all(is_static(v) for v in values):
        return None

    def source(v: Any) -> str:
        return str(v) if is_static(v) else sympy.pycode(v.xreplace(symbol_names))

    def tup(items: tuple) -> str:
        return "(" + "".join(source(v) + ", " for v in items) + ")"

    body = ", ".join(f"({tup(a.shape)}, {tup(a.stride)})" for a in outputs)
    params = ", ".join(sorted((str(name) for name in symbol_names.values()), key=lambda n: int(n[3:])))
    code = f"lambda {params}: ({source(R)}, ({body}{',' if len(outputs) == 1 else ''}))"
    return eval(compile(code, "<lightning_thunder region sizes>", "eval"), {})  # noqa: S307 - our own expression


def generate(region: RegionPlan) -> KernelSpec:
    """Generate the Triton kernel of ``region`` (whose ``kernel`` shape the ``kernel_shapes`` pass has set)."""
    if region.kernel is None:
        raise ValueError(f"{region.name} has no kernel shape: run the kernel_shapes pass first")
    tensors = [p for p in region.inputs if p.is_tensor]
    inputs = _tensor_args("in", tensors, [None] * len(tensors))
    outputs = _tensor_args("out", region.output_proxies, [o.strides for o in region.outputs])
    for arg, o in zip(outputs, region.outputs):
        arg.zeroed = o.zeroed
    writer = writer_for(region, {a.name: a for a in inputs + outputs})
    params = []
    for arg in inputs + outputs:
        params.append(arg.name)
        params += [f"{arg.name}_s{j}" for j in arg.stride_dims]
    params += sorted((str(name) for name in writer.symbol_names.values()), key=lambda n: int(n[3:]))
    params += ["BLOCK: tl.constexpr"] if writer.mode == "flat" else ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    writer.header(params)
    writer.body()
    body = "\n".join(writer.lines)
    # Named by the code alone, not the comments (they name each layer's own values and source lines): the
    # same region in every layer of a model is one kernel, compiled and autotuned once.
    code = "\n".join(line for line in writer.lines if not line.lstrip().startswith("#"))
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    kernel_name = f"fused_{digest}"
    source = f"{_PRELUDE}\n\n@triton.jit\n" + body.replace("def KERNEL(", f"def {kernel_name}(", 1) + "\n"
    return KernelSpec(
        region=region.name,
        kernel_name=kernel_name,
        source=source,
        mode=region.kernel,
        R=region.R,
        N=region.N or 1,
        inputs=inputs,
        outputs=outputs,
        configs=configs_for(region.kernel, _hint(region.R), region.N or 1),
        programs=region.programs if region.kernel in ("grid-stride", "column-tiled") else None,
        symbols=len(writer.symbol_names),
        sizes=_sizes_function(region.R, outputs, writer.symbol_names),
    )
