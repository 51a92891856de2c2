"""Images from folders, and the sampler that shards and shuffles them resumably."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class ImageFileError(ValueError):
    """An image under ``--data`` cannot be used (not decodable, or over the pixel limit); the message names it.

    The trainer's policy for such a file is to stop, naming it (no image is skipped silently).
    """


def open_image(path: Path) -> Image.Image:
    """The decoded image at ``path``; ``ImageFileError`` naming it when it is over the pixel limit or undecodable.

    The limit is ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 MP, read at call time), checked from the
    header before any pixel is decoded; Pillow alone only warns below twice that.
    """
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the file's name
            image = Image.open(path)
    except Image.DecompressionBombError as err:  # Pillow refuses twice the limit before we see the size
        raise ImageFileError(
            f"Image {path} is over the limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS; Pillow: {err}): downscale "
            f"it or remove it from --data."
        ) from err
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageFileError(f"Could not read image {path}: {err}. Remove or replace the file.") from err
    with image:
        width, height = image.size
        if limit is not None and width * height > limit:
            raise ImageFileError(
                f"Image {path} is {width}×{height} = {width * height} pixels, over the limit of {limit} "
                f"(PIL.Image.MAX_IMAGE_PIXELS): downscale it or remove it from --data (raise "
                f"PIL.Image.MAX_IMAGE_PIXELS only for images you trust)."
            )
        try:
            image.load()
        except (OSError, ValueError) as err:  # a truncated or corrupt file decodes only this far
            raise ImageFileError(f"Could not read image {path}: {err}. Remove or replace the file.") from err
        return image.copy()


def find_images(roots: Sequence[str | os.PathLike]) -> list[Path]:
    """All jpg/jpeg/png/webp files under ``roots`` (recursive, any case), sorted per root."""
    files: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {root} does not exist or is not a directory.")
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}.")
        files.extend(found)
    return files


class ImageFolderDataset(Dataset):
    """Images found recursively under one or more folders, each passed through ``transform``.

    Items are ``(transform(image), index)``. A file that cannot be decoded, or is over the pixel
    limit, raises ``ImageFileError`` naming it (``open_image``), rather than being skipped.

    Args:
        roots: Folders to search.
        transform: PIL image → tensor (e.g. ``features.ImagePreprocessor``).
        files: Use this file list instead of searching ``roots`` (e.g. a held-out split).
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike] = (),
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        files: Sequence[Path] | None = None,
    ) -> None:
        self.files = list(files) if files is not None else find_images(roots)
        if not self.files:
            raise ValueError("ImageFolderDataset got no images: pass image folders or a non-empty file list.")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        image = open_image(path)
        try:
            item = self.transform(image) if self.transform is not None else image
        except (OSError, ValueError) as err:
            raise ImageFileError(f"Could not read image {path}: {err}. Remove or replace the file.") from err
        return item, index


class ShardedShuffleSampler(Sampler[int]):
    """Per-epoch shuffled indices, split across ranks, that can start part-way through an epoch.

    Every rank draws the same permutation from ``seed + epoch`` and takes every
    ``num_replicas``-th index from ``rank``; the permutation is padded by repetition so all ranks
    run the same number of steps. ``set_epoch(epoch, start=k)`` skips the first ``k`` indices of
    this rank's share, which is how a resumed run continues mid-epoch without repeating images.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(size / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch``'s permutation and skip its first ``start`` indices on this rank."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / self.size))[:total]
        return iter(order[self.rank::self.num_replicas][self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start
