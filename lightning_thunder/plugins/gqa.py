"""The NativeGQA plugin: grouped-query attention without materialized key/value copies.

Models with fewer key/value heads than query heads (GQA, MQA: Llama 3, Mistral, Gemma) commonly
repeat the keys and values to the query's head count before calling SDPA::

    k = k.repeat_interleave(n_head // n_query_groups, dim=1)
    v = v.repeat_interleave(n_head // n_query_groups, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)

Each repeat is a copy of ``n_head / n_query_groups`` times the key (or value) tensor in the forward,
again when the backward recomputes it, and a reduction over the copies in the backward. The flash
and cuDNN attention kernels read grouped keys and values directly (``enable_gqa=True``, same
numerics), so this plugin rewrites the call to pass the un-repeated tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_thunder.plugins.base import Plugin
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp, Trace

__all__ = ["NativeGQA"]

_SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_PROBE_SEQ = 256
_NATIVE_BACKENDS = (torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.CUDNN_ATTENTION)


def _sdpa_arguments(op: BoundOp) -> dict[str, Any] | None:
    try:
        if op.is_method or op.target not in _SDPA_TARGETS:
            return None
    except TypeError:  # an unhashable target
        return None
    if len(op.args) > len(_SDPA_PARAMS) or set(op.kwargs) - set(_SDPA_PARAMS):
        return None
    bound = dict(zip(_SDPA_PARAMS, op.args))
    if set(bound) & set(op.kwargs):
        return None
    bound.update(op.kwargs)
    return bound if {"query", "key", "value"} <= set(bound) else None


def _repeated_heads(op: BoundOp | None) -> tuple[Proxy, int] | None:
    """``(x, r)`` when ``op`` is ``x.repeat_interleave(r, dim=1)`` (or ``torch.repeat_interleave``) of a 4-D ``x``."""
    if op is None or op.unpack:
        return None
    if op.target not in ("repeat_interleave", torch.repeat_interleave):
        return None
    names = ("input", "repeats", "dim")
    bound = dict(zip(names, op.args))
    if set(bound) & set(op.kwargs) or set(op.kwargs) - {"repeats", "dim", "output_size"}:
        return None
    bound.update(op.kwargs)
    x, repeats, dim = bound.get("input"), bound.get("repeats"), bound.get("dim")
    if not (isinstance(x, Proxy) and x.is_tensor and len(x.shape) == 4):
        return None
    if type(repeats) is not int or repeats < 1 or type(dim) is not int or dim % 4 != 1:
        return None
    return x, repeats


def _native_kernel_takes_groups(q: Proxy, k: Proxy, v: Proxy, bound: dict[str, Any]) -> bool:
    """Whether SDPA would run a flash or cuDNN kernel on these shapes with ``enable_gqa=True`` (asked
    of PyTorch's own backend choice, on empty tensors of batch 1 on the query's device)."""
    if bound.get("attn_mask") is not None or bound.get("dropout_p", 0.0) != 0.0:
        return False
    shapes = [tuple(p.shape) for p in (q, k, v)]
    if not all(type(d) is int for s in shapes for d in s):
        return False
    try:
        # Batch 1 and at most _PROBE_SEQ positions: the choice depends on dtype, head size, head counts,
        # device and flags, not on the length, and the probe must stay small (a 128k context would
        # otherwise allocate gigabytes just to ask).
        empty = [
            torch.empty(
                (1, s[1], min(s[2], _PROBE_SEQ), s[3]), dtype=p.dtype, device=p.device, requires_grad=p.requires_grad
            )
            for p, s in zip((q, k, v), shapes)
        ]
        choice = torch.ops.aten._fused_sdp_choice(
            *empty, None, 0.0, bool(bound.get("is_causal", False)), scale=bound.get("scale"), enable_gqa=True
        )
    except (RuntimeError, TypeError, ValueError):
        return False
    return choice in [int(b) for b in _NATIVE_BACKENDS]


class NativeGQA(Plugin):
    """Call SDPA with grouped keys and values (``enable_gqa=True``) instead of repeated copies.

    Rewrites ``scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1))``
    into ``scaled_dot_product_attention(q, k, v, enable_gqa=True)`` when PyTorch would run a flash or
    cuDNN kernel for it (asked at compile time for the traced shapes, dtype and device); otherwise, and
    for calls with an attention mask or dropout, the trace is left as it is. The result is the same
    computation: the kernels index key/value head ``h // r`` for query head ``h``, exactly the repeat.

    On by default with CUDA (see :func:`lightning_thunder.default_plugins`).

    Attributes:
        rewritten: how many attention calls were rewritten so far (all graphs).
    """

    def __init__(self) -> None:
        self.rewritten = 0

    def transform_torch_trace(self, trace: Trace) -> Trace:
        """Pass un-repeated keys and values to SDPA with ``enable_gqa=True`` where a native kernel takes them."""
        producer = trace.producers()
        ops: list[BoundOp] = []
        count = 0
        for op in trace.ops:
            bound = _sdpa_arguments(op)
            if bound is None or bound.get("enable_gqa"):
                ops.append(op)
                continue
            q, k, v = bound["query"], bound["key"], bound["value"]
            rk = _repeated_heads(producer.get(id(k))) if isinstance(k, Proxy) else None
            rv = _repeated_heads(producer.get(id(v))) if isinstance(v, Proxy) else None
            if not (rk and rv and isinstance(q, Proxy) and q.is_tensor and len(q.shape) == 4):
                ops.append(op)
                continue
            (k0, r), (v0, rv_) = rk, rv
            if r != rv_ or k0.shape[1] * r != q.shape[1] or v0.shape[1] != k0.shape[1]:
                ops.append(op)
                continue
            if not _native_kernel_takes_groups(q, k0, v0, bound):
                ops.append(op)
                continue
            kwargs = {key: val for key, val in bound.items() if key not in ("query", "key", "value")}
            kwargs["enable_gqa"] = True
            ops.append(op.replace(args=(q, k0, v0), kwargs=kwargs))
            count += 1
        if not count:
            return trace
        self.rewritten += count
        # The repeats are now unused unless something else reads them; drop the unused ones.
        used = {id(p) for op in ops for p in op.input_proxies()} | {id(p) for p in trace.output_proxies()}
        ops = [op for op in ops if _repeated_heads(op) is None or any(id(p) in used for p in op.output_proxies())]
        return trace.derive(f"plugin NativeGQA: {count} attention call(s) take grouped keys/values", ops=ops)

    def __repr__(self) -> str:
        return "NativeGQA()"
