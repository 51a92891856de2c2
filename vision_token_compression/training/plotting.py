"""A loss-curve PNG drawn with Pillow (a core dependency), so training needs no plotting library."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vision_token_compression import atomic_write

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127)]


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


def plot_curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str = "",
    x_label: str = "step",
    size: tuple[int, int] = (900, 540),
) -> Path:
    """Draw each named series of (x, y) points as a line on shared axes and write a PNG atomically."""
    width, height = size
    left, right, top, bottom = 70, 190, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if points:
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
        x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-6)
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad

        def to_px(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                    height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

        for y in _ticks(y_lo, y_hi):
            _, py = to_px(x_lo, y)
            draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
            draw.text((left - 6, py), f"{y:.3g}", fill="black", font=font, anchor="rm")
        for x in _ticks(x_lo, x_hi):
            px, _ = to_px(x, y_lo)
            draw.text((px, height - bottom + 6), f"{x:g}", fill="black", font=font, anchor="mt")
        for i, (name, values) in enumerate(series.items()):
            colour = _COLOURS[i % len(_COLOURS)]
            line = [to_px(x, y) for x, y in values if math.isfinite(y)]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            elif line:
                draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
            draw.line([(width - right + 12, top + 10 + 20 * i), (width - right + 32, top + 10 + 20 * i)],
                      fill=colour, width=3)
            draw.text((width - right + 38, top + 10 + 20 * i), name, fill="black", font=font, anchor="lm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2, 12), title, fill="black", font=font, anchor="mt")
    draw.text(((left + width - right) // 2, height - 18), x_label, fill="black", font=font, anchor="mt")
    path = Path(path)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path
