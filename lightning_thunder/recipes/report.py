"""What a recipe run shows: a progress bar (on a terminal) with one log line per ``train.log_interval``, the peak
memory, and the final summary (also written as ``summary.json``)."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["PretrainResult", "Progress", "peak_memory_bytes", "describe_outputs", "format_summary", "write_summary"]


@dataclass
class PretrainResult:
    """What a run did; :func:`~lightning_thunder.recipes.pretrain` returns it on every rank."""

    out_dir: str
    #: Steps trained by this run: ``first_step`` to ``last_step`` (``first_step > last_step`` when nothing was left).
    first_step: int
    last_step: int
    max_steps: int
    #: Training loss (mean over ranks and micro-batches) at every logged step.
    train_losses: dict[int, float] = field(default_factory=dict)
    #: Validation loss at every validation.
    val_losses: dict[int, float] = field(default_factory=dict)
    #: Tokens per second over all ranks, training steps after the first one of the run (compilation) only.
    tokens_per_sec: float | None = None
    tokens: int = 0
    #: Peak memory over ranks: CUDA's peak allocated on GPU, the process's peak resident set size on CPU.
    peak_memory_gib: float | None = None
    peak_memory_kind: str = ""
    wall_time_s: float = 0.0
    compile_time_s: float | None = None
    resumed_from: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    log_dir: str | None = None


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """``(bytes, what)``: CUDA's peak allocated on ``device``, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA peak allocated"
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak CPU RSS"


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal; log lines are printed either way (above the bar)."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
        self._enabled = enabled

    def update(self, postfix: dict[str, str]) -> None:
        """One step done."""
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def write(self, line: str) -> None:
        """Print a line (rank 0 only)."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def describe_outputs(out_dir: Path, log_dir: Path | None) -> list[str]:
    """One line per output: config, summary, each checkpoint (a sharded one counts as one), this run's logs."""
    lines = []
    for name in ("config.yaml", "summary.json"):
        if (out_dir / name).is_file():
            lines.append(f"{out_dir / name}")
    ckpts = sorted((out_dir / "checkpoints").glob("step-*.ckpt")) if (out_dir / "checkpoints").is_dir() else []
    for path in ckpts:
        kind = "directory of shards" if path.is_dir() else "file"
        lines.append(f"{path} ({kind}, {_human(_size(path))})")
    if log_dir is not None and log_dir.is_dir():
        for path in sorted(p for p in log_dir.iterdir() if p.is_file()):
            lines.append(f"{path}")
    return lines


def format_summary(result: PretrainResult, outputs: list[str]) -> str:
    """The text printed at the end of a run."""
    steps = result.last_step - result.first_step + 1
    lines = [
        f"Training finished: steps {result.first_step}-{result.last_step} of {result.max_steps} ({steps} this run) in "
        f"{result.wall_time_s:.1f} s"
        + (f", {result.compile_time_s:.1f} s of it compiling" if result.compile_time_s is not None else "")
        + (f"; resumed from {result.resumed_from}" if result.resumed_from else "")
    ]
    if result.train_losses:
        first_step, last_step = min(result.train_losses), max(result.train_losses)
        lines.append(
            f"  train loss {result.train_losses[first_step]:.4f} at step {first_step} -> "
            f"{result.train_losses[last_step]:.4f} at step {last_step}"
        )
    if result.val_losses:
        step = max(result.val_losses)
        history = ", ".join(f"{v:.4f} (step {s})" for s, v in sorted(result.val_losses.items()))
        lines.append(f"  validation loss {result.val_losses[step]:.4f} at step {step}; all: {history}")
    if result.tokens_per_sec is not None:
        wall = result.tokens / result.wall_time_s if result.wall_time_s > 0 else 0.0
        lines.append(
            f"  throughput {result.tokens_per_sec:,.0f} tokens/s in training steps (all ranks; the steps after the "
            f"run's first, which compiles; validation and checkpointing excluded); wall clock {wall:,.0f} tokens/s "
            f"({result.tokens:,} tokens this run over its {result.wall_time_s:.1f} s: start-up, compilation, "
            "validation and checkpoints included)"
        )
    if result.peak_memory_gib is not None:
        lines.append(f"  memory: {result.peak_memory_kind} {result.peak_memory_gib:.2f} GiB (max over ranks)")
    lines.append(f"  outputs in {result.out_dir}:")
    lines += [f"    {line}" for line in outputs]
    lines.append(
        "  continue this run with resume=auto and a larger train.max_steps; metrics.csv has every logged figure"
    )
    return "\n".join(lines)


def write_summary(result: PretrainResult, path: Path) -> None:
    """Write ``result`` as JSON (losses keyed by step), atomically."""
    data: dict[str, Any] = asdict(result)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    partial.replace(path)
