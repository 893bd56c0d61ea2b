"""CompileReport: graph breaks and recompiles with their reasons, kernels per step, traces written."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import lightning_thunder
from lightning_thunder.callbacks import CompileReport
from lightning_thunder.callbacks.graphs import kernel_count, training_graphs
from tests.callbacks.models import Regressor, column, loader, read_metrics


class Broken(nn.Module):
    """Two linears with a graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(x)


class BrokenRegressor(Regressor):
    def __init__(self) -> None:
        super().__init__(compiled=False)
        self.net = lightning_thunder.compile(Broken())


def _fit(tmp_path, model, report, steps=3):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=CSVLogger(tmp_path), log_every_n_steps=1,
        callbacks=[report], enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, loader())
    return tmp_path / "lightning_logs" / "version_0"


def test_graph_breaks_are_reported_with_reasons_and_traces_written(tmp_path, capsys):
    model = BrokenRegressor()
    report = CompileReport(write_traces=True)
    log_dir = _fit(tmp_path, model, report)

    rows = read_metrics(log_dir / "metrics.csv")
    assert column(rows, "compile/graph_breaks") == [1, 1, 1]
    assert column(rows, "compile/graphs") == [2, 2, 2]
    assert column(rows, "compile/recompiles") == [0, 0, 0]
    printed = capsys.readouterr().out
    assert "graph break: " in printed and "test_compile_report.py" in printed  # the reason names the line

    # Kernels per step: both graphs' forward and backward, from the traces.
    parts = [model.net]
    graphs = training_graphs(model.net, parts)
    assert len(graphs) == 2
    assert report.kernels_per_step == sum(kernel_count(g.forward) + kernel_count(g.backward) for g in graphs) > 0

    written = sorted(p.relative_to(log_dir).as_posix() for p in report.written)
    assert any(p.endswith("graph0/00-torch.py") for p in written)
    assert any("/graph1/" in p and p.endswith("backward-final.py") for p in written)
    for path in report.written:
        compile(path.read_text(), str(path), "exec")  # every written trace is valid Python


def test_a_recompile_is_printed_when_it_happens(tmp_path, capsys):
    class Growing(Regressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx == 2:  # a new shape: Dynamo recompiles (dynamic=False keeps it a recompile)
                x, y = torch.cat([x, x]), torch.cat([y, y])
            return nn.functional.mse_loss(self.net(x), y)

    model = Growing(compiled=False)
    model.net = lightning_thunder.compile(model.net, dynamic=False)  # compiled here, not in configure_model
    _fit(tmp_path, model, CompileReport(), steps=4)
    printed = capsys.readouterr().out
    assert "CompileReport: recompiled: " in printed


def test_uncompiled_model_warns_once_and_logs_nothing(tmp_path):
    report = CompileReport()
    with pytest.warns(UserWarning, match="no module compiled by lightning_thunder") as record:
        log_dir = _fit(tmp_path, Regressor(compiled=False), report)
    assert sum("no module compiled" in str(w.message) for w in record) == 1
    assert not any(name.startswith("compile/") for row in read_metrics(log_dir / "metrics.csv") for name in row)
    assert report.stats is None
