"""Recipe checkpoints: where they go, which one ``resume`` means, saving atomically, and checking that a checkpoint
fits the config it is resumed with.

A checkpoint is ``<out_dir>/checkpoints/step-<step>.ckpt``, written by ``fabric.save`` (a file; a directory of
shards for ``thunder_fsdp``) with everything the next step depends on::

    {"model", "optimizer",            # weights and AdamW's moments and step counts
     "step", "tokens",                # optimizer steps and tokens done
     "data",                          # the training sampler's generator state and batches drawn
     "rng",                           # torch's (and CUDA's) global RNG state
     "config"}                        # the recipe config, to check a resume against

so a run resumed from step k computes the same step k + 1 as the run that saved it. The strategies write it
atomically with its SHA-256 (``step-<step>.ckpt.sha256``, or ``checksums.sha256`` inside a directory of shards);
``resume`` verifies it, and ``resume=auto`` falls back to the newest checkpoint that verifies, saying so.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_thunder.recipes.errors import ConfigError
from lightning_thunder.strategies.checkpoint import CheckpointError, verify_checkpoint

if TYPE_CHECKING:
    from lightning.fabric import Fabric

__all__ = [
    "RESUME_MUST_MATCH",
    "checkpoint_path",
    "list_checkpoints",
    "resolve_resume",
    "read_checkpoint_metadata",
    "check_resumable",
    "checkpoint_problem",
    "save_checkpoint",
    "rng_state",
    "set_rng_state",
]

_NAME = re.compile(r"^step-(\d+)\.ckpt$")

#: Config keys (and key prefixes) that must be the same as in the checkpoint to resume from it.
RESUME_MUST_MATCH = ("model.", "data.", "train.micro_batch_size", "train.global_batch_size", "train.seed", "devices")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    """``<out_dir>/checkpoints/step-<step, 6 digits>.ckpt``."""
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}.ckpt"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``out_dir`` (partial writes are hidden), by step."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _say(line: str) -> None:
    """Print on the launching process only (before Fabric starts, the other ranks re-run the same resolution)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(line, flush=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (its checksums do not match, a shard is missing, it is
    unreadable or not a recipe's), or ``None`` when it can."""
    try:
        verify_checkpoint(path)
        read_checkpoint_metadata(path)
    except (CheckpointError, ConfigError, OSError) as e:
        return str(e).removeprefix("resume: ")
    return None


def resolve_resume(resume: bool | str, out_dir: str | Path) -> Path | None:
    """The checkpoint ``resume`` names, or ``None`` to start fresh.

    ``False``: start fresh; ``out_dir`` must hold no checkpoint (so a later ``resume: auto`` cannot pick up a
    stale one). ``"auto"``: the newest *valid* checkpoint in ``out_dir`` (checksums match, readable), saying which
    newer ones it skipped and why; none when there is no checkpoint. ``True``: the latest, which must exist and be
    valid. A string: that checkpoint path, which must be valid.

    Raises:
        ConfigError: no checkpoint where one is required, or the one required is corrupt or incomplete (the message
            names the file and what is wrong).
    """
    latest = list_checkpoints(out_dir)
    if resume is False:
        if latest:
            raise ConfigError(
                f"resume=false, but out_dir={str(out_dir)!r} already holds checkpoints of an earlier run "
                f"({', '.join(p.name for _, p in latest[-3:])}); continue it with resume=auto, train elsewhere with "
                "out_dir=<another directory>, or delete that directory"
            )
        return None
    if resume == "auto":
        if not latest:
            return None
        skipped = []
        for _, path in reversed(latest):
            problem = checkpoint_problem(path)
            if problem is None:
                if skipped:
                    _say(f"resume=auto: resuming from {path}, the newest valid checkpoint ({len(skipped)} newer one(s) "
                         "skipped above)")
                return path
            _say(f"resume=auto: skipping {path.name}: {problem}")
            skipped.append(f"{path.name}: {problem}")
        raise ConfigError(
            f"resume=auto: none of the {len(latest)} checkpoint(s) in {Path(out_dir) / 'checkpoints'} can be resumed "
            f"from ({'; '.join(skipped)}); restore one, or move them away to start over"
        )
    if resume is True:
        if not latest:
            raise ConfigError(
                f"resume=true, but out_dir={str(out_dir)!r} holds no checkpoint (looked for "
                f"{Path(out_dir) / 'checkpoints'}/step-*.ckpt); use resume=auto to start fresh when there is none"
            )
        path = latest[-1][1]
    else:
        path = Path(str(resume)).expanduser()
        if not path.exists():
            raise ConfigError(f"resume={resume!r}: no checkpoint at that path; allowed: false, true, auto, or a path")
    problem = checkpoint_problem(path)
    if problem is not None:
        shown = "true" if resume is True else str(resume)
        fallback = "; resume=auto falls back to the newest valid checkpoint" if len(latest) > 1 else ""
        raise ConfigError(f"resume={shown}: {problem}{fallback}")
    return path


def read_checkpoint_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint's non-tensor entries (``step``, ``config``, ...) without reading the weights into memory."""
    try:
        if path.is_dir():  # a sharded checkpoint: rank 0 wrote everything but the model and optimizer to meta.pt
            meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        else:
            meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"resume: {path} is not a readable checkpoint ({reason})") from e
    if not isinstance(meta, Mapping) or "config" not in meta or "step" not in meta:
        raise ConfigError(f"resume: {path} was not written by a lightning_thunder recipe (it has no step or config)")
    return {k: v for k, v in meta.items() if k not in ("model", "optimizer")}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resolved_model(model: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``litgpt.Config`` fields of a config's ``model`` section (``None`` when LitGPT refuses it)."""
    import dataclasses

    from lightning_thunder.recipes.model import litgpt_config

    try:
        return dataclasses.asdict(litgpt_config(model["name"], dict(model.get("overrides") or {})))
    except (ConfigError, KeyError, TypeError):
        return None


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`ConfigError` listing the keys in :data:`RESUME_MUST_MATCH` whose values differ between the
    checkpoint's config ``saved`` and the run's ``current`` one.

    The model is compared as LitGPT builds it (``model.name`` and ``model.overrides`` resolved into a
    ``litgpt.Config``), so an override equal to the model's default (``n_layer: 6`` on pythia-14m) is no change.
    """
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(old) | set(new) if any(k == m or k.startswith(m) for m in RESUME_MUST_MATCH))
    old_model, new_model = _resolved_model(saved.get("model", {})), _resolved_model(current.get("model", {}))
    if old_model is not None and new_model is not None:
        keys = [k for k in keys if not k.startswith("model.")]
        old.update({f"model.{k}": v for k, v in old_model.items()})
        new.update({f"model.{k}": v for k, v in new_model.items()})
        keys += sorted(f"model.{k}" for k in set(old_model) | set(new_model))
    diffs = [f"{k}: {old.get(k, '(unset)')!r} in the checkpoint, {new.get(k, '(unset)')!r} now" for k in keys
             if old.get(k) != new.get(k)]
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: the model, the data and the batch settings must be those it was trained "
            "with; " + "; ".join(diffs)
        )


def save_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """``fabric.save(path, state)``: the thunder strategies write atomically (a crash mid-write leaves the previous
    checkpoints intact, no partial ``step-*.ckpt`` and no temporary file outside ``checkpoints/``) and record the
    checkpoint's SHA-256 beside it (see :mod:`lightning_thunder.strategies.checkpoint`)."""
    fabric.save(path, state)


def rng_state() -> dict[str, Any]:
    """torch's global RNG state (and every CUDA device's, when CUDA is initialized)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
