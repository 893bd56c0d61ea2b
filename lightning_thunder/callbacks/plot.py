"""Line plots written as PNG with the standard library only (``zlib``), no plotting package needed.

A plot is a stack of :class:`Panel` s, each with a title, a legend and one or more :class:`Series`
of ``(step, value)`` points, y from ``min(0, lowest)`` to the highest value, x over the steps; the
axis ends are labelled with a built-in 3×5 pixel font (drawn at twice that size).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Panel", "Series", "format_number", "write_plot", "write_png"]

# 3x5 glyphs, rows top to bottom, "1" = ink. Letters are drawn as capitals.
_GLYPHS: dict[str, str] = {
    "0": "111101101101111", "1": "010110010010111", "2": "110001010100111", "3": "110001010001110",
    "4": "101101111001001", "5": "111100110001110", "6": "011100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001110",
    "a": "010101111101101", "b": "110101110101110", "c": "011100100100011", "d": "110101101101110",
    "e": "111100110100111", "f": "111100110100100", "g": "011100101101011", "h": "101101111101101",
    "i": "111010010010111", "j": "001001001101010", "k": "101101110101101", "l": "100100100100111",
    "m": "101111111101101", "n": "110101101101101", "o": "010101101101010", "p": "110101110100100",
    "q": "010101101110011", "r": "110101110101101", "s": "011100010001110", "t": "111010010010010",
    "u": "101101101101111", "v": "101101101101010", "w": "101101111111101", "x": "101101010101101",
    "y": "101101010010010", "z": "111001010100111",
    ".": "000000000000010", "/": "001001010100100", "%": "101001010100101", "-": "000000111000000",
    "_": "000000000000111", "(": "001010010010001", ")": "100010010010100", ":": "000010000010000",
    ",": "000000000010100", "+": "000010111010000", "=": "000111000111000", " ": "000000000000000",
    "?": "111001010000010",
}
_SCALE = 2  # font pixels per glyph pixel
_ADVANCE = 4 * _SCALE  # glyph width plus one column of space

_BACKGROUND = (255, 255, 255)
_AXIS = (90, 90, 90)
_GRID = (225, 225, 225)
_TEXT = (30, 30, 30)
#: Series colors, in order (a colorblind-safe palette).
COLORS = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233))


@dataclass
class Series:
    """One line: ``points`` are ``(step, value)`` pairs (non-finite values are skipped)."""

    label: str
    points: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Panel:
    """One chart of the stack: a title and its lines."""

    title: str
    series: list[Series] = field(default_factory=list)


def format_number(value: float) -> str:
    """Compact label for an axis end: ``0``, ``12.5``, ``3.4k``, ``1.2M``, ``7.0G``."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    magnitude = abs(value)
    for factor, suffix in ((1e12, "t"), (1e9, "g"), (1e6, "m"), (1e3, "k")):
        if magnitude >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


class _Canvas:
    """An RGB image with the few drawing operations a line plot needs."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(_BACKGROUND) * (width * height))

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        for y in range(max(y0, 0), min(y1, self.height)):
            for x in range(max(x0, 0), min(x1, self.width)):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], width: int = 1) -> None:
        """Bresenham's line, ``width`` pixels thick."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(width):
                for oy in range(width):
                    self.set(x0 + ox - width // 2, y0 + oy - width // 2, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: tuple[int, int, int] = _TEXT) -> int:
        """Draw ``text`` with its top-left corner at ``(x, y)``; returns the x after it."""
        for ch in text.lower():
            glyph = _GLYPHS.get(ch, _GLYPHS["?"])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = x + (i % 3) * _SCALE, y + (i // 3) * _SCALE
                    self.rect(gx, gy, gx + _SCALE, gy + _SCALE, color)
            x += _ADVANCE
        return x


def write_png(path: str | Path, width: int, height: int, rgb: bytes) -> Path:
    """Write 8-bit RGB pixels (row-major, ``3 * width * height`` bytes) as a PNG file."""
    if len(rgb) != 3 * width * height:
        raise ValueError(f"expected {3 * width * height} bytes for a {width}x{height} RGB image, got {len(rgb)}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = 3 * width
    raw = b"".join(b"\x00" + bytes(rgb[y * stride : (y + 1) * stride]) for y in range(height))  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    )
    return path


def _draw_panel(canvas: _Canvas, panel: Panel, top: int, height: int) -> None:
    left, right = 70, canvas.width - 16
    plot_top, plot_bottom = top + 30, top + height - 26
    x = canvas.text(left, top + 8, panel.title)
    for k, series in enumerate(panel.series):
        color = COLORS[k % len(COLORS)]
        x += 16
        canvas.rect(x, top + 10, x + 12, top + 16, color)
        x = canvas.text(x + 16, top + 8, series.label)
    points = [(s, v) for series in panel.series for s, v in series.points if math.isfinite(v)]
    canvas.line(left, plot_top, left, plot_bottom, _AXIS)
    canvas.line(left, plot_bottom, right, plot_bottom, _AXIS)
    if not points:
        canvas.text(left + 12, (plot_top + plot_bottom) // 2, "no data")
        return
    x_min, x_max = min(s for s, _ in points), max(s for s, _ in points)
    y_min, y_max = min(0.0, min(v for _, v in points)), max(v for _, v in points)
    if y_max <= y_min:
        y_max = y_min + 1.0
    if x_max <= x_min:
        x_max = x_min + 1.0
    canvas.line(left + 1, plot_top, right, plot_top, _GRID)
    canvas.text(4, plot_top - 4, format_number(y_max))
    canvas.text(4, plot_bottom - 8, format_number(y_min))
    canvas.text(left, plot_bottom + 6, f"step {format_number(x_min)}")
    end = f"step {format_number(x_max)}"
    canvas.text(right - len(end) * _ADVANCE, plot_bottom + 6, end)

    def to_pixel(step: float, value: float) -> tuple[int, int]:
        px = left + round((step - x_min) / (x_max - x_min) * (right - left))
        py = plot_bottom - round((value - y_min) / (y_max - y_min) * (plot_bottom - plot_top))
        return px, py

    for k, series in enumerate(panel.series):
        color = COLORS[k % len(COLORS)]
        pixels = [to_pixel(s, v) for s, v in series.points if math.isfinite(v)]
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
            canvas.line(x0, y0, x1, y1, color, width=2)
        for px, py in pixels:
            canvas.rect(px - 2, py - 2, px + 3, py + 3, color)


def write_plot(path: str | Path, panels: Sequence[Panel], width: int = 720, panel_height: int = 220) -> Path:
    """Draw ``panels`` stacked top to bottom and write them to ``path`` as a PNG; returns the path."""
    if not panels:
        raise ValueError("write_plot needs at least one Panel")
    canvas = _Canvas(width, panel_height * len(panels))
    for i, panel in enumerate(panels):
        _draw_panel(canvas, panel, i * panel_height, panel_height)
    return write_png(path, canvas.width, canvas.height, bytes(canvas.pixels))
