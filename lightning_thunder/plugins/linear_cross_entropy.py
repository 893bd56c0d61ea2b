"""The FusedLinearCrossEntropy plugin: the output head and the loss as one chunked op, without the logits.

Before autograd, each chain of the torch-level trace that computes a loss from an output head::

    logits = linear(x, W[, b])                      # [..., V]
    logits = tanh(logits / c) * c                   # optional: LitGPT's final_logit_softcapping
    logits = logits.reshape(-1, V) / .view / .flatten / .float() / .to(torch.float32) / .contiguous()   # any of these
    loss   = cross_entropy(logits, target, ignore_index=..., label_smoothing=..., reduction="mean" | "sum")

becomes one call of :func:`lightning_thunder.ops.linear_cross_entropy` (same operands, same loss), whose forward and
backward run chunk by chunk over the tokens; the ``[tokens, vocab]`` logits exist in neither the forward nor the
backward trace (see :mod:`lightning_thunder.ops.linear_cross_entropy` for the op and its numerics).

The rewrite applies only when the logits feed the loss alone. When the logits (or a value on the way to the loss)
are also returned or read by another op, or the loss uses what the op does not support (class weights,
``reduction="none"``), the chain is left as it is and the reason is written in the trace this plugin produces
(its header, see :func:`lightning_thunder.last_traces`) and kept in :attr:`FusedLinearCrossEntropy.kept`.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F

from lightning_thunder.ops.linear_cross_entropy import linear_cross_entropy
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp, Trace, op_display_name

__all__ = ["FusedLinearCrossEntropy"]

_LINEAR = (torch._C._nn.linear, F.linear)
_CROSS_ENTROPY = F.cross_entropy
# (input, target, weight, reduction enum, ignore_index, label_smoothing)
_CROSS_ENTROPY_LOSS = torch._C._nn.cross_entropy_loss
_REDUCTION_ENUM = {0: "none", 1: "mean", 2: "sum"}
_RESHAPES = {"reshape", "view", "flatten", torch.reshape, torch.flatten}
_CONTIGUOUS = {"contiguous"}
_FLOAT32 = (torch.float32,)
_CE_SIGNATURE = inspect.signature(F.cross_entropy)


def _is(op: BoundOp | None, targets: Any) -> bool:
    if op is None:
        return False
    try:
        return op.target in targets
    except TypeError:  # an unhashable target
        return False


def _tensor(value: Any) -> Proxy | None:
    return value if isinstance(value, Proxy) and value.is_tensor else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Rejected(Exception):
    """A head + loss chain that cannot be rewritten; the message says why (kept in the trace)."""


class _NoHead(Exception):
    """The loss's input does not come from a linear (through ops this plugin looks through): nothing to report."""


#: How many ops above the loss :func:`_linear_upstream` looks for a linear through ops the rewrite does not handle.
_UPSTREAM_DEPTH = 8


def _linear_upstream(value: Proxy, producers: dict[int, BoundOp]) -> bool:
    """Whether a ``linear`` computes ``value`` within :data:`_UPSTREAM_DEPTH` ops, following first tensor arguments."""
    for _ in range(_UPSTREAM_DEPTH):
        op = producers.get(id(value))
        if op is None:
            return False
        if _is(op, _LINEAR) and not op.is_method:
            return True
        value = next((a for a in op.args if _tensor(a)), None)
        if value is None:
            return False
    return False


def _cross_entropy_arguments(op: BoundOp) -> dict[str, Any]:
    """The bound arguments of a ``cross_entropy`` op (``F.cross_entropy`` or ``torch._C._nn.cross_entropy_loss``)."""
    if op.target is _CROSS_ENTROPY:
        try:
            bound = _CE_SIGNATURE.bind(*op.args, **op.kwargs)
        except TypeError as e:
            raise _Rejected(f"cross_entropy arguments not understood ({e})") from None
        bound.apply_defaults()
        args = dict(bound.arguments)
        if args["size_average"] is not None or args["reduce"] is not None:
            raise _Rejected("cross_entropy uses the deprecated size_average/reduce arguments")
        return args
    names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
    args = dict(zip(names, (None, None, None, 1, -100, 0.0)))
    args.update(zip(names, op.args))
    args.update(op.kwargs)
    args["reduction"] = _REDUCTION_ENUM.get(args["reduction"], args["reduction"])
    return args


def _cast_to_float32(op: BoundOp) -> bool:
    """``t.float()`` or ``t.to(torch.float32)`` / ``t.to(dtype=torch.float32)`` (no device change)."""
    if op.target == "float" and len(op.args) == 1 and not op.kwargs:
        return True
    if op.target != "to":
        return False
    dtypes = [a for a in op.args[1:]] + [v for k, v in op.kwargs.items() if k == "dtype"]
    others = set(op.kwargs) - {"dtype", "copy", "non_blocking"}
    return len(dtypes) == 1 and dtypes[0] in _FLOAT32 and not others and len(op.args) <= 2


def _softcap_input(mul: BoundOp, producers: dict[int, BoundOp]) -> tuple[Proxy, float, list[BoundOp]] | None:
    """``(logits, c, [div, tanh, mul])`` when ``mul`` is ``tanh(logits / c) * c``, else ``None``."""
    if mul.target not in (operator.mul, torch.mul) or len(mul.args) != 2 or mul.kwargs:
        return None
    a, b = mul.args
    th, c = (a, _number(b)) if _tensor(a) else (b, _number(a))
    tanh = producers.get(id(th)) if _tensor(th) else None
    if c is None or tanh is None or tanh.target not in (torch.tanh, "tanh") or len(tanh.args) != 1 or tanh.kwargs:
        return None
    div = producers.get(id(tanh.args[0])) if _tensor(tanh.args[0]) else None
    if div is None or div.kwargs or len(div.args) != 2 or not _tensor(div.args[0]):
        return None
    if div.target in (operator.truediv, torch.div) and _number(div.args[1]) == c:
        return div.args[0], c, [div, tanh, mul]
    if div.target in (operator.mul, torch.mul) and _number(div.args[1]) is not None and c > 0:
        if abs(_number(div.args[1]) * c - 1.0) < 1e-12:
            return div.args[0], c, [div, tanh, mul]
    return None


class FusedLinearCrossEntropy(Plugin):
    """Compute ``cross_entropy(linear(x, W, b), target)`` chunk by chunk over the tokens, never materializing the
    ``[tokens, vocab]`` logits (see the module docstring for the patterns, and
    :mod:`lightning_thunder.ops.linear_cross_entropy` for the op).

    On by default with CUDA (:func:`lightning_thunder.default_plugins`). It needs the loss inside the compiled graph:
    compile the model and its loss together (``Trainer`` strategies compile ``training_step``; for Fabric see
    :class:`~lightning_thunder.strategies.ModelWithLoss`).

    Args:
        chunk_size: tokens per chunk; default :func:`~lightning_thunder.ops.default_chunk_size` (the rows whose
            logits fill 512 MiB).

    Attributes:
        rewritten: for each rewritten chain, ``"<logits> -> <loss>"`` (all graphs, in order).
        kept: for each chain left alone, ``"<logits> -> <loss>: <reason>"``.

    Example::

        cm = lightning_thunder.compile(model_with_loss, plugins=[FusedLinearCrossEntropy(), Fusion()])
        print(lightning_thunder.last_traces(cm)[1])   # torch/FusedLinearCrossEntropy: linear_cross_entropy(...)
    """

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (tokens per chunk) or None (automatic)")
        self.chunk_size = chunk_size
        self.rewritten: list[str] = []
        self.kept: list[str] = []

    def transform_torch_trace(self, trace: Trace) -> Trace:
        """Replace each head + loss chain whose logits feed only the loss by ``linear_cross_entropy``."""
        producers = trace.producers()
        readers = trace.readers()
        outputs = {id(p) for p in trace.output_proxies()}
        replaced: dict[int, BoundOp | None] = {}
        done: list[str] = []
        kept: list[str] = []
        for op in trace.ops:
            if op.is_method or not _is(op, (_CROSS_ENTROPY, _CROSS_ENTROPY_LOSS)):
                continue
            loss = op.outputs[0]
            try:
                new, removed, logits = self._rewrite(op, producers, readers, outputs)
            except _NoHead:
                continue
            except _Rejected as e:
                logits_input = op.args[0] if op.args else op.kwargs.get("input")
                name = logits_input.name if isinstance(logits_input, Proxy) else "?"
                kept.append(f"{name} -> {loss.name if loss is not None else '_'}: {e}")
                continue
            replaced[id(op)] = new
            for r in removed:
                replaced[id(r)] = None
            done.append(f"{logits.name} -> {loss.name if loss is not None else '_'}")
        if not done and not kept:
            return trace
        self.rewritten.extend(done)
        self.kept.extend(kept)
        note = f"plugin FusedLinearCrossEntropy: {len(done)} linear + cross_entropy -> linear_cross_entropy"
        if done:
            note += f" ({', '.join(done)})"
        if kept:
            note += f"; left alone: {'; '.join(kept)}"
        ops = [replaced.get(id(op), op) for op in trace.ops]
        return trace.derive(note, ops=[op for op in ops if op is not None])

    def _rewrite(
        self,
        ce: BoundOp,
        producers: dict[int, BoundOp],
        readers: dict[int, list[BoundOp]],
        outputs: set[int],
    ) -> tuple[BoundOp, list[BoundOp], Proxy]:
        """``(new op, ops it makes dead, the logits proxy)`` for the loss ``ce``; raises :class:`_Rejected` or
        :class:`_NoHead`."""
        value = _tensor(ce.args[0] if ce.args else ce.kwargs.get("input", ce.kwargs.get("self")))
        if value is None:
            raise _NoHead
        # Walk back from the loss's input to the linear, through reshapes, casts and the soft-capping.
        chain: list[BoundOp] = []
        softcap: float | None = None
        while True:
            op = producers.get(id(value))
            if op is None:
                raise _NoHead
            if _is(op, _LINEAR) and not op.is_method and not op.unpack:
                linear = op
                break
            capped = _softcap_input(op, producers) if softcap is None else None
            if capped is not None:
                value, softcap, ops = capped
                chain.extend(reversed(ops))
                continue
            if not op.unpack and op.args and _tensor(op.args[0]):
                if _is(op, _RESHAPES) or _is(op, _CONTIGUOUS) or _cast_to_float32(op):
                    chain.append(op)
                    value = op.args[0]
                    continue
            if not _linear_upstream(value, producers):
                raise _NoHead
            raise _Rejected(f"the logits pass through {op_display_name(op.target)} on the way to the loss")
        logits = linear.outputs[0]
        args = _cross_entropy_arguments(ce)
        target = _tensor(args["target"])
        if target is None:
            raise _Rejected("cross_entropy's target is not a tensor")
        # Every value from the linear to the loss's input must feed the next op only.
        path = [linear, *reversed(chain)]
        for k, op in enumerate(path):
            out = op.outputs[0]
            users = readers.get(id(out), [])
            if id(out) in outputs:
                raise _Rejected(f"the logits {out.name} are also returned by the graph")
            nxt = path[k + 1] if k + 1 < len(path) else ce
            others = [u for u in users if u is not nxt]
            if others or len(users) != 1:
                who = ", ".join(op_display_name(u.target) for u in others) or "an op twice"
                raise _Rejected(f"the logits {out.name} are also read by {who}")
        x, weight, bias = self._linear_operands(linear)
        if args["weight"] is not None:
            raise _Rejected("cross_entropy has class weights")
        reduction = args["reduction"]
        if reduction not in ("mean", "sum"):
            raise _Rejected(f"cross_entropy has reduction={reduction!r} (mean and sum are fused)")
        ignore_index, smoothing = args["ignore_index"], args["label_smoothing"]
        if not isinstance(ignore_index, int) or _number(smoothing) is None:
            raise _Rejected("cross_entropy's ignore_index or label_smoothing is not a constant")
        value_shape, vocab = tuple(args["input"].shape), weight.shape[0]
        if len(value_shape) != 2 or value_shape[1] != vocab or len(target.shape) != 1:
            raise _Rejected(
                f"cross_entropy reads logits of shape {list(value_shape)} and targets of shape {list(target.shape)}; "
                f"fused: [tokens, {vocab}] logits with [tokens] targets"
            )
        kwargs: dict[str, Any] = {
            "ignore_index": ignore_index,
            "label_smoothing": _number(smoothing),
            "softcap": softcap,
            "reduction": reduction,
            "dtype": logits.dtype,
        }
        loss = ce.outputs[0]
        if loss is not None and loss.dtype != torch.float32:
            kwargs["out_dtype"] = loss.dtype
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        new = ce.replace(target=linear_cross_entropy, args=(x, weight, bias, target), kwargs=kwargs)
        return new, path, logits

    @staticmethod
    def _linear_operands(op: BoundOp) -> tuple[Proxy, Proxy, Proxy | None]:
        names = ("input", "weight", "bias")
        if set(op.kwargs) - set(names) or len(op.args) > 3:
            raise _Rejected("linear arguments not understood")
        bound = dict(zip(names, op.args))
        bound.update(op.kwargs)
        x, weight, bias = _tensor(bound.get("input")), _tensor(bound.get("weight")), bound.get("bias")
        if x is None or weight is None or len(weight.shape) != 2 or not all(type(d) is int for d in weight.shape):
            raise _Rejected("the linear's input or weight is not a tensor with a static [vocab, hidden] shape")
        if bias is not None and _tensor(bias) is None:
            raise _Rejected("the linear's bias is not a tensor")
        if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):
            raise _Rejected("the linear is not a floating-point matmul")
        return x, weight, bias

    def __repr__(self) -> str:
        return f"FusedLinearCrossEntropy({'' if self.chunk_size is None else f'chunk_size={self.chunk_size}'})"

