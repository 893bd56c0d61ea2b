"""FP8 quantization: the Triton kernel (interpreter on CPU) against the PyTorch reference, and the math itself."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_thunder.executors.kernels.fp8_quant import fp8_quantize_triton
from lightning_thunder.fp8.quantize import (
    E4M3,
    E5M2,
    fp8_max,
    quantize,
    quantize_reference,
    quantize_with_transpose,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1",
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (E4M3, E5M2) else t


def _spread(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Values over 6 orders of magnitude (by column), so subnormals, ties and the saturation edge all occur."""
    return (torch.randn(rows, cols) * torch.logspace(-3, 3, cols)).to(dtype)


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
@pytest.mark.parametrize("transpose", [False, True], ids=["plain", "with_transpose"])
@pytest.mark.parametrize(
    "shape, layout",
    [((37, 150), "contiguous"), ((150, 37), "transposed_view"), ((64, 128), "contiguous"), ((5, 123), "contiguous"),
     ((200, 300), "contiguous")],  # 12 tiles: the tensorwise amax programs loop over several tiles each
)
def test_kernel_matches_reference_bit_for_bit(fp8_dtype, rowwise, transpose, shape, layout):
    x = _spread(*shape, torch.bfloat16)
    if layout == "transposed_view":
        x = x.t()  # non-contiguous input: the kernel reads strides
    got = fp8_quantize_triton(x, fp8_dtype, rowwise, transpose)
    expected = quantize_reference(x, fp8_dtype, rowwise, transpose)
    assert len(got) == len(expected) == (4 if transpose else 2)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g.shape, g.dtype, g.stride()) == (e.shape, e.dtype, e.stride()), f"output {i}"
        assert torch.equal(_bits(g), _bits(e)), f"output {i}: {(_bits(g) != _bits(e)).sum()} elements differ"


def test_kernel_fp32_input_zero_rows_and_saturation():
    x = torch.randn(20, 48)
    x[3] = 0.0  # amax = 0: the scale is guarded, the row quantizes to zeros
    x[5, 7] = 1e30  # a huge outlier saturates nothing else away in rowwise mode
    for rowwise in (False, True):
        got = fp8_quantize_triton(x, E4M3, rowwise, True)
        for g, e in zip(got, quantize_reference(x, E4M3, rowwise, True)):
            assert torch.equal(_bits(g), _bits(e))
    q, s = fp8_quantize_triton(x, E4M3, True, False)
    assert torch.all(q[3].float() == 0) and torch.isfinite(s).all()


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
def test_reference_math(fp8_dtype, rowwise):
    x = _spread(33, 80, torch.float32)
    q, s, q_t, s_t = quantize_reference(x, fp8_dtype, rowwise, transpose=True)
    mx = fp8_max(fp8_dtype)
    # The largest element of each scaling group lands exactly on the format's maximum.
    group_max = q.float().abs().amax(dim=1) if rowwise else q.float().abs().amax()
    assert torch.all(group_max == mx)
    assert s.shape == ((33, 1) if rowwise else ()) and s_t.shape == ((80, 1) if rowwise else ())
    assert s.dtype == s_t.dtype == torch.float32
    # Dequantization error: half an ulp (2^-4 for e4m3, 2^-3 for e5m2) relative, or half a subnormal step.
    mantissa = 3 if fp8_dtype == E4M3 else 2
    min_normal = 2.0**-6 if fp8_dtype == E4M3 else 2.0**-14
    for data, scale_inv, original in ((q, s, x), (q_t, s_t, x.t())):
        deq = data.float() * scale_inv
        bound = original.abs() * 2.0 ** -(mantissa + 1) + scale_inv * min_normal * 2.0 ** -(mantissa + 1)
        assert torch.all((deq - original).abs() <= bound * (1 + 1e-6))
    # Tensorwise: one scale for both layouts, and the transposed copy is the transpose.
    if not rowwise:
        assert torch.equal(s, s_t) and torch.equal(_bits(q_t), _bits(q).t())


def test_custom_ops_run_and_have_fake_implementations():
    x = torch.randn(16, 32)
    q, s = quantize(x, E4M3, True)
    assert q.dtype == E4M3 and s.shape == (16, 1)
    outs = quantize_with_transpose(x, E5M2, False)
    assert [tuple(t.shape) for t in outs] == [(16, 32), (), (32, 16), ()]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fx = torch.empty(8, 48, dtype=torch.bfloat16)
        fq, fs, fqt, fst = quantize_with_transpose(fx, E4M3, True)
        assert (fq.shape, fs.shape, fqt.shape, fst.shape) == ((8, 48), (8, 1), (48, 8), (48, 1))
        assert fqt.is_contiguous() and fq.dtype == E4M3
    with pytest.raises(ValueError, match="2-D tensor"):
        quantize(torch.randn(2, 3, 4), E4M3, False)
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.float8_e5m2"):
        quantize(x, torch.bfloat16, False)


@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
def test_kernel_outputs_share_no_storage(rowwise):
    # The custom ops return these tensors: PyTorch rejects custom-op outputs that alias one another.
    outs = fp8_quantize_triton(_spread(40, 96, torch.bfloat16), E4M3, rowwise, True)
    storages = [t.untyped_storage().data_ptr() for t in outs]
    assert len(set(storages)) == len(storages)


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("transpose", [False, True], ids=["plain", "with_transpose"])
def test_grouped_kernel_matches_the_single_tensor_kernel_bit_for_bit(fp8_dtype, transpose):
    """Several weights of different shapes (partial tiles, an empty one) quantized in one call equal each one
    quantized alone; every scale view is 16-byte aligned (cuBLAS)."""
    from lightning_thunder.executors.kernels.fp8_group_quant import fp8_quantize_group_triton

    torch.manual_seed(0)
    shapes = [(80, 144), (16, 32), (0, 48), (128, 256), (32, 16)]
    tensors = [_spread(r, c, torch.bfloat16) for r, c in shapes]
    grouped = fp8_quantize_group_triton(tensors, fp8_dtype, transpose)
    for t, got in zip(tensors, grouped, strict=True):
        want = fp8_quantize_triton(t, fp8_dtype, False, transpose)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(_bits(a), _bits(b)), f"{tuple(t.shape)}: grouped quantization differs"
        assert all(s.data_ptr() % 16 == 0 for s in got[1::2])


def test_grouped_kernel_follows_weights_that_move_and_casts_with_given_maxima():
    """Weights of the same shapes at new addresses (FSDP gathers a block's weights into new memory at every
    all-gather) share the shape tables and get their own address table; with ``amax`` given, the cast pass alone
    scales by those maxima (FSDP's FP8 all-gather: the whole weight's maximum), as the single-tensor cast does."""
    from lightning_thunder.executors.kernels import fp8_group_quant
    from lightning_thunder.executors.kernels.fp8_quant import fp8_cast_triton

    torch.manual_seed(1)
    shapes = [(32, 48), (16, 16)]
    first = [_spread(r, c, torch.bfloat16) for r, c in shapes]
    fp8_group_quant.fp8_quantize_group_triton(first, E4M3, False)
    tables = len(fp8_group_quant._TABLES)
    moved = [_spread(r, c, torch.bfloat16) for r, c in shapes]  # same shapes, other memory and values
    for t, (q, scale_inv) in zip(moved, fp8_group_quant.fp8_quantize_group_triton(moved, E4M3, False)):
        want_q, want_s = fp8_quantize_triton(t, E4M3, False, False)
        assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(scale_inv, want_s)
    assert len(fp8_group_quant._TABLES) == tables
    amax = torch.tensor([1e3, 0.5])
    given = fp8_group_quant.fp8_quantize_group_triton(moved, E4M3, False, amax=amax)
    for t, (q, scale_inv), m in zip(moved, given, amax):
        want_q, want_s = fp8_cast_triton(t, m.reshape(1), E4M3, False)
        assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(scale_inv, want_s)
    with pytest.raises(ValueError, match=r"amax must be fp32 \[2\]"):
        fp8_group_quant.fp8_quantize_group_triton(moved, E4M3, False, amax=amax[:1])


def test_grouped_kernel_rejects_what_it_cannot_address():
    from lightning_thunder.executors.kernels.fp8_group_quant import fp8_quantize_group_triton

    a = torch.randn(16, 32)
    with pytest.raises(ValueError, match="2-D contiguous tensors of one dtype"):
        fp8_quantize_group_triton([a, a.t()], E4M3, True)
    with pytest.raises(ValueError, match="2-D contiguous tensors of one dtype"):
        fp8_quantize_group_triton([a, a.to(torch.bfloat16)], E4M3, True)
    with pytest.raises(ValueError, match="dims multiples of 16"):
        fp8_quantize_group_triton([a, torch.randn(16, 40)], E4M3, True)


def test_grouped_op_quantizes_what_the_kernel_cannot_take_one_by_one():
    """``fp8_quantize_group_kernel`` (what the grouped op runs) returns every tensor's outputs in order, on any
    device; on CUDA a misaligned or odd-sized tensor goes through the single-tensor kernel instead."""
    from lightning_thunder.fp8.quantize import fp8_quantize_group_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = _spread(40, 96, torch.bfloat16).to(device)
    tensors = [base[:32, :48], _spread(16, 40, torch.bfloat16).to(device), base.reshape(-1)[8:8 + 32 * 16].view(32, 16)]
    tensors[0] = tensors[0].contiguous()
    outs = fp8_quantize_group_kernel(*tensors, dtype=E4M3, transpose=True)
    assert len(outs) == 4 * len(tensors)
    for k, t in enumerate(tensors):
        want = quantize_reference(t.cpu(), E4M3, False, True)
        for a, b in zip(outs[4 * k : 4 * k + 4], want):
            assert torch.equal(_bits(a.cpu()), _bits(b))


@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
@pytest.mark.parametrize("shape", [(0, 48), (32, 0)], ids=["no_rows", "no_columns"])
def test_reference_quantizes_an_empty_tensor(shape, rowwise):
    """An empty batch quantizes to empty FP8 tensors with the scales of an all-zero tensor (the Triton path does
    the same); ``amax`` over no elements would raise."""
    q, s, q_t, s_t = quantize_reference(torch.zeros(shape), E4M3, rowwise, True)
    assert q.shape == shape and q_t.shape == shape[::-1]
    assert s.shape == ((shape[0], 1) if rowwise else ()) and s_t.shape == ((shape[1], 1) if rowwise else ())
    assert torch.all(s == 1e-12 / 448) or s.numel() == 0
    if not rowwise:
        got = fp8_quantize_triton(torch.zeros(shape), E4M3, False, True)
        assert torch.allclose(got[1], s, rtol=1e-6) and got[0].shape == q.shape and got[2].shape == q_t.shape
