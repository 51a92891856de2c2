"""Token sequences as 2-D grids, and the mean of each convolution window.

Shared by the compressor, its trainer and hosts. A (B, side², C) token sequence and a (B, C, side,
side) grid are two views of the same memory: ``tokens_to_grid`` returns the grid with channels-last
strides and copies nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .models.geometry import ConvGeometry


def tokens_to_grid(tokens: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """(B, side², C) tokens → (B, C, side, side) grid, a channels-last view (no copy).

    ``side`` defaults to the square root of the token count, which must then be a square.
    """
    if side is None:
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(
                f"Expected a square number of tokens, got {tokens.shape[1]}; drop the CLS token first."
            )
    return tokens.unflatten(1, (side, side)).permute(0, 3, 1, 2)  # (B, C, H, W)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) grid → (B, H·W, C) tokens, row by row."""
    return grid.flatten(2).transpose(1, 2)


def window_mean(tokens: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Mean of the valid tokens under each convolution window: (B, in², C) → (B, out², C).

    Padding is not counted, so this is what an average-initialised ``TokenCompressor`` computes.
    """
    pooled = F.avg_pool2d(
        tokens_to_grid(tokens), geometry.kernel_size, geometry.stride, geometry.padding, count_include_pad=False,
    )  # (B, C, out, out)
    return grid_to_tokens(pooled)
