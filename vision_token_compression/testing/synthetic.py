"""Generated images with structure (gradients, shapes, text) for tests and smoke runs.

Random noise gives a CLIP tower nothing to say; these images have edges, flat regions, smooth
gradients and glyphs, so neighbouring patch tokens differ the way they do on photos and
documents. Run ``python -m vision_token_compression.testing.synthetic OUT_DIR --num 48`` to write a folder.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

_WORDS = ["token", "CLIP", "LLaVA", "conv", "336px", "grid", "patch", "ViT-L", "cat", "sign", "42", "map"]


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def _gradient(rng: random.Random, width: int, height: int) -> Image.Image:
    """Linear gradient between two random colours along a random axis."""
    start, stop = _colour(rng), _colour(rng)
    horizontal = rng.random() < 0.5
    length = width if horizontal else height
    strip = Image.new("RGB", (length, 1))
    strip.putdata([
        tuple(int(a + (b - a) * i / max(length - 1, 1)) for a, b in zip(start, stop)) for i in range(length)
    ])
    if not horizontal:
        strip = strip.transpose(Image.Transpose.ROTATE_90)
    return strip.resize((width, height), Image.Resampling.NEAREST)


def make_structured_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """One RGB image: a gradient background with random shapes, lines and words on it."""
    image = _gradient(rng, width, height)
    draw = ImageDraw.Draw(image)
    scale = min(width, height)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        w, h = rng.randint(scale // 12, scale // 2), rng.randint(scale // 12, scale // 2)
        box = (x0, y0, x0 + w, y0 + h)
        kind = rng.choice(["rect", "ellipse", "polygon", "line"])
        if kind == "rect":
            draw.rectangle(box, fill=_colour(rng), outline=_colour(rng), width=rng.randint(0, 4))
        elif kind == "ellipse":
            draw.ellipse(box, fill=_colour(rng))
        elif kind == "polygon":
            points = [(rng.randrange(width), rng.randrange(height)) for _ in range(rng.randint(3, 6))]
            draw.polygon(points, fill=_colour(rng))
        else:
            draw.line([(x0, y0), (rng.randrange(width), rng.randrange(height))], fill=_colour(rng),
                      width=rng.randint(1, 8))
    for _ in range(rng.randint(1, 3)):
        font = ImageFont.load_default(size=rng.randint(scale // 14, scale // 5))
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
        draw.text((rng.randrange(width // 2), rng.randrange(height * 3 // 4)), text, fill=_colour(rng), font=font)
    return image


def make_structured_images(
    folder: str | Path,
    num_images: int,
    size: int | tuple[int, int] = 336,
    seed: int = 0,
    formats: Sequence[str] = ("png", "jpg", "webp"),
    subfolders: int = 2,
) -> list[Path]:
    """Write ``num_images`` structured images under ``folder`` and return their paths.

    Image ``i`` is saved as ``formats[i % len(formats)]`` in ``sub{i % subfolders}/`` (or directly in
    ``folder`` when ``subfolders`` is 0), so a recursive, multi-format loader is exercised. A
    ``(width, height)`` size makes non-square images; the same seed writes the same pixels.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    width, height = (size, size) if isinstance(size, int) else size
    rng = random.Random(seed)
    folder = Path(folder)
    paths = []
    for i in range(num_images):
        target = folder / f"sub{i % subfolders}" if subfolders else folder
        target.mkdir(parents=True, exist_ok=True)
        ext = formats[i % len(formats)]
        path = target / f"image_{i:05d}.{ext}"
        make_structured_image(rng, width, height).save(path, quality=95)  # PNG ignores quality
        paths.append(path)
    logger.info("Wrote %d structured %dx%d images to %s", num_images, width, height, folder)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write a folder of structured images."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--num", type=int, default=48, help="number of images (default 48)")
    parser.add_argument("--size", type=int, nargs="+", default=[336], metavar="PIXELS",
                        help="side, or width and height, in pixels (default 336)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(args.size) > 2:
        parser.error(f"--size takes one side or a width and a height, got {args.size}.")
    make_structured_images(args.output_dir, args.num, tuple(args.size) if len(args.size) == 2 else args.size[0], args.seed)


if __name__ == "__main__":
    main()
