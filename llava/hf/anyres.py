"""LLaVA-1.6 (anyres) token arithmetic on the compressed grid: one rule for the processor and the model.

An image of (height, width) is tiled into rows × cols tiles of the tower's size (the pinpoint that keeps
the most pixels); each tile gives ``side × side`` tokens (the compressed grid: 12 at 24→12). The
tiles' grid is cropped back to the image's aspect ratio (``spatial_unpad``) and gets one
``image_newline`` per row; the base tile (``side²`` tokens) comes first. The processor counts the
placeholders with ``anyres_token_count``; the model crops with ``unpadded_size``: the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.image_processing_utils import select_best_resolution

from ..mm_utils import check_tile_multiples, unpadded_bounds


def anyres_tile_grid(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of ``image_size`` (height, width); ``pinpoints`` are (height, width)."""
    height, width = select_best_resolution([int(x) for x in image_size], [list(p) for p in pinpoints])
    return height // tile, width // tile


def unpadded_size(grid_height: int, grid_width: int, image_size: Sequence[int]) -> tuple[int, int]:
    """(height, width) of a (grid_height, grid_width) token grid once the padding anyres added is cropped off.

    The fork's rule (``llava.mm_utils.unpadded_bounds``, upstream LLaVA's ``int`` truncation): transformers'
    ``unpad_image`` rounds to 7 digits first, which can keep one more row than the model was trained with.
    """
    height, width = (int(x) for x in image_size)
    top, bottom, left, right = unpadded_bounds(grid_height, grid_width, (width, height))
    return bottom - top, right - left


def anyres_token_count(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int, side: int) -> int:
    """Image tokens for an image of ``image_size`` (height, width): base tile, unpadded tiles, one newline per row."""
    rows, cols = anyres_tile_grid(image_size, pinpoints, tile)
    height, width = unpadded_size(rows * side, cols * side, image_size)
    return side * side + height * (width + 1)


def check_pinpoints(pinpoints, tile: int, where: str, order: str = "[height, width]") -> list[list[int]]:
    """``pinpoints`` as a list of int pairs, each side a multiple of ``tile``; else a ``ValueError`` naming them.

    ``order`` names the pairs' order in the message (transformers' [height, width]; the fork's [width, height]).
    """
    try:
        pairs = [[int(a), int(b)] for a, b in pinpoints]
    except (TypeError, ValueError):
        pairs = None
    if not pairs:
        raise ValueError(f"{where}image_grid_pinpoints must be a non-empty list of {order} pairs, got {pinpoints!r}.")
    try:
        check_tile_multiples(pairs, tile, order)
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None
    return pairs
