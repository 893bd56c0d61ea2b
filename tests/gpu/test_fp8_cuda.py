"""FP8 on a CUDA GPU of compute capability >= 8.9 (H100): the Triton quantization kernel, ``torch._scaled_mm`` against
bf16 and against the emulation, compiled LitGPT training with ``FP8()``, and ``ThunderFP8()`` under Fabric
``thunder``, the Trainer, and ``thunder_fsdp`` on 2 GPUs.

Run on the H100 machines: ``pytest tests/gpu/test_fp8_cuda.py``. Skipped elsewhere, saying why.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import lightning_thunder as lt
from lightning_thunder.fp8 import E4M3, E5M2, fp8_linear, quantize_reference
from lightning_thunder.plugins import FP8, Fusion

_CAPABILITY = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(
    _CAPABILITY is None or _CAPABILITY < (8, 9),
    reason=f"needs a CUDA GPU of compute capability >= 8.9 for FP8 (found {_CAPABILITY or 'no CUDA'})",
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
def test_triton_kernel_matches_the_reference_bit_for_bit(fp8_dtype, rowwise):
    from lightning_thunder.executors.kernels.fp8_quant import fp8_quantize_triton

    torch.manual_seed(0)
    x = (torch.randn(4096, 2048, device="cuda") * torch.logspace(-3, 3, 2048, device="cuda")).to(torch.bfloat16)
    for source in (x, x.t()):  # contiguous, and a transposed view
        got = fp8_quantize_triton(source, fp8_dtype, rowwise, True)
        expected = quantize_reference(source, fp8_dtype, rowwise, True)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape and g.dtype == e.dtype and g.stride() == e.stride(), i
            gb = g.view(torch.uint8) if g.dtype == fp8_dtype else g
            eb = e.view(torch.uint8) if e.dtype == fp8_dtype else e
            assert torch.equal(gb, eb), f"output {i}: {(gb != eb).sum().item()} of {gb.numel()} differ"


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_scaled_mm_linear_vs_bf16_and_the_emulation(recipe):
    torch.manual_seed(0)
    # 2 x 1001 tokens: not a multiple of 16, so the token padding for dW is exercised.
    x = torch.randn(2, 1001, 1024, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2048, 1024, device="cuda") * 0.03).to(torch.bfloat16)
    b = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(2, 1001, 2048, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, ws, bs)
        y.backward(dy)
        return y.detach(), xs.grad, ws.grad, bs.grad

    real = run(lambda a, c, d: fp8_linear(a, c, d, recipe=recipe))
    emulated = run(lambda a, c, d: fp8_linear(a, c, d, recipe=recipe, emulate=True))
    bf16 = run(F.linear)
    exact = run(lambda a, c, d: F.linear(a.double(), c.double(), d.double()))
    for name, r, e, h, ex in zip(("y", "grad input", "grad weight", "grad bias"), real, emulated, bf16, exact):
        assert r.dtype == torch.bfloat16 and r.shape == h.shape and torch.isfinite(r).all(), name
        # Same quantization as the emulation: only accumulation order and bf16 rounding differ.
        assert _rel(r, e) < 1e-2, f"{name}: real vs emulated FP8 {_rel(r, e):.3g}"
        limit = 0.05 if name in ("y", "grad bias") else 0.1  # e4m3 forward, e5m2 gradients
        assert _rel(r, ex) < limit, f"{name}: FP8 error {_rel(r, ex):.3g} (bf16: {_rel(h, ex):.3g})"


def _mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)
    ).cuda().to(torch.bfloat16)


def test_compiled_traces_run_scaled_mm_and_the_quantization_kernels():
    torch.manual_seed(0)
    model = _mlp()
    cm = lt.compile(model, plugins=[*lt.default_plugins(), FP8()])
    x = torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = cm(x)
    out.float().square().mean().backward()
    forward = lt.last_traces(cm)[-1].python()
    backward = lt.last_backward_traces(cm)[-1].python()
    assert forward.count("aten._scaled_mm.default(") == 2
    # Four quantizations: x, the GELU output (whose region computes the amax itself), and W1 and W2 together.
    assert forward.count("fp8_cast_with_transpose_kernel(") == 2 and "[fp8]" in forward
    assert forward.count("fp8_amax_kernel(") == 1 and forward.count("lightning_thunder.fp8_amax.default") == 1
    assert forward.count("fp8_quantize_group_kernel(") == 1
    assert backward.count("fp8_amax_kernel(") == 1 and backward.count("lightning_thunder.fp8_amax.default") == 1
    assert backward.count("aten._scaled_mm.default(") == 4 and "torch.float8_e5m2" in backward
    with torch.no_grad():
        ref = model(x)
    assert _rel(out, ref) < 0.1  # two layers of e4m3 rounding: ~0.05


def _llama(seed: int = 0, device: str = "cuda"):
    from litgpt import GPT, Config

    torch.manual_seed(seed)
    config = Config.from_name(
        "Llama-3.2-1B", n_layer=2, n_embd=256, n_head=8, n_query_groups=2, intermediate_size=1024,
        padded_vocab_size=512, vocab_size=512, block_size=128,
    )
    return GPT(config).to(device=device, dtype=torch.bfloat16), config


def _batches(n: int, vocab: int, batch: int = 8, seq: int = 128):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        data = (start + stride * torch.arange(seq + 1)) % vocab
        out.append((data[:, :-1].cuda(), data[:, 1:].cuda()))
    return out


def _train(plugins, recipe_steps: int = 30) -> list[float]:
    torch._dynamo.reset()
    model, config = _llama()
    cm = lt.compile(model, plugins=plugins)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for x, y in _batches(recipe_steps, config.padded_vocab_size):
        loss = F.cross_entropy(cm(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_litgpt_training_tracks_bf16(recipe):
    pytest.importorskip("litgpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf16 = torch.tensor(_train(None))
        fp8 = torch.tensor(_train([*lt.default_plugins(), FP8(recipe=recipe)]))
    assert torch.isfinite(fp8).all()
    gap = (fp8 - bf16).abs()
    assert gap.max() < 0.15, f"max |loss_fp8 - loss_bf16| = {gap.max():.3f} at step {int(gap.argmax())}"
    assert fp8[-5:].mean() < 1.03 * bf16[-5:].mean()
    assert bf16[-5:].mean() < 0.7 * bf16[:3].mean(), "the bf16 run did not learn; bad test data"


def test_fabric_and_trainer_with_thunder_fp8():
    pytest.importorskip("litgpt")
    import lightning as L
    from lightning.fabric import Fabric
    from torch.utils.data import DataLoader, TensorDataset

    torch._dynamo.reset()
    fabric = Fabric(accelerator="cuda", devices=1, strategy="thunder", plugins=[lt.ThunderFP8()])
    model, config = _llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = fabric.setup(model, opt)
    losses = []
    for x, y in _batches(5, config.padded_vocab_size):
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "aten._scaled_mm.default(" in lt.last_traces(model)[-1].python()

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _llama()[0]

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch[0]).flatten(0, 1).float(), batch[1].flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch._dynamo.reset()
    x, y = (torch.cat(t).cpu() for t in zip(*_batches(4, config.padded_vocab_size)))
    lit = Lit()
    trainer = L.Trainer(
        accelerator="cuda", devices=1, strategy="thunder", plugins=[lt.ThunderFP8(recipe="rowwise")], max_steps=4,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(lit, DataLoader(TensorDataset(x, y), batch_size=8))
    assert "aten._scaled_mm.default(" in lt.last_traces(lit)[-1].python()  # the compiled training_step


def _fsdp_worker(rank: int) -> dict:
    from lightning.fabric import Fabric

    torch._dynamo.reset()
    precision = lt.ThunderFP8()
    fabric = Fabric(accelerator="cuda", devices=2, strategy="thunder_fsdp", plugins=[precision])
    fabric.launch()
    model, config = _llama(device="cpu")  # FSDP2 moves each rank's shard to its GPU
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = fabric.setup(model, opt)
    losses = []
    for x, y in _batches(10, config.padded_vocab_size):
        x, y = x[rank::2].to(fabric.device), y[rank::2].to(fabric.device)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    block = model.module.transformer.h[0]
    return {
        "losses": losses,
        "converted": precision.compiler_plugins()[0].converted,
        "scaled_mm": "aten._scaled_mm.default(" in lt.last_traces(block)[-1].python(),
    }


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
def test_thunder_fsdp_with_thunder_fp8_on_two_gpus(monkeypatch):
    pytest.importorskip("litgpt")
    from tests.strategies.helpers import spawn

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    for res in spawn(_fsdp_worker, timeout=300):
        losses = torch.tensor(res["losses"])
        assert torch.isfinite(losses).all() and losses[-3:].mean() < losses[:3].mean()
        assert res["converted"] == ["attn.qkv", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.proj"]
        assert res["scaled_mm"]


@pytest.mark.parametrize("case", ["persistent", "flat", "column_sum"])
def test_fused_amax_at_llm_sizes_quantizes_exactly(case):
    """The fusion region's partial maxima (atomics from thousands of programs, autotuned grid) give the same FP8
    tensors and scales as the reference quantization of the region's own output, at 8192 x 2048 bf16."""
    from tests.fp8.test_fused_amax import _bits, _norm_then_quantize, _scaled_with_bias_sum, _swiglu_then_quantize

    fn, shapes = {
        "persistent": (_norm_then_quantize, [(4, 2048, 2048), (2048,)]),
        "flat": (_swiglu_then_quantize, [(4, 2048, 2048), (4, 2048, 2048)]),
        "column_sum": (_scaled_with_bias_sum, [(4, 2048, 2048), (2048,)]),
    }[case]
    torch.manual_seed(0)
    args = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    compiled = lt.compile(fn, plugins=[Fusion()])
    for _ in range(2):  # the first call autotunes (launches each config several times into the same partials)
        outs = compiled(*[a * 3 for a in args])
    trace = lt.last_traces(compiled)[-1].python()
    assert "fp8_amax.default(" not in trace and "lightning_thunder.fp8_amax.default" in trace
    h = outs[0]
    quantized = [o for o in outs[1:] if not (o.dim() == 1 and o.dtype == torch.float32)]
    expected = quantize_reference(h, quantized[0].dtype, False, len(quantized) == 4)
    for got, want in zip(quantized, expected, strict=True):
        assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_grouped_weight_quantization_matches_one_by_one_bit_for_bit(fp8_dtype):
    """The three-launch quantization of a Llama layer's weights equals quantizing each weight alone."""
    from lightning_thunder.executors.kernels.fp8_group_quant import fp8_quantize_group_triton
    from lightning_thunder.executors.kernels.fp8_quant import fp8_quantize_triton

    torch.manual_seed(0)
    shapes = [(3072, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192), (48, 80)]
    weights = [torch.randn(s, device="cuda", dtype=torch.bfloat16) * (k + 1) for k, s in enumerate(shapes)]
    for _ in range(2):  # the second call reuses the cached tables
        grouped = fp8_quantize_group_triton(weights, fp8_dtype, True)
    for w, got in zip(weights, grouped, strict=True):
        want = fp8_quantize_triton(w, fp8_dtype, False, True)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and a.data_ptr() % 16 == 0
            assert torch.equal(a.view(torch.uint8) if a.dtype == fp8_dtype else a, b.view(torch.uint8) if b.dtype == fp8_dtype else b)
