"""A loss-curve PNG drawn with Pillow (a core dependency), so training needs no plotting library."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vision_token_compression import atomic_write

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]  # series i is drawn in COLOURS[i % len(COLOURS)]
# Margins around the plot area, in pixels (the legend sits in the right one).
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 190, 40, 50

Series = Mapping[str, Sequence[tuple[float, float]]]


@dataclass(frozen=True)
class Axes:
    """The plot area of an image (pixel box) and the data ranges it shows; maps points both ways."""

    box: tuple[float, float, float, float]  # left, top, right, bottom
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    @classmethod
    def fit(cls, series: Series, size: tuple[int, int]) -> Axes | None:
        """Axes showing every finite point of ``series`` (5% spare above and below); None if there is none."""
        points = [p for values in series.values() for p in values if math.isfinite(p[1])]
        if not points:
            return None
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
        x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-6)
        pad = 0.05 * (y_hi - y_lo)
        width, height = size
        return cls((_LEFT, _TOP, width - _RIGHT, height - _BOTTOM), (x_lo, x_hi), (y_lo - pad, y_hi + pad))

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        (left, top, right, bottom), (x_lo, x_hi), (y_lo, y_hi) = self.box, self.x_range, self.y_range
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    def from_px(self, px: float, py: float) -> tuple[float, float]:
        (left, top, right, bottom), (x_lo, x_hi), (y_lo, y_hi) = self.box, self.x_range, self.y_range
        return (x_lo + (px - left) / (right - left) * (x_hi - x_lo),
                y_lo + (bottom - py) / (bottom - top) * (y_hi - y_lo))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _draw_grid(draw: ImageDraw.ImageDraw, axes: Axes, font) -> None:
    """Horizontal grid lines with y labels, and x labels under the plot area."""
    (left, _, right, bottom), (x_lo, x_hi), (y_lo, y_hi) = axes.box, axes.x_range, axes.y_range
    for y in _ticks(y_lo, y_hi):
        _, py = axes.to_px(x_lo, y)
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        draw.text((left - 6, py), f"{y:.3g}", fill="black", font=font, anchor="rm")
    for x in _ticks(x_lo, x_hi):
        px, _ = axes.to_px(x, y_lo)
        draw.text((px, bottom + 6), f"{x:g}", fill="black", font=font, anchor="mt")


def _draw_series(draw: ImageDraw.ImageDraw, axes: Axes, series: Series, font) -> None:
    """Each series as a line through its finite points (a dot for one point), and its legend entry."""
    right, top = axes.box[2], axes.box[1]
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = [axes.to_px(x, y) for x, y in values if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        legend_y = top + 10 + 20 * i
        draw.line([(right + 12, legend_y), (right + 32, legend_y)], fill=colour, width=3)
        draw.text((right + 38, legend_y), name, fill="black", font=font, anchor="lm")


def plot_curves(
    series: Series,
    path: str | os.PathLike,
    title: str = "",
    x_label: str = "step",
    size: tuple[int, int] = (900, 540),
) -> Path:
    """Draw each named series of (x, y) points as a line on shared axes and write a PNG atomically.

    The plot area and data ranges are ``Axes.fit(series, size)``; non-finite values are left out.
    """
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    axes = Axes.fit(series, size)
    if axes is not None:
        _draw_grid(draw, axes, font)
        _draw_series(draw, axes, series, font)
    draw.rectangle([_LEFT, _TOP, width - _RIGHT, height - _BOTTOM], outline="black")
    draw.text((width // 2, 12), title, fill="black", font=font, anchor="mt")
    draw.text(((_LEFT + width - _RIGHT) // 2, height - 18), x_label, fill="black", font=font, anchor="mt")
    path = Path(path)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path
