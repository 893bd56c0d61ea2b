"""Tiny models, data and helpers shared by the callback tests (module level, so spawned ranks import them)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from torch import nn

import lightning_thunder
from tests.strategies.helpers import release_process_group

BATCH, FEATURES, HIDDEN = 4, 8, 32


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, FEATURES))


#: Bytes of the MLP's parameters (and of its gradients).
PARAM_BYTES = 4 * (FEATURES * HIDDEN + HIDDEN + HIDDEN * FEATURES + FEATURES)
#: Activations the compiled MLP saves for backward on a [BATCH, FEATURES] input: the input, and the
#: [BATCH, HIDDEN] output of each of the first linear and the GELU (the weight it saves is a parameter).
SAVED_BYTES = 4 * (BATCH * FEATURES + 2 * BATCH * HIDDEN)
#: FLOPs of a training step (2 per multiply-add): both matmuls forward, their weight gradients, and the
#: input gradient of the second one only (the batch does not require grad).
STEP_FLOPS = 2 * BATCH * FEATURES * HIDDEN * (2 + 2 + 1)


def data(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randn(n, FEATURES, generator=g))


def loader(batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data(), batch_size=batch_size)


def tokens(batch) -> int:
    """The "token" count of a batch: elements of its input."""
    return batch[0].numel()


def forward_on_inputs(model: nn.Module, batch) -> torch.Tensor:
    """`step_fn` for ThroughputMonitor under Fabric: the model takes the batch's inputs."""
    return model(batch[0])


class FakeClock:
    """Replaces ThroughputMonitor's clock: each reading advances one second; `advance` adds more."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Regressor(L.LightningModule):
    """An MLP, compiled by lightning_thunder (in `configure_model`, so in each spawned process: a compiled
    module cannot be pickled) unless `compiled=False`; validation may advance a clock."""

    def __init__(self, compiled: bool = True, clock: FakeClock | None = None) -> None:
        super().__init__()
        self.net = mlp()
        self.compiled = compiled
        self.clock = clock

    def configure_model(self) -> None:
        if self.compiled and not isinstance(self.net, lightning_thunder.ThunderModule):
            self.net = lightning_thunder.compile(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        if self.clock is not None and not self.trainer.sanity_checking:
            self.clock.advance(1000.0)  # a slow validation: must not count as training time
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a CSVLogger metrics.csv, empty cells dropped."""
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def column(rows: list[dict[str, float]], name: str) -> list[float]:
    return [row[name] for row in rows if name in row]


def check_png(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, after checking its signature."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def fabric_train(fabric, steps: int, batch_size: int, compiled: bool, callbacks_out: bool = False):
    """A Fabric training loop calling the documented monitor hooks. Batch size may differ per rank.

    Returns the monitors' latest metrics and breakdown (rank 0's are what `fabric.launch` hands back).
    """
    torch.manual_seed(0)
    model = lightning_thunder.compile(mlp()) if compiled else mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)  # -> on_after_setup
    fabric.call("on_train_start")
    g = torch.Generator().manual_seed(fabric.global_rank)
    for _ in range(steps):
        x, y = torch.randn(batch_size, FEATURES, generator=g), torch.randn(batch_size, FEATURES, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()  # -> on_after_optimizer_step
        optimizer.zero_grad()
        fabric.call("on_train_batch_end", batch=(x, y))
    fabric.call("on_train_end")
    monitors = {type(cb).__name__: cb for cb in fabric._callbacks}
    return {
        "throughput": monitors["ThroughputMonitor"].metrics,
        "memory": monitors["MemoryMonitor"].metrics,
        "breakdown": monitors["MemoryMonitor"].breakdown_bytes,
        "flops_per_batch": monitors["ThroughputMonitor"].flops_per_batch,
        "rank": fabric.global_rank,
    }


def fabric_train_two_ranks(fabric, steps: int):
    """Rank r trains on batches of 2 + r samples (so summing and multiplying by the world size differ).
    The rank releases its process group before it returns (see ``release_process_group``)."""
    out = fabric_train(fabric, steps, batch_size=2 + fabric.global_rank, compiled=False)
    release_process_group()
    return out
