"""Deterministic ``embedding_dense_backward`` (Triton; the interpreter on CPU) against ``aten``'s.

Error bounds are derived, not tuned: the kernel sums in fp32 and rounds once to the output dtype, so
``|out - exact| <= eps(dtype) * |exact| + n * 2^-24 * sum|g|`` (one rounding to the dtype, here a full
ulp for slack; plus the fp32 accumulation of ``n <= T`` terms), with ``exact`` computed in fp64.
"""

from __future__ import annotations

import os

import pytest
import torch

from lightning_thunder.executors.kernels.embedding_backward import embedding_dense_backward, supported

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
aten_backward = torch.ops.aten.embedding_dense_backward.default


def _check(grad: torch.Tensor, idx: torch.Tensor, num_weights: int, padding_idx: int) -> torch.Tensor:
    """Run the kernel, check it took the Triton path, and compare with aten in fp64 and in grad's dtype."""
    assert supported(grad, idx, num_weights, padding_idx, False)
    out = embedding_dense_backward(grad, idx, num_weights, padding_idx, False)
    same = aten_backward(grad, idx, num_weights, padding_idx, False)
    exact = aten_backward(grad.double(), idx, num_weights, padding_idx, False)
    assert (out.shape, out.dtype, out.stride()) == (same.shape, same.dtype, same.stride())
    abs_sum = aten_backward(grad.double().abs(), idx, num_weights, padding_idx, False)
    bound = torch.finfo(grad.dtype).eps * exact.abs() + idx.numel() * 2.0**-24 * abs_sum
    if grad.dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # PyTorch in the same dtype: fp32 agrees to rounding; its CPU kernel sums fp16/bf16 in that dtype (no
    # comparison then), its CUDA kernel in fp32, so within the two results' rounding.
    if grad.dtype == torch.float32 or grad.is_cuda:
        same_err = (same.double() - exact).abs()
        assert (err <= 2 * same_err + bound).all()
    if padding_idx >= 0:
        assert (out[padding_idx] == 0).all()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding_idx", [-1, 2])
def test_repeated_indices_1d(dtype, padding_idx):
    idx = torch.randint(0, 5, (300,), device=DEVICE)  # ~60 tokens per row, 2 rows (5, 6) never hit
    grad = torch.randn(300, 37, device=DEVICE, dtype=dtype)  # D not a power of two
    _check(grad, idx, 7, padding_idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_2d_indices_with_transposed_grad(dtype, index_dtype):
    B, S, D = 4, 45, 24
    idx = torch.randint(0, 20, (B, S), device=DEVICE, dtype=index_dtype)
    grad = torch.randn(S, B, D, device=DEVICE, dtype=dtype).transpose(0, 1)  # [B, S, D], not contiguous
    assert not grad.is_contiguous()
    _check(grad, idx, 20, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_1d_indices_with_strided_grad(dtype):
    idx = torch.randint(0, 9, (70,), device=DEVICE)
    grad = torch.randn(19, 70, device=DEVICE, dtype=dtype).t()  # [70, 19] with strides (1, 70)
    _check(grad, idx, 9, -1)


def test_3d_indices_and_contiguous_2d():
    idx = torch.randint(0, 6, (2, 3, 5), device=DEVICE)
    _check(torch.randn(2, 3, 5, 11, device=DEVICE), idx, 6, 0)
    _check(torch.randn(2, 5, 3, 11, device=DEVICE).transpose(1, 2), idx, 6, -1)  # reshape copies
    _check(torch.randn(3, 10, 13, device=DEVICE, dtype=torch.bfloat16), idx.reshape(3, 10), 6, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_span_column_blocks(dtype):
    idx = torch.tensor([[3, 1, 3], [0, 3, 1]], device=DEVICE)
    grad = torch.randn(2, 3, 2100, device=DEVICE, dtype=dtype)  # 2 column blocks of 2048, the last partial
    _check(grad, idx, 4, 0)


def test_index_only_at_last_token():
    idx = torch.randint(0, 4, (257,), device=DEVICE)
    idx[-1] = 9
    grad = torch.randn(257, 5, device=DEVICE)
    out = _check(grad, idx, 10, -1)
    assert torch.equal(out[9], grad[-1])
    assert (out[4:9] == 0).all()


@pytest.mark.parametrize("first", [1500, 3], ids=["owner_in_the_middle", "owner_early"])
def test_hot_row_across_scan_blocks(first):
    """Row 7 hit by the last 600 of 2100 tokens, and before by the token ``first`` (or only the last 600):
    scan blocks of 1024 with scattered matches (gathered) and all matching (contiguous tiles)."""
    idx = torch.full((2100,), 7, device=DEVICE)
    idx[:1500] = torch.randint(0, 7, (1500,), device=DEVICE)
    idx[first] = 7
    grad = torch.randn(2100, 3, device=DEVICE)
    _check(grad, idx, 8, -1)


def test_single_token_and_empty():
    grad = torch.randn(6, device=DEVICE)
    out = _check(grad, torch.tensor(2, device=DEVICE), 4, -1)  # 0-d indices, 1-D grad
    assert torch.equal(out[2], grad)
    empty = embedding_dense_backward(
        torch.randn(0, 6, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE), 4, -1, False
    )
    assert empty.shape == (4, 6) and (empty == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype):
    idx = torch.randint(0, 5, (300,), device=DEVICE)
    grad = torch.randn(300, 33, device=DEVICE, dtype=dtype) * torch.logspace(-3, 3, 33, device=DEVICE, dtype=dtype)
    first = embedding_dense_backward(grad, idx, 5, -1, False)
    second = embedding_dense_backward(grad, idx, 5, -1, False)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(first.view(bits), second.view(bits))


@pytest.mark.parametrize(
    "case",
    ["scale_grad_by_freq", "float64", "shape_mismatch", "int16_indices"],
)
def test_unsupported_falls_back_to_pytorch(case):
    idx = torch.randint(0, 5, (3, 4), device=DEVICE)
    grad = torch.randn(3, 4, 8, device=DEVICE)
    args = [grad, idx, 6, 1, False]
    if case == "scale_grad_by_freq":
        args[4] = True
    elif case == "float64":
        args[0] = grad.double()
    elif case == "shape_mismatch":
        args[0] = grad.reshape(12, 8)  # aten accepts any grad with D columns and numel(indices) rows
    else:
        args[1] = idx.to(torch.int16)
    assert not supported(*args)
    if case == "int16_indices":
        with pytest.raises(RuntimeError):  # neither path takes int16 indices
            embedding_dense_backward(*args)
        return
    assert torch.equal(embedding_dense_backward(*args), aten_backward(*args))


def test_supported_requirements():
    idx = torch.randint(0, 5, (3, 4), device=DEVICE)
    grad = torch.randn(3, 4, 8, device=DEVICE)
    assert supported(grad, idx, 6, -1, False)
    assert not supported(grad, idx, 6, -1, True)
    assert not supported(grad, idx.to("meta"), 6, -1, False)  # devices differ
    assert not supported(grad.to("meta"), idx.to("meta"), 6, -1, False)
    assert not supported(grad, idx, torch.tensor(6), -1, False)  # sizes must be static ints
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "0"  # restored by conftest's _restore_environment
        assert not supported(grad, idx, 6, -1, False)


def test_precompile_needs_cuda():
    from lightning_thunder.executors.kernels.embedding_backward import precompile

    assert precompile(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), 10, -1) is None
