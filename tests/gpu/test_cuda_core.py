"""The core compiler on a CUDA GPU: parity at real kernel paths (cuBLAS, cuDNN, flash SDPA) and peak memory.

Runs on the H100 machines: ``pytest tests/gpu``. Skipped without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lightning_thunder as lt
from tests.helpers import check_module_parity
from tests.test_models import CNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu on an H100)")


def _llama(n_layer: int = 2, n_embd: int = 256, **kw):
    from litgpt import GPT, Config

    config = Config.from_name(
        "Llama-3.2-1B", n_layer=n_layer, n_embd=n_embd, n_head=8, n_query_groups=2,
        intermediate_size=4 * n_embd, padded_vocab_size=4096, vocab_size=4096, block_size=2048, **kw,
    )
    return GPT(config), config


def test_litgpt_llama_bf16_parity_on_cuda():
    pytest.importorskip("litgpt")
    model, config = _llama()
    model = model.cuda().to(torch.bfloat16)
    check_module_parity(model, lambda: [torch.randint(0, config.padded_vocab_size, (2, 256), device="cuda")], steps=2)


@pytest.fixture
def exact_cudnn():
    """fp32 convolutions without TF32 and with deterministic algorithms, so eager and compiled agree to 1e-5
    (with TF32, cuDNN's weight-gradient differs between two eager runs by ~0.5% relative)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True, False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def test_cnn_parity_on_cuda(exact_cudnn):
    model = CNN().cuda()
    check_module_parity(model, lambda: [torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)], steps=2)


def test_peak_memory_of_a_training_step_is_not_above_eager():
    pytest.importorskip("litgpt")
    model, config = _llama(n_layer=4, n_embd=1024)
    model = model.cuda().to(torch.bfloat16)
    eager = copy.deepcopy(model)
    cm = lt.compile(model)
    idx = torch.randint(0, config.padded_vocab_size, (4, 1024), device="cuda")

    def step(net):
        net(idx).float().pow(2).mean().backward()

    def peak(net) -> int:
        for p in net.parameters():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(net)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    step(cm)  # compile
    step(eager)  # warm up cuBLAS / allocator the same way
    eager_peak, compiled_peak = peak(eager), peak(cm)
    print(f"peak above parameters: eager {eager_peak / 2**20:.1f} MiB, compiled {compiled_peak / 2**20:.1f} MiB")
    assert compiled_peak <= eager_peak, (compiled_peak, eager_peak)
