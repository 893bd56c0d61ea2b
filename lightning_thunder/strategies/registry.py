"""Registering ``thunder``, ``thunder_ddp`` and ``thunder_fsdp`` with Fabric's and the Trainer's strategy registries.

Lightning resolves ``Fabric(strategy="...")`` and ``Trainer(strategy="...")`` through two name registries. This
is the one place the project writes to them: :func:`register_strategies` runs once when ``lightning_thunder`` is
imported, adds only names that are free, and never replaces another project's entry.
"""

from __future__ import annotations

import warnings

__all__ = ["register_strategies", "STRATEGY_NAMES"]

#: The names registered, with their descriptions.
STRATEGY_NAMES = {
    "thunder": "one device; the model compiled with lightning_thunder",
    "thunder_ddp": "DistributedDataParallel around the model compiled with lightning_thunder",
    "thunder_fsdp": "FSDP2 with each transformer block compiled with lightning_thunder (regional compilation)",
}


def register_strategies() -> list[str]:
    """Register the strategies with Fabric's ``STRATEGY_REGISTRY`` and the Trainer's ``StrategyRegistry``.

    Idempotent. A name already registered for another class is left alone with a warning that says how to
    use our strategy anyway (pass an instance). Returns the ``"fabric:<name>"``/``"trainer:<name>"`` entries
    added by this call.
    """
    from lightning.fabric.strategies import STRATEGY_REGISTRY
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_thunder.strategies import fabric, trainer

    targets = (
        ("fabric", STRATEGY_REGISTRY, {
            "thunder": fabric.ThunderStrategy,
            "thunder_ddp": fabric.ThunderDDPStrategy,
            "thunder_fsdp": fabric.ThunderFSDPStrategy,
        }),
        ("trainer", StrategyRegistry, {
            "thunder": trainer.ThunderTrainerStrategy,
            "thunder_ddp": trainer.ThunderDDPTrainerStrategy,
            "thunder_fsdp": trainer.ThunderFSDPTrainerStrategy,
        }),
    )
    added = []
    for where, registry, classes in targets:
        for name, cls in classes.items():
            existing = registry[name]["strategy"] if name in registry else None
            if existing is cls:
                continue
            if existing is not None:
                warnings.warn(
                    f"lightning_thunder did not register the {where} strategy name {name!r}: it is already registered "
                    f"for {getattr(existing, '__qualname__', existing)!r}. Pass an instance instead: "
                    f"strategy=lightning_thunder.strategies.{cls.__name__}()",
                    stacklevel=2,
                )
                continue
            registry.register(name, cls, description=f"lightning_thunder: {STRATEGY_NAMES[name]}")
            added.append(f"{where}:{name}")
    return added
