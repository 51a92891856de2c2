"""Image preprocessing shared by hosts and the trainer. Pillow is imported only when a function runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad ``image`` to a centred square filled with ``background`` (LLaVA-1.5's ``image_aspect_ratio='pad'``).

    A square image is returned as it is.
    """
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
