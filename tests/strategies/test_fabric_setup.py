"""Fabric ``thunder_fsdp`` setup on 2 CPU processes: meta-device init, and optimizers built before sharding."""

from __future__ import annotations

import pytest
import torch

from tests.strategies.helpers import lm_loss, spawn, tiny_config, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")


def _fabric():
    from lightning.fabric import Fabric

    import lightning_thunder  # noqa: F401 - registers the strategy names

    torch._dynamo.reset()
    fabric = Fabric(accelerator="cpu", devices=2, strategy="thunder_fsdp")
    fabric.launch()
    return fabric


def _raises(fn, exc: type[Exception], match: str) -> str:
    """Call ``fn``; return ``"ok"`` if it raised ``exc`` with ``match`` in the message, else what happened."""
    try:
        fn()
    except exc as e:
        return "ok" if match in str(e) else f"wrong message: {e}"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"raised {type(e).__name__}: {e}"
    return "did not raise"


def _empty_init_and_optimizer_order(rank: int) -> dict:
    from litgpt import GPT
    from litgpt.model import RMSNorm
    from torch.distributed.tensor import DTensor

    out: dict = {}
    # 1. Meta-device init: the optimizer is built on meta parameters, before setup.
    fabric = _fabric()
    with fabric.init_module(empty_init=True):
        model = GPT(tiny_config())
    out["meta_before_setup"] = all(p.is_meta for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = fabric.setup(model, opt)
    out["meta_after_setup"] = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    out["all_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
    out["optimizer_on_model_params"] = [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    ref = tiny_gpt()
    out["rope_cache_recomputed"] = torch.equal(model.cos, ref.cos) and torch.equal(model.sin, ref.sin)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    out["norms_reset_to_one"] = bool(norms) and all(torch.equal(m.weight.full_tensor(), torch.ones(32)) for m in norms)
    qkv = model.transformer.h[0].attn.qkv.weight.full_tensor()
    out["linear_initialized"] = bool(torch.isfinite(qkv).all()) and 0.01 < float(qkv.std()) < 1.0
    losses = []
    for x, y in token_batches(4):
        loss = lm_loss(model(x[rank::2]), y[rank::2])
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(fabric.all_reduce(loss.detach(), reduce_op="mean")))
    out["losses"] = losses

    # 2. An optimizer that already stepped cannot be re-pointed: the error names the order to use.
    fabric = _fabric()
    model = tiny_gpt()
    stepped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(token_batches(1)[0][0]).sum().backward()
    stepped.step()
    out["stepped_optimizer"] = _raises(lambda: fabric.setup(model, stepped), RuntimeError, "fabric.setup_module(model)")

    # 3. An optimizer over a parameter that is not the model's.
    fabric = _fabric()
    model = tiny_gpt()
    stray = torch.optim.AdamW([*model.parameters(), torch.nn.Parameter(torch.zeros(3))])
    out["foreign_parameter"] = _raises(lambda: fabric.setup(model, stray), ValueError, "not a parameter of the model")

    # 4. setup_module, then an optimizer built from the *old* parameters: refused, not silently stale.
    fabric = _fabric()
    model = tiny_gpt()
    stale = torch.optim.AdamW(model.parameters())
    model = fabric.setup_module(model)
    out["stale_optimizer"] = _raises(lambda: fabric.setup_optimizers(stale), ValueError, "is not sharded")
    good = torch.optim.AdamW(model.parameters())
    out["fresh_optimizer"] = fabric.setup_optimizers(good).optimizer is good

    # 5. The strategy shards and compiles: a model that is already sharded or compiled is refused.
    from torch.distributed.fsdp import fully_shard

    import lightning_thunder as lt

    fabric = _fabric()
    model = tiny_gpt()
    fully_shard(model.transformer.h[0])
    out["pre_sharded"] = _raises(lambda: fabric.setup(model), ValueError, "`transformer.h.0` (FSDPBlock) is already")
    out["pre_compiled"] = _raises(lambda: fabric.setup(lt.compile(tiny_gpt())), ValueError, "`cm.original_module`")
    return out


@pytest.mark.slow
def test_fabric_fsdp_empty_init_and_optimizer_order():
    out = spawn(_empty_init_and_optimizer_order)[0]
    assert out["meta_before_setup"] and not out["meta_after_setup"] and out["all_dtensor"]
    assert out["optimizer_on_model_params"], "the optimizer built on meta parameters must step the materialized ones"
    assert out["rope_cache_recomputed"] and out["norms_reset_to_one"] and out["linear_initialized"], out
    assert out["losses"][-1] < out["losses"][0], out["losses"]
    for case in ("stepped_optimizer", "foreign_parameter", "stale_optimizer", "pre_sharded", "pre_compiled"):
        assert out[case] == "ok", f"{case}: {out[case]}"
    assert out["fresh_optimizer"]


def _bf16_mixed(rank: int) -> dict:
    import lightning_thunder as lt
    from lightning.fabric import Fabric
    from torch.distributed.fsdp import fully_shard

    out = {}
    for precision in ("32-true", "bf16-mixed"):
        torch._dynamo.reset()
        fabric = Fabric(accelerator="cpu", devices=2, strategy="thunder_fsdp", precision=precision)
        fabric.launch()
        model = tiny_gpt()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = fabric.setup(model, opt)
        losses = []
        for x, y in token_batches(3):
            loss = lm_loss(model(x[rank::2]), y[rank::2])
            fabric.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(float(fabric.all_reduce(loss.detach().float(), reduce_op="mean")))
        policy = fully_shard.state(model.transformer.h[0])._mp_policy
        block_trace = lt.last_traces(model.transformer.h[0])[0]
        out[precision] = {
            "losses": losses,
            "param_dtype": str(policy.param_dtype),
            "reduce_dtype": str(policy.reduce_dtype),
            "weight_dtypes": sorted({str(p.dtype) for p in block_trace.inputs if "weight" in p.name}),
            "master_dtype": str(model.transformer.h[0].attn.qkv.weight.dtype),
        }
    return out


@pytest.mark.slow
def test_fabric_fsdp_precision_sets_the_fsdp_mixed_precision_policy():
    out = spawn(_bf16_mixed)[0]
    fp32, bf16 = out["32-true"], out["bf16-mixed"]
    assert fp32["param_dtype"] == "None" and fp32["weight_dtypes"] == ["torch.float32"], fp32
    # bf16-mixed: the gathered weights the compiled block computes with are bf16, gradients reduce in fp32, and the
    # sharded master weights stay fp32.
    assert bf16["param_dtype"] == "torch.bfloat16" and bf16["reduce_dtype"] == "torch.float32", bf16
    assert bf16["weight_dtypes"] == ["torch.bfloat16"] and bf16["master_dtype"] == "torch.float32", bf16
    torch.testing.assert_close(torch.tensor(bf16["losses"]), torch.tensor(fp32["losses"]), rtol=2e-2, atol=2e-2)
