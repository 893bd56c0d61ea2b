"""The two errors a recipe raises for the user to fix, printed by the CLI without a traceback."""

from __future__ import annotations

__all__ = ["ConfigError", "MissingDependencyError", "require_litgpt"]

LITGPT_INSTALL = "pip install 'lightning-thunder-ext[litgpt]' (or `pip install litgpt`)"


class ConfigError(ValueError):
    """A recipe config that is not valid: the message names the key, the bad value and what is allowed."""


class MissingDependencyError(ImportError):
    """Something the recipe needs is not installed in this environment; the message says how to get it."""


def require_litgpt(what: str = "LitGPT recipes") -> None:
    """Raise :class:`MissingDependencyError` naming the install command when ``litgpt`` is not importable."""
    try:
        import litgpt  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"{what} need the `litgpt` package, which is not installed: {LITGPT_INSTALL}"
        ) from e
