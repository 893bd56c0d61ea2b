"""DDP: data parallelism on PyTorch's ``DistributedDataParallel`` (NCCL on GPU, Gloo on CPU).

Every rank holds the whole model; gradients are all-reduced in buckets during the backward.

- ``lightning_thunder.compile(model, plugins=[DDP()])`` wraps the model in DDP and compiles the DDP
  module, PyTorch's recommended ``torch.compile(DDP(model))`` composition. ``state_dict`` keys get
  DDP's ``module.`` prefix, as with DDP itself.
- The ``thunder_ddp`` strategies compile first and let Lightning put DDP *around* the compiled
  module (Lightning's ``no_sync`` and communication hooks need DDP outermost).

Either way Dynamo's DDPOptimizer splits the compiled graph at DDP's bucket boundaries and each piece is
compiled on its own (``compile_stats(model).graphs`` counts them), so a bucket's all-reduce starts as soon
as the backward of its piece has run, overlapping the backward of the pieces before it. Dynamo cannot
split buckets smaller than DDP's first bucket (1 MB): with ``bucket_cap_mb < 1`` the graph stays whole,
gradients are all-reduced after its backward, and a warning says so.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_thunder.plugins.base import Plugin
from lightning_thunder.plugins.fsdp import require_process_group

__all__ = ["DDP"]

_DDP_ARGS = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}


class DDP(Plugin):
    """Wrap the model in ``torch.nn.parallel.DistributedDataParallel`` (needs an initialized process group).

    Args:
        **ddp_kwargs: passed to ``DistributedDataParallel`` (``bucket_cap_mb``, ``find_unused_parameters``,
            ``static_graph``, ``gradient_as_bucket_view``, ...). ``device_ids`` defaults to the current CUDA
            device with NCCL and to ``None`` on CPU. Unknown names raise ``TypeError`` here.

    Example::

        torch.distributed.init_process_group("gloo")
        cm = lightning_thunder.compile(model, plugins=[DDP(bucket_cap_mb=50)])
    """

    def __init__(self, **ddp_kwargs: Any) -> None:
        unknown = sorted(set(ddp_kwargs) - _DDP_ARGS - {"device_ids"})
        if unknown:
            raise TypeError(
                f"DDP got unknown argument(s) {unknown}; DistributedDataParallel accepts {sorted(_DDP_ARGS)}"
            )
        self.ddp_kwargs = ddp_kwargs

    def transform_module(self, module: nn.Module) -> nn.Module:
        """Return ``DistributedDataParallel(module, ...)`` (rank 0's parameters are broadcast to all ranks)."""
        require_process_group("The DDP plugin")
        kwargs = dict(self.ddp_kwargs)
        if "device_ids" not in kwargs:
            param = next(module.parameters(), None)
            on_cuda = param is not None and param.device.type == "cuda" and dist.get_backend() == "nccl"
            kwargs["device_ids"] = [param.device.index] if on_cuda else None
        return DistributedDataParallel(module, **kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.ddp_kwargs.items())
        return f"DDP({args})"
