"""The Triton fusion executor on a CUDA GPU at real sizes: parity with eager (outputs and gradients) and
Triton's on-disk cache letting a second process skip compilation. Skipped without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lightning_thunder as lt
from lightning_thunder.plugins import Fusion
from tests.test_fusion import _check_function, random_program

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu on an H100)")


def _rmsnorm_mlp(x, w, a, b):
    xf = x.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w
    return F.silu(a) * b + h.sum(-1, keepdim=True)


def _inputs(*shapes, dtype=torch.bfloat16):
    return [torch.randn(s, device="cuda", dtype=dtype).requires_grad_() for s in shapes]


def test_llm_sized_norm_and_swiglu_bf16():
    cf = _check_function(_rmsnorm_mlp, _inputs((8192, 2048), (2048,), (8192, 2048), (8192, 2048)))
    assert lt.compile_stats(cf).fusion_regions >= 2


def test_vocabulary_sized_cross_entropy_uses_looped_kernels():
    def loss(logits, target):
        return (F.cross_entropy(logits.float(), target),)

    logits = torch.randn(1024, 128256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 128256, (1024,), device="cuda")
    cf = lt.compile(loss, plugins=[Fusion()])
    ref_logits = logits.detach().clone().requires_grad_()
    (out,), (ref,) = cf(logits, target), loss(ref_logits, target)
    out.backward()
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(), rtol=2e-2, atol=1e-6)
    assert any("for c0 in range(0, 128256, BLOCK_N):" in s for s in lt.kernel_sources(cf).values())


@pytest.mark.parametrize("seed", range(8))
def test_random_programs_at_medium_sizes(seed):
    program, shapes = random_program(seed, rounding=True)
    big = [tuple(d * m if d > 1 else d for d, m in zip(s[::-1], (8, 16, 4)))[::-1] for s in shapes]
    _check_function(program, [torch.randn(s, device="cuda", dtype=torch.bfloat16).requires_grad_() for s in big])


def test_second_process_skips_triton_compilation(tmp_path):
    script = (
        "import time, torch, lightning_thunder as lt\n"
        "from lightning_thunder.plugins import Fusion\n"
        "f = lt.compile(lambda x: (torch.tanh(x) * 2).softmax(-1), plugins=[Fusion()])\n"
        "x = torch.randn(64, 1000, device='cuda')\n"
        "t0 = time.perf_counter(); f(x); torch.cuda.synchronize(); print(time.perf_counter() - t0)\n"
    )
    env = {**os.environ, "LIGHTNING_THUNDER_CACHE": str(tmp_path / "lt"), "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    env.pop("TRITON_INTERPRET", None)
    counts = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts.append(len(list(Path(tmp_path, "triton").rglob("*.cubin"))))
    assert counts[0] >= 1 and counts[1] == counts[0], counts  # nothing compiled the second time


def test_wide_bias_gradient_with_split_columns_bf16():
    # The bias gradient over 16384 columns: a column-tiled grid-stride kernel (codegen.column_tiled).
    x, b = _inputs((4096, 16384), (16384,))
    _check_function(lambda x, b: F.gelu(x + b, approximate="tanh"), [x, b])
