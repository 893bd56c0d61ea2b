"""LitGPT training recipes: a YAML file (and ``key=value`` overrides) in, a trained model, checkpoints and a
summary out, on Fabric with lightning_thunder's strategies, plugins and callbacks.

Command line (see :mod:`lightning_thunder.recipes.cli`)::

    lightning-thunder pretrain --config examples/recipes/debug.yaml train.max_steps=50

Python::

    from lightning_thunder.recipes import load_config, pretrain
    result = pretrain(load_config("examples/recipes/debug.yaml", ["train.max_steps=50"]))
    result.train_losses, result.val_losses, result.tokens_per_sec

Modules: ``config`` (the typed schema), ``data`` (text -> tokens -> batches), ``model`` (the LitGPT model),
``plugins`` (``strategy``/``plugins`` keys -> Fabric strategy and compiler plugins), ``checkpoints`` (save,
resume), ``loop`` (the training loop), ``report`` (progress and summary), ``cli``.
"""

from lightning_thunder.recipes.config import RecipeConfig, describe_schema, load_config
from lightning_thunder.recipes.errors import ConfigError, MissingDependencyError
from lightning_thunder.recipes.loop import learning_rate, pretrain
from lightning_thunder.recipes.report import PretrainResult

__all__ = [
    "ConfigError",
    "MissingDependencyError",
    "PretrainResult",
    "RecipeConfig",
    "describe_schema",
    "learning_rate",
    "load_config",
    "pretrain",
]
