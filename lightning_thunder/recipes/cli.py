"""The ``lightning-thunder`` command line::

    lightning-thunder pretrain --config examples/recipes/debug.yaml [key=value ...]
    lightning-thunder pretrain --config examples/recipes/debug.yaml --print-config   # the resolved config
    lightning-thunder pretrain --help                                               # every key, with its help

``python -m lightning_thunder.recipes.pretrain ...`` is the same as ``lightning-thunder pretrain ...``. Config
errors, what this machine cannot run, a damaged checkpoint and missing optional packages print one ``error:`` line
(on rank 0) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_thunder.recipes.errors import ConfigError, MissingDependencyError
from lightning_thunder.strategies.checkpoint import CheckpointError

__all__ = ["main", "pretrain_main"]

_USAGE = """usage: lightning-thunder <command> [arguments]

commands:
  pretrain   train a LitGPT model from a YAML recipe: lightning-thunder pretrain --config <file> [key=value ...]

`lightning-thunder <command> --help` describes a command."""


def _pretrain_parser() -> argparse.ArgumentParser:
    from lightning_thunder.recipes.config import describe_schema

    parser = argparse.ArgumentParser(
        prog="lightning-thunder pretrain",
        description="Train a LitGPT model from a YAML recipe (examples/recipes/*.yaml) with lightning_thunder's "
        "strategies and callbacks. key=value arguments override the file (OmegaConf dot-list: train.max_steps=20, "
        "plugins=[fp8], model.overrides.n_layer=2).",
        epilog="config keys (default  # help):\n\n" + describe_schema(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="the recipe, a YAML file (e.g. examples/recipes/debug.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied in order")
    return parser


def _pretrain(argv: Sequence[str]) -> int:
    args = _pretrain_parser().parse_intermixed_args(list(argv))
    from lightning_thunder.recipes.config import load_config, to_yaml

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from lightning_thunder.recipes.loop import pretrain

        pretrain(cfg)
    except (ConfigError, MissingDependencyError, CheckpointError) as e:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:  # one line, not one per process of a multi-device run
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "pretrain":
        return _pretrain(rest)
    print(f"error: unknown command {command!r}; allowed commands: pretrain\n\n{_USAGE}", file=sys.stderr)
    return 2


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """``lightning-thunder pretrain`` with ``argv`` (default: ``sys.argv[1:]``)."""
    return _pretrain(list(sys.argv[1:] if argv is None else argv))
