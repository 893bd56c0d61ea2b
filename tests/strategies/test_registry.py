"""Strategy names in Lightning's registries, the public classes, and errors for impossible combinations."""

from __future__ import annotations

import pytest
import torch

import lightning_thunder
import lightning_thunder.strategies as strategies
from lightning_thunder.plugins import DDP, FSDP, Plugin
from lightning_thunder.strategies import (
    ThunderDDPStrategy,
    ThunderDDPTrainerStrategy,
    ThunderFSDPStrategy,
    ThunderFSDPTrainerStrategy,
    ThunderStrategy,
    ThunderTrainerStrategy,
)

NAMES = ("thunder", "thunder_ddp", "thunder_fsdp")
FABRIC = {"thunder": ThunderStrategy, "thunder_ddp": ThunderDDPStrategy, "thunder_fsdp": ThunderFSDPStrategy}
TRAINER = {
    "thunder": ThunderTrainerStrategy,
    "thunder_ddp": ThunderDDPTrainerStrategy,
    "thunder_fsdp": ThunderFSDPTrainerStrategy,
}


def test_import_registers_the_names_in_both_registries():
    from lightning.fabric.strategies import STRATEGY_REGISTRY
    from lightning.pytorch.strategies import StrategyRegistry

    for name in NAMES:
        assert STRATEGY_REGISTRY[name]["strategy"] is FABRIC[name]
        assert StrategyRegistry[name]["strategy"] is TRAINER[name]
        assert isinstance(STRATEGY_REGISTRY.get(name), FABRIC[name])
        assert isinstance(StrategyRegistry.get(name), TRAINER[name])
    assert lightning_thunder.register_strategies() == [], "registering again must change nothing"


def test_registration_never_replaces_a_name_taken_by_someone_else():
    from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy

    saved = STRATEGY_REGISTRY.pop("thunder_ddp")
    try:
        STRATEGY_REGISTRY.register("thunder_ddp", DDPStrategy, description="another project's strategy")
        match = r"did not register the fabric strategy name 'thunder_ddp'.*ThunderDDPStrategy"
        with pytest.warns(UserWarning, match=match):
            added = lightning_thunder.register_strategies()
        assert STRATEGY_REGISTRY["thunder_ddp"]["strategy"] is DDPStrategy and added == []
    finally:
        STRATEGY_REGISTRY["thunder_ddp"] = saved


def test_public_api():
    assert sorted(strategies.__all__) == sorted(
        [*FABRIC_NAMES, *TRAINER_NAMES, "ModelWithLoss", "compile_steps", "register_strategies"]
    )
    for name in strategies.__all__:
        assert getattr(strategies, name).__doc__, f"{name} has no docstring"
    strategy = ThunderFSDPStrategy(plugins=[Plugin()], block_cls=torch.nn.Linear, activation_checkpointing=True)
    assert strategy.fsdp.block_cls is torch.nn.Linear and strategy.fsdp.activation_checkpointing


FABRIC_NAMES = [c.__name__ for c in FABRIC.values()]
TRAINER_NAMES = [c.__name__ for c in TRAINER.values()]


@pytest.mark.parametrize("cls", [*FABRIC.values(), *TRAINER.values()])
def test_bad_plugins_and_options_are_rejected_at_construction(cls):
    with pytest.raises(ValueError, match=r"plugins=\[..., FSDP\(.*\)\] conflicts with strategy=.*remove FSDP"):
        cls(plugins=[FSDP()])
    with pytest.raises(ValueError, match=r"conflicts with strategy=.*remove DDP from plugins"):
        cls(plugins=[DDP()])
    with pytest.raises(TypeError, match=r"got the class Plugin; use Plugin\(\)"):
        cls(plugins=[Plugin])
    with pytest.raises(TypeError, match=r"wrap the single plugin: plugins=\[Plugin\(\)\]"):
        cls(plugins=Plugin())
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['fullgrpah'\]"):
        cls(compile_options={"fullgrpah": True})


@pytest.mark.parametrize("cls", [ThunderFSDPStrategy, ThunderFSDPTrainerStrategy])
def test_fsdp_options_are_checked(cls):
    with pytest.raises(ValueError, match=r"reshard_after_forward=0 must be True"):
        cls(reshard_after_forward=0)


def test_fabric_single_device_strategy_refuses_several_devices():
    from lightning.fabric import Fabric

    with pytest.raises(ValueError, match=r"strategy='thunder' runs on one device, but 2 devices were requested.*"
                       r"use strategy='thunder_ddp' or 'thunder_fsdp'"):
        Fabric(accelerator="cpu", devices=2, strategy="thunder")
    with pytest.raises(ValueError, match=r"strategy='thunder' runs on one device, but num_nodes=2"):
        Fabric(accelerator="cpu", devices=1, num_nodes=2, strategy="thunder").launch()


def test_trainer_single_device_strategy_refuses_several_devices():
    from lightning.pytorch import Trainer

    with pytest.raises(ValueError, match=r"strategy='thunder' runs on one device, but 2 devices were requested"):
        Trainer(accelerator="cpu", devices=2, strategy="thunder", logger=False)
    with pytest.raises(ValueError, match=r"strategy='thunder' runs on one device, but num_nodes=2"):
        Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="thunder", logger=False)


def test_cpu_offload_on_cpu_names_the_fix():
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, strategy=ThunderFSDPStrategy(cpu_offload=True))
    with pytest.raises(ValueError, match=r"cpu_offload=True\) needs CUDA devices.*set cpu_offload=False"):
        fabric.launch()


def test_fabric_fsdp_rejects_fp16_mixed_precision():
    from lightning.fabric import Fabric

    with pytest.raises(ValueError, match=r"does not support `Fabric\(..., precision='16-mixed'\)`"):
        Fabric(accelerator="cpu", devices=1, strategy="thunder_fsdp", precision="16-mixed")
