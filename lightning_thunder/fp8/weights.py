"""The two tensor subclasses of FP8 all-gather under FSDP2: the sharded weight FSDP all-gathers, and the FP8 weight
the all-gather produces.

FSDP2 lets the local tensor of a sharded parameter decide what is all-gathered (``fsdp_pre_all_gather``) and what
the module then sees (``fsdp_post_all_gather``), as torchao's float8 training does::

    sharded parameter (DTensor)                         unsharded parameter (what the block's forward reads)
      local tensor: FP8ShardedWeight  --all-gather-->   FP8GatheredWeight
        bf16 shard, updated in place                      data: the whole weight in FP8 (e4m3), gathered
        by the optimizer                                  scale_inv: fp32 0-d, the same on every rank

- :class:`FP8ShardedWeight` wraps the high-precision shard (``bf16``): every op runs on that shard (the optimizer,
  checkpoint loading, FSDP's padding and copies), and its ``fsdp_pre_all_gather`` hands FSDP the shard's FP8 copy
  and the scale, which :class:`~lightning_thunder.fp8.fsdp.FP8AllGather` computes for all weights at once.
- :class:`FP8GatheredWeight` is a high-precision tensor in shape, dtype and device (autograd gives it a ``bf16``
  gradient of its shape, which FSDP reduce-scatters as usual) that holds FP8 data and its scale. ``fp8_linear``
  consumes them as they are: its traces show the weight arriving as an FP8 tensor and a scale, and no quantization
  of it. Any other op sees the dequantized weight (``data * scale_inv``) and warns once, outside tracing: the FP8
  layer filter and the weights gathered in FP8 disagree.

Both are traceable wrapper subclasses (``__tensor_flatten__``): Dynamo and AOTAutograd pass their inner tensors
to the compiled graphs.
"""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

if TYPE_CHECKING:
    from lightning_thunder.fp8.fsdp import FP8AllGather

__all__ = ["FP8GatheredWeight", "FP8ShardedWeight", "OneRankShard", "ShardWrapper", "keep_state_dict_plain"]

aten = torch.ops.aten

#: Ops after which an :class:`FP8GatheredWeight` is still the same weight (FSDP2's ``nn.Parameter`` and
#: ``as_strided`` around the all-gather output; Dynamo's ``detach``/``alias``).
_GATHERED_VIEWS = {aten.detach.default, aten.alias.default, aten.as_strided.default, aten.view.default}

#: Ops whose results are still (parts of) the sharded weight: FSDP2's padding and sharding (``new_zeros``,
#: ``slice``, ``view``, ``split``), materialization (``empty_like``), moves (``_to_copy``, ``_pin_memory``),
#: ``nn.Parameter`` (``detach``), copies (``clone``). In-place ops return their destination; anything else
#: (optimizer states made by ``zeros_like``, norms, arithmetic) gives plain tensors.
_SHARDED_PRESERVED = {
    aten.detach.default, aten.alias.default, aten.empty_like.default, aten.new_zeros.default, aten.slice.Tensor,
    aten.view.default, aten.as_strided.default, aten._to_copy.default, aten._pin_memory.default,
    aten.split.Tensor, aten.clone.default,
}

_warned: set[str] = set()


def _is_real(t: torch.Tensor) -> bool:
    """Whether ``t`` holds data (not a fake, functional or meta tensor of a trace)."""
    return type(t) is torch.Tensor and not t.is_meta


class FP8GatheredWeight(torch.Tensor):
    """A weight quantized to FP8 (tensorwise) that poses as a tensor of its high-precision ``dtype``.

    Args:
        data: the FP8 values (``float8_e4m3fn``), the weight's shape.
        scale_inv: fp32 0-d: ``weight ~= data * scale_inv``.
        dtype: the dtype the weight has for autograd and for every op but ``fp8_linear`` (its gradient's dtype).
        requires_grad: as for a parameter.
    """

    _data: torch.Tensor
    _scale_inv: torch.Tensor

    @staticmethod
    def __new__(
        cls, data: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False
    ) -> FP8GatheredWeight:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=dtype,
            device=data.device, requires_grad=requires_grad,
        )

    def __init__(
        self, data: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False
    ) -> None:
        self._data = data
        self._scale_inv = scale_inv

    def __tensor_flatten__(self) -> tuple[list[str], torch.dtype]:
        """Inner tensors ``_data`` and ``_scale_inv``; the outer dtype is the context."""
        return ["_data", "_scale_inv"], self.dtype

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], dtype: torch.dtype, outer_size: Any, outer_stride: Any
    ) -> FP8GatheredWeight:
        """The inverse of :meth:`__tensor_flatten__`."""
        return FP8GatheredWeight(inner["_data"], inner["_scale_inv"], dtype)

    def dequantize(self) -> torch.Tensor:
        """``data * scale_inv`` in fp32, returned in this tensor's dtype (the weight as every other op sees it)."""
        return (self._data.float() * self._scale_inv).to(self.dtype)

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"FP8GatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, data={self._data.dtype}, "
            f"device={self.device})"
        )

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _GATHERED_VIEWS:
            t, *rest = args
            return FP8GatheredWeight(func(t._data, *rest, **kwargs), t._scale_inv, t.dtype)
        weights = [a for a in args if isinstance(a, FP8GatheredWeight)]
        if weights and _is_real(weights[0]._data) and str(func) not in _warned:
            _warned.add(str(func))
            warnings.warn(
                f"{func} ran on the dequantized FP8 weight of a layer whose weight FSDP all-gathers in FP8: only "
                "fp8_linear consumes it as it is, so this op computes with an FP8-rounded weight. The FP8 plugin's "
                "filter and the gathered weights disagree; pass all_gather='bf16' to ThunderFP8/FP8",
                stacklevel=2,
            )
        args, kwargs = tree_map_only(FP8GatheredWeight, FP8GatheredWeight.dequantize, (args, kwargs))
        return func(*args, **kwargs)


class ShardWrapper(torch.Tensor):
    """The local shard of a parameter under FSDP2, wrapped so that its all-gather can be changed (FSDP2's
    ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``, defined by subclasses): every op runs on the wrapped shard
    ``_tensor``; FSDP2's padding, sharding and copies keep the wrapper (see ``_SHARDED_PRESERVED``), in-place ops
    return their destination, and anything else gives plain tensors.

    Args:
        tensor: the high-precision shard.
    """

    _tensor: torch.Tensor

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> ShardWrapper:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, tensor.shape, strides=tensor.stride(), storage_offset=tensor.storage_offset(), dtype=tensor.dtype,
            device=tensor.device, layout=tensor.layout, requires_grad=tensor.requires_grad,
            pin_memory=tensor.is_pinned() if not tensor.is_meta else False,
        )

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def _context(self) -> tuple[Any, ...]:
        """The constructor's arguments after ``tensor`` (what a derived wrapper keeps)."""
        return ()

    def _written(self) -> None:
        """Called after an in-place op wrote the shard (every write to a parameter's shard reaches here: the
        ``DTensor`` parameter hands its local tensor, this wrapper, to the op)."""

    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        """Inner tensor ``_tensor``; the constructor's other arguments are the context."""
        return ["_tensor"], self._context()

    @classmethod
    def __tensor_unflatten__(  # type: ignore[override]
        cls, inner: dict[str, torch.Tensor], ctx: tuple[Any, ...], outer_size: Any, outer_stride: Any
    ) -> ShardWrapper:
        """The inverse of :meth:`__tensor_flatten__`."""
        return cls(inner["_tensor"], *ctx)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"{type(self).__name__}({self._tensor!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inner_args, inner_kwargs = tree_map_only(ShardWrapper, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*inner_args, **inner_kwargs)
        schema = func._schema
        if schema.arguments and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
            # In place (the optimizer's update, a checkpoint's copy_, an initialization): tell the written shards, then
            # return the destination as it was, or nothing (foreach and fused optimizer ops return nothing).
            written = args[0] if isinstance(args[0], (list, tuple)) else (args[0],)
            for t in written:
                if isinstance(t, ShardWrapper):
                    t._written()
            return args[0] if schema.returns else out
        src = args[0] if args else None
        if func not in _SHARDED_PRESERVED or not isinstance(src, ShardWrapper):
            return out
        return tree_map_only(torch.Tensor, lambda t: type(src)(t, *src._context()), out)


class OneRankShard(ShardWrapper):
    """A parameter's shard on a data-parallel group of one rank, where it *is* the whole parameter: FSDP2's
    all-gather moves nothing and the unsharded parameter is a view of the shard (FSDP2 would otherwise copy every
    parameter into a second buffer at each all-gather). Only without a mixed-precision cast: a parameter gathered in
    another dtype is a copy anyway."""

    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: Any, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """``((empty,), (shard,))``: nothing to gather; the shard itself travels in the metadata."""
        shard = self._tensor
        if mesh.size() != 1 or shard.storage_offset() != 0 or not shard.is_contiguous():
            raise RuntimeError(
                f"OneRankShard serves a data-parallel group of one rank with a contiguous shard at the start of its "
                f"storage; got a group of {mesh.size()} and a shard at offset {shard.storage_offset()}"
            )
        return (shard.new_empty((0, *shard.shape[1:])),), (shard,)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """The shard as the unsharded parameter (FSDP2 frees and reallocates only the empty all-gather output)."""
        (gathered,) = all_gather_outputs
        (shard,) = metadata
        if param_dtype != shard.dtype:
            raise RuntimeError(
                f"OneRankShard cannot hand a {shard.dtype} shard to a parameter computed in {param_dtype}: leave "
                "parameters that FSDP's mixed-precision policy casts unwrapped"
            )
        if out is not None:
            if out.data_ptr() != shard.data_ptr():  # the shard was replaced (materialized, loaded with assign)
                out.data = shard.view(out.shape)
            return None
        return shard, (gathered,)


class FP8ShardedWeight(ShardWrapper):
    """The local shard of an FP8 layer's weight under FSDP2: the high-precision shard (every op runs on it), plus the
    FSDP2 all-gather extension that gathers it in FP8 (see the module docstring).

    Args:
        tensor: the high-precision shard.
        group: the :class:`~lightning_thunder.fp8.fsdp.FP8AllGather` that quantizes every FP8 weight of the model.
        index: this weight's position in ``group``.
    """

    _group: FP8AllGather
    _index: int

    def __init__(self, tensor: torch.Tensor, group: FP8AllGather, index: int) -> None:
        super().__init__(tensor)
        self._group = group
        self._index = index

    def _context(self) -> tuple[Any, ...]:
        return (self._group, self._index)

    def _written(self) -> None:
        """The weights changed: the group requantizes them at the next all-gather."""
        if self._group is not None:
            self._group.mark_stale()

    def __repr__(self) -> str:  # type: ignore[override]
        return f"FP8ShardedWeight({self._tensor!r}, index={self._index})"

    # ------------------------------------------------------------------------------------- FSDP2's extension
    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: Any, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """``((FP8 shard,), (scale_inv,))``: this shard in FP8, scaled by the whole weight's maximum (the same
        scale on every rank), padded to FSDP's padded shard size.

        On a group of one rank the shard is the whole weight: nothing is gathered (an empty input) and the FP8
        weight itself travels in the metadata, so FSDP2 copies nothing."""
        q, scale_inv = self._group.quantized(self)
        if mesh.size() == 1:
            return (q.new_empty((0, *q.shape[1:])),), (scale_inv, q)
        padded_rows = -(-outer_size[0] // mesh.size())
        if q.shape[0] != padded_rows:
            q = torch.cat([q, q.new_zeros(padded_rows - q.shape[0], *q.shape[1:])])
        return (q,), (scale_inv,)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """The gathered FP8 weight as an :class:`FP8GatheredWeight` of ``param_dtype`` (on later all-gathers, FSDP
        refills ``out``'s data in place and only the scale is set here; on one rank ``out`` takes the FP8 weight
        from the metadata)."""
        (gathered,) = all_gather_outputs
        scale_inv, *whole = metadata
        data = whole[0] if whole else gathered  # one rank: the FP8 weight itself, nothing was gathered
        if out is not None:
            if not isinstance(out, FP8GatheredWeight):
                raise TypeError(f"FSDP's unsharded parameter should be an FP8GatheredWeight, got {type(out).__name__}")
            out._scale_inv = scale_inv
            if whole:
                out._data = data
            return None
        return FP8GatheredWeight(data, scale_inv, param_dtype), (gathered,)


# FSDP2 reads the signature of `fsdp_pre_all_gather` (``inspect.signature``) at every all-gather of every parameter:
# about 20 us of host time each, two thirds of the extension's cost. A precomputed ``__signature__`` answers at once.
for _cls in (OneRankShard, FP8ShardedWeight):
    _cls.fsdp_pre_all_gather.__signature__ = inspect.signature(_cls.fsdp_pre_all_gather)  # type: ignore[attr-defined]

_PLAIN_HOOK = "_lt_plain_state_dict"


def keep_state_dict_plain(module: nn.Module) -> None:
    """After ``fully_shard``: every ``state_dict`` entry of a parameter whose local shard is a :class:`ShardWrapper`
    becomes a ``DTensor`` of the plain shard (a view of the same storage, no copy), so checkpoints never hold the
    subclasses; loading copies into the shards in place. A post-hook on each module that holds such a parameter
    (``module`` and its submodules), registered once."""
    for sub in module.modules():
        if getattr(sub, _PLAIN_HOOK, False) or not any(_wrapped(p) for p in sub._parameters.values()):
            continue
        sub.register_state_dict_post_hook(_plain_state_dict)
        object.__setattr__(sub, _PLAIN_HOOK, True)


def _wrapped(p: Any) -> bool:
    return isinstance(getattr(p, "_local_tensor", None), ShardWrapper)


def _plain_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    from torch.distributed.tensor import DTensor

    for name in module._parameters:
        value = state_dict.get(prefix + name)
        if _wrapped(value):
            with torch.no_grad():
                state_dict[prefix + name] = DTensor.from_local(
                    value._local_tensor._tensor, value.device_mesh, value.placements, run_check=False,
                    shape=value.shape, stride=value.stride(),
                )
