"""Checkpoints that defend themselves: atomic writes beside the target, checksums written with them and checked on
load, for every thunder strategy.

**Atomic.** Lightning's ``ModelParallelStrategy`` writes a full checkpoint with a plain ``torch.save(path)`` and a
sharded one straight into the target directory, and its single-device and DDP strategies write through a temporary
file in ``$TMPDIR`` that is then *moved* (a copy, when ``/tmp`` is another file system; a kill mid-save leaves a
checkpoint-sized file there). Here every rank writes into a sibling ``.<name>.partial`` path (a file is written by
:class:`SiblingCheckpointIO` directly, no temporary elsewhere); once all ranks are done, rank 0 moves it into place
(``os.replace`` for a file: atomic; a directory replaces the old one by two renames). Leftovers of a writer that was
killed (``.<name>.partial``, ``.<name>.old`` in the checkpoint's directory) are removed at the next save there: a
directory of checkpoints has one writer at a time.

**Checksums.** Before the move, rank 0 records the SHA-256 of what was written: ``<name>.sha256`` beside a file
checkpoint, ``checksums.sha256`` inside a sharded directory (one line per shard), both in ``sha256sum`` format
(``sha256sum -c`` checks them by hand). :func:`verify_checkpoint` checks them: a changed byte, a truncated file or a
missing shard raises :class:`CheckpointError` naming the file. The strategies' ``load_checkpoint`` verifies on rank
0 and raises the same one-line error on every rank. A checkpoint written without checksums (by an earlier version,
or another tool) loads unverified; a sharded one is still checked for shards its ``.metadata`` names but lacks.

The mixins :class:`AtomicFabricSave` and :class:`AtomicTrainerSave` give a strategy this behaviour.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

__all__ = [
    "CHECKSUMS",
    "AtomicFabricSave",
    "AtomicTrainerSave",
    "CheckpointError",
    "SiblingCheckpointIO",
    "atomic_checkpoint_path",
    "checksum_file",
    "is_sharded_checkpoint",
    "remove_checkpoint_files",
    "remove_stale_temporaries",
    "verify_checkpoint",
    "write_checksums",
]

_SHARDED_MARKERS = ("meta.pt", ".metadata")
#: The checksum manifest inside a sharded checkpoint directory.
CHECKSUMS = "checksums.sha256"
#: Temporary names this module writes: ``.<name>.partial`` and ``.<name>.old``.
_TEMPORARY = re.compile(r"^\..+\.(partial|old)$")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt or incomplete; the message names the file and what is wrong with it."""


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory written by a sharded (distributed) checkpoint save."""
    return path.is_dir() and any((path / marker).is_file() for marker in _SHARDED_MARKERS)


def checksum_file(path: Path) -> Path:
    """Where the checksums of the checkpoint at ``path`` are: ``<path>/checksums.sha256`` for a directory,
    ``<path>.sha256`` beside a file."""
    return path / CHECKSUMS if path.is_dir() else path.with_name(path.name + ".sha256")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported here (e.g. some network file systems): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _move_into_place(partial: Path, path: Path) -> None:
    if partial.is_file() and not path.is_dir():
        os.replace(partial, path)  # atomic on POSIX
    else:
        old = path.with_name(f".{path.name}.old")
        _remove(old)
        if path.exists():
            os.replace(path, old)
        os.replace(partial, path)
        _remove(old)
    _fsync_directory(path.parent)


def _write_text_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove ``.<name>.partial`` / ``.<name>.old`` files and directories in ``folder`` (left by a writer that was
    killed mid-save); returns what was removed."""
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if _TEMPORARY.match(entry.name):
                _remove(entry)
                removed.append(entry)
    return removed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(root: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each file (threads: hashlib releases the GIL, so the shards of a large checkpoint hash in
    parallel)."""
    if len(names) <= 1:
        return {name: _sha256(root / name) for name in names}
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(root / name), names)))


def write_checksums(written: Path, target: Path) -> Path:
    """Record the SHA-256 of the checkpoint just written at ``written`` (a file or a sharded directory), which is
    about to become ``target``; returns the checksum file. A file's line names ``target`` (the file it will be)."""
    if written.is_dir():
        names = sorted(str(p.relative_to(written)) for p in written.rglob("*") if p.is_file() and p.name != CHECKSUMS)
        sums = _hash_files(written, names)
        manifest = written / CHECKSUMS
        _write_text_atomically(manifest, "".join(f"{sums[name]}  {name}\n" for name in names))
        return manifest
    sidecar = target.with_name(target.name + ".sha256")
    _write_text_atomically(sidecar, f"{_sha256(written)}  {target.name}\n")
    return sidecar


def _read_manifest(path: Path) -> dict[str, str]:
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CheckpointError(f"{path} is not a checksum file (line {number}: {line[:80]!r})")
        entries[name.strip()] = digest
    return entries


_VERIFIED: dict[str, tuple] = {}  # checkpoint -> the (name, size, mtime) of its files when it was last verified


def _signature(path: Path) -> tuple:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path, checksum_file(path)]
    return tuple(sorted((str(p), *((s := p.stat()).st_size, s.st_mtime_ns)) for p in files if p.exists()))


def verify_checkpoint(path: str | Path) -> bool:
    """Check the checkpoint at ``path`` against the checksums written with it.

    Returns ``True`` when every file matches, ``False`` when no checksums were written with it (a checkpoint of an
    earlier version or another tool: a sharded one is then only checked for the shards its ``.metadata`` names).
    A checkpoint already verified in this process and unchanged since is not read again.

    Raises:
        CheckpointError: a file differs from its checksum (a changed byte, a truncated file) or is missing; the
            message names the file.
        FileNotFoundError: there is nothing at ``path``.
    """
    path = Path(path).resolve()  # a link (``last.ckpt``) is checked as the checkpoint it points to
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    signature = _signature(path)
    if _VERIFIED.get(str(path)) == signature:
        return True
    manifest = checksum_file(path)
    if not manifest.is_file():
        if path.is_dir():
            _check_dcp_files(path)
        return False
    expected = _read_manifest(manifest)
    if not path.is_dir():
        expected = {path.name: next(iter(expected.values()))} if len(expected) == 1 else expected
    root = path if path.is_dir() else path.parent
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
            f"(listed in {manifest.name} when it was written); restore the file(s) or use an earlier checkpoint"
        )
    actual = _hash_files(root, sorted(expected))
    for name in sorted(expected):
        if actual[name] != expected[name]:
            size = (root / name).stat().st_size
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {root / name} ({size:,} bytes) has SHA-256 {actual[name][:16]}..., but "
                f"{manifest.name} recorded {expected[name][:16]}... when it was written (the file changed since: a "
                "disk, copy or transfer error, or an edit); use an earlier checkpoint"
            )
    _VERIFIED[str(path)] = signature
    return True


def _check_dcp_files(path: Path) -> None:
    """For a sharded checkpoint without checksums: the shard files its ``.metadata`` names must all be there."""
    if not (path / ".metadata").is_file():
        return
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data or {}
    except Exception as e:  # noqa: BLE001 - an unreadable .metadata is reported as such, with its cause
        raise CheckpointError(f"checkpoint {path} is unreadable: its .metadata could not be read ({e})") from e
    names = sorted({getattr(info, "relative_path", None) for info in storage.values()} - {None})
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: shard {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"missing ({len(names)} shard files are named in its .metadata); restore them or use an earlier checkpoint"
        )


def remove_checkpoint_files(path: Path) -> None:
    """Remove a checkpoint and the checksums beside it."""
    sidecar = path.with_name(path.name + ".sha256")
    _remove(path)
    _remove(sidecar)


@contextmanager
def atomic_checkpoint_path(
    path: Path, *, sharded: bool, is_global_zero: bool, barrier: Callable[[], None]
) -> Iterator[Path]:
    """Yield the temporary path every rank writes the checkpoint to; record its checksums and move it to ``path``
    when all are done.

    Must be entered on every rank with the same ``path`` (broadcast it first). An existing checkpoint at
    ``path`` (file or sharded directory) is replaced; any other directory there raises ``IsADirectoryError``
    rather than being deleted. Temporaries left in ``path``'s directory by a killed writer are removed first.
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
        remove_stale_temporaries(path.parent)
    barrier()
    yield partial
    barrier()  # every rank has written its part
    if is_global_zero:
        if not partial.exists():
            raise FileNotFoundError(f"the checkpoint was not written to {str(partial)!r}")
        write_checksums(partial, path)
        if partial.is_dir():  # a file checkpoint's checksums, if a sharded one replaces it
            _remove(path.with_name(path.name + ".sha256"))
        _move_into_place(partial, path)
        _VERIFIED.pop(str(path.resolve()), None)
    barrier()


class SiblingCheckpointIO(TorchCheckpointIO):
    """``torch.save`` straight into a temporary file beside the target, then renamed into place.

    Lightning's :class:`~lightning.fabric.plugins.io.TorchCheckpointIO` serializes into memory and writes through
    a temporary file in ``$TMPDIR`` (twice the checkpoint in memory, and a checkpoint-sized file left there when the
    process is killed mid-write). The thunder strategies use this one unless given another ``checkpoint_io``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` through ``.<name>.partial`` beside it."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options (got {storage_options!r}); pass your own "
                "checkpoint_io to the strategy to use them"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Inside an atomic save the target already is a temporary sibling: write it directly.
        partial = target if _TEMPORARY.match(target.name) else target.with_name(f".{target.name}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if partial != target:
                os.replace(partial, target)
        finally:
            if partial != target and partial.exists():
                partial.unlink()

    @override
    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint file and its checksums."""
        remove_checkpoint_files(Path(path))


def _verify_on_rank_zero(strategy: Any, path: Any) -> None:
    """Verify on rank 0 and raise the same :class:`CheckpointError` on every rank (one line, not a traceback per
    rank from deep inside the loader)."""
    error = None
    if strategy.is_global_zero:
        try:
            verify_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as e:
            error = f"{type(e).__name__}: {e}"
    error = strategy.broadcast(error)
    if error is not None:
        kind, _, message = error.partition(": ")
        raise (FileNotFoundError if kind == "FileNotFoundError" else CheckpointError)(message)


class _SiblingIODefault:
    """The strategies' default ``checkpoint_io``: :class:`SiblingCheckpointIO` (a given one is kept)."""

    @property
    def checkpoint_io(self) -> Any:
        """The checkpoint IO plugin (``SiblingCheckpointIO`` unless the strategy was given one)."""
        if self._checkpoint_io is None:
            self._checkpoint_io = SiblingCheckpointIO()
        return super().checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Any) -> None:
        self._checkpoint_io = io


class AtomicFabricSave(_SiblingIODefault):
    """Mixin for Fabric strategies: ``save_checkpoint`` writes atomically with checksums, ``load_checkpoint``
    verifies them (see the module docstring)."""

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

    @override
    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        """Verify the checkpoint's checksums (rank 0), then load as the Lightning strategy does."""
        _verify_on_rank_zero(self, Path(self.broadcast(path)))
        return super().load_checkpoint(path, *args, **kwargs)


class AtomicTrainerSave(_SiblingIODefault):
    """Mixin for Trainer strategies: ``save_checkpoint`` writes atomically with checksums, ``load_checkpoint``
    verifies them, ``remove_checkpoint`` removes the checksums too (see the module docstring)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save as the Lightning strategy does, into a temporary sibling path moved into place at the end."""
        target = Path(self.broadcast(filepath))
        sharded = bool(getattr(self, "_save_distributed_checkpoint", False))
        with atomic_checkpoint_path(
            target, sharded=sharded, is_global_zero=self.is_global_zero, barrier=self.barrier
        ) as partial:
            super().save_checkpoint(checkpoint, partial, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Verify the checkpoint's checksums (rank 0), then load as the Lightning strategy does."""
        _verify_on_rank_zero(self, Path(self.broadcast(checkpoint_path)))
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove the checkpoint (as the Lightning strategy does) and the checksums beside it."""
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            _remove(Path(filepath).with_name(Path(filepath).name + ".sha256"))
