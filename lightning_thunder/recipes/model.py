"""The recipe's LitGPT model: its config from ``model.name`` + ``model.overrides``, weight initialization, and the
language-modelling loss."""

from __future__ import annotations

import dataclasses
import difflib
import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_thunder.recipes.errors import ConfigError, require_litgpt

if TYPE_CHECKING:
    from litgpt import Config

    from lightning_thunder.recipes.config import RecipeConfig

__all__ = [
    "BYTE_VOCAB_SIZE",
    "check_model",
    "litgpt_config",
    "lm_loss",
    "reset_parameters",
    "set_initializers",
    "training_flops",
]

#: Token ids of the byte tokenizer.
BYTE_VOCAB_SIZE = 256


def litgpt_config(name: str, overrides: dict[str, Any]) -> Config:
    """``litgpt.Config.from_name(name, **overrides)``, with errors that name the bad key and the allowed values."""
    require_litgpt()
    from litgpt import Config
    from litgpt.config import name_to_config

    if name not in name_to_config:
        close = difflib.get_close_matches(name, list(name_to_config), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"model.name={name!r} is not a LitGPT model name ({len(name_to_config)} names are allowed: "
            f"`python -c \"import litgpt.config as c; print(sorted(c.name_to_config))\"` lists them){hint}"
        )
    fields = {f.name for f in dataclasses.fields(Config)}
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"model.overrides.{key} is not a litgpt.Config field{hint} (allowed: {', '.join(sorted(fields))})"
            )
    try:
        return Config.from_name(name, **overrides)
    except (TypeError, ValueError, AssertionError, AttributeError) as e:
        raise ConfigError(f"model.overrides={overrides!r} was refused by litgpt.Config for {name!r}: {e}") from e


def check_model(cfg: RecipeConfig) -> Config:
    """Check ``model`` against LitGPT and the data settings that depend on it; returns the LitGPT config."""
    config = litgpt_config(cfg.model.name, dict(cfg.model.overrides))
    if cfg.data.seq_length > config.block_size:
        raise ConfigError(
            f"data.seq_length={cfg.data.seq_length} is longer than the model's block_size ({config.block_size}); "
            f"set data.seq_length<={config.block_size} or model.overrides.block_size={cfg.data.seq_length}"
        )
    if cfg.data.tokenizer_dir is None and config.padded_vocab_size < BYTE_VOCAB_SIZE:
        raise ConfigError(
            f"the byte tokenizer (data.tokenizer_dir=null) needs a vocabulary of {BYTE_VOCAB_SIZE} token ids, but the "
            f"model's padded_vocab_size is {config.padded_vocab_size}; set model.overrides.vocab_size=256 or give "
            "data.tokenizer_dir"
        )
    return config


def _normal_init(module: nn.Module, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def set_initializers(model: nn.Module, n_layer: int, n_embd: int) -> None:
    """Give the model's linear and embedding layers LitGPT's pretraining initialization as their
    ``reset_parameters`` (normal with std sqrt(2 / (5 n_embd)); the output projections of attention and MLP
    with 1 / sqrt(n_embd) / n_layer; biases zero).

    Sharded strategies materialize meta-device models by calling ``reset_parameters``, so this is the one
    initialization for every strategy; call :func:`reset_parameters` afterwards for a model that is not on meta.
    """
    std = math.sqrt(2.0 / 5 / n_embd)
    proj_std = 1 / math.sqrt(n_embd) / n_layer
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            is_proj = name.endswith(("attn.proj", "mlp.proj"))
            module.reset_parameters = partial(_normal_init, module, proj_std if is_proj else std)


def reset_parameters(model: nn.Module) -> None:
    """Call ``reset_parameters`` of every module that has one (the initialization set above, norms, RoPE caches)."""
    with torch.no_grad():
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()


def training_flops(config: Config, micro_batch_size: int, seq_length: int) -> int:
    """FLOPs of one micro-batch's forward and backward through ``GPT(config)``, counted with ``FlopCounterMode``
    on a meta-device model (no memory, no compute). The throughput monitor cannot measure a sharded model
    itself (FSDP modules cannot be copied), so the recipe gives it this figure for every strategy."""
    from lightning.fabric.utilities.throughput import measure_flops
    from litgpt import GPT

    with torch.device("meta"):
        model = GPT(config)
        x = torch.zeros((micro_batch_size, seq_length), dtype=torch.long)
    return int(measure_flops(model, lambda: model(x), lambda y: y.sum()))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over every position: ``logits`` (B, T, V), ``targets`` (B, T).

    The recipe compiles it with the model (``ModelWithLoss(model, lm_loss)``): ``linear`` (the head), ``reshape``,
    ``float`` and ``cross_entropy`` are the pattern :class:`~lightning_thunder.plugins.FusedLinearCrossEntropy` fuses.
    """
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

