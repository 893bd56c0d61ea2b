"""Checkpoints of the thunder strategies defend themselves: written beside the target (nothing in $TMPDIR) and moved
into place, with a SHA-256 that loading checks; a changed byte, a truncated file or a missing shard is one error
naming the file; what a killed writer left behind is removed at the next save."""

from __future__ import annotations

import hashlib
import tempfile
import warnings

import pytest
import torch
from lightning.fabric import Fabric

from lightning_thunder.strategies.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    SiblingCheckpointIO,
    atomic_checkpoint_path,
    verify_checkpoint,
)


@pytest.fixture
def fabric_and_model():
    fabric = Fabric(accelerator="cpu", devices=1, strategy="thunder")
    return fabric, fabric.setup(torch.nn.Linear(4, 4))


def _flip_a_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_save_writes_beside_the_target_with_its_checksum(tmp_path, monkeypatch, fabric_and_model):
    fabric, model = fabric_and_model
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where Lightning's own save writes its temporary file
    path = tmp_path / "out" / "ckpt.pt"
    fabric.save(path, {"model": model, "step": 1})
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt", "ckpt.pt.sha256"]
    assert not any(scratch.iterdir())
    # sha256sum's format: `sha256sum -c ckpt.pt.sha256` checks it by hand.
    assert (path.parent / "ckpt.pt.sha256").read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  ckpt.pt\n"
    assert verify_checkpoint(path) is True
    assert fabric.load(path)["step"] == 1


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch, fabric_and_model):
    fabric, model = fabric_and_model
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model, "step": 1})
    good = path.read_bytes()
    written_to = []
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        written_to.append(getattr(f, "name", f))
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        fabric.save(path, {"model": model, "step": 2})
    assert written_to == [str(tmp_path / ".ckpt.pt.partial")]  # beside the target
    assert path.read_bytes() == good
    monkeypatch.setattr(torch, "save", real_save)
    fabric.save(path, {"model": model, "step": 3})
    assert fabric.load(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.sha256"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_refused_on_load_naming_the_file(tmp_path, fabric_and_model, damage):
    fabric, model = fabric_and_model
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model, "step": 1})
    if damage == "flip":
        _flip_a_byte(path)
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt: {path} \([\d,]+ bytes\) has SHA-256 "
                                              r"[0-9a-f]{16}\.\.\., but ckpt.pt.sha256 recorded [0-9a-f]{16}\.\.\. "
                                              r"when it was written .*; use an earlier checkpoint"):
        fabric.load(path, {"model": model})


def test_a_checkpoint_without_checksums_loads_unverified(tmp_path, fabric_and_model):
    fabric, model = fabric_and_model
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model, "step": 4})
    (tmp_path / "ckpt.pt.sha256").unlink()  # as written by an earlier version
    assert verify_checkpoint(path) is False
    assert fabric.load(path)["step"] == 4


def test_what_a_killed_writer_left_is_removed_at_the_next_save(tmp_path, fabric_and_model):
    fabric, model = fabric_and_model
    (tmp_path / ".step-000004.ckpt.partial").write_bytes(b"x" * 1000)  # killed mid-write of another checkpoint
    (tmp_path / ".step-000002.ckpt.old").mkdir()  # killed between the two renames of a sharded save
    (tmp_path / "notes.txt").write_text("kept")
    fabric.save(tmp_path / "step-000006.ckpt", {"model": model})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-000006.ckpt", "step-000006.ckpt.sha256"]


def test_removing_a_checkpoint_removes_its_checksum(tmp_path):
    io = SiblingCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "epoch=0.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["epoch=0.ckpt"]  # the IO alone writes no checksum
    (tmp_path / "epoch=0.ckpt.sha256").write_text("")
    io.remove_checkpoint(tmp_path / "epoch=0.ckpt")
    assert not any(tmp_path.iterdir())


def _sharded(path):
    """A directory of shards as an FSDP save writes it (DCP's files plus meta.pt), saved atomically."""
    import torch.distributed.checkpoint as dcp

    with atomic_checkpoint_path(path, sharded=True, is_global_zero=True, barrier=lambda: None) as partial:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save({"w": torch.randn(8, 8)}, checkpoint_id=str(partial))
        torch.save({"step": 2}, partial / "meta.pt")
    return path


def test_a_sharded_checkpoint_has_a_checksum_per_file_and_a_missing_shard_is_named(tmp_path):
    path = _sharded(tmp_path / "step-000002.ckpt")
    listed = [line.split("  ")[1] for line in (path / CHECKSUMS).read_text().splitlines()]
    assert listed == [".metadata", "__0_0.distcp", "meta.pt"]
    assert verify_checkpoint(path) is True
    _flip_a_byte(path / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0.distcp \([\d,]+ bytes\) has SHA-256"):
        verify_checkpoint(path)
    (path / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path} is incomplete: __0_0.distcp is missing \(listed in "
                                              rf"{CHECKSUMS} when it was written\); restore"):
        verify_checkpoint(path)
    (path / CHECKSUMS).unlink()  # written before checksums: the shards named in .metadata are still checked
    with pytest.raises(CheckpointError, match=r"is incomplete: shard __0_0.distcp is missing \(1 shard files are named "
                                              r"in its .metadata\)"):
        verify_checkpoint(path)
