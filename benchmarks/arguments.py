"""Argument types shared by the benchmarks' command lines."""

from __future__ import annotations

import argparse


def image_size(text: str) -> tuple[int, int]:
    """``WxH`` (e.g. ``400x300``) as (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an image size; write WIDTHxHEIGHT, e.g. 400x300") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be at least 1")
    from llava.mm_utils import check_image_size  # the limit process_images applies, checked before any image is made

    try:
        check_image_size((width, height))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return width, height
