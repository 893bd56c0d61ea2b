"""Parity checking against eager PyTorch: outputs and every gradient, tolerances by dtype."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import lightning_thunder

#: (rtol, atol) per dtype; the compiled program must match eager within these.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def assert_close(actual: Any, expected: Any, what: str) -> None:
    """Compare tensors (or nested structures) with the dtype's tolerance; NaN and inf never pass."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
        if expected.is_floating_point():
            assert torch.isfinite(actual).all(), f"{what}: compiled result has NaN/inf"
            assert torch.isfinite(expected).all(), f"{what}: eager result has NaN/inf (bad test input)"
        rtol, atol = TOLERANCES.get(expected.dtype, (0.0, 0.0))
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} items vs {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{what}[{i}]")
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def _float_leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() and x.requires_grad else []
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _float_leaves(v)]
    return []


def check_module_parity(
    model: nn.Module,
    make_inputs: Callable[[], Sequence[Any]],
    *,
    steps: int = 2,
    backward: bool = True,
    plugins: Sequence[lightning_thunder.Plugin] | None = None,
    **options: Any,
) -> nn.Module:
    """Compile a deep copy of ``model`` and check it against ``model`` over ``steps`` fresh inputs.

    Each step compares the outputs, then (if ``backward``) backpropagates the same random cotangent
    through both and compares every parameter gradient and every input gradient, then every buffer.
    Returns the compiled module.
    """
    compiled = lightning_thunder.compile(copy.deepcopy(model), plugins=plugins, **options)
    for step in range(steps):
        inputs = list(make_inputs())
        ref_inputs = [i.detach().clone().requires_grad_(i.requires_grad) if isinstance(i, torch.Tensor) else i for i in inputs]
        out = compiled(*inputs)
        ref = model(*ref_inputs)
        assert_close(out, ref, f"step {step} output")
        if backward:
            outs, refs = _float_leaves(out), _float_leaves(ref)
            cotangents = [torch.randn_like(r) for r in refs]
            torch.autograd.backward(outs, cotangents)
            torch.autograd.backward(refs, cotangents)
            for (name, p), (_, q) in zip(compiled.named_parameters(), model.named_parameters()):
                if q.grad is None:
                    assert p.grad is None, f"step {step}: grad of {name} should be None"
                else:
                    assert p.grad is not None, f"step {step}: grad of {name} missing"
                    assert_close(p.grad, q.grad, f"step {step} grad of {name}")
            for k, (i, r) in enumerate(zip(inputs, ref_inputs)):
                if isinstance(r, torch.Tensor) and r.requires_grad:
                    assert_close(i.grad, r.grad, f"step {step} grad of input {k}")
        for (name, b), (_, c) in zip(compiled.named_buffers(), model.named_buffers()):
            assert_close(b, c, f"step {step} buffer {name}")
    return compiled
