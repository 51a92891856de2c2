"""``--compare-peers`` with LLaVA-1.6 (anyres) images: each method at ToConv's token count for each image size.

An image of each of the preset's sizes goes through the fork's ``process_anyres_image`` (base image
and crops, up to 5 tiles of 336×336). The budget at an image size is what ToConv hands the LLM there
with the fork's ``spatial_unpad`` layout (24→12: 348 / 508 / 744 for 400×300 / 300×700 / 1000×1000):
no compression, FastV and PyramidDrop hand on the fork's uncompressed layout (1,368 / 1,976 / 2,928),
ToConv and bilinear pooling reduce every tile and keep the layout, VisionZip, PruMerge(+) and the
bound reduce every tile to an equal share and hand on the tiles' tokens joined (``peers.peer_method``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from benchmarks.peers import Tiling
from benchmarks.pipeline_measures import PipelineInputs, random_inputs
from llava.hf.anyres import anyres_token_count
from llava.mm_utils import get_anyres_image_grid_shape, process_anyres_image
from llava.model.llava_arch import arrange_crops
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower


class AnyresImage(NamedTuple):
    """One image as anyres tiles it: its size, its crops' grid and its tiles' pixels."""

    size: tuple[int, int]  # (width, height)
    crop_grid: tuple[int, int]  # (columns, rows) of crops
    pixels: torch.Tensor  # (1 + columns·rows, 3, S, S): the base image, then the crops row by row


def anyres_image(tower: CLIPVisionTower, size: tuple[int, int], pinpoints, seed: int) -> AnyresImage:
    """A seeded stand-in image of ``size`` through the fork's anyres tiling for ``tower``."""
    from llava.standins import make_images

    (image,) = make_images(1, size=size, seed=seed)
    pixels = process_anyres_image(image, tower.image_processor, [list(p) for p in pinpoints])
    crop_grid = get_anyres_image_grid_shape(size, [list(p) for p in pinpoints], tower.config.image_size)
    return AnyresImage(tuple(size), crop_grid, pixels.to(device=tower.device, dtype=tower.dtype))


def image_tiling(image: AnyresImage, pinpoints, tile: int, newline: torch.Tensor) -> Tiling:
    """The fork's ``spatial_unpad`` layout for ``image``, with ``newline`` (D,) ending each row of crops."""
    width, height = image.size
    pinpoints_hw = [(h, w) for w, h in pinpoints]  # anyres_token_count takes transformers' [height, width]
    return Tiling(
        tiles=image.pixels.shape[0],
        arrange=functools.partial(arrange_image, image=image, newline=newline),
        image_tokens=lambda side: anyres_token_count((height, width), pinpoints_hw, tile, side),
    )


def arrange_image(embeds: torch.Tensor, image: AnyresImage, newline: torch.Tensor) -> torch.Tensor:
    """(B·tiles, side², D) → (B, n, D): per image, the base tile, then the crops unpadded with newlines."""
    tiles = image.pixels.shape[0]
    per_image = embeds.view(-1, tiles, *embeds.shape[1:])
    return torch.stack([
        torch.cat([tokens[0], arrange_crops(tokens[1:], image.crop_grid, image.size, newline)], dim=0)
        for tokens in per_image
    ])


def anyres_inputs(pipe, image: AnyresImage, batch: int, prompt_len: int, seed: int) -> PipelineInputs:
    """``batch`` copies of the image's tiles, (batch·tiles, 3, S, S), and a seeded random prompt around each."""
    text = random_inputs(pipe, batch, prompt_len, image.pixels.shape[-1], image.pixels.dtype, seed)
    return text._replace(images=image.pixels.repeat(batch, 1, 1, 1))
