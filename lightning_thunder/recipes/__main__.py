"""``python -m lightning_thunder.recipes <command> ...``: the ``lightning-thunder`` command line."""

import sys

from lightning_thunder.recipes.cli import main

if __name__ == "__main__":
    sys.exit(main())
