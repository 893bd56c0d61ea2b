"""The first pass of FP8 tensorwise quantization (``fp8_amax``) folded into the fusion region that computes its
input: the region writes partial maxima of what it stores, and the quantization equals the reference bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

import lightning_thunder as lt
from lightning_thunder.fp8.quantize import E4M3, E5M2, quantize, quantize_reference, quantize_with_transpose
from lightning_thunder.plugins import FP8, Fusion

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="fusion regions need CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _plugins(order: str = "fusion_first") -> list:
    """Fusion and FP8 (whose epilogue folds ``fp8_amax`` into regions), in the given order."""
    fp8 = FP8(emulate=DEVICE == "cpu")
    return [Fusion(), fp8] if order == "fusion_first" else [fp8, Fusion()]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (E4M3, E5M2) else t


def _norm_then_quantize(x: torch.Tensor, w: torch.Tensor):
    """RMSNorm (a persistent region: a row reduction) whose output is quantized with its transposed copy."""
    h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * w
    h2 = h.reshape(-1, h.shape[-1])
    return (h2, *quantize_with_transpose(h2, E4M3, False))


def _swiglu_then_quantize(a: torch.Tensor, b: torch.Tensor):
    """SwiGLU (a flat region: no reduction), quantized to e5m2 without the transposed copy."""
    h = (torch.nn.functional.silu(a) * b).reshape(-1, a.shape[-1])
    return (h, *quantize(h, E5M2, False))


def _scaled_with_bias_sum(x: torch.Tensor, w: torch.Tensor):
    """A region with a column sum (a grid-stride kernel) that also quantizes its full-size value."""
    h = (x * w).reshape(-1, x.shape[-1])
    return (h, h.float().sum(0), *quantize_with_transpose(h, E5M2, False))


def _forward_trace(compiled) -> str:
    return lt.last_traces(compiled)[-1].python()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "fn, shapes",
    [
        (_norm_then_quantize, [(3, 37, 48), (48,)]),
        (_swiglu_then_quantize, [(5, 23, 64), (5, 23, 64)]),
        (_scaled_with_bias_sum, [(4, 29, 80), (80,)]),
    ],
    ids=["persistent", "flat", "column_sum"],
)
@pytest.mark.parametrize("order", ["fusion_first", "fp8_first"])
def test_region_computes_the_amax_and_the_quantization_is_exact(fn, shapes, dtype, order):
    torch.manual_seed(0)
    args = [(torch.randn(s) * torch.logspace(-2, 2, s[-1])).to(DEVICE, dtype) for s in shapes]
    compiled = lt.compile(fn, plugins=_plugins(order))
    outs = compiled(*args)
    trace = _forward_trace(compiled)
    # The partial maxima come out of the region (a zeroed [P] output); no separate pass reads h.
    region = next(line for line in trace.splitlines() if line.lstrip().startswith("# fusion"))
    assert "lightning_thunder.fp8_amax.default" in region
    assert "fp8_amax.default(" not in trace and "fp8_amax_kernel(" not in trace
    h = outs[0]
    quantized = [o for o in outs[1:] if o.dim() != 1 or o.dtype != torch.float32 or o.shape[0] != h.shape[-1]]
    transpose = len(quantized) == 4
    fp8_dtype = quantized[0].dtype
    expected = quantize_reference(h.cpu(), fp8_dtype, False, transpose)
    assert len(expected) == len(quantized)
    for got, want in zip(quantized, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(_bits(got.cpu()), _bits(want)), "fused amax changed the quantization"
    # ... and the region's other outputs are what eager computes.
    eager = fn(*args)
    torch.testing.assert_close(h, eager[0], **({"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}))


def test_amax_of_a_loaded_input_stays_a_separate_pass():
    """``fp8_amax`` of a tensor the region only reads (a graph input) is not folded: the region would read it
    anyway, but it computes nothing there, so the standalone pass runs."""

    def fn(x, w):
        return (x * w).sum(-1), *quantize(x.reshape(-1, x.shape[-1]), E4M3, False)

    x = torch.randn(4, 9, 32, device=DEVICE)
    w = torch.randn(32, device=DEVICE)
    compiled = lt.compile(fn, plugins=_plugins())
    out = compiled(x, w)
    assert "fp8_amax_kernel(" in _forward_trace(compiled)
    expected = quantize_reference(x.reshape(-1, 32).cpu(), E4M3, False)
    assert torch.equal(_bits(out[1].cpu()), _bits(expected[0])) and torch.equal(out[2].cpu(), expected[1])


def test_regions_share_one_zeroed_workspace_for_their_partial_maxima():
    """Two regions that fold an amax take slices of one workspace zeroed once (one fill, not one per region);
    quantizations stay exact, run after run (the workspace is zeroed again every call)."""

    def fn(x, w, m, b):
        h, q, s, qt, st = _norm_then_quantize(x, w)
        g, q2, s2 = _swiglu_then_quantize(h @ m, b)  # the matmul between keeps two regions
        return h, q, s, g, q2, s2

    torch.manual_seed(0)
    # h is large and g small: slices that overlapped would give g the scale of h
    w, m = torch.randn(48, device=DEVICE) * 50, torch.randn(48, 48, device=DEVICE) / 1000
    compiled = lt.compile(fn, plugins=_plugins())
    for _ in range(2):
        x, b = torch.randn(3, 37, 48, device=DEVICE), torch.randn(111, 48, device=DEVICE)
        h, q, s, g, q2, s2 = compiled(x, w, m, b)
        trace = _forward_trace(compiled)
        zero_fills = [line for line in trace.splitlines() if "workspace0 = aten.zeros.default(" in line]
        assert len(zero_fills) == 1 and trace.count("workspace0)") == 2
        for value, got, scale, fp8_dtype in ((h, q, s, E4M3), (g, q2, s2, E5M2)):
            want_q, want_s = quantize_reference(value.reshape(-1, 48).cpu(), fp8_dtype, False)
            assert torch.equal(_bits(got.cpu()), _bits(want_q)) and torch.equal(scale.cpu(), want_s)


def test_without_the_fp8_plugin_nothing_is_folded():
    """The fold is FP8's epilogue: with Fusion alone the quantization ops run as their own passes (and stay exact)."""
    torch.manual_seed(0)
    args = [torch.randn(3, 37, 48, device=DEVICE), torch.randn(48, device=DEVICE)]
    compiled = lt.compile(_norm_then_quantize, plugins=[Fusion()])
    outs = compiled(*args)
    assert "fp8_amax.default(" in _forward_trace(compiled)
    expected = quantize_reference(outs[0].cpu(), E4M3, False, True)
    assert all(torch.equal(_bits(g.cpu()), _bits(w)) for g, w in zip(outs[1:], expected))
