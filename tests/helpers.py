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


#: Against an fp64 reference, the compiled program's error may be at most twice eager's error plus this
#: fraction of the value's scale (about one ulp for fp16/bf16; the fp32 tolerance for fp32).
REFERENCE_SLACK = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def assert_close_to_reference(actual: Any, eager: Any, reference: Any, what: str) -> None:
    """``max|actual - reference| <= 2 * max|eager - reference| + slack * scale`` (see :data:`REFERENCE_SLACK`).

    Compiled and eager programs round differently (a fused kernel keeps fp32 between ops and sums in
    another order), so neither is "the" answer; both are held against the same fp64 computation.
    """
    if isinstance(eager, (tuple, list)):
        for i, (a, e, r) in enumerate(zip(actual, eager, reference)):
            assert_close_to_reference(a, e, r, f"{what}[{i}]")
        return
    if not isinstance(eager, torch.Tensor) or eager.dtype not in REFERENCE_SLACK:
        assert_close(actual, eager, what)
        return
    assert actual.dtype == eager.dtype and actual.shape == eager.shape, f"{what}: {actual.dtype}{list(actual.shape)} vs {eager.dtype}{list(eager.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: compiled result has NaN/inf"
    ref = reference.double()
    err_compiled = (actual.double() - ref).abs().max().item()
    err_eager = (eager.double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    bound = 2 * err_eager + REFERENCE_SLACK[eager.dtype] * scale
    assert err_compiled <= bound, f"{what}: error vs fp64 {err_compiled:.3g} > bound {bound:.3g} (eager's error {err_eager:.3g})"


def _to_double(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


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
    reference: bool = False,
    **options: Any,
) -> nn.Module:
    """Compile a deep copy of ``model`` and check it against ``model`` over ``steps`` fresh inputs.

    Each step compares the outputs, then (if ``backward``) backpropagates the same random cotangent
    through both and compares every parameter gradient and every input gradient, then every buffer.
    fp32/fp64 results must match eager within :data:`TOLERANCES`; fp16/bf16 results (and every
    result with ``reference=True``, for programs that reorder fp32 sums) are held against an fp64
    copy of the model (see :func:`assert_close_to_reference`). Returns the compiled module.
    """
    compiled = lightning_thunder.compile(copy.deepcopy(model), plugins=plugins, **options)
    low = reference or any(t.dtype in LOW_PRECISION for t in [*model.parameters(), *model.buffers()])
    model64 = copy.deepcopy(model).double() if low else None
    for step in range(steps):
        inputs = list(make_inputs())
        low = low or any(isinstance(i, torch.Tensor) and i.dtype in LOW_PRECISION for i in inputs)
        if low and model64 is None:
            model64 = copy.deepcopy(model).double()
        ref_inputs = [i.detach().clone().requires_grad_(i.requires_grad) if isinstance(i, torch.Tensor) else i for i in inputs]
        inputs64 = [_to_double(i) for i in inputs] if low else []
        out = compiled(*inputs)
        ref = model(*ref_inputs)
        out64 = model64(*inputs64) if low else None
        check = (lambda a, e, r, w: assert_close_to_reference(a, e, r, w)) if low else (lambda a, e, r, w: assert_close(a, e, w))
        check(out, ref, out64, f"step {step} output")
        if backward:
            outs, refs = _float_leaves(out), _float_leaves(ref)
            cotangents = [torch.randn_like(r) for r in refs]
            torch.autograd.backward(outs, cotangents)
            torch.autograd.backward(refs, cotangents)
            if low:
                torch.autograd.backward(_float_leaves(out64), [c.double() for c in cotangents])
            params64 = list(model64.parameters()) if low else [None] * len(list(model.parameters()))
            for (name, p), (_, q), q64 in zip(compiled.named_parameters(), model.named_parameters(), params64):
                if q.grad is None:
                    assert p.grad is None, f"step {step}: grad of {name} should be None"
                else:
                    assert p.grad is not None, f"step {step}: grad of {name} missing"
                    check(p.grad, q.grad, q64.grad if low else None, f"step {step} grad of {name}")
            for k, (i, r) in enumerate(zip(inputs, ref_inputs)):
                if isinstance(r, torch.Tensor) and r.requires_grad:
                    check(i.grad, r.grad, inputs64[k].grad if low else None, f"step {step} grad of input {k}")
        buffers64 = list(model64.buffers()) if low else [None] * len(list(model.buffers()))
        for (name, b), (_, c), c64 in zip(compiled.named_buffers(), model.named_buffers(), buffers64):
            check(b, c, c64, f"step {step} buffer {name}")
    return compiled
