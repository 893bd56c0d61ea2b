"""The debug recipe trains on CPU as users run it (`python -m lightning_thunder.recipes.pretrain`, a fresh
interpreter each), and a run resumed from a checkpoint in a fresh process continues with the identical next loss."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_thunder.recipes import ConfigError, load_config, pretrain
from lightning_thunder.recipes.checkpoints import list_checkpoints, resolve_resume
from lightning_thunder.recipes.cli import main

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "examples" / "recipes" / "debug.yaml"
# The debug recipe as it is (pythia-14m-sized, bytes of the standard library, thunder, 32-true), for 4 steps:
# every step logged, validation and a checkpoint every 2 steps.
FEW_STEPS = ["train.max_steps=4", "train.log_interval=1", "train.save_interval=2", "eval.interval=2",
             "eval.max_iters=2", "accelerator=cpu"]


def _pretrain(*overrides: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_thunder.recipes.pretrain", "--config", str(DEBUG), *FEW_STEPS, *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"pretrain {overrides} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    out_dir = tmp_path_factory.mktemp("debug") / "out"
    return out_dir, _pretrain(f"out_dir={out_dir}", "resume=false")


@pytest.mark.slow
def test_debug_recipe_trains_a_few_steps_on_cpu(first_run):
    out_dir, stdout = first_run
    assert "model pythia-14m" in stdout and "strategy thunder on 1 cpu device(s), precision 32-true" in stdout
    assert "data: " in stdout and "Python standard library" in stdout
    for step in range(1, 5):
        assert f"step {step}/4 | loss " in stdout
    assert "step 2 | validation loss" in stdout and f"step 4 | saved {out_dir}/checkpoints/step-000004.ckpt" in stdout
    assert "ThroughputMonitor:" in stdout and "MemoryMonitor:" in stdout and "CompileReport:" in stdout
    assert "Training finished: steps 1-4 of 4" in stdout and "tokens/s" in stdout and "peak CPU RSS" in stdout

    summary = json.loads((out_dir / "summary.json").read_text())
    losses = {int(k): v for k, v in summary["train_losses"].items()}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(int(k) for k in summary["val_losses"]) == [2, 4]
    assert 5.0 < losses[1] < 6.5  # ~ln(256) = 5.55 from a fresh byte-level model
    assert losses[4] < losses[1]
    assert summary["tokens_per_sec"] > 0 and summary["peak_memory_gib"] > 0 and summary["tokens"] == 4 * 8 * 256
    assert [step for step, _ in list_checkpoints(out_dir)] == [2, 4]
    assert not [p for p in (out_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial writes
    assert load_config(out_dir / "config.yaml").train.max_steps == 4  # the resolved config, reloadable
    with open(Path(summary["log_dir"]) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert logged == losses
    assert any(r.get("val/loss") for r in rows) and any(r.get("throughput/global/tokens_per_sec") for r in rows)


@pytest.mark.slow
def test_resume_in_a_fresh_process_gives_the_identical_next_loss(first_run, tmp_path):
    """resume=auto over a copy of the run whose latest checkpoint had a bit flipped: it says so, falls back to
    step 2, and steps 3 and 4 compute exactly the losses of the uninterrupted run."""
    out_dir, _ = first_run
    shutil.copytree(out_dir / "checkpoints", tmp_path / "checkpoints")
    corrupt = tmp_path / "checkpoints" / "step-000004.ckpt"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x10
    corrupt.write_bytes(bytes(data))
    checkpoint = tmp_path / "checkpoints" / "step-000002.ckpt"
    stdout = _pretrain(f"out_dir={tmp_path}", "resume=auto")
    assert f"resume=auto: skipping step-000004.ckpt: checkpoint {corrupt} is corrupt: {corrupt}" in stdout
    assert f"resume=auto: resuming from {checkpoint}, the newest valid checkpoint (1 newer one(s) skipped" in stdout
    assert f"resumed from {checkpoint} at step 2: continuing with step 3" in stdout
    first = json.loads((out_dir / "summary.json").read_text())
    resumed = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(resumed["train_losses"]) == ["3", "4"]
    for step in ("3", "4"):  # bit for bit, not approximately
        assert resumed["train_losses"][step] == first["train_losses"][step], step
    assert resumed["val_losses"]["4"] == first["val_losses"]["4"]
    a = torch.load(out_dir / "checkpoints" / "step-000004.ckpt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints" / "step-000004.ckpt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["tokens"] == b["tokens"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])


@pytest.mark.slow
def test_resume_choices_on_a_finished_run(first_run, capsys):
    out_dir, _ = first_run
    done = ["--config", str(DEBUG), *FEW_STEPS, f"out_dir={out_dir}"]
    # auto: the latest checkpoint is at max_steps, nothing to do (returns before building anything)
    assert main(["pretrain", *done, "resume=auto"]) == 0
    assert "step-000004.ckpt is at step 4, train.max_steps=4: nothing left to train" in capsys.readouterr().out
    # false: refuses to mix a fresh run into a directory with checkpoints
    assert main(["pretrain", *done, "resume=false"]) == 2
    assert "resume=false, but out_dir=" in capsys.readouterr().err
    # another model cannot resume from these weights
    changed = [*done, "resume=auto", "train.max_steps=6", "model.overrides.n_layer=3", "train.micro_batch_size=4",
               "train.global_batch_size=4"]
    assert main(["pretrain", *changed]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "model.n_layer: 6 in the checkpoint, 3 now" in err
    assert "train.micro_batch_size: 8 in the checkpoint, 4 now" in err
    # an override equal to the model's default is no change (pythia-14m has 6 layers)
    assert main(["pretrain", *done, "resume=auto", "model.overrides.n_layer=6"]) == 0
    assert "nothing left to train" in capsys.readouterr().out


def _recipe_checkpoint(path: Path, step: int) -> Path:
    """A small checkpoint as a recipe writes it (metadata, weights), with its checksum."""
    from lightning_thunder.recipes.config import to_dict
    from lightning_thunder.strategies.checkpoint import write_checksums

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.randn(64, 64)}, "step": step, "config": to_dict(load_config(DEBUG))}, path)
    write_checksums(path, path)
    return path


def test_resolve_resume(tmp_path):
    assert resolve_resume(False, tmp_path) is None and resolve_resume("auto", tmp_path) is None
    with pytest.raises(ConfigError, match=r"resume=true, but out_dir=.* holds no checkpoint"):
        resolve_resume(True, tmp_path)
    with pytest.raises(ConfigError, match=r"resume='nowhere.ckpt': no checkpoint at that path"):
        resolve_resume("nowhere.ckpt", tmp_path)
    for step in (10, 2):
        _recipe_checkpoint(tmp_path / "checkpoints" / f"step-{step:06d}.ckpt", step)
    for name in (".step-000020.ckpt.partial", "notes.txt"):
        (tmp_path / "checkpoints" / name).write_text("")
    assert resolve_resume("auto", tmp_path).name == resolve_resume(True, tmp_path).name == "step-000010.ckpt"
    with pytest.raises(ConfigError, match=r"already holds checkpoints of an earlier run \(step-000002.ckpt, "
                                          r"step-000010.ckpt\); continue it with resume=auto"):
        resolve_resume(False, tmp_path)


def test_resume_auto_falls_back_to_the_newest_valid_checkpoint_and_says_so(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _recipe_checkpoint(folder / f"step-{step:06d}.ckpt", step)
    newest = folder / "step-000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:-500])  # truncated, as by a full disk
    (folder / "step-000004.ckpt.sha256").unlink()  # written before checksums: checked by reading it
    assert resolve_resume("auto", tmp_path) == folder / "step-000004.ckpt"
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"resume=auto: skipping step-000006.ckpt: checkpoint {newest} is corrupt: {newest} (")
    assert out[1] == (f"resume=auto: resuming from {folder / 'step-000004.ckpt'}, the newest valid checkpoint (1 newer "
                      "one(s) skipped above)")
    # Asked for by name or as the latest, a damaged checkpoint is an error naming it.
    with pytest.raises(ConfigError, match=rf"resume=true: checkpoint {newest} is corrupt: .*; resume=auto falls back "
                                          r"to the newest valid checkpoint"):
        resolve_resume(True, tmp_path)
    (folder / "step-000004.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"resume=.*step-000004.ckpt: .*step-000004.ckpt is not a readable "
                                          r"checkpoint"):
        resolve_resume(str(folder / "step-000004.ckpt"), tmp_path)
    (folder / "step-000002.ckpt.sha256").write_text("0" * 64 + "  step-000002.ckpt\n")
    with pytest.raises(ConfigError, match=r"resume=auto: none of the 3 checkpoint\(s\) in .* can be resumed from "
                                          r"\(step-000006.ckpt: .*; step-000004.ckpt: .*; step-000002.ckpt: .*\); "
                                          r"restore one, or move them away to start over"):
        resolve_resume("auto", tmp_path)


def test_a_damaged_checkpoint_is_one_error_line_from_the_cli(tmp_path, capsys):
    path = _recipe_checkpoint(tmp_path / "checkpoints" / "step-000002.ckpt", 2)
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["pretrain", "--config", str(DEBUG), f"out_dir={tmp_path}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: resume=true: checkpoint {path} is corrupt: {path} (") and err.count("\n") == 1


def test_a_checkpoint_from_elsewhere_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"model": {}, "step": 3}, path)
    with pytest.raises(ConfigError, match=r"was not written by a lightning_thunder recipe"):
        pretrain(load_config(DEBUG, [f"resume={path}", f"out_dir={tmp_path / 'out'}"]))
