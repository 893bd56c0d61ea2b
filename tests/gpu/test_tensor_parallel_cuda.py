"""Tensor parallelism and DDP graph splitting on one CUDA GPU (NCCL, one rank).

The model goes through what ``thunder_fsdp`` with ``tensor_parallel_size`` does, on a 1 x 1
``("data_parallel", "tensor_parallel")`` mesh: ``TensorParallel`` (DTensor parameters, sequence parallelism), each
block compiled with the default CUDA plugins (Fusion, NativeGQA), then FSDP2. Training must match eager PyTorch on
the same GPU, the fused programs must run on the blocks' local shapes, FP8 linears must run on DTensor weights, and
Dynamo's DDPOptimizer pieces must compile with Fusion. The multi-GPU meshes run in the CPU suite
(tests/strategies/test_tensor_parallel.py) and on several GPUs elsewhere.

    pytest tests/gpu/test_tensor_parallel_cuda.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 5
CONFIG = dict(
    n_layer=3, n_embd=256, n_head=8, n_query_groups=4, intermediate_size=512, vocab_size=512, padded_vocab_size=512,
    block_size=128,
)


def _llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from litgpt import GPT, Config

    torch.manual_seed(0)
    return GPT(Config.from_name("Llama-3.2-1B", **CONFIG)).to(device="cuda", dtype=dtype)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        data = torch.randint(0, CONFIG["vocab_size"], (4, 129), generator=g).cuda()
        out.append((data[:, :-1], data[:, 1:]))
    return out


def _train(model: torch.nn.Module) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for x, y in _batches():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _parallelize(model: torch.nn.Module, plugins: list) -> torch.nn.Module:
    """thunder_fsdp's order on a 1 x 1 mesh: tensor parallel, per-block compile, FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_thunder.plugins import FSDP, TensorParallel, compile_blocks

    mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    TensorParallel(mesh=mesh["tensor_parallel"]).transform_module(model)
    compile_blocks(model, plugins)
    return FSDP(mesh=mesh["data_parallel"]).transform_module(model)


def _one_gpu(rank: int) -> dict:
    import torch.distributed as dist

    import lightning_thunder as lt
    from lightning_thunder.plugins import DDP, FP8

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out: dict = {"eager": _train(_llama())}

    model = _parallelize(_llama(), lt.default_plugins())
    out["tp"] = _train(model)
    stats = lt.compile_stats(model)
    forward = lt.last_traces(model.transformer.h[0])[-1]
    out["tp_stats"] = (stats.graphs, stats.graph_breaks, stats.fusion_regions)
    out["tp_inputs"] = [tuple(p.val.shape) for p in forward.inputs if hasattr(p.val, "shape")]

    torch._dynamo.reset()
    model = _parallelize(_llama(torch.bfloat16), [*lt.default_plugins(), FP8()])
    out["fp8"] = _train(model)
    out["fp8_scaled_mm"] = "aten._scaled_mm.default(" in lt.last_traces(model.transformer.h[0])[-1].python()
    out["eager_bf16"] = _train(_llama(torch.bfloat16))

    torch._dynamo.reset()
    model = lt.compile(_llama(), plugins=[*lt.default_plugins(), DDP(bucket_cap_mb=4)])
    out["ddp"] = _train(model)
    stats = lt.compile_stats(model)
    out["ddp_stats"] = (stats.graphs, stats.recompiles, stats.fusion_regions)
    return out


def test_tensor_parallel_fsdp_and_ddp_splitting_on_one_gpu():
    pytest.importorskip("litgpt")
    from tests.strategies.helpers import spawn

    res = spawn(_one_gpu, world_size=1, timeout=900)[0]
    eager = torch.tensor(res["eager"])
    assert eager[-1] < eager[0], res["eager"]
    # fp32 without TF32: fused programs differ from eager by summation order only.
    torch.testing.assert_close(torch.tensor(res["tp"]), eager, rtol=1e-4, atol=1e-4, msg="TP 1x1 + FSDP vs eager")
    graphs, breaks, regions = res["tp_stats"]
    assert graphs == 1 and breaks == [] and regions > 0, res["tp_stats"]
    qkv_rows = (CONFIG["n_head"] + 2 * CONFIG["n_query_groups"]) * CONFIG["n_embd"] // CONFIG["n_head"]
    assert (qkv_rows, CONFIG["n_embd"]) in res["tp_inputs"], res["tp_inputs"]
    # FP8 matmuls on the DTensor weights' shards: trains like bf16 eager, within FP8 rounding.
    assert res["fp8_scaled_mm"]
    fp8, bf16 = torch.tensor(res["fp8"]), torch.tensor(res["eager_bf16"])
    assert torch.isfinite(fp8).all() and (fp8 - bf16).abs().max() < 0.1, (res["fp8"], res["eager_bf16"])
    # DDP: Dynamo's DDPOptimizer splits the model at the 4 MB buckets; each piece compiled (with Fusion).
    torch.testing.assert_close(torch.tensor(res["ddp"]), eager, rtol=1e-4, atol=1e-4, msg="DDP pieces vs eager")
    graphs, recompiles, regions = res["ddp_stats"]
    assert graphs > 1 and recompiles == [] and regions > 0, res["ddp_stats"]
