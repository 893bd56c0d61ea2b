"""The monitors' plots: matplotlib figures with real axes and ticks, a loss panel, one line per device count,
and a clear message (not a crash) where matplotlib is missing."""

from __future__ import annotations

import sys
import warnings

import pytest

from lightning_thunder.callbacks import MemoryMonitor, ThroughputMonitor
from lightning_thunder.callbacks.plot import Panel, Series, plot_figure, write_plot
from tests.callbacks.models import check_png

pytest.importorskip("matplotlib", reason="matplotlib is part of the `test` extra")


def test_a_plot_has_real_axes_ticks_labels_and_reference_lines(tmp_path):
    panels = [
        Panel("throughput", [Series("tokens/s", [(s, 1000.0 + 10 * s) for s in range(1, 40)])], ylabel="tokens/s",
              references=[("steady state 1,200 tokens/s", 1200.0)]),
        Panel("memory", [Series("a", [(1, 1.5)]), Series("b", [])], ylabel="GiB"),
    ]
    figure = plot_figure(panels)
    top, bottom = figure.axes
    assert top.get_title(loc="left") == "throughput" and top.get_ylabel() == "tokens/s"
    assert bottom.get_xlabel() == "step"
    assert len(top.get_yticks()) > 3 and len(bottom.get_xticks()) > 3  # ticks, not only 0 and the maximum
    assert [line.get_label() for line in top.get_lines()] == ["tokens/s", "steady state 1,200 tokens/s"]
    assert [text.get_text() for text in top.get_legend().get_texts()] == ["tokens/s", "steady state 1,200 tokens/s"]
    width, height = check_png(write_plot(tmp_path / "sub" / "plot.png", panels))
    assert (width, height) == (800, 520)
    with pytest.raises(ValueError, match="at least one Panel"):
        write_plot(tmp_path / "x.png", [])


def _monitor_with_history(world_size: int) -> ThroughputMonitor:
    monitor = ThroughputMonitor(length_fn=lambda b: 1)
    monitor._world_size = world_size
    for step in range(1, 6):
        metrics = {"throughput/global/tokens_per_sec": 100.0 * world_size, "throughput/device/tokens_per_sec": 100.0}
        monitor.history.append((step, metrics))
        monitor.losses.append((step, 5.0 - step / 2))
    return monitor


def test_throughput_plot_one_line_on_one_device_and_a_loss_panel(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figures.append(self),
                                                                                    real(self, *a, **k))[1])
    _monitor_with_history(1).write_plot(tmp_path / "one.png")
    _monitor_with_history(2).write_plot(tmp_path / "two.png")
    one, two = figures
    assert [ax.get_title(loc="left") for ax in one.axes] == ["throughput, windowed over 50 batches", "training loss"]
    assert [line.get_label() for line in one.axes[0].get_lines()] == ["tokens/s"]  # no hidden "all ranks" line
    assert [line.get_label() for line in two.axes[0].get_lines()] == ["all ranks", "this device"]
    assert two.axes[1].get_title(loc="left") == "training loss (rank 0)"
    assert list(one.axes[1].get_lines()[0].get_ydata()) == [4.5, 4.0, 3.5, 3.0, 2.5]


def test_without_matplotlib_the_monitors_say_so_and_train_on(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.warns(UserWarning, match=r"ThroughputMonitor's throughput.png needs matplotlib, which is not "
                                         r"installed: pip install 'lightning-thunder-ext\[plot\]'.*or pass plot=False"):
        monitor = ThroughputMonitor()
    assert "plot" in monitor.unavailable
    monitor._write_plot_at_end(tmp_path, "throughput.png")  # skipped, no error
    assert monitor.plot_path is None and not any(tmp_path.iterdir())
    with pytest.warns(UserWarning, match=r"MemoryMonitor's memory.png needs matplotlib"):
        MemoryMonitor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ThroughputMonitor(plot=False)  # no warning when no plot is asked for
