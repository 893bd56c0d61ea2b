"""FSDP: fully sharded data parallelism on PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP units as torchtitan lays them out (``apply_fsdp``): the embedding is its own unit, each
transformer block is one (its parameters are all-gathered just before it runs and freed after), the
final norm and the output head together are one, and the root is the unit for what is left. The
last block and the [final norm + head] unit keep their parameters gathered after the forward: the
backward starts with them. Parameters become sharded ``DTensor``s; gradients are reduce-scattered in
the backward. On a tensor-parallel model (DTensor parameters over a ``"tensor_parallel"`` mesh)
FSDP shards over the data-parallel mesh and the parameters become 2-D ``DTensor``s.

Composition with the compiler (the torchtitan order, "compile per block after AC wrapping and
before FSDP"): activation checkpointing goes *inside* each block's compiled graph, and FSDP's hooks
run *around* it, eagerly (PyTorch keeps Dynamo out of FSDP2's hooks). Two ways to get there:

- ``compile_blocks(model, plugins)`` then ``FSDP(...).transform_module(model)``: each block is a
  compiled module, sharded; the root's own code stays eager. This is what the ``thunder_fsdp``
  strategies do.
- ``lightning_thunder.compile(model, plugins=[FSDP(), ...])``: ``compile`` shards here, then compiles
  the root. Since Dynamo cannot enter FSDP's hooks, the root's graph stops at each block and each
  block's forward is compiled as its own graph (one graph shared by all blocks).

FP8: given the :class:`~lightning_thunder.plugins.FP8` plugin (``FSDP(fp8=...)``; the ``thunder_fsdp`` strategies
pass ``ThunderFP8``'s), the weights of the blocks' FP8 layers are all-gathered in FP8 with their scales
(:mod:`lightning_thunder.fp8.fsdp`) unless that plugin says ``all_gather="bf16"``.

One device (a data-parallel group of one rank, without CPU offload or tensor parallelism; :meth:`FSDP.one_unit`):
there is nothing to shard, yet per-block units would cost what they cost on many ranks: FSDP2 copies every
parameter into its "gathered" buffer at each all-gather (forward, and again in the backward), and the compiled
blocks and the units' hooks split the step into graphs (so the head and the loss land in separate graphs, and the
fused cross-entropy does not apply). FSDP2 is kept, because leaving it out would change what the strategy hands
back: parameters would not be ``DTensor``s, so Lightning's distributed checkpointing (which looks for them),
``strategy.device_mesh`` code and the checkpoint layout would differ between one device and many, and a run debugged
on one GPU would not be the run scaled out. But the whole model is one unit, the root, whose parameters are used in
place (:class:`~lightning_thunder.fp8.weights.OneRankShard`: FSDP2 gathers nothing; a parameter that a
mixed-precision policy casts keeps FSDP2's cast copy), and the ``thunder_fsdp`` strategies compile the whole step as
``thunder`` does. What remains of FSDP2 there: its hooks, ``DTensor`` parameters for the optimizer and clipping,
and its copies of the gradients into and out of the reduce-scatter buffer.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import nn

from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.blocks import (
    BlockClass,
    checkpoint_block,
    find_block_class,
    find_blocks,
    find_outer_modules,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lightning_thunder.fp8.fsdp import FP8AllGather
    from lightning_thunder.plugins.fp8 import FP8

__all__ = ["FSDP", "require_process_group", "default_device_mesh"]

log = logging.getLogger(__name__)


def require_process_group(what: str) -> None:
    """Raise a ``RuntimeError`` naming the fix when no default process group is initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialized process group: call torch.distributed.init_process_group(...) first "
            "(or let Lightning do it: Fabric(strategy='thunder_fsdp') / Trainer(strategy='thunder_fsdp'))"
        )


def default_device_mesh(what: str) -> DeviceMesh:
    """A 1-D mesh of every rank of the default process group (CUDA with NCCL, else CPU); ``what`` names the
    caller in the error raised when there is no process group."""
    from torch.distributed.device_mesh import init_device_mesh

    require_process_group(what)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def _check_reshard(value: object) -> bool | int:
    if isinstance(value, bool) or (isinstance(value, int) and value >= 2):
        return value
    raise ValueError(
        f"reshard_after_forward={value!r} must be True (free parameters after each block's forward), False "
        "(keep them until the backward) or an int >= 2 (reshard to that many ranks, dividing the world size)"
    )


class FSDP(Plugin):
    """Shard a model with FSDP2: ``fully_shard`` on the embedding, every transformer block, the final norm with
    the output head, then the root (see the module docstring).

    Needs an initialized process group (or a ``mesh``). Parameters may still be on the meta device:
    materialize them afterwards with ``model.to_empty(device=...)`` and ``reset_parameters()``.

    Args:
        mesh: a 1-D device mesh to shard over (default: all ranks of the default process group, on CUDA
            with NCCL and on CPU otherwise).
        block_cls: the block class (or a tuple of classes); ``None`` detects the repeated block.
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` (e.g. bf16 parameters for compute with fp32 gradient
            reduction); ``None`` computes in the parameters' dtype.
        reshard_after_forward: free the gathered parameters of the embedding and of each block but the last
            after their forward (``True``, least memory), keep them for the backward (``False``, no second
            all-gather), or reshard to a smaller group (an int). The last block, [final norm + head] and the
            root always keep them: the backward starts with them.
        cpu_offload: keep sharded parameters, gradients and optimizer state in (pinned) CPU memory;
            needs a CUDA mesh.
        activation_checkpointing: recompute each block's activations in the backward instead of saving
            them (see :func:`~lightning_thunder.plugins.blocks.checkpoint_block`).
        fp8: the :class:`~lightning_thunder.plugins.FP8` plugin the blocks are compiled with: with its
            ``all_gather="fp8"`` (the tensorwise default) the weights of the blocks' FP8 layers are all-gathered in
            FP8 (see the module docstring).

    Attributes:
        fp8_all_gather: after :meth:`transform_module`, the :class:`~lightning_thunder.fp8.fsdp.FP8AllGather` of
            the weights gathered in FP8, or ``None``.

    Example::

        torch.distributed.init_process_group("nccl")
        cm = lightning_thunder.compile(model, plugins=[FSDP(activation_checkpointing=True)])
        fp8 = FP8()
        cm = lightning_thunder.compile(model, plugins=[FSDP(fp8=fp8), *lightning_thunder.default_plugins(), fp8])
    """

    def __init__(
        self,
        *,
        mesh: DeviceMesh | None = None,
        block_cls: BlockClass | None = None,
        mp_policy: MixedPrecisionPolicy | None = None,
        reshard_after_forward: bool | int = True,
        cpu_offload: bool = False,
        activation_checkpointing: bool = False,
        fp8: FP8 | None = None,
    ) -> None:
        if mesh is not None and mesh.ndim != 1:
            raise ValueError(
                f"FSDP shards over a 1-D mesh, got a {mesh.ndim}-D mesh with dims {mesh.mesh_dim_names}; "
                "pass the data-parallel sub-mesh, e.g. mesh['data_parallel']"
            )
        self.mesh = mesh
        self.block_cls = block_cls
        self.mp_policy = mp_policy
        self.reshard_after_forward = _check_reshard(reshard_after_forward)
        self.cpu_offload = bool(cpu_offload)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.fp8 = fp8
        self.fp8_all_gather: FP8AllGather | None = None

    def gathers_fp8(self, module: nn.Module, mesh: DeviceMesh) -> bool:
        """Whether :meth:`transform_module` all-gathers the FP8 weights of ``module``'s blocks in FP8 over ``mesh``: the
        FP8 plugin asks for it (``all_gather="fp8"``) and FSDP2 allows it. Where FSDP2 does not (CPU offload,
        ``reshard_after_forward`` to a smaller group, tensor-parallel weights), an explicit ``all_gather="fp8"``
        raises a ``ValueError`` and the default falls back to bf16 with a warning."""
        if self.fp8 is None or self.fp8.all_gather != "fp8":
            return False
        from lightning_thunder.fp8.dtensor import is_dtensor

        reasons = []
        if self.cpu_offload:
            reasons.append("cpu_offload=True (FSDP2 moves each bf16 shard to the GPU just before its all-gather)")
        if not isinstance(self.reshard_after_forward, bool) and not self.one_unit(module, mesh):
            reasons.append(
                f"reshard_after_forward={self.reshard_after_forward} (FSDP2 regathers from the smaller group without "
                "the all-gather extension)"
            )
        if any(is_dtensor(p) for p in module.parameters()):
            reasons.append("tensor parallelism (the weights are already DTensors split over the tensor-parallel mesh)")
        if not reasons:
            return True
        message = f"FP8 all-gather is not available with {' and '.join(reasons)}"
        if self.fp8.all_gather_requested == "fp8":
            raise ValueError(f"{message}; pass all_gather='bf16' to ThunderFP8/FP8")
        warnings.warn(
            f"{message}: the FP8 layers' weights are all-gathered in bf16 and quantized in each block's forward; pass "
            "all_gather='bf16' to ThunderFP8/FP8 to choose this without the warning",
            stacklevel=3,
        )
        return False

    def one_unit(self, module: nn.Module, mesh: DeviceMesh) -> bool:
        """Whether :meth:`transform_module` shards ``module`` over ``mesh`` as a single unit, the root: on a
        data-parallel group of one rank, without CPU offload and without tensor parallelism (see the module
        docstring). The ``thunder_fsdp`` strategies then compile the whole step, not each block."""
        from lightning_thunder.fp8.dtensor import is_dtensor

        return mesh.size() == 1 and not self.cpu_offload and not any(is_dtensor(p) for p in module.parameters())

    def transform_module(self, module: nn.Module) -> nn.Module:
        """Apply activation checkpointing (if enabled) to each block, then ``fully_shard`` to the embedding, each
        block, [final norm + head] and the root (on one rank: to the root alone, see :meth:`one_unit`)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from lightning_thunder.fp8.weights import keep_state_dict_plain

        mesh = self.mesh if self.mesh is not None else default_device_mesh("The FSDP plugin")
        if self.cpu_offload and mesh.device_type == "cpu":
            raise ValueError(
                "cpu_offload=True needs a CUDA device mesh (FSDP2 keeps offloaded shards in pinned host memory "
                "and computes on the GPU); on a CPU mesh the parameters already live in CPU memory: set "
                "cpu_offload=False"
            )
        block_cls = self.block_cls if self.block_cls is not None else find_block_class(module)
        blocks = find_blocks(module, block_cls)
        mp_policy = self.mp_policy or MixedPrecisionPolicy()
        kwargs = {
            "mesh": mesh,
            "mp_policy": mp_policy,
            "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
        }
        one_unit = self.one_unit(module, mesh)
        fp8_all_gather = None
        if self.gathers_fp8(module, mesh):
            fp8_all_gather = self._wrap_fp8(module, [block for _, _, block in blocks])
        if self.activation_checkpointing:
            for _, _, block in blocks:
                checkpoint_block(block)
        if one_unit:
            _alias_one_rank_shards(module, mp_policy.param_dtype)
            fully_shard(module, reshard_after_forward=False, **kwargs)
            units = "the whole model as one unit (one rank: nothing to shard, parameters used in place)"
        else:
            units = self._shard_units(module, block_cls, blocks, fully_shard, kwargs)
        if fp8_all_gather is not None:
            fp8_all_gather.bind()
        keep_state_dict_plain(module)
        self.fp8_all_gather = fp8_all_gather
        log.info(
            "FSDP: sharded %s over %d ranks (%d %s blocks; activation checkpointing %s; %s)",
            units,
            mesh.size(),
            len(blocks),
            "/".join(c.__name__ for c in (block_cls if isinstance(block_cls, tuple) else (block_cls,))),
            "on" if self.activation_checkpointing else "off",
            f"{len(fp8_all_gather.names)} weights all-gathered in FP8" if fp8_all_gather else "no FP8 all-gather",
        )
        return module

    def _wrap_fp8(self, module: nn.Module, blocks: list[nn.Module]) -> FP8AllGather:
        """Before sharding: the blocks' FP8 weights made FP8ShardedWeights."""
        from lightning_thunder.fp8.fsdp import FP8AllGather
        from lightning_thunder.plugins.fp8 import LinearInfo

        fp8 = self.fp8
        assert fp8 is not None

        def accept(name: str, linear: nn.Linear) -> bool:  # the names the block's trace shows (attn.qkv)
            return fp8.accepts(LinearInfo(name, linear.in_features, linear.out_features))

        fp8_all_gather = FP8AllGather()
        block_names = {id(b): n for n, b in module.named_modules()}
        for block in blocks:
            fp8_all_gather.wrap(block, accept, prefix=f"{block_names[id(block)]}.")
        return fp8_all_gather

    def _shard_units(
        self, module: nn.Module, block_cls: BlockClass, blocks: list, fully_shard: Any, kwargs: dict[str, Any]
    ) -> str:
        """``fully_shard`` the embedding, each block, [final norm + head], then the root; returns their description."""
        # A head tied to the embedding (one weight) stays with it in the root's unit.
        outer = find_outer_modules(module, block_cls)
        embedding = outer.embedding if not outer.tied else None
        head = [n for n in (outer.final_norm, None if outer.tied else outer.head) if n is not None]
        if embedding is not None:
            fully_shard(module.get_submodule(embedding), reshard_after_forward=self.reshard_after_forward, **kwargs)
        for i, (_, _, block) in enumerate(blocks):
            last = i == len(blocks) - 1  # the backward starts with it: no need to free and gather it again
            fully_shard(block, reshard_after_forward=False if last else self.reshard_after_forward, **kwargs)
        if head:
            fully_shard([module.get_submodule(n) for n in head], reshard_after_forward=False, **kwargs)
        # The root's parameters are needed again as soon as the backward starts: keep them gathered.
        fully_shard(module, reshard_after_forward=False, **kwargs)
        units = ["each block", *([embedding] if embedding else []), *([" + ".join(head)] if head else [])]
        return f"{', '.join(units)} and the root {type(module).__name__}"

    def __repr__(self) -> str:
        fp8 = "" if self.fp8 is None else f", fp8={self.fp8!r}"
        return (
            f"FSDP(block_cls={self.block_cls!r}, reshard_after_forward={self.reshard_after_forward!r}, "
            f"cpu_offload={self.cpu_offload}, activation_checkpointing={self.activation_checkpointing}{fp8})"
        )


def _alias_one_rank_shards(module: nn.Module, param_dtype: Any) -> None:
    """Before ``fully_shard`` on one rank: make each parameter not yet wrapped (the FP8 weights are) a
    :class:`~lightning_thunder.fp8.weights.OneRankShard`, so that FSDP2 gathers nothing and the unsharded parameter is
    the shard itself; parameters that the mixed-precision policy casts (``param_dtype``) keep FSDP2's cast copy.
    A parameter shared by several modules (tied weights) is wrapped once."""
    from lightning_thunder.fp8.weights import OneRankShard, ShardWrapper

    wrapped: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or isinstance(p, ShardWrapper):
                continue
            if id(p) not in wrapped:
                if param_dtype is not None and param_dtype != p.dtype:
                    continue
                wrapped[id(p)] = nn.Parameter(OneRankShard(p.detach()), requires_grad=p.requires_grad)
            sub._parameters[name] = wrapped[id(p)]
