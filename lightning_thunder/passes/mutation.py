"""Keep saved-for-backward values of mutated inputs at their pre-mutation value.

AOTAutograd keeps in-place updates of buffers inside the forward graph (``copy_(buf, new)`` at the
end). If the partitioner then saves that very input for the backward (to recompute ``buf + 1`` there,
say), the backward reads the *mutated* tensor and computes wrong gradients (PyTorch's min-cut
partitioner does this; torch.compile gives wrong gradients for ``y * self.steps`` after
``self.steps += 1``). This pass saves a clone taken before the first mutation instead.
"""

from __future__ import annotations

import torch

from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp, Trace, timed_pass
from lightning_thunder.trace.tree import map_structure

__all__ = ["protect_mutated_saved_inputs", "mutated_arguments"]


def mutated_arguments(op: BoundOp) -> list[Proxy]:
    """The proxies ``op`` writes to in place (from the ATen schema's alias annotations)."""
    target = op.target
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.is_mutable:
        return []
    written = []
    for i, arg in enumerate(target._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = op.args[i] if i < len(op.args) else op.kwargs.get(arg.name)
        if isinstance(value, Proxy):
            written.append(value)
    return written


def protect_mutated_saved_inputs(forward: Trace, num_user_outputs: int) -> Trace:
    """Return ``forward`` with saved inputs that it mutates replaced by pre-mutation clones.

    Args:
        forward: the forward trace; outputs are ``(*user_outputs, *saved_for_backward)``.
        num_user_outputs: how many leading outputs are not saved for the backward.

    Returns ``forward`` itself when nothing needs protecting.
    """
    with timed_pass() as timer:
        inputs = {id(p) for p in forward.inputs}
        first_write: dict[int, int] = {}
        for i, op in enumerate(forward.ops):
            for p in mutated_arguments(op):
                if id(p) in inputs:
                    first_write.setdefault(id(p), i)
        outputs = list(forward.output)
        saved = outputs[num_user_outputs:]
        hazards = {id(p): p for p in saved if isinstance(p, Proxy) and id(p) in first_write}
        if not hazards:
            return forward
        names = forward.name_generator()
        clones: dict[int, Proxy] = {}
        clone_at: dict[int, list[BoundOp]] = {}
        for key, p in hazards.items():
            clone = Proxy(names("t"), p.val)
            clones[key] = clone
            clone_at.setdefault(first_write[key], []).append(BoundOp(torch.ops.aten.clone.default, (p,), outputs=(clone,)))
        ops: list[BoundOp] = []
        for i, op in enumerate(forward.ops):
            ops.extend(clone_at.get(i, []))
            ops.append(op)
        new_saved = map_structure(lambda x: clones.get(id(x), x) if isinstance(x, Proxy) else x, saved)
        output = type(forward.output)([*outputs[:num_user_outputs], *new_saved])
    return forward.derive(
        "saves pre-mutation clones of inputs the forward mutates (PyTorch's partitioner saves the mutated tensor)",
        name="forward/protect-mutated-saves",
        ops=ops,
        output=output,
        elapsed_ms=timer.ms,
    )
