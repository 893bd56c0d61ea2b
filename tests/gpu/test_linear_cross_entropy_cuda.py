"""The chunked linear + cross-entropy on a CUDA GPU at LLM sizes: the Triton kernel and cuBLAS against eager and an fp64
reference (Llama 3's 128,256-class head), its memory against eager's, and a LitGPT model with its loss compiled with
the default plugins (FusedLinearCrossEntropy and Fusion) against eager, with no [tokens, vocab] value in its traces.

Run on the H100 machines: ``pytest tests/gpu/test_linear_cross_entropy_cuda.py``. Skipped elsewhere, saying why.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import lightning_thunder as lt
import lightning_thunder.ops.linear_cross_entropy as lce
from lightning_thunder.ops import linear_cross_entropy
from tests.helpers import assert_close_to_reference, check_module_parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)")

_GIB = float(1 << 30)


def _eager(x, w, t, softcap=None, **kwargs):
    logits = F.linear(x, w).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, t, **kwargs)


def _grads(fn, x, w, t, **kwargs):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(x, w, t, **kwargs)
    loss.backward()
    return [loss.detach(), x.grad, w.grad]


def test_llama3_head_bf16_matches_fp64_reference_with_fp32_weight_accumulation():
    torch.manual_seed(0)
    n, h, v = 4096, 2048, 128256  # 2 chunks of the default 2048 rows
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(v, h, device="cuda") / h**0.5).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    t[:300] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mixed-precision addmm must work: no fallback warning
        ours = _grads(lambda x, w, t: linear_cross_entropy(x, w, None, t), x, w, t)
    assert lce._mixed_addmm_works is True, "dW was not accumulated in fp32 with cuBLAS (addmm out_dtype)"
    eager = _grads(_eager, x, w, t)
    reference = _grads(_eager, x.double(), w.double(), t)
    for name, a, e, r in zip(["loss", "grad x", "grad weight"], ours, eager, reference):
        assert_close_to_reference(a, e, r, name)


def test_softcap_smoothing_sum_odd_vocab_fp32():
    torch.manual_seed(0)
    n, h, v = 3000, 512, 50257
    x = torch.randn(n, h, device="cuda")
    w = torch.randn(v, h, device="cuda") / h**0.5
    t = torch.randint(0, v, (n,), device="cuda")
    t[1000:2100] = -100  # whole chunks ignored (chunk 1024 rows)
    options = dict(softcap=5.0, label_smoothing=0.1, reduction="sum")
    ours = _grads(lambda x, w, t, **k: linear_cross_entropy(x, w, None, t, **k), x, w, t, **options)
    eager = _grads(_eager, x, w, t, **options)
    for name, a, e in zip(["loss", "grad x", "grad weight"], ours, eager):
        # fp32 sums over 50k classes and 3000 tokens in another order: relative error ~1e-6, checked at 1e-4
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_autocast_fp32_master_weights():
    torch.manual_seed(0)
    n, h, v = 2048, 1024, 32000
    x = torch.randn(n, h, device="cuda")
    w = torch.randn(v, h, device="cuda") / h**0.5
    t = torch.randint(0, v, (n,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = _grads(lambda x, w, t: linear_cross_entropy(x, w, None, t, chunk_size=512), x, w, t)
        eager = _grads(_eager, x, w, t)
    reference = _grads(_eager, x.double(), w.double(), t)
    assert ours[2].dtype == torch.float32
    for name, a, e, r in zip(["loss", "grad x", "grad weight"], ours, eager, reference):
        assert_close_to_reference(a.bfloat16(), e.bfloat16(), r, name)


def test_memory_is_a_chunk_not_the_logits():
    """Eager holds [tokens, vocab] logits in bf16 and fp32 and their gradients (> 10 GiB here); the op holds one
    512 MiB chunk, dW in fp32 and the gradients it returns."""
    torch.manual_seed(0)
    n, h, v = 8192, 2048, 128256
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device="cuda") / h**0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    peaks = {}
    for name, fn in (("ours", linear_cross_entropy), ("eager", lambda x, w, t: _eager(x, w, t))):
        x.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn(x, w, t) if name == "eager" else fn(x, w, None, t)
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / _GIB
        del loss
    # ours: chunk 0.5 + dW fp32 1.0 + dW bf16 0.5 + dW * g 0.5 + dx 2 x 0.03 GiB
    assert peaks["ours"] < 3.0, peaks
    assert peaks["eager"] > 3 * peaks["ours"], peaks


def test_litgpt_with_loss_compiled_with_default_plugins():
    litgpt = pytest.importorskip("litgpt", reason="litgpt is not installed (carry its wheel to run this test)")
    from litgpt import GPT, Config

    vocab = 32003
    config = Config.from_name(
        "Llama-3.2-1B", n_layer=2, n_embd=256, n_head=8, n_query_groups=2, intermediate_size=512,
        padded_vocab_size=vocab, vocab_size=vocab, block_size=512,
    )

    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = GPT(config)

        def forward(self, idx, targets):
            logits = self.model(idx)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WithLoss().to(torch.bfloat16)

    def batch():
        return [torch.randint(0, vocab, (4, 512), device="cuda"), torch.randint(0, vocab, (4, 512), device="cuda")]

    assert "FusedLinearCrossEntropy" in [p.name for p in lt.default_plugins()]
    cm = check_module_parity(model, batch, steps=2)
    for trace in (lt.last_traces(cm)[-1], lt.last_backward_traces(cm)[-1]):
        logits = [
            p.name for op in trace.ops for p in op.output_proxies()
            if p.is_tensor and p.shape and p.shape[-1] == vocab and p.val.numel() == 4 * 512 * vocab
        ]
        assert logits == [], f"{trace.name} holds [tokens, vocab] values: {logits}"
    assert "lightning_thunder.linear_cross_entropy" in lt.last_traces(cm)[-1].python()
    assert lt.compile_stats(cm).graph_breaks == []
