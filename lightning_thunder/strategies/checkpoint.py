"""Atomic checkpoint writes for every thunder strategy.

Lightning's ``ModelParallelStrategy`` writes a full checkpoint with a plain ``torch.save(path)`` and a
sharded one straight into the target directory, and its single-device and DDP strategies write through
a temporary file that is *moved* (a copy, when ``/tmp`` is another file system), so a crash mid-write
leaves a truncated file or a directory of partial shards where the previous good checkpoint was. Here
every rank writes into a sibling ``.<name>.partial`` path first; once all ranks are done, rank 0 moves
it into place (``os.replace`` for a file: atomic; a directory replaces the old one by two renames).
The mixins :class:`AtomicFabricSave` and :class:`AtomicTrainerSave` give a strategy this behaviour.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from typing_extensions import override

__all__ = ["AtomicFabricSave", "AtomicTrainerSave", "atomic_checkpoint_path", "is_sharded_checkpoint"]

_SHARDED_MARKERS = ("meta.pt", ".metadata")


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory written by a sharded (distributed) checkpoint save."""
    return path.is_dir() and any((path / marker).is_file() for marker in _SHARDED_MARKERS)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_into_place(partial: Path, path: Path) -> None:
    if partial.is_file() and not path.is_dir():
        os.replace(partial, path)  # atomic on POSIX
        return
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    if path.exists():
        os.replace(path, old)
    os.replace(partial, path)
    _remove(old)


@contextmanager
def atomic_checkpoint_path(
    path: Path, *, sharded: bool, is_global_zero: bool, barrier: Callable[[], None]
) -> Iterator[Path]:
    """Yield the temporary path every rank writes the checkpoint to; move it to ``path`` when all are done.

    Must be entered on every rank with the same ``path`` (broadcast it first). An existing checkpoint at
    ``path`` (file or sharded directory) is replaced; any other directory there raises ``IsADirectoryError``
    rather than being deleted.
    """
    if path.is_dir() and not is_sharded_checkpoint(path):
        kind = "sharded" if sharded else "full"
        raise IsADirectoryError(
            f"cannot save a {kind} checkpoint to {str(path)!r}: it is a directory that is not a checkpoint; "
            "choose another path or remove the directory"
        )
    partial = path.with_name(f".{path.name}.partial")
    if is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(partial)  # left over from an interrupted save
    barrier()
    yield partial
    barrier()  # every rank has written its part
    if is_global_zero:
        if not partial.exists():
            raise FileNotFoundError(f"the checkpoint was not written to {str(partial)!r}")
        _move_into_place(partial, path)
    barrier()


class AtomicFabricSave:
    """Mixin for Fabric strategies: ``save_checkpoint`` writes atomically (see the module docstring)."""

    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,  # noqa: A002 - Lightning's signature
    ) -> None:
        """Save as the Lightning strategy does, into a temporary sibling path moved into place at the end."""
        target = Path(self.broadcast(path))
        sharded = bool(getattr(self, "_save_distributed_checkpoint", False))
        with atomic_checkpoint_path(
            target, sharded=sharded, is_global_zero=self.is_global_zero, barrier=self.barrier
        ) as partial:
            super().save_checkpoint(partial, state, storage_options=storage_options, filter=filter)


class AtomicTrainerSave:
    """Mixin for Trainer strategies: ``save_checkpoint`` writes atomically (see the module docstring)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save as the Lightning strategy does, into a temporary sibling path moved into place at the end."""
        target = Path(self.broadcast(filepath))
        sharded = bool(getattr(self, "_save_distributed_checkpoint", False))
        with atomic_checkpoint_path(
            target, sharded=sharded, is_global_zero=self.is_global_zero, barrier=self.barrier
        ) as partial:
            super().save_checkpoint(checkpoint, partial, storage_options=storage_options)
