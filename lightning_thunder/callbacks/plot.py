"""The monitors' PNG plots, drawn with matplotlib (the optional extra ``plot``: ``pip install
'lightning-thunder-ext[plot]'``).

A plot is a stack of :class:`Panel` s sharing the step axis, each with a title, a y label, a legend when it has
several lines, and one or more :class:`Series` of ``(step, value)`` points; a panel may carry horizontal reference
lines (the steady-state rate). Without matplotlib the monitors say so once, in a warning and in their summary, and
train on without the plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOT_INSTALL", "Panel", "Series", "matplotlib_missing", "plot_figure", "write_plot"]

#: How to get what the plots need.
PLOT_INSTALL = "pip install 'lightning-thunder-ext[plot]' (or `pip install matplotlib`)"


@dataclass
class Series:
    """One line: ``points`` are ``(step, value)`` pairs (non-finite values are skipped)."""

    label: str
    points: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Panel:
    """One chart of the stack: a title, the y axis label, its lines and horizontal reference lines
    (``(label, value)``); ``from_zero``: the y axis starts at 0 (rates and sizes; a loss is drawn zoomed)."""

    title: str
    series: list[Series] = field(default_factory=list)
    ylabel: str = ""
    references: list[tuple[str, float]] = field(default_factory=list)
    from_zero: bool = True


def matplotlib_missing(what: str = "plotting") -> str | None:
    """``None`` when matplotlib can be imported, else the message saying how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"{what} needs matplotlib, which is not installed: {PLOT_INSTALL}"
    return None


def plot_figure(panels: Sequence[Panel], *, width: float = 8.0, panel_height: float = 2.6) -> Figure:
    """The matplotlib ``Figure`` of ``panels`` stacked top to bottom (sizes in inches), without pyplot's global
    state. Raises ``ImportError`` naming the install command when matplotlib is missing."""
    if not panels:
        raise ValueError("plot_figure needs at least one Panel")
    missing = matplotlib_missing("plot_figure")
    if missing is not None:
        raise ImportError(missing)
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    figure = Figure(figsize=(width, panel_height * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        drawn, largest = 0, 0.0
        for series in panel.series:
            points = [(s, v) for s, v in series.points if math.isfinite(v)]
            if points:
                steps, values = zip(*points)
                largest = max(largest, *(abs(v) for v in values))
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=series.label)
                drawn += 1
        for label, value in panel.references:
            if math.isfinite(value):
                ax.axhline(value, linestyle="--", linewidth=1, color="0.4", label=label)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
        if panel.from_zero and drawn:
            low, high = ax.get_ylim()
            low = min(0.0, low)
            ax.set_ylim(low, high + 0.05 * (high - low))  # from zero, with room above the highest point
        ax.set_title(panel.title, loc="left", fontsize=10)
        ax.set_ylabel(panel.ylabel)
        if largest >= 1e4:  # 12k, 1.5M rather than an offset or 1e6 notation (small values keep plain ticks)
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    return figure


def write_plot(path: str | Path, panels: Sequence[Panel], *, width: float = 8.0, panel_height: float = 2.6) -> Path:
    """Draw ``panels`` (see :func:`plot_figure`) and write them to ``path`` as a PNG; returns the path."""
    figure = plot_figure(panels, width=width, panel_height=panel_height)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    return path
