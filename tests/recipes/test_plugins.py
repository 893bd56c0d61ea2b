"""The recipe's `plugins` and `strategy` keys: what they map to (FP8 itself is a stand-in here; what a machine without
FP8 says is in test_config.py)."""

from __future__ import annotations

import pytest

import lightning_thunder
import lightning_thunder.plugins
from lightning_thunder import Plugin
from lightning_thunder.recipes import ConfigError
from lightning_thunder.recipes.plugins import (
    RecipePlugins,
    apply_activation_checkpointing,
    build_plugins,
    build_strategy,
)
from lightning_thunder.strategies import ThunderDDPStrategy, ThunderFSDPStrategy, ThunderStrategy


class StandInFP8(Plugin):
    """Takes FP8's arguments (recipe=..., emulate=False) and nothing else."""

    def __init__(self, recipe: str = "tensorwise", emulate: bool = False) -> None:
        self.recipe, self.emulate = recipe, emulate


@pytest.fixture
def stand_in_fp8(monkeypatch):
    monkeypatch.setattr(lightning_thunder.plugins, "FP8", StandInFP8, raising=False)


def test_fp8_maps_to_the_plugin_with_its_options(stand_in_fp8):
    resolved = build_plugins([{"fp8": {"recipe": "rowwise", "emulate": True}}])
    (fp8,) = resolved.compile_plugins
    assert isinstance(fp8, StandInFP8) and (fp8.recipe, fp8.emulate) == ("rowwise", True)
    assert resolved.fp8 and not resolved.activation_checkpointing
    # appended to the compiler's defaults (Fusion with CUDA, none on CPU), for every strategy
    assert resolved.compiler_plugins() == [*lightning_thunder.default_plugins(), fp8]
    for name, cls in (("thunder", ThunderStrategy), ("thunder_ddp", ThunderDDPStrategy),
                      ("thunder_fsdp", ThunderFSDPStrategy)):
        strategy = build_strategy(name, resolved)
        assert type(strategy) is cls and strategy.plugins == resolved.compiler_plugins()
    assert isinstance(build_plugins(["fp8"]).compile_plugins[0], StandInFP8)


def test_fp8_options_it_refuses_are_named(stand_in_fp8):
    with pytest.raises(ConfigError, match=r"plugins: fp8 options \{'scaling': 'delayed'\} were refused by StandInFP8"):
        build_plugins([{"fp8": {"scaling": "delayed"}}])


def test_without_plugins_the_compiler_defaults_apply():
    resolved = build_plugins([])
    assert resolved == RecipePlugins() and resolved.compiler_plugins() is None
    assert build_strategy("thunder", resolved).plugins is None


def test_activation_checkpointing_for_each_strategy():
    litgpt = pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    resolved = build_plugins(["activation_checkpointing"])
    assert resolved.activation_checkpointing and resolved.compiler_plugins() is None
    assert build_strategy("thunder_fsdp", resolved).fsdp.activation_checkpointing  # inside each compiled block
    model = litgpt.GPT(litgpt.Config.from_name("pythia-14m", n_layer=3, vocab_size=256, padded_vocab_size=256))
    assert apply_activation_checkpointing(model, "thunder_fsdp", resolved) == 0  # the strategy does it
    assert not any("forward" in vars(block) for block in model.transformer.h)
    assert apply_activation_checkpointing(model, "thunder", resolved) == 3
    assert all("forward" in vars(block) for block in model.transformer.h)  # checkpointed, per instance
    assert apply_activation_checkpointing(model, "thunder", build_plugins([])) == 0
