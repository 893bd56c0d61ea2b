"""The low-overhead launcher on a GPU: after the first launch of a key, launches skip ``JITFunction.run``
and still compute the right thing, and a differently aligned or typed argument gets its own kernel."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lightning_thunder.executors.launch import Launcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, a, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (a * x + y).to(out_ptr.dtype.element_ty), mask=mask)


def test_direct_launches_are_correct_and_keyed_by_alignment_and_dtype(monkeypatch):
    launch = Launcher(_axpy_kernel)
    n = 1000
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n + 1, device="cuda", dtype=dtype)
        y = torch.randn(n + 1, device="cuda", dtype=dtype)
        for offset in (0, 1):  # 1: addresses off a multiple of 16, which Triton specializes on
            xs, ys = x[offset : offset + n], y[offset : offset + n]
            out = torch.empty_like(xs)
            launch((triton.cdiv(n, 256),), xs, ys, out, n, 3.0, BLOCK=256)  # records the compiled kernel
            torch.testing.assert_close(out, (3.0 * xs.float() + ys.float()).to(dtype))
    assert len(launch._kernels) == 4

    # From now on the recorded keys must not go through JITFunction.run at all.
    def refuse(*args, **kwargs):
        raise AssertionError("JITFunction.run called for a recorded launch key")

    monkeypatch.setattr(launch.fn, "run", refuse)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n + 1, device="cuda", dtype=dtype)
        y = torch.randn(n + 1, device="cuda", dtype=dtype)
        for offset in (0, 1):
            xs, ys = x[offset : offset + n], y[offset : offset + n]
            out = torch.full_like(xs, float("nan"))
            launch((triton.cdiv(n, 256),), xs, ys, out, n, -2.0, BLOCK=256)
            torch.testing.assert_close(out, (-2.0 * xs.float() + ys.float()).to(dtype))
