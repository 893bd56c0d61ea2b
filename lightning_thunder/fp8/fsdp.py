"""FP8 all-gather under FSDP2: the tensorwise FP8 layers' weights travel as FP8 with their scales.

With tensorwise FP8 every forward quantizes each weight anyway; under FSDP the all-gather can move the quantized
weight (1 byte per value) instead of the ``bf16`` one (2 bytes), and the compiled block then uses it as it is, with
no quantization of its own. What :class:`FP8AllGather` does, for the FP8 layers of the transformer blocks:

1. Before ``fully_shard``, :meth:`FP8AllGather.wrap` makes each chosen weight an
   :class:`~lightning_thunder.fp8.weights.FP8ShardedWeight` (the same ``bf16`` values; FSDP2 shards it as usual).
2. At an all-gather, FSDP2 asks each weight's shard for its all-gather input (``fsdp_pre_all_gather``). The first
   time after any weight changed (the optimizer's step, a checkpoint load: every in-place write to a shard goes
   through its wrapper, which marks the group stale; a shard replaced by another tensor is noticed too),
   :meth:`FP8AllGather.refresh` quantizes *every* weight's shard at once: the maxima of all shards in one grouped op
   (:func:`~lightning_thunder.fp8.quantize.fp8_amax_group`), one ``all_reduce(MAX)`` of that vector over the
   data-parallel group (each weight's scale is its whole maximum, the same on every rank), then one grouped cast
   (:func:`~lightning_thunder.fp8.quantize.fp8_cast_group`). The FP8 shards are kept until the weights change
   again, so the backward's all-gather and the micro-steps of gradient accumulation reuse them. Nothing to call
   after the optimizer step, whatever the loop or the optimizer (for-loop, foreach or fused).
3. FSDP2 all-gathers the FP8 shards (in bytes when a unit mixes them with ``bf16`` norms) and the block's forward
   receives each weight as an :class:`~lightning_thunder.fp8.weights.FP8GatheredWeight`, which ``fp8_linear``
   consumes directly: its FP8 values and scale are inputs of the block's traces, which quantize only activations
   and gradients.

The values are those of the ``bf16`` all-gather with the quantization inside the block (the same scale: the
maximum of the whole weight; the same saturating cast), so training matches it.

Checkpoints stay plain: each wrapped layer's ``state_dict`` holds a ``DTensor`` of the ``bf16`` shard (a view, no
copy), never the subclass; loading copies into the shards in place.

Where FP8 all-gather does not apply (tensor-parallel weights, CPU offload, ``reshard_after_forward`` to a smaller
group, rowwise scaling) the FSDP plugin keeps the ``bf16`` all-gather (see
:class:`~lightning_thunder.plugins.FSDP`). Every rank must change the weights alike (they do: FSDP steps every rank's
shard), since the refresh's ``all_reduce`` runs when a rank sees its shards changed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_thunder.fp8.quantize import E4M3, fp8_amax_group, fp8_cast_group
from lightning_thunder.fp8.weights import FP8ShardedWeight

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["FP8AllGather", "ALL_GATHER_CHOICES"]

#: ``all_gather`` settings of :class:`~lightning_thunder.plugins.FP8` / :class:`~lightning_thunder.ThunderFP8`.
ALL_GATHER_CHOICES = ("fp8", "bf16")


class FP8AllGather:
    """FP8 all-gather for the FP8 linear layers of one model sharded with FSDP2 (see the module docstring).

    Attributes:
        names: the qualified names of the layers whose weights are gathered in FP8, in order.
        refreshes: how many times the FP8 shards were recomputed (once per optimizer step in training).
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.refreshes = 0
        self._slots: list[tuple[nn.Module, str]] = []
        self._params: list[DTensor] = []
        self._group: Any = None
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._seen: list[weakref.ref] = []  # the shards the cache was computed from
        self._stale = True

    def __repr__(self) -> str:
        return f"FP8AllGather({len(self.names)} weights, {self.refreshes} refreshes)"

    def wrap(self, module: nn.Module, accept: Callable[[str, nn.Linear], bool], prefix: str = "") -> list[str]:
        """Before ``fully_shard``: make the weight of each ``nn.Linear`` below ``module`` that ``accept(name, linear)``
        chooses an :class:`FP8ShardedWeight` (same values, same ``requires_grad``); returns the qualified names
        (``prefix`` + the name below ``module``)."""
        wrapped = []
        for name, linear in module.named_modules():
            if not isinstance(linear, nn.Linear) or not accept(name, linear):
                continue
            weight = linear.weight
            if isinstance(weight, FP8ShardedWeight) or _is_dtensor(weight):
                raise ValueError(
                    f"FP8 all-gather wraps plain weights before FSDP shards them, but {prefix}{name}.weight is a "
                    f"{type(weight).__name__}; wrap the unsharded model once (tensor-parallel weights keep the bf16 "
                    "all-gather: pass all_gather='bf16')"
                )
            sharded = FP8ShardedWeight(weight.detach(), self, len(self._slots))
            linear.weight = nn.Parameter(sharded, requires_grad=weight.requires_grad)
            self._slots.append((linear, "weight"))
            self.names.append(f"{prefix}{name}")
            wrapped.append(f"{prefix}{name}")
        return wrapped

    def bind(self) -> None:
        """After ``fully_shard``: take the sharded parameters (the ``DTensor``s the optimizer updates), and requantize
        after any ``load_state_dict`` of their layers. (:func:`~lightning_thunder.fp8.weights.keep_state_dict_plain`
        keeps the layers' ``state_dict`` entries plain.)"""
        from torch.distributed.tensor import DTensor

        params = []
        for (linear, attr), name in zip(self._slots, self.names):
            p = linear._parameters[attr]
            if not (isinstance(p, DTensor) and isinstance(p._local_tensor, FP8ShardedWeight)):
                raise RuntimeError(
                    f"{name}.{attr} should be a DTensor sharded by fully_shard holding an FP8ShardedWeight after "
                    f"sharding, got {type(p).__name__}; call bind() after fully_shard on the module that holds it"
                )
            if p.device_mesh.ndim != 1:
                raise ValueError(
                    f"FP8 all-gather shards over a 1-D data-parallel mesh; {name}.{attr} is on a "
                    f"{p.device_mesh.ndim}-D mesh (tensor parallelism): pass all_gather='bf16'"
                )
            params.append(p)
            linear.register_load_state_dict_post_hook(self._loaded)
        if params:
            mesh = params[0].device_mesh
            self._group = mesh.get_group() if mesh.size() > 1 else None
        self._params = params

    def mark_stale(self) -> None:
        """Requantize every weight at the next all-gather (called by a shard written in place)."""
        self._stale = True

    def _loaded(self, module: nn.Module, incompatible_keys: Any) -> None:
        """``load_state_dict`` post-hook of each wrapped layer: the shards may have been written through the plain
        views the ``state_dict`` handed out (distributed checkpoint loading); requantize them."""
        self._stale = True

    def stale(self, weight: FP8ShardedWeight) -> bool:
        """Whether the cache is out of date for ``weight``: a shard was written in place since the last
        :meth:`refresh` (:meth:`mark_stale`), or ``weight``'s shard is another tensor (materialization, FSDP's
        re-padding)."""
        return self._stale or self._seen[weight._index]() is not weight._tensor

    def quantized(self, weight: FP8ShardedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """``(FP8 shard, scale_inv)`` of ``weight`` (FSDP2's all-gather input), refreshing every weight first when it
        changed."""
        if self.stale(weight):
            self.refresh()
        return self._cache[weight._index]

    @torch.no_grad()
    def refresh(self) -> None:
        """Quantize every weight's shard: grouped maxima, one ``all_reduce(MAX)`` over the data-parallel group,
        grouped cast (see the module docstring)."""
        if not self._params:
            raise RuntimeError("FP8AllGather.refresh before bind(): shard the model with fully_shard first")
        import torch.distributed as dist

        shards = [p._local_tensor._tensor for p in self._params]
        amax = fp8_amax_group(shards)
        if self._group is not None:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self._group)
        self._cache = fp8_cast_group(shards, amax, E4M3)
        self._seen = [weakref.ref(t) for t in shards]
        self._stale = False
        self.refreshes += 1


def _is_dtensor(t: Any) -> bool:
    from lightning_thunder.fp8.dtensor import is_dtensor

    return is_dtensor(t)
