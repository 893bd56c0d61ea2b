"""The PNG writer: a valid file a PNG reader accepts, of the right size, with the lines drawn."""

from __future__ import annotations

import struct
import zlib

import pytest

from lightning_thunder.callbacks.plot import COLORS, Panel, Series, format_number, write_plot, write_png


def read_png(path) -> tuple[int, int, list[bytes]]:
    """Minimal reader for what write_png produces (8-bit RGB, filter 0): width, height, rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color_type) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width)
    rows = [raw[y * (1 + 3 * width) + 1 : (y + 1) * (1 + 3 * width)] for y in range(height)]
    return width, height, rows


def test_plot_is_a_png_with_the_series_drawn(tmp_path):
    path = write_plot(
        tmp_path / "sub" / "plot.png",
        [
            Panel("tokens/s", [Series("all ranks", [(1, 10.0), (2, 30.0), (3, 20.0)])]),
            Panel("memory gib", [Series("a", [(1, 1.0)]), Series("b", [])]),
        ],
        width=300,
        panel_height=120,
    )
    width, height, rows = read_png(path)
    assert (width, height) == (300, 240)
    pixels = b"".join(rows)
    first = bytes(COLORS[0])
    assert pixels.count(first) > 50  # the line and its markers
    top_half = b"".join(rows[:120])
    assert top_half.count(first) > pixels.count(first) // 2  # mostly in the first panel


def test_write_png_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="expected 12 bytes for a 2x2 RGB image, got 3"):
        write_png(tmp_path / "x.png", 2, 2, b"abc")
    with pytest.raises(ValueError, match="at least one Panel"):
        write_plot(tmp_path / "x.png", [])


def test_format_number():
    assert [format_number(v) for v in (0, 12.5, 3400, 1.2e6, 7e9)] == ["0", "12.5", "3.4k", "1.2m", "7g"]
