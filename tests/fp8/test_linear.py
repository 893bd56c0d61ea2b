"""``fp8_linear`` (emulated) against exact and bf16 linear: forward, grad input, grad weight, grad bias.

Error bounds are derived, not tuned: each FP8 operand is off by at most half an ulp relative
(``u = 2^-4`` e4m3, ``2^-3`` e5m2) plus half a subnormal step of its scaling group, so a matmul
``a @ b^T`` is off by at most ``ea @ |b|^T + |a| @ eb^T + ea @ eb^T`` (``ea``, ``eb`` the elementwise bounds).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_thunder.fp8 import E4M3, E5M2, fp8_linear, fp8_max, quantize_reference
from lightning_thunder.fp8.linear import FP8LinearFunction

_MANTISSA = {E4M3: 3, E5M2: 2}
_MIN_NORMAL = {E4M3: 2.0**-6, E5M2: 2.0**-14}


def _err(t: torch.Tensor, fmt: torch.dtype, rowwise: bool) -> torch.Tensor:
    """Elementwise bound on |dequantize(quantize(t)) - t| (fp64); groups are rows of ``t`` when ``rowwise``."""
    t = t.double()
    amax = t.abs().amax(dim=1, keepdim=True) if rowwise else t.abs().amax()
    u = 2.0 ** -(_MANTISSA[fmt] + 1)
    return u * t.abs() + (amax / fp8_max(fmt)) * _MIN_NORMAL[fmt] * u


def _mm_bound(a: torch.Tensor, ea: torch.Tensor, b: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """Bound on |â @ b̂^T - a @ b^T| given |â - a| <= ea, |b̂ - b| <= eb, plus fp32 rounding of the matmul."""
    a, b = a.double().abs(), b.double().abs()
    return ea @ b.t() + a @ eb.t() + ea @ eb.t() + 1e-5 * (a @ b.t())


def _inputs(dtype: torch.dtype, bias: bool = True):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype) * torch.linspace(0.1, 4, 64, dtype=dtype)  # uneven columns
    w = (torch.randn(48, 64) * 0.1).to(dtype)
    b = torch.randn(48, dtype=dtype) if bias else None
    dy = torch.randn(3, 5, 48, dtype=dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp32_within_the_quantization_error_bound(recipe):
    rowwise = recipe == "rowwise"
    x, w, b, dy = _inputs(torch.float32)
    y, dx, dw, db = _run(lambda x, w, b: fp8_linear(x, w, b, recipe=recipe, emulate=True), x, w, b, dy)
    x2, dy2 = x.reshape(-1, 64), dy.reshape(-1, 48)
    exact_y = x2.double() @ w.double().t() + b.double()
    exact_dx = dy2.double() @ w.double()
    exact_dw = dy2.double().t() @ x2.double()
    bound_y = _mm_bound(x2, _err(x2, E4M3, rowwise), w, _err(w, E4M3, rowwise))
    # dx = dy @ w contracts over out_features: dy per row (e5m2), w per column (rows of w^T).
    bound_dx = _mm_bound(dy2, _err(dy2, E5M2, rowwise), w.t(), _err(w.t(), E4M3, rowwise))
    # dW = dy^T @ x contracts over the tokens: both scaled per column (rows of the transposes).
    bound_dw = _mm_bound(dy2.t(), _err(dy2.t(), E5M2, rowwise), x2.t(), _err(x2.t(), E4M3, rowwise))
    for what, got, exact, bound in (
        ("y", y.reshape(-1, 48), exact_y, bound_y),
        ("grad input", dx.reshape(-1, 64), exact_dx, bound_dx),
        ("grad weight", dw, exact_dw, bound_dw),
    ):
        err = (got.double() - exact).abs()
        assert torch.all(err <= bound), f"{what}: error exceeds the bound by {(err - bound).max():.3g}"
        rel = err.norm() / exact.norm()
        assert rel > 1e-4, f"{what}: no quantization error at all ({rel:.2g}); is FP8 really applied?"
        assert rel < (0.05 if what == "y" else 0.1), f"{what}: relative error {rel:.3g}"
    torch.testing.assert_close(db, dy2.sum(0))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulation_is_quantize_dequantize_with_the_same_scales(recipe):
    rowwise = recipe == "rowwise"
    x, w, b, _ = _inputs(torch.float32)
    x2 = x.reshape(-1, 64)
    xq, xs = quantize_reference(x2, E4M3, rowwise)
    wq, ws = quantize_reference(w, E4M3, rowwise)
    expected = F.linear(xq.float() * xs, wq.float() * ws, b).reshape(3, 5, 48)
    torch.testing.assert_close(fp8_linear(x, w, b, recipe=recipe, emulate=True), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_bf16_matches_bf16_linear_within_fp8_error(recipe):
    x, w, b, dy = _inputs(torch.bfloat16)
    got = _run(lambda x, w, b: fp8_linear(x, w, b, recipe=recipe, emulate=True), x, w, b, dy)
    ref = _run(F.linear, x, w, b, dy)
    exact = _run(F.linear, x.double(), w.double(), b.double(), dy.double())
    for what, g, r, e in zip(("y", "grad input", "grad weight", "grad bias"), got, ref, exact):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), what
        rel_fp8 = ((g.double() - e).norm() / e.norm()).item()
        rel_bf16 = ((r.double() - e).norm() / e.norm()).item()
        # e4m3 forward ~2^-4 / sqrt(3) rms relative rounding, e5m2 gradients twice that; bf16 itself ~2^-8.
        limit = 0.05 if what in ("y", "grad bias") else 0.1
        assert rel_fp8 < limit, f"{what}: FP8 relative error {rel_fp8:.3g} (bf16: {rel_bf16:.3g})"


def test_no_bias_inference_and_gradient_subsets():
    x, w, _, dy = _inputs(torch.float32, bias=False)
    with torch.no_grad():
        y_inference = fp8_linear(x, w, None, emulate=True)
    y, dx, dw, db = _run(lambda x, w, b: fp8_linear(x, w, b, emulate=True), x, w, None, dy)
    torch.testing.assert_close(y_inference, y)
    assert db is None
    # Only the weight needs a gradient (a first layer fed by data): dy^T is quantized alone.
    wg = w.detach().requires_grad_()
    fp8_linear(x, wg, None, emulate=True).backward(dy)
    torch.testing.assert_close(wg.grad, dw)
    # Only the input needs a gradient (a frozen layer).
    xg = x.detach().requires_grad_()
    fp8_linear(xg, w, None, emulate=True).backward(dy)
    torch.testing.assert_close(xg.grad, dx)


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b, _ = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w, b, emulate=True)
    assert y.dtype == torch.bfloat16


def test_errors_name_the_fix():
    x, w, b, _ = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match="set emulate=True"):
        fp8_linear(x, w, b)  # CPU tensors, real FP8
    allowed = r"recipe='blockwise' is not supported; choose one of \['tensorwise', 'rowwise'\]"
    with pytest.raises(ValueError, match=allowed):
        fp8_linear(x, w, b, recipe="blockwise", emulate=True)
    assert FP8LinearFunction.__doc__
