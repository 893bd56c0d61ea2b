"""``python -m lightning_thunder.recipes.pretrain --config <file> [key=value ...]``: the same as
``lightning-thunder pretrain ...`` (see :mod:`lightning_thunder.recipes.cli`). The loop itself is
:func:`lightning_thunder.recipes.pretrain` (in :mod:`lightning_thunder.recipes.loop`)."""

from __future__ import annotations

import sys

from lightning_thunder.recipes.cli import pretrain_main

__all__ = ["pretrain_main"]

if __name__ == "__main__":
    sys.exit(pretrain_main())
