"""Tensor parallelism on PyTorch's DTensor: ``parallelize_module`` with a plan inferred for LitGPT blocks.

Each linear layer of a block is split over the ranks of a 1-D tensor-parallel mesh (Megatron-LM's layout,
as torchtitan's ``apply_tp`` writes it for Llama):

==============================  ========================================================================
module                          style
==============================  ========================================================================
``attn.qkv``                    ``ColwiseParallel``: each rank computes whole query groups (their query
                                heads, key and value); attention runs on local heads, no communication
``attn.proj``                   ``RowwiseParallel``: partial sums reduced (reduce-scattered over the
                                sequence with sequence parallelism, else all-reduced)
``mlp.fc_1``/``fc_2``/``fc``    ``ColwiseParallel``
``mlp.proj``                    ``RowwiseParallel``
``norm_1``/``norm_2``/...       ``SequenceParallel`` (with ``sequence_parallel=True``): each rank
                                normalizes its slice of the sequence; ``attn``/``mlp`` all-gather it
``transformer.wte``             ``RowwiseParallel`` over the vocabulary (output sequence-sharded)
``transformer.ln_f``            ``SequenceParallel``
``lm_head``                     ``ColwiseParallel`` over the vocabulary: logits gathered (or left
                                vocabulary-sharded with ``loss_parallel=True``)
==============================  ========================================================================

LitGPT fuses q, k and v in one ``qkv`` linear whose rows are ``[all q | all k | all v]``; a plain
column split would hand rank 0 only query rows. The plugin reorders those rows so that each rank's
contiguous slice is ``[its q heads | its k groups | its v groups]``, and gives the attention module a
config with the per-rank head counts. The reordering is internal: ``state_dict()`` returns ``qkv`` in
LitGPT's order and ``load_state_dict`` takes it in that order (hooks on the ``qkv`` modules), so
checkpoints are independent of the tensor-parallel size. Optimizer state of ``qkv`` is reordered the
same way by :func:`keep_qkv_state_order` (the ``thunder_fsdp`` strategies call it).

Compile after sharding (torchtitan's order: tensor parallel, activation checkpointing, per-block
compile, FSDP): a compiled block then sees local shapes, and the collectives DTensor issues
(``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``wait_tensor``) appear in its traces.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.blocks import HEAD_NAMES, BlockClass, find_block_class, find_blocks, find_outer_modules
from lightning_thunder.plugins.fsdp import default_device_mesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import ParallelStyle
    from torch.optim import Optimizer

__all__ = ["TensorParallel", "infer_plan", "keep_qkv_state_order"]

log = logging.getLogger(__name__)

#: Norms inside a LitGPT block (``nn.Identity`` or ``None`` when the config has none).
BLOCK_NORM_NAMES = ("norm_1", "norm_2", "post_attention_norm", "post_mlp_norm")
#: LitGPT MLPs: their input projections (column-split) and output projection (row-split).
MLP_LAYOUTS = {("fc_1", "fc_2", "proj"): ("fc_1", "fc_2"), ("fc", "proj"): ("fc",)}

_QKV_ORDER = "_lt_qkv_tp_order"  # on a qkv Linear whose rows the plugin reordered: (order, inverse order)


class TensorParallel(Plugin):
    """Shard a model's linear layers over a tensor-parallel mesh with PyTorch's ``parallelize_module``.

    Needs an initialized process group (or a ``mesh``). Parameters may be on the meta device. Apply it before
    compiling and before FSDP (``ThunderFSDPStrategy(tensor_parallel_size=N)`` does all of this in order).

    Args:
        mesh: a 1-D device mesh (default: every rank of the default process group; with FSDP the
            ``"tensor_parallel"`` sub-mesh of a 2-D mesh).
        sequence_parallel: shard the norms and the residual stream along the sequence (dimension 1) instead of
            replicating them: activation memory between blocks is divided by the mesh size, and each block's
            all-reduce becomes an all-gather plus a reduce-scatter. The sequence length must be divisible by the
            mesh size.
        loss_parallel: leave the logits sharded over the vocabulary (a ``DTensor``) instead of gathering them; the
            loss and its backward must then run under ``torch.distributed.tensor.parallel.loss_parallel()``.
        plan: a ``parallelize_module`` plan (``{qualified name: ParallelStyle}``) to use instead of the inferred
            one, for models whose blocks are not LitGPT-shaped. The model is then taken as it is (no ``qkv``
            reordering, no head-count change).
        block_cls: the block class (or a tuple); ``None`` detects the repeated block.

    Example::

        torch.distributed.init_process_group("nccl")
        model = lightning_thunder.compile(GPT(config), plugins=[TensorParallel()])
    """

    def __init__(
        self,
        *,
        mesh: DeviceMesh | None = None,
        sequence_parallel: bool = True,
        loss_parallel: bool = False,
        plan: Mapping[str, ParallelStyle] | None = None,
        block_cls: BlockClass | None = None,
    ) -> None:
        if mesh is not None and mesh.ndim != 1:
            raise ValueError(
                f"TensorParallel shards over a 1-D mesh, got a {mesh.ndim}-D mesh with dims {mesh.mesh_dim_names}; "
                "pass the tensor-parallel sub-mesh, e.g. mesh['tensor_parallel']"
            )
        if plan is not None and not isinstance(plan, Mapping):
            raise TypeError(
                "plan must map qualified module names to ParallelStyle objects (e.g. "
                f"{{'mlp.fc': ColwiseParallel()}}), got {type(plan).__name__}"
            )
        self.mesh = mesh
        self.sequence_parallel = bool(sequence_parallel)
        self.loss_parallel = bool(loss_parallel)
        self.plan = dict(plan) if plan is not None else None
        self.block_cls = block_cls

    def transform_module(self, module: nn.Module) -> nn.Module:
        """Reorder LitGPT's fused ``qkv`` rows and set per-rank head counts (inferred plans only), then
        ``parallelize_module`` with the plan."""
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = self.mesh if self.mesh is not None else default_device_mesh("The TensorParallel plugin")
        size = mesh.size()
        if self.plan is not None:
            plan = self.plan
            parallelize_module(module, mesh, plan)
        else:
            block_cls = self.block_cls if self.block_cls is not None else find_block_class(module)
            plan = infer_plan(
                module, size, sequence_parallel=self.sequence_parallel, loss_parallel=self.loss_parallel,
                block_cls=block_cls,
            )
            _split_attention_heads(module, size, block_cls)
            parallelize_module(module, mesh, plan)
            self._around_blocks(module, mesh, block_cls)
        log.info(
            "TensorParallel: %d modules of %s split over %d ranks (sequence parallel %s, loss parallel %s)",
            len(plan), type(module).__name__, size, "on" if self.sequence_parallel else "off",
            "on" if self.loss_parallel else "off",
        )
        return module

    def _around_blocks(self, module: nn.Module, mesh: DeviceMesh, block_cls: BlockClass) -> None:
        """What the inferred plan needs besides ``parallelize_module``: the embedding's and head's outputs completed
        (see :func:`_completed_collective`), the sequence length checked, and without sequence parallelism the
        norms' parameters replicated over the mesh (see :func:`_replicate`)."""
        outer = find_outer_modules(module, block_cls)
        for name in (outer.embedding, outer.head):
            if name is not None:
                module.get_submodule(name).register_forward_hook(_completed_collective)
        if self.sequence_parallel and outer.embedding is not None:
            check = functools.partial(_check_sequence_length, mesh.size())
            module.get_submodule(outer.embedding).register_forward_pre_hook(check, prepend=True)
        if not self.sequence_parallel:
            for norm in _norms(module, block_cls, outer.final_norm):
                _replicate(norm, mesh)

    def __repr__(self) -> str:
        return (
            f"TensorParallel(sequence_parallel={self.sequence_parallel}, loss_parallel={self.loss_parallel}, "
            f"plan={'inferred' if self.plan is None else f'{len(self.plan)} entries'})"
        )


# ----------------------------------------------------------------------------------------------- the plan
def infer_plan(
    module: nn.Module,
    size: int,
    *,
    sequence_parallel: bool = True,
    loss_parallel: bool = False,
    block_cls: BlockClass | None = None,
) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan for a LitGPT-shaped model split over ``size`` ranks (see the module
    docstring for the layout).

    Raises ``ValueError`` naming the module and the fix when a block is not LitGPT-shaped (pass ``plan=``) or
    when head counts or the MLP width are not divisible by ``size``.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    block_cls = find_block_class(module) if block_cls is None else block_cls
    blocks = _block_names(module, block_cls)
    sp = sequence_parallel
    between_blocks = Shard(1) if sp else Replicate()  # the residual stream's layout
    plan: dict[str, ParallelStyle] = {}

    def gathered_input(submodule: nn.Module) -> PrepareModuleInput:
        # attn/mlp take the sequence-sharded normalized input (their first argument) whole, as a DTensor: the
        # partial input gradients of its consumers (qkv; fc_1 and fc_2) add up before one reduce-scatter.
        n_args = _positional_arity(submodule)
        return PrepareModuleInput(
            input_layouts=(Shard(1),) + (None,) * (n_args - 1),
            desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
        )

    for name, block in blocks.items():
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        _check_attention(f"{name}.attn", attn, size)
        mlp_in = _check_mlp(f"{name}.mlp", mlp, size)
        plan[f"{name}.attn.qkv"] = ColwiseParallel()
        plan[f"{name}.attn.proj"] = RowwiseParallel(output_layouts=between_blocks)
        for fc in mlp_in:
            plan[f"{name}.mlp.{fc}"] = ColwiseParallel()
        plan[f"{name}.mlp.proj"] = RowwiseParallel(output_layouts=between_blocks)
        if sp:
            plan[f"{name}.attn"] = gathered_input(attn)
            plan[f"{name}.mlp"] = gathered_input(mlp)
            for norm in BLOCK_NORM_NAMES:
                if _has_parameters(getattr(block, norm, None)):
                    plan[f"{name}.{norm}"] = SequenceParallel(use_local_output=True)

    outer = find_outer_modules(module, block_cls)
    embedding, final_norm, head = outer.embedding, outer.final_norm, outer.head
    if outer.tied:
        raise ValueError(
            f"`{head}` shares its weight with `{embedding}` (tied embeddings), which the inferred plan shards "
            "differently (vocabulary rows for both, but as separate parameters); pass TensorParallel(plan=...)"
        )
    if embedding is not None:
        plan[embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks)
    if final_norm is not None and sp:
        plan[final_norm] = SequenceParallel(use_local_output=True)
    if head is not None:
        plan[head] = ColwiseParallel(
            input_layouts=between_blocks,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    elif loss_parallel:
        raise ValueError(
            f"loss_parallel=True shards the output head's logits, but {type(module).__name__} has no head named "
            f"{' or '.join(HEAD_NAMES)} outside its blocks; set loss_parallel=False or pass plan="
        )
    return plan


def _block_names(module: nn.Module, block_cls: BlockClass) -> dict[str, nn.Module]:
    blocks = {id(b) for _, _, b in find_blocks(module, block_cls)}
    return {name: m for name, m in module.named_modules() if id(m) in blocks}


def _has_parameters(module: nn.Module | None) -> bool:
    return module is not None and next(module.parameters(), None) is not None


def _positional_arity(module: nn.Module) -> int:
    forward = getattr(module, "original_module", module).forward
    params = inspect.signature(forward).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _not_litgpt(where: str, what: str) -> ValueError:
    return ValueError(
        f"TensorParallel cannot infer a plan for `{where}`: {what}. The inferred plan covers LitGPT blocks "
        "(attn.qkv + attn.proj with config.n_head/n_query_groups; mlp with fc_1, fc_2, proj or fc, proj); pass "
        "TensorParallel(plan={qualified name: ParallelStyle}) for other layouts"
    )


def _check_attention(where: str, attn: nn.Module | None, size: int) -> None:
    if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("qkv", "proj")):
        raise _not_litgpt(where, "no fused `qkv` and `proj` linear layers")
    config = getattr(attn, "config", None)
    if config is None or not all(hasattr(config, a) for a in ("n_head", "n_query_groups", "head_size")):
        raise _not_litgpt(where, "no `config` with n_head, n_query_groups and head_size")
    if getattr(config, "norm_qk", False) and getattr(config, "norm_qk_type", "default") != "default":
        raise _not_litgpt(where, f"its q/k norms span all heads (norm_qk_type={config.norm_qk_type!r})")
    heads, groups = config.n_head, config.n_query_groups
    if heads % size or groups % size:
        raise ValueError(
            f"tensor parallelism over {size} ranks splits attention heads by query group, but `{where}` has "
            f"n_head={heads} and n_query_groups={groups}: both must be divisible by the tensor-parallel size {size}; "
            f"choose a tensor-parallel size that divides {math.gcd(heads, groups)}"
        )


def _check_mlp(where: str, mlp: nn.Module | None, size: int) -> tuple[str, ...]:
    if mlp is None:
        raise _not_litgpt(where, "no `mlp`")
    for names, column_split in MLP_LAYOUTS.items():
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            width = getattr(mlp, column_split[0]).out_features
            if width % size:
                raise ValueError(
                    f"tensor parallelism over {size} ranks splits the MLP width of `{where}` ({width}), which is not "
                    f"divisible by {size}; choose a tensor-parallel size that divides {width}"
                )
            return column_split
    raise _not_litgpt(where, f"a {type(mlp).__name__} (mixture-of-experts and other MLPs are not covered)")


def _norms(module: nn.Module, block_cls: BlockClass, final_norm: str | None) -> list[nn.Module]:
    norms = [getattr(b, n, None) for _, _, b in find_blocks(module, block_cls) for n in BLOCK_NORM_NAMES]
    norms.append(module.get_submodule(final_norm) if final_norm is not None else None)
    return [n for n in norms if _has_parameters(n)]


def _replicate(norm: nn.Module, mesh: DeviceMesh) -> None:
    """Without sequence parallelism a norm sees the whole (replicated) activation: its parameters become
    replicated ``DTensor``s of the tensor-parallel mesh (so every parameter of the model lives on one mesh, which
    FSDP and gradient clipping expect) and it computes on local tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def to_dtensor(mod: nn.Module, inputs: tuple, device_mesh: DeviceMesh) -> tuple:
        x, *rest = inputs
        return (DTensor.from_local(x, device_mesh, [Replicate()], run_check=False), *rest)

    def to_local(mod: nn.Module, output: Any, device_mesh: DeviceMesh) -> Any:
        return output.to_local()

    distribute_module(norm, mesh, input_fn=to_dtensor, output_fn=to_local)


def _check_sequence_length(size: int, module: nn.Module, args: tuple) -> None:
    """Sequence parallelism splits the sequence evenly; an uneven split would leave the ranks' collectives
    mismatched (a hang), so refuse it before the embedding runs."""
    tokens = args[0]
    length = tokens.shape[1] if tokens.ndim > 1 else tokens.shape[0]
    if length % size:
        raise ValueError(
            f"sequence_parallel=True splits the sequence over the {size} tensor-parallel ranks, but this batch has "
            f"sequence length {length}, not divisible by {size}; pad or crop sequences to a multiple of {size} (e.g. "
            f"{length - length % size or size}), or set sequence_parallel=False"
        )


def _completed_collective(module: nn.Module, args: Any, output: Any) -> Any:
    """A forward hook for the embedding and the head, whose outputs leave the blocks' compiled graphs: DTensor
    hands their collective's result over as an ``AsyncCollectiveTensor`` (the wait deferred to its first use), and a
    compiled graph taking one as an input returns no gradient for it (PyTorch 2.11-2.13; the embedding then gets
    none). Copying it completes the wait eagerly and gives a plain tensor; it is one activation-sized copy per step."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


# ----------------------------------------------------------------------------------------------- fused qkv
def qkv_tp_order(n_head: int, n_query_groups: int, head_size: int, size: int) -> torch.Tensor:
    """Row order that turns LitGPT's ``[all q | all k | all v]`` into ``size`` contiguous slices
    ``[q heads | k groups | v groups]`` of one rank each (rank ``r`` holds query groups
    ``r * n_query_groups / size ...``, the query heads that share them, and their keys and values)."""
    q, kv = n_head * head_size, n_query_groups * head_size
    q_step, kv_step = q // size, kv // size
    rows = []
    for r in range(size):
        rows.append(torch.arange(r * q_step, (r + 1) * q_step))
        rows.append(q + torch.arange(r * kv_step, (r + 1) * kv_step))
        rows.append(q + kv + torch.arange(r * kv_step, (r + 1) * kv_step))
    return torch.cat(rows)


def _split_attention_heads(module: nn.Module, size: int, block_cls: BlockClass) -> None:
    """Reorder each fused ``qkv`` for a column split and give its attention module per-rank head counts."""
    local_configs: dict[int, Any] = {}
    for _, _, block in find_blocks(module, block_cls):
        attn = block.attn
        config = attn.config
        if id(config) not in local_configs:
            local = copy.copy(config)
            local.n_head, local.n_query_groups = config.n_head // size, config.n_query_groups // size
            local_configs[id(config)] = local
        order = qkv_tp_order(config.n_head, config.n_query_groups, config.head_size, size)
        _reorder_qkv(attn.qkv, order)
        attn.config = local_configs[id(config)]


def _reorder_qkv(qkv: nn.Linear, order: torch.Tensor) -> None:
    if hasattr(qkv, _QKV_ORDER):
        raise RuntimeError(
            f"the fused qkv layer {qkv} was already split for tensor parallelism; apply TensorParallel once"
        )
    inverse = torch.argsort(order)
    with torch.no_grad():
        for p in qkv.parameters(recurse=False):
            p.data = p.data[order.to(p.device)]
    object.__setattr__(qkv, _QKV_ORDER, (order, inverse))
    qkv._register_state_dict_hook(_qkv_state_dict_hook)
    qkv._register_load_state_dict_pre_hook(_qkv_load_pre_hook, with_module=True)


def _reordered(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t`` with its rows (dimension 0) in ``index`` order; a ``DTensor`` keeps its mesh and placements."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(t, DTensor):
        full = t.full_tensor()[index.to(t.device)]
        return distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)
    return t[index.to(t.device)]


def _qkv_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    _, inverse = getattr(module, _QKV_ORDER)
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict and state_dict[key].device.type != "meta":
            state_dict[key] = _reordered(state_dict[key], inverse)


def _qkv_load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    order, _ = getattr(module, _QKV_ORDER)
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict and state_dict[key].device.type != "meta":
            state_dict[key] = _reordered(state_dict[key], order)


def _reordered_parameters(module: nn.Module) -> Iterator[tuple[nn.Parameter, tuple[torch.Tensor, torch.Tensor]]]:
    for m in module.modules():
        orders = getattr(m, _QKV_ORDER, None)
        if orders is not None:
            for p in m.parameters(recurse=False):
                yield p, orders


def keep_qkv_state_order(optimizer: Optimizer, module: nn.Module) -> None:
    """Make ``optimizer.state_dict()`` hold the state of ``module``'s reordered ``qkv`` parameters (AdamW's
    moments) in LitGPT's row order, and ``optimizer.load_state_dict`` take it in that order, as the model's
    ``state_dict`` does. Call it once the optimizer holds ``module``'s final (sharded) parameters; a no-op when
    no ``qkv`` was reordered."""
    reordered = {id(p): orders for p, orders in _reordered_parameters(module)}
    if not reordered or getattr(optimizer, _QKV_ORDER, False):
        return

    def convert(state_dict: dict, use_inverse: bool) -> dict:
        # The saved param groups list the keys of `state` in the order of the optimizer's own param groups.
        keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = dict(state_dict["state"])
        for key, p in zip(keys, params):
            orders = reordered.get(id(p))
            if orders is None or key not in state:
                continue
            index = orders[1] if use_inverse else orders[0]
            state[key] = {
                k: _reordered(v, index) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                for k, v in state[key].items()
            }
        return {**state_dict, "state": state}

    optimizer.register_state_dict_post_hook(lambda opt, sd: convert(sd, use_inverse=True))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: convert(sd, use_inverse=False))
    setattr(optimizer, _QKV_ORDER, True)
