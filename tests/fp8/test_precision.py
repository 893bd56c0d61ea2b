"""``ThunderFP8`` (emulated) with Fabric and the Trainer: thunder strategies (compiler plugin) and Lightning's own
``auto``/``ddp`` (module swap), the strategy hand-off, the MFU peak selection, and errors."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
from torch import nn

import lightning_thunder as lt
from lightning_thunder.callbacks import fp8_active, precision_of
from lightning_thunder.fp8 import FP8Linear
from lightning_thunder.plugins import FP8
from lightning_thunder.strategies.common import with_precision_plugins
from tests.strategies.helpers import lm_loss, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

STEPS = 4
#: The tiny Llama's linear layers: 5 per block x 2 blocks, and the head.
BLOCK_LINEARS = 10


@pytest.fixture(autouse=True)
def _one_thread_and_no_process_group():
    """One intra-op thread (tiny matmuls on a shared 2-core machine) and no process group left behind by ``ddp``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _fp8_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, FP8Linear)]


def _fabric_run(strategy: str, plugin) -> tuple[list[float], nn.Module]:
    from lightning.fabric import Fabric

    torch._dynamo.reset()
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy, plugins=[plugin])
    fabric.launch()
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built before setup: the swap keeps the parameters
    model, opt = fabric.setup(model, opt)
    losses = []
    for x, y in token_batches(STEPS):
        loss = lm_loss(model(x), y)
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, model


def test_fabric_thunder_and_lightning_strategies():
    from lightning.fabric.plugins.precision import HalfPrecision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager, eager_model = _fabric_run("auto", lt.ThunderFP8(emulate=True))
        ddp, ddp_model = _fabric_run("ddp", lt.ThunderFP8(emulate=True))
        plugin = lt.ThunderFP8(emulate=True)
        compiled, compiled_model = _fabric_run("thunder", plugin)
        bf16, _ = _fabric_run("auto", HalfPrecision("bf16-true"))
    # Lightning's strategies: the linear layers became FP8Linear in place (the head stays), weights bf16.
    for model in (eager_model, ddp_model):
        names = _fp8_modules(model)
        assert len(names) == BLOCK_LINEARS and not any("lm_head" in n for n in names)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # thunder: the FP8 compiler plugin rewrote the trace; no FP8Linear module is left in the compiled model.
    assert isinstance(compiled_model._forward_module, lt.ThunderModule) and not _fp8_modules(compiled_model)
    torch_level = lt.last_traces(compiled_model)[1]
    assert torch_level.name == "torch/FP8" and "10 of 11 linear -> fp8_linear" in torch_level.provenance
    assert len(plugin.compiler_plugins()[0].converted) == BLOCK_LINEARS
    # The same FP8 numerics on every path; bf16 without FP8 is close.
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(eager), rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.tensor(eager), torch.tensor(bf16), rtol=0, atol=0.1)


def _trainer_run(strategy: str, plugin) -> tuple[list[float], nn.Module]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class LitTiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_gpt()
            self.losses: list[float] = []
            self.hooks: list[str] = []

        def training_step(self, batch, batch_idx):
            loss = lm_loss(self.model(batch[0]), batch[1])
            self.losses.append(float(loss.detach()))
            return loss

        def on_before_backward(self, loss):
            self.hooks.append("on_before_backward")

        def on_after_backward(self):
            self.hooks.append("on_after_backward")

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch._dynamo.reset()
    x, y = (torch.cat(t) for t in zip(*token_batches(STEPS)))
    module = LitTiny()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, plugins=[plugin], max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.5,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert module.hooks.count("on_before_backward") == STEPS and module.hooks.count("on_after_backward") == STEPS
    return module.losses, module


def test_trainer_thunder_and_lightning_strategies():
    from lightning.pytorch.plugins.precision import HalfPrecision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager, eager_module = _trainer_run("auto", lt.ThunderFP8(emulate=True))
        ddp, ddp_module = _trainer_run("ddp", lt.ThunderFP8(emulate=True))
        compiled, compiled_module = _trainer_run("thunder", lt.ThunderFP8(emulate=True))
        ddp_bf16, _ = _trainer_run("ddp", HalfPrecision("bf16-true"))  # DDP's sampler orders the data differently
    assert len(_fp8_modules(eager_module)) == len(_fp8_modules(ddp_module)) == BLOCK_LINEARS
    # The Trainer compiled training_step (model + loss); FP8 happens in its trace, not in FP8Linear modules.
    assert isinstance(compiled_module.training_step, lt.capture.ThunderFunction) and not _fp8_modules(compiled_module)
    assert lt.last_traces(compiled_module)[1].name == "torch/FP8"
    assert all(p.dtype == torch.bfloat16 for p in compiled_module.parameters())
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(ddp_bf16), rtol=0, atol=0.1)


def test_strategies_get_the_fp8_compiler_plugin_from_the_precision_plugin():
    from lightning.fabric.plugins.precision import HalfPrecision

    precision = lt.ThunderFP8(emulate=True)
    (fp8,) = precision.compiler_plugins()
    assert isinstance(fp8, FP8) and precision.compiler_plugins()[0] is fp8  # one instance: one backend for all blocks
    assert with_precision_plugins(None, precision) == [*lt.default_plugins(), fp8]
    mine = [lt.plugins.Fusion()]
    assert with_precision_plugins(mine, precision) == [*mine, fp8]
    assert with_precision_plugins(mine, HalfPrecision("bf16-true")) is mine
    assert with_precision_plugins(None, HalfPrecision("bf16-true")) is None


def test_convert_module_skips_compiled_modules_and_warns_when_nothing_is_fp8():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.compiled = lt.compile(nn.Sequential(nn.Linear(32, 32)), plugins=[])
            self.eager = nn.Sequential(nn.Linear(32, 32))

    holder = lt.ThunderFP8(emulate=True).convert_module(Holder())
    assert _fp8_modules(holder) == ["eager.0"] and holder.compiled.original_module[0].weight.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match=r"kept every linear layer in bf16 \(0\)"):
        lt.ThunderFP8(emulate=True, filter=lambda info: False).convert_module(nn.Sequential(nn.Linear(32, 32)))


def test_mfu_peak_follows_fp8_active():
    emulated = lt.ThunderFP8(emulate=True)
    assert not fp8_active(emulated) and precision_of(emulated) == "bf16"  # emulation multiplies in bf16
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)),
    ):
        real = lt.ThunderFP8(recipe="rowwise")
    assert fp8_active(real) and precision_of(real) == "fp8" and real.precision == "bf16-true"
    assert repr(real) == "ThunderFP8(recipe='rowwise', emulate=False, all_gather='bf16')"


def test_errors_name_the_fix():
    with mock.patch("torch.cuda.is_available", return_value=False):
        with pytest.raises(RuntimeError, match="set emulate=True"):
            lt.ThunderFP8()
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_device_capability", return_value=(8, 6)),
        mock.patch("torch.cuda.current_device", return_value=0),
        mock.patch("torch.cuda.get_device_name", return_value="NVIDIA RTX A6000"),
    ):
        with pytest.raises(RuntimeError, match=r"has 8.6; set emulate=True"):
            lt.ThunderFP8()
    with pytest.raises(ValueError, match=r"choose one of \['tensorwise', 'rowwise'\]"):
        lt.ThunderFP8(recipe="mxfp8", emulate=True)


def _fsdp_worker(rank: int) -> dict:
    from lightning.fabric import Fabric

    from tests.strategies.helpers import WORLD_SIZE

    torch._dynamo.reset()
    precision = lt.ThunderFP8(emulate=True)
    fabric = Fabric(accelerator="cpu", devices=WORLD_SIZE, strategy="thunder_fsdp", plugins=[precision])
    fabric.launch()
    model = tiny_gpt()
    keys = list(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = fabric.setup(model, opt)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in token_batches(3):
            loss = lm_loss(model(x[rank::WORLD_SIZE]), y[rank::WORLD_SIZE])
            fabric.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    block = model.module.transformer.h[0]
    return {
        "losses": losses,
        "converted": precision.compiler_plugins()[0].converted,
        "block_trace": lt.last_traces(block)[1].name,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "sharded": all(type(p).__name__ == "DTensor" or hasattr(p, "full_tensor") for p in model.parameters()),
        "same_keys": list(model.state_dict()) == keys,
    }


@pytest.mark.slow
def test_fabric_thunder_fsdp_on_two_processes():
    from tests.strategies.helpers import spawn

    for res in spawn(_fsdp_worker, timeout=240):
        assert all(torch.isfinite(torch.tensor(res["losses"])))
        # One graph shared by both blocks: its 5 linear layers rewritten once (the head is not in a block).
        assert res["converted"] == ["attn.qkv", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.proj"]
        assert res["block_trace"] == "torch/FP8"
        assert res["dtypes"] == ["torch.bfloat16"] and res["sharded"] and res["same_keys"]
