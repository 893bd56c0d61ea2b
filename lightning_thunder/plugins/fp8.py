"""The FP8 compiler plugin: linear layers run their three matmuls in FP8 (Ada/Hopper/Blackwell).

Before autograd, every ``linear(x, w, b)`` of the torch-level trace that the filter accepts becomes
``lightning_thunder.fp8.linear.fp8_linear(x, w, b, recipe=..., emulate=...)``; AOTAutograd then traces
that op's autograd function, so the forward and backward traces show each quantization (tensorwise:
``fp8_amax`` then ``fp8_cast[_with_transpose]``, whose outputs are the FP8 tensors and their scales; rowwise:
``fp8_quantize[_with_transpose]``) and each ``aten._scaled_mm``. See :mod:`lightning_thunder.fp8.linear`
for the math. Weights keep their dtype; they are quantized on the fly every step (dynamic scaling), all of
a forward's together (:func:`group_weight_quantizations`). A fusion region that computes a quantized value
takes its ``fp8_amax`` in (see :mod:`lightning_thunder.fp8.quantize`).

The filter: a layer stays in high precision unless both its dims are multiples of 16 (what
``torch._scaled_mm`` requires) and ``filter(info)`` accepts it. The default filter,
:func:`default_filter`, also keeps the output head (a module named ``lm_head`` or ``output``): its
logits feed the loss directly and gain little from FP8 (torchao and torchtitan skip it too).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_thunder.executors.base import Executor, OpExecutor
from lightning_thunder.executors.triton.epilogues import Epilogue
from lightning_thunder.fp8.config import check_fp8_hardware, check_recipe
from lightning_thunder.fp8.fsdp import ALL_GATHER_CHOICES
from lightning_thunder.fp8.linear import fp8_linear
from lightning_thunder.fp8.module import restore_linears
from lightning_thunder.fp8.weights import FP8GatheredWeight
from lightning_thunder.fp8.quantize import (
    fp8_amax_kernel,
    fp8_cast_kernel,
    fp8_cast_with_transpose_kernel,
    fp8_quantize_group_kernel,
    fp8_quantize_kernel,
    fp8_quantize_with_transpose_kernel,
)
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp, Trace

__all__ = [
    "FP8",
    "LinearInfo",
    "default_filter",
    "fp8_compatible",
    "group_weight_quantizations",
    "check_all_gather",
    "OUTPUT_HEAD_NAMES",
]

#: Module names (the last part of the qualified name) :func:`default_filter` treats as the output head.
OUTPUT_HEAD_NAMES = ("lm_head", "output")

_LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)


@dataclass(frozen=True)
class LinearInfo:
    """What a filter sees of one linear layer.

    Attributes:
        name: the module's qualified name (``"transformer.h.0.attn.qkv"``, ``"lm_head"``) as in
            ``model.named_modules()``; for a ``linear`` call outside a module, its weight's name.
        in_features, out_features: the weight's ``[out_features, in_features]`` shape.
    """

    name: str
    in_features: int
    out_features: int


def fp8_compatible(info: LinearInfo) -> bool:
    """Whether ``torch._scaled_mm`` can run the layer: both dims multiples of 16."""
    return info.in_features % 16 == 0 and info.out_features % 16 == 0


def default_filter(info: LinearInfo) -> bool:
    """The default filter: FP8 for every layer with dims that are multiples of 16 except the output head
    (a module whose name ends in one of :data:`OUTPUT_HEAD_NAMES`)."""
    return fp8_compatible(info) and info.name.rsplit(".", 1)[-1] not in OUTPUT_HEAD_NAMES


def _module_name(op: BoundOp, weight: Proxy) -> str:
    """``transformer.h.0.attn.qkv`` from Dynamo's ``nn_module_stack`` (``L['module'].transformer.h.0.attn.qkv``)."""
    stack = op.meta.get("nn_module_stack")
    if stack:
        entry = list(stack.values())[-1]
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        path = re.sub(r"^L\['[^']*'\]\.?", "", path)
        path = re.sub(r"\[(\d+)\]", r".\1", path)
        path = re.sub(r"\['([^']*)'\]", r".\1", path).replace("._modules.", ".").strip(".")
        if path:
            return path
    return re.sub(r"_weight$", "", weight.name)


def _linear_operands(op: BoundOp) -> tuple[Any, Any, Any] | None:
    """``(x, weight, bias)`` of a ``linear`` op, or ``None`` when it is not one we can rewrite."""
    try:
        is_linear = op.target in _LINEAR_TARGETS
    except TypeError:
        return None
    if not is_linear or op.is_method or op.unpack:
        return None
    names = ("input", "weight", "bias")
    values = list(op.args) + [op.kwargs[n] for n in names[len(op.args) :] if n in op.kwargs]
    if len(values) < 2 or set(op.kwargs) - set(names):
        return None
    x, weight = values[0], values[1]
    bias = values[2] if len(values) > 2 else None
    if not (isinstance(x, Proxy) and x.is_tensor and isinstance(weight, Proxy) and weight.is_tensor):
        return None
    if len(weight.shape) != 2 or not all(isinstance(d, int) for d in weight.shape):
        return None
    return x, weight, bias


def group_weight_quantizations(trace: Trace, executor: str) -> Trace:
    """Replace the tensorwise quantizations of graph inputs (the weights: ``fp8_amax(w)`` read only by
    ``fp8_cast[_with_transpose](w, partials, dtype)``) by one :func:`~lightning_thunder.fp8.quantize.fp8_quantize_group_kernel`
    op per input dtype, FP8 dtype and layout, placed where the first of them was.

    Each weight quantized on its own costs two launches and a handful of allocations of host time inside the
    layer that uses it, where the host, not the GPU, sets the pace of an FP8 forward; grouped, the forward
    starts with three launches that quantize every weight. The values are the same bit for bit. Only 2-D
    contiguous inputs are grouped, and only groups of two or more.
    """
    amax_op = torch.ops.lightning_thunder.fp8_amax.default
    casts = {
        torch.ops.lightning_thunder.fp8_cast.default: False,
        torch.ops.lightning_thunder.fp8_cast_with_transpose.default: True,
    }
    inputs = {id(p) for p in trace.inputs}
    graph_outputs = {id(p) for p in trace.output_proxies()}
    readers = trace.readers()
    groups: dict[tuple, list[tuple[BoundOp, BoundOp]]] = {}
    for op in trace.ops:
        if op.executor or op.is_method or op.target is not amax_op:
            continue
        w, partials = op.args[0], op.outputs[0]
        if not (isinstance(w, Proxy) and id(w) in inputs and w.is_tensor and w.val.dim() == 2 and w.val.is_contiguous()):
            continue
        users = readers.get(id(partials), [])
        if partials is None or id(partials) in graph_outputs or len(users) != 1:
            continue
        cast = users[0]
        if cast.executor or cast.is_method or cast.target not in casts or len(cast.args) < 2:
            continue
        if cast.args[0] is not w or cast.args[1] is not partials:
            continue
        fp8_dtype = cast.args[2] if len(cast.args) > 2 else cast.kwargs.get("dtype")
        key = (w.val.dtype, w.val.device, fp8_dtype, casts[cast.target])
        groups.setdefault(key, []).append((op, cast))
    groups = {key: members for key, members in groups.items() if len(members) > 1}
    if not groups:
        return trace
    replaced: dict[int, BoundOp | None] = {}
    for (_, _, fp8_dtype, transpose), members in groups.items():
        outputs = tuple(p for _, cast in members for p in cast.outputs)
        grouped = BoundOp(
            fp8_quantize_group_kernel,
            tuple(amax.args[0] for amax, _ in members),
            {"dtype": fp8_dtype, "transpose": transpose},
            outputs,
            unpack=True,
            executor=executor,
            meta=members[0][0].meta,
        )
        replaced[id(members[0][0])] = grouped
        for k, (amax, cast) in enumerate(members):
            if k:
                replaced[id(amax)] = None
            replaced[id(cast)] = None
    ops = [replaced.get(id(op), op) for op in trace.ops]
    sizes = ", ".join(str(len(m)) for m in groups.values())
    return trace.derive(f"FP8: weight quantizations grouped ({sizes})", ops=[op for op in ops if op is not None])


class _FP8Executor(OpExecutor):
    """The ``fp8`` executor: groups the weights' quantizations (:func:`group_weight_quantizations`), then runs
    the quantization ops with their kernels."""

    def claim(self, trace: Trace) -> Trace:
        """Group, then claim the remaining quantization ops."""
        return super().claim(group_weight_quantizations(trace, self.name))


class FP8(Plugin):
    """Run the matmuls of linear layers in FP8: forward in e4m3, gradients in e5m2, dynamic scales.

    Args:
        recipe: ``"tensorwise"`` (one scale per tensor) or ``"rowwise"`` (one scale per row along the
            contracted dimension; more robust to outliers, slower).
        emulate: run the same quantize/dequantize numerics but multiply in the input's dtype, on any
            device (tests, CPU). Without it, a CUDA GPU of compute capability >= 8.9 is required.
        filter: ``filter(info: LinearInfo) -> bool`` chooses the layers to run in FP8 among those whose
            dims are multiples of 16; default :func:`default_filter` (all but the output head).
        all_gather: under FSDP (the ``thunder_fsdp`` strategies, or :class:`~lightning_thunder.plugins.FSDP` given
            this plugin), how the FP8 layers' weights of the transformer blocks are all-gathered. ``"fp8"``: as FP8
            with their scales, computed for all weights once after they change (the optimizer step); the blocks
            use them without quantizing them again (:mod:`lightning_thunder.fp8.fsdp`): half the bytes gathered,
            no weight quantization per block and micro-step. ``"bf16"``: the weights' own dtype, quantized in each
            block's forward. ``None`` (default): ``"fp8"`` with ``recipe="tensorwise"``; ``"bf16"`` with
            ``"rowwise"`` (per-row scales of the gathered weight cannot be computed shard by shard), and where FSDP2
            cannot gather in FP8 (tensor parallelism, CPU offload, ``reshard_after_forward`` to a smaller group),
            with a warning. ``"fp8"`` with ``"rowwise"`` is an error.

    Attributes:
        converted: qualified names of the layers rewritten so far (all graphs), in order.
        kept: qualified names of the linear layers left in high precision, in order.

    Example::

        cm = lightning_thunder.compile(model, plugins=[*lightning_thunder.default_plugins(), FP8()])
        print(lightning_thunder.last_traces(cm)[1])          # torch/FP8: fp8_linear in place of linear
        print(lightning_thunder.last_backward_traces(cm)[-1])  # quantize ops and _scaled_mm
    """

    def __init__(
        self,
        recipe: str = "tensorwise",
        emulate: bool = False,
        filter: Callable[[LinearInfo], bool] | None = None,  # noqa: A002 - the issue's name for it
        all_gather: str | None = None,
    ) -> None:
        self.recipe = check_recipe(recipe)
        self.emulate = bool(emulate)
        self.all_gather_requested = check_all_gather(all_gather, self.recipe)
        check_fp8_hardware(self.emulate)
        if filter is not None and not callable(filter):
            raise TypeError(f"filter must be a callable taking a LinearInfo and returning a bool, got {filter!r}")
        self.filter = filter
        self.converted: list[str] = []
        self.kept: list[str] = []
        self._executor = _FP8Executor(
            "fp8",
            {
                torch.ops.lightning_thunder.fp8_quantize.default: fp8_quantize_kernel,
                torch.ops.lightning_thunder.fp8_quantize_with_transpose.default: fp8_quantize_with_transpose_kernel,
                torch.ops.lightning_thunder.fp8_amax.default: fp8_amax_kernel,
                torch.ops.lightning_thunder.fp8_cast.default: fp8_cast_kernel,
                torch.ops.lightning_thunder.fp8_cast_with_transpose.default: fp8_cast_with_transpose_kernel,
            },
        )

    @property
    def all_gather(self) -> str:
        """``"fp8"`` or ``"bf16"``: the ``all_gather`` argument, or its default for the recipe (see the class
        docstring)."""
        if self.all_gather_requested is not None:
            return self.all_gather_requested
        return "fp8" if self.recipe == "tensorwise" else "bf16"

    def accepts(self, info: LinearInfo) -> bool:
        """Whether the layer described by ``info`` runs in FP8 (dims multiples of 16, and the filter agrees)."""
        return fp8_compatible(info) and bool((self.filter or default_filter)(info))

    def transform_module(self, module: nn.Module) -> nn.Module:
        """Turn :class:`~lightning_thunder.fp8.FP8Linear` modules (from ``ThunderFP8`` on an eager path) back into
        ``nn.Linear``: in a compiled module this plugin rewrites ``linear`` in the trace instead."""
        restore_linears(module)
        return module

    def transform_torch_trace(self, trace: Trace) -> Trace:
        """Replace each accepted ``linear`` by ``fp8_linear`` (same operands and output)."""
        ops: list[BoundOp] = []
        converted: list[str] = []
        kept: list[str] = []
        for op in trace.ops:
            operands = _linear_operands(op)
            if operands is None:
                ops.append(op)
                continue
            x, weight, bias = operands
            out_features, in_features = weight.shape
            info = LinearInfo(_module_name(op, weight), in_features, out_features)
            if not self.accepts(info):
                if isinstance(weight.val, FP8GatheredWeight):
                    raise ValueError(
                        f"FP8: the filter keeps `{info.name}` in high precision, but FSDP all-gathers its weight in "
                        "FP8 (the FSDP plugin chose the layers with this plugin's filter under other module names); "
                        "make the filter decide by the last part of the name, or pass all_gather='bf16'"
                    )
                kept.append(info.name)
                ops.append(op)
                continue
            converted.append(info.name)
            kwargs = {"recipe": self.recipe, "emulate": self.emulate}
            ops.append(op.replace(target=fp8_linear, args=(x, weight, bias), kwargs=kwargs))
        if not converted and not kept:
            return trace
        if not converted and not self.converted:
            warnings.warn(
                f"FP8: the filter kept every linear layer of this graph in high precision ({', '.join(kept)}), so "
                "nothing runs in FP8. A layer runs in FP8 when both its dims are multiples of 16 and `filter` "
                "accepts it (the default filter skips the output head, "
                f"{' / '.join(OUTPUT_HEAD_NAMES)}); pass FP8(filter=...) to choose layers",
                stacklevel=2,
            )
        self.converted.extend(converted)
        self.kept.extend(kept)
        emulated = ", emulated" if self.emulate else ""
        total = len(converted) + len(kept)
        note = f"plugin FP8 ({self.recipe}{emulated}): {len(converted)} of {total} linear -> fp8_linear"
        if kept:
            note += f"; kept in high precision: {', '.join(kept)}"
        return trace.derive(note, ops=ops)

    def executors(self) -> list[Executor]:
        """``fp8``: runs the quantization ops' kernels directly (the Triton kernel pair on CUDA)."""
        return [self._executor]

    def fusion_epilogues(self) -> list[Epilogue]:
        """:class:`~lightning_thunder.fp8.epilogue.AbsmaxEpilogue`: a fusion region that computes a value this plugin
        quantizes folds its ``fp8_amax`` into its kernel (whatever the order of the plugins)."""
        from lightning_thunder.fp8.epilogue import AbsmaxEpilogue

        return [AbsmaxEpilogue()]

    def __repr__(self) -> str:
        filt = "" if self.filter is None else f", filter={getattr(self.filter, '__name__', self.filter)!r}"
        gather = "" if self.all_gather_requested is None else f", all_gather={self.all_gather_requested!r}"
        return f"FP8(recipe={self.recipe!r}, emulate={self.emulate}{filt}{gather})"


def check_all_gather(all_gather: str | None, recipe: str) -> str | None:
    """Validate the ``all_gather`` argument of :class:`FP8` for ``recipe`` (``None``: the recipe's default)."""
    if all_gather is None:
        return None
    if all_gather not in ALL_GATHER_CHOICES:
        raise ValueError(
            f"all_gather={all_gather!r} is not supported; choose one of {list(ALL_GATHER_CHOICES)} (or None for the "
            "recipe's default)"
        )
    if all_gather == "fp8" and recipe != "tensorwise":
        raise ValueError(
            f"all_gather='fp8' needs recipe='tensorwise' (one scale per weight, computed before the all-gather), got "
            f"recipe={recipe!r}: rowwise scales belong to rows of the gathered weight, so rowwise FP8 keeps the bf16 "
            "all-gather; pass all_gather='bf16' or leave it None"
        )
    return all_gather
