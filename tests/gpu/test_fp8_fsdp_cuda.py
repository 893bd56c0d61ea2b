"""FP8 all-gather under ``thunder_fsdp`` on CUDA (compute capability >= 8.9): the grouped cast with given maxima
against the reference, ``fp8_linear`` on a gathered FP8 weight against the weight quantized in the layer (real
``torch._scaled_mm``), no host-GPU synchronization when weights move, the Trainer on one GPU (``thunder_fsdp`` as
one unit compiled whole, FP8 all-gather against bf16 all-gather and against ``thunder``), and Fabric on 2 GPUs.

Run on an H100: ``pytest tests/gpu/test_fp8_fsdp_cuda.py``. Skipped elsewhere, saying why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lightning_thunder as lt
from lightning_thunder.fp8 import E4M3, fp8_linear, quantize_reference
from lightning_thunder.fp8.quantize import fp8_amax_group, fp8_cast_group
from lightning_thunder.fp8.weights import FP8GatheredWeight
from lightning_thunder.plugins import FP8

_CAPABILITY = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(
    _CAPABILITY is None or _CAPABILITY < (8, 9),
    reason=f"needs a CUDA GPU of compute capability >= 8.9 for FP8 (found {_CAPABILITY or 'no CUDA'})",
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == E4M3 else t


def test_grouped_amax_and_cast_with_given_maxima_match_the_reference_bit_for_bit():
    """Shards as FSDP leaves them (rows not multiples of 16, an empty one) scaled by a maximum over all ranks."""
    torch.manual_seed(0)
    shapes = [(1024, 2048), (384, 2048), (1000, 512), (0, 2048), (4096, 1024)]
    shards = [(torch.randn(r, c, device="cuda") * torch.logspace(-3, 2, c, device="cuda")).to(torch.bfloat16)
              for r, c in shapes]
    amax = fp8_amax_group(shards)
    assert amax.tolist() == [float(s.abs().max()) if s.numel() else 0.0 for s in shards]
    whole = amax * 1.5 + 1.0  # as if another rank held larger values
    for shard, (q, scale_inv), m in zip(shards, fp8_cast_group(shards, whole, E4M3), whole):
        with_max = torch.cat([shard, shard.new_full((1, shard.shape[1]), float(m))])
        ref_q, ref_scale_inv = quantize_reference(with_max, E4M3, False)
        assert torch.equal(_bits(q), _bits(ref_q[: shard.shape[0]])) and torch.equal(scale_inv, ref_scale_inv)


def test_grouped_quantization_of_moved_weights_does_not_synchronize():
    """FSDP gathers a block's weights into new memory at every all-gather: the grouped kernel uploads their
    addresses without waiting for the GPU (a blocking upload would stall the host at every block)."""
    from lightning_thunder.executors.kernels.fp8_group_quant import fp8_quantize_group_triton

    shapes = [(2048, 2048), (512, 2048), (8192, 2048)]
    fp8_quantize_group_triton([torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes], E4M3, True)
    moved = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fp8_quantize_group_triton(moved, E4M3, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t, (q, scale_inv, q_t, _) in zip(moved, out):
        ref_q, ref_s = quantize_reference(t, E4M3, False)
        assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(scale_inv, ref_s)
        assert torch.equal(_bits(q_t), _bits(ref_q.t().contiguous()))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fp8_linear_on_a_gathered_weight_equals_the_weight_quantized_in_the_layer(compiled):
    torch.manual_seed(0)
    w = (torch.randn(2048, 1024, device="cuda") * 0.03).to(torch.bfloat16)
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(4, 512, 2048, device="cuda", dtype=torch.bfloat16)
    q, scale_inv = quantize_reference(w, E4M3, False)

    def run(weight):
        torch._dynamo.reset()
        xs = x.clone().requires_grad_()
        if compiled:
            fn = lt.compile(lambda a, b: F.linear(a, b), plugins=[FP8()])
        else:
            fn = fp8_linear
        y = fn(xs, weight)
        y.backward(dy)
        return y, xs.grad, weight.grad, fn

    ref = run(w.clone().requires_grad_())
    got = run(FP8GatheredWeight(q, scale_inv, torch.bfloat16, requires_grad=True))
    for a, b in zip(got[:3], ref[:3]):
        assert torch.equal(a, b)
    if compiled:
        final = lt.last_traces(got[3])[-1].python()
        assert "aten._scaled_mm.default(" in final and final.count("fp8_amax") == 1  # only x is quantized


def _llama(device: str = "cuda"):
    from litgpt import GPT, Config

    torch.manual_seed(0)
    config = Config.from_name(
        "Llama-3.2-1B", n_layer=2, n_embd=256, n_head=8, n_query_groups=2, intermediate_size=1024,
        padded_vocab_size=512, vocab_size=512, block_size=128,
    )
    return GPT(config).to(device=device), config


def _data(n: int, vocab: int, batch: int = 8, seq: int = 128):
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, vocab, (n * batch, 1), generator=g)
    stride = torch.randint(1, 4, (n * batch, 1), generator=g)
    data = (start + stride * torch.arange(seq + 1)) % vocab
    return torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:])


def _trainer_run(strategy: str, all_gather: str | None) -> dict:
    import lightning as L

    from lightning_thunder.fp8.fsdp import FP8AllGather
    from tests.fp8.trainer_helpers import lit_module, loss_recorder

    torch._dynamo.reset()
    losses = loss_recorder()
    lit = lit_module(lambda: _llama()[0], lr=1e-3)
    trainer = L.Trainer(
        accelerator="cuda", devices=1, strategy=strategy, plugins=[lt.ThunderFP8(all_gather=all_gather)],
        max_steps=8, gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[losses],
    )
    trainer.fit(lit, torch.utils.data.DataLoader(_data(8, 512), batch_size=8))
    groups = {getattr(p, "_local_tensor", p).__dict__.get("_group") for p in lit.parameters()}
    groups = [g for g in groups if isinstance(g, FP8AllGather)]
    final = lt.last_traces(lit)[-1]
    return {
        "losses": losses.values,
        "graphs": lt.compile_stats(lit).graphs,
        "gathered": [(len(g.names), g.refreshes) for g in groups],
        "fp8_inputs": sum(str(p.val.dtype) == "torch.float8_e4m3fn" for p in final.inputs),
        "final": final.python(),
    }


def test_trainer_thunder_fsdp_fp8_all_gather_on_one_gpu():
    pytest.importorskip("litgpt")
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    thunder = _trainer_run("thunder", None)
    fp8_ag = _trainer_run("thunder_fsdp", "fp8")
    bf16_ag = _trainer_run("thunder_fsdp", "bf16")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # One rank: the whole model is one FSDP unit compiled whole, as under "thunder": training_step is one graph.
    assert thunder["graphs"] == fp8_ag["graphs"] == bf16_ag["graphs"] == 1
    # The 10 FP8 weights of the 2 blocks are gathered in FP8, quantized once per optimizer step (the last step's
    # update is quantized at the next forward, which does not run).
    assert fp8_ag["gathered"] == [(10, 8)] and bf16_ag["gathered"] == []
    assert fp8_ag["fp8_inputs"] == 10 and "fp8_quantize_group_kernel" not in fp8_ag["final"]
    assert bf16_ag["fp8_inputs"] == 0 and "fp8_quantize_group_kernel" in bf16_ag["final"]
    losses = torch.tensor([thunder["losses"], fp8_ag["losses"], bf16_ag["losses"]])
    assert torch.isfinite(losses).all() and losses[0, -3:].mean() < losses[0, :3].mean()
    # The same scales and casts, before instead of inside the graph: the same training within FP8 rounding.
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(losses[2], losses[0], rtol=2e-2, atol=2e-2)


def _two_gpu_worker(rank: int, all_gather: str) -> dict:
    from lightning.fabric import Fabric

    torch._dynamo.reset()
    fabric = Fabric(accelerator="cuda", devices=2, strategy="thunder_fsdp",
                    plugins=[lt.ThunderFP8(all_gather=all_gather)])
    fabric.launch()
    model, config = _llama(device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = fabric.setup(model, opt)
    data = _data(8, config.padded_vocab_size, batch=16)
    losses = []
    for step in range(8):
        x, y = data[step * 16 + rank * 8 : step * 16 + rank * 8 + 8]
        loss = F.cross_entropy(model(x.to(fabric.device)).flatten(0, 1).float(), y.to(fabric.device).flatten())
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    block = model.module.transformer.h[0]
    forward = lt.last_traces(block)[-1]
    return {"losses": losses, "fp8_inputs": sum(str(p.val.dtype) == "torch.float8_e4m3fn" for p in forward.inputs)}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
def test_fabric_fp8_all_gather_on_two_gpus_trains_like_bf16_all_gather(monkeypatch):
    pytest.importorskip("litgpt")
    from tests.strategies.helpers import spawn

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    fp8 = spawn(_two_gpu_worker, "fp8", timeout=300)
    bf16 = spawn(_two_gpu_worker, "bf16", timeout=300)
    for got, ref in zip(fp8, bf16):
        assert got["fp8_inputs"] == 5 and ref["fp8_inputs"] == 0
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=2e-2)
