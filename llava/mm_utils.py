"""Image and prompt helpers shared by LLaVA's training, evaluation and serving code.

``process_images`` turns PIL images into the tensors a vision tower takes, following the model
config's ``image_aspect_ratio``: ``pad`` (pad to a square with the processor's mean colour),
``anyres`` (LLaVA-1.6: a resized base image plus tower-sized crops of the image scaled to the best
grid resolution), anything else (the processor's own resize and centre crop).
"""

from __future__ import annotations

import ast
import base64
import functools
import logging
import math
import re
import struct
from collections.abc import Sequence
from io import BytesIO

import torch
from PIL import Image
from transformers import StoppingCriteria

from vision_token_compression import expand_to_square

from .constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, config_value

logger = logging.getLogger(__name__)

Resolution = tuple[int, int]  # (width, height)

# What Pillow raises for a file it cannot open or decode, besides its decompression-bomb check: plugins raise
# OSError (UnidentifiedImageError), SyntaxError, ValueError, EOFError or struct.error on corrupt data.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def load_image_from_base64(image: str) -> Image.Image:
    """Decode a base64-encoded image file."""
    return Image.open(BytesIO(base64.b64decode(image)))


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad ``pil_img`` to a square with ``background_color``, keeping it centred."""
    # One implementation for LLaVA and the compressor trainer, so both see the same pixels.
    return expand_to_square(pil_img, background_color)


# LLaVA-NeXT's shorthand: "(1x1),...,(3x3)" is every grid from 1×1 to 3×3 tiles (columns × rows).
_TILE_GRID = re.compile(r"\((\d+)x(\d+)\)")
_PINPOINTS_FIX = ("write it as a list of [width, height] pairs in pixels, multiples of the tile size, such as "
                  "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] (LLaVA-1.6), or as LLaVA-NeXT's "
                  "tile grids '(1x1),...,(3x3)'")


@functools.lru_cache(maxsize=32)
def _tile_grid_pinpoints(text: str, tile: int | None) -> tuple[Resolution, ...]:
    """LLaVA-NeXT's ``"(1x1),...,(3x3)"``: every grid from the first entry to the last, times ``tile`` pixels.

    Upstream (LLaVA-VL/LLaVA-NeXT ``llava/mm_utils.py``) reads only the first and last entries as the
    corners of a range; entries in between that fall outside it are refused rather than dropped.
    """
    grids = [(int(c), int(r)) for c, r in _TILE_GRID.findall(text)]
    if not grids:
        raise ValueError(f"image_grid_pinpoints {text!r} has no (COLSxROWS) entries: {_PINPOINTS_FIX}.")
    if tile is None:
        raise ValueError(f"image_grid_pinpoints {text!r} counts tiles; the tile size (the vision tower's image "
                         f"size) is needed to turn it into pixels.")
    (c0, r0), (c1, r1) = grids[0], grids[-1]
    if min(c0, r0) < 1 or c1 < c0 or r1 < r0:
        raise ValueError(f"image_grid_pinpoints {text!r} must run from a smaller grid to a larger one, each at "
                         f"least (1x1), as in '(1x1),...,(3x3)'.")
    outside = [f"({c}x{r})" for c, r in grids if not (c0 <= c <= c1 and r0 <= r <= r1)]
    if outside:
        raise ValueError(f"image_grid_pinpoints {text!r}: LLaVA-NeXT reads only the first and last entries, as a "
                         f"range, so {', '.join(outside)} would be ignored; {_PINPOINTS_FIX}.")
    return tuple((c * tile, r * tile) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1))


def parse_grid_pinpoints(grid_pinpoints: str | Sequence[Sequence[int]], tile: int | None = None) -> list[Resolution]:
    """``image_grid_pinpoints`` as a list of (width, height) in pixels.

    Configs store a list, its repr, or LLaVA-NeXT's ``"(1x1),...,(3x3)"`` tile grids (multiplied by
    ``tile``, as upstream does). With ``tile`` given, every resolution must be a multiple of it: anyres
    cuts the canvas into tile-sized crops, and a remainder would be cut off.
    """
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        return list(_tile_grid_pinpoints(grid_pinpoints, tile))
    if isinstance(grid_pinpoints, str):
        try:
            grid_pinpoints = ast.literal_eval(grid_pinpoints)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"image_grid_pinpoints {grid_pinpoints!r} cannot be read: {_PINPOINTS_FIX}.") from err
    if not grid_pinpoints:
        raise ValueError(f"image_grid_pinpoints is empty: anyres needs at least one resolution; {_PINPOINTS_FIX}.")
    resolutions = []
    for entry in grid_pinpoints:
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry)):
            raise ValueError(f"image_grid_pinpoints entry {entry!r} is not a [width, height] pair of positive "
                             f"integers: {_PINPOINTS_FIX}.")
        resolutions.append((entry[0], entry[1]))
    if tile is not None:
        check_tile_multiples(resolutions, tile)
    return resolutions


def check_tile_multiples(pairs: Sequence[Sequence[int]], tile: int, order: str = "[width, height]") -> None:
    """Every pinpoint side a multiple of ``tile`` (anyres cuts each canvas into tiles); else a ``ValueError`` naming them.

    ``order`` names the pairs' order in the message (the fork's [width, height]; transformers' [height, width]).
    """
    bad = [list(pair) for pair in pairs if min(pair) < tile or pair[0] % tile or pair[1] % tile]
    if bad:
        raise ValueError(
            f"image_grid_pinpoints {bad} ({order}) are not multiples of the tile size {tile} (the vision tower's "
            f"image_size): anyres cuts each canvas into {tile}×{tile} tiles, and a remainder would be cut off. Use "
            f"multiples of {tile}, e.g. LLaVA-1.6's [[{tile}, {2 * tile}], [{2 * tile}, {tile}], [{2 * tile}, {2 * tile}], "
            f"[{3 * tile}, {tile}], [{tile}, {3 * tile}]]."
        )


def select_best_resolution(original_size: Resolution, possible_resolutions: Sequence[Resolution]) -> Resolution:
    """The resolution that keeps the most of the image's pixels, then wastes the least canvas.

    Args:
        original_size: (width, height) of the image.
        possible_resolutions: candidate (width, height) canvases.
    """
    orig_w, orig_h = original_size
    best, best_key = None, None
    for width, height in possible_resolutions:
        scale = min(width / orig_w, height / orig_h)
        kept = min(int(orig_w * scale) * int(orig_h * scale), orig_w * orig_h)
        wasted = width * height - kept
        key = (kept, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (width, height), key
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: Resolution) -> Image.Image:
    """Scale ``image`` to fit ``target_resolution`` (width, height) and centre it on a black canvas."""
    target_w, target_h = target_resolution
    orig_w, orig_h = image.size
    scale_w, scale_h = target_w / orig_w, target_h / orig_h
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(orig_h * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(orig_w * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Square ``patch_size`` crops of ``image`` in row-major order."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def unpadded_bounds(height: int, width: int, original_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a (height, width) feature grid that saw the image, not padding.

    anyres pads the resized image to the chosen canvas (see ``resize_and_pad_image``); ``original_size``
    is (width, height) of the image before processing. Shared by ``unpad_image`` and the token count
    that is computed before the tower runs, so both agree.
    """
    original_width, original_height = original_size
    if original_width / original_height > width / height:
        # Wider than the canvas: the padding is above and below.
        kept = int(original_height * (width / original_width))
        pad = (height - kept) // 2
        return pad, height - pad, 0, width
    kept = int(original_width * (height / original_height))
    pad = (width - kept) // 2
    return 0, height, pad, width - pad


def get_anyres_image_grid_shape(
    image_size: Resolution, grid_pinpoints: str | Sequence[Sequence[int]], patch_size: int
) -> tuple[int, int]:
    """(columns, rows) of crops that anyres cuts an image of ``image_size`` (width, height) into.

    ``patch_size`` is the tile (crop) side in pixels, the vision tower's image size, as upstream names it.
    """
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def _size_field(size, key: str):
    """``key`` of a processor's size: a dict in transformers 4, a ``SizeDict`` in 5; None when absent."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _crop_side(image_processor) -> int:
    """Side of the square a processor outputs: CLIP's centre crop, or SigLIP's square resize (it has no crop)."""
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    return _size_field(crop, "height")


def _shortest_edge(image_processor) -> int:
    """The edge anyres resizes the whole image to: CLIP's ``shortest_edge``, else the square side (SigLIP)."""
    edge = _size_field(image_processor.size, "shortest_edge")
    return edge if edge is not None else _crop_side(image_processor)


def _pixel_values(image_processor, images) -> torch.Tensor:
    return image_processor.preprocess(images, return_tensors="pt")["pixel_values"]


def process_anyres_image(
    image: Image.Image, processor, grid_pinpoints: str | Sequence[Sequence[int]]
) -> torch.Tensor:
    """(1 + crops, 3, S, S): the whole image resized to the tower's size, then the crops row by row."""
    tile = _crop_side(processor)
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints, tile))
    crops = divide_to_patches(resize_and_pad_image(image, best), tile)
    edge = _shortest_edge(processor)
    base = image.resize((edge, edge))
    return _pixel_values(processor, [base, *crops])


def check_image_size(size: Resolution, index: int = 0, max_pixels: int | None = None) -> None:
    """Refuse an image of ``size`` (width, height) with no pixels or more than ``max_pixels``.

    ``max_pixels`` defaults to ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb limit, read at
    call time so raising it there raises it here; None there means no limit).
    """
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"Image {index} is {width}×{height} pixels: an image needs a non-zero width and height; "
                         f"check that the file decodes to a real picture.")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and width * height > limit:
        raise ValueError(f"Image {index} is {width}×{height} = {width * height} pixels, over the limit of {limit} "
                         f"(PIL.Image.MAX_IMAGE_PIXELS): downscale it first (anyres resizes to at most the "
                         f"largest image_grid_pinpoints resolution anyway), or raise PIL.Image.MAX_IMAGE_PIXELS "
                         f"for images you trust.")


def preprocessed_pixels(size: Resolution, image_processor, model_cfg) -> int:
    """Pixels of the largest image ``process_images`` makes from an image of ``size`` (width, height).

    That is the square ``pad`` pastes it on, the processor's resize of the shortest edge to the tower's
    size, or anyres' grid canvas. A thin image makes a huge one (``pad`` turns a 20000×1 image into
    20000×20000), so a server that takes images from clients checks this from the header, before decoding.
    """
    width, height = size
    aspect_ratio = config_value(model_cfg, "image_aspect_ratio")
    if aspect_ratio == "pad":
        return max(width, height) ** 2
    if aspect_ratio == "anyres":
        best_w, best_h = select_best_resolution(size, parse_grid_pinpoints(model_cfg.image_grid_pinpoints,
                                                                           _crop_side(image_processor)))
        return best_w * best_h
    edge = _size_field(image_processor.size, "shortest_edge")
    if edge is None:  # resized straight to the tower's square (SigLIP)
        return _crop_side(image_processor) ** 2
    return edge * math.ceil(edge * max(width, height) / max(1, min(width, height)))


def process_images(images: Sequence[Image.Image], image_processor, model_cfg) -> torch.Tensor | list[torch.Tensor]:
    """Tensors for ``images`` according to ``model_cfg.image_aspect_ratio``.

    ``pad`` and the default give one (3, S, S) image each; ``anyres`` gives (1 + crops, 3, S, S)
    per image. Returns a stacked tensor when all shapes agree, else a list. Images with no pixels or
    over ``PIL.Image.MAX_IMAGE_PIXELS`` are refused (``ValueError``) before any processing.
    """
    for index, image in enumerate(images):
        check_image_size(image.size, index)
    aspect_ratio = config_value(model_cfg, "image_aspect_ratio")
    if aspect_ratio == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        new_images = [_pixel_values(image_processor, expand2square(img, background))[0] for img in images]
    elif aspect_ratio == "anyres":
        new_images = [process_anyres_image(img, image_processor, model_cfg.image_grid_pinpoints) for img in images]
    else:
        return _pixel_values(image_processor, list(images))
    if all(x.shape == new_images[0].shape for x in new_images):
        return torch.stack(new_images, dim=0)
    return new_images


def tokenizer_image_token(
    prompt: str,
    tokenizer,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Token ids of ``prompt`` with each ``<image>`` replaced by ``image_token_index``.

    Each text chunk is tokenised on its own; the BOS token, if the tokenizer adds one, appears
    once at the start.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    has_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos
    input_ids: list[int] = [bos] if has_bos else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[1:] if has_bos and chunk[:1] == [bos] else chunk)
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"Unsupported return_tensors {return_tensors!r}; use 'pt' or None.")


def get_model_name_from_path(model_path: str) -> str:
    """Name of a checkpoint folder; ``.../run/checkpoint-500`` becomes ``run_checkpoint-500``."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a sequence once its generated text ends with one of ``keywords``.

    Works per sequence, so in a batch each row stops on its own keyword.

    Args:
        keywords: Stop strings, e.g. the conversation separator.
        tokenizer: Decodes the generated tail to look for keywords spanning several tokens.
        input_ids: The prompt ids. Whether the generated ids that ``generate`` hands over include
            this prompt (they do not when LLaVA generates from ``inputs_embeds``) is read from the
            length of the first call, so keywords inside the prompt never stop generation.
    """

    def __init__(self, keywords: Sequence[str], tokenizer, input_ids: torch.Tensor) -> None:
        self.keywords = list(keywords)
        self.keyword_ids = []
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))
        self.max_keyword_len = max((len(ids) for ids in self.keyword_ids), default=0)
        self.tokenizer = tokenizer
        self.start_len = input_ids.shape[1]
        self._prompt_len: int | None = None  # prompt tokens at the front of generate's ids

    def _row_done(self, row: torch.Tensor, start: int) -> bool:
        generated = row.shape[0] - start
        for ids in self.keyword_ids:
            n = len(ids)
            if 0 < n <= generated and torch.equal(row[-n:].cpu(), ids):
                return True
        tail_len = min(generated, self.max_keyword_len + 3)
        if tail_len <= 0:
            return False
        text = self.tokenizer.decode(row[-tail_len:], skip_special_tokens=True)
        return any(keyword in text for keyword in self.keywords)

    def call_for_batch(self, output_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Bool tensor (batch,): which rows have produced a keyword."""
        if self._prompt_len is None:
            self._prompt_len = self.start_len if output_ids.shape[1] > self.start_len else 0
        return torch.tensor(
            [self._row_done(row, self._prompt_len) for row in output_ids], dtype=torch.bool, device=output_ids.device
        )

    def __call__(self, output_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.call_for_batch(output_ids, scores, **kwargs)


def left_pad_input_ids(input_ids: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token id tensors for batched generation, padded on the left: (input_ids, attention_mask)."""
    length = max(ids.shape[0] for ids in input_ids)
    batch = torch.full((len(input_ids), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), length), dtype=torch.long)
    for row, ids in enumerate(input_ids):
        batch[row, length - ids.shape[0]:] = ids
        mask[row, length - ids.shape[0]:] = 1
    return batch, mask
