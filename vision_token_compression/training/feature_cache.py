"""On-disk cache of frozen CLIP features, so that later epochs skip the tower's forward pass.

The cache is one ``.npy`` array (images, tokens, channels) in float16 plus a JSON index beside
it. Its name is a hash of everything that decides the features: the image files (path, size,
modification time), the tower (name and config), the selected layer and the preprocessing. A
changed image folder or tower therefore gets a new cache instead of stale features. The array is
filled under a temporary name and renamed when complete, then the index is written: a killed
fill leaves no index, and the next run fills it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vision_token_compression import atomic_write_text, publish_file

logger = logging.getLogger(__name__)

CACHE_DTYPE = np.float16


def files_digest(files: list[Path]) -> str:
    """SHA-256 over each file's path, size and modification time."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(fingerprint: Mapping) -> str:
    """Short stable hash of a JSON-serialisable fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache(Dataset):
    """A complete feature cache; items are ``(features (T, C) float16, index)``.

    The array is memory-mapped lazily in each process, so DataLoader workers share the page
    cache instead of receiving a pickled copy.
    """

    def __init__(self, array_path: Path) -> None:
        self.array_path = Path(array_path)
        self.index = json.loads(self.array_path.with_suffix(".json").read_text())
        self.shape = tuple(self.index["shape"])
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[index])), index

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def open_feature_cache(directory: Path, fingerprint: Mapping) -> FeatureCache | None:
    """The complete cache for ``fingerprint`` in ``directory``, or None."""
    array_path = Path(directory) / f"features-{cache_key(fingerprint)}.npy"
    index_path = array_path.with_suffix(".json")
    if not (array_path.is_file() and index_path.is_file()):
        return None
    if json.loads(index_path.read_text()).get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None  # a hash collision, in principle
    return FeatureCache(array_path)


def build_feature_cache(
    directory: str | os.PathLike,
    fingerprint: Mapping,
    images: Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    token_shape: tuple[int, int],
    *,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> FeatureCache:
    """Return the cache for ``fingerprint``, filling it first if needed.

    ``encode`` maps a batch of pixels to (B, T, C) features. With several processes each rank
    encodes every ``world_size``-th image into the shared array; rank 0 creates and finalises it,
    and ``barrier`` separates the phases.
    """
    directory = Path(directory)
    cache = open_feature_cache(directory, fingerprint)
    if cache is not None:
        logger.info("Using feature cache %s (%d images)", cache.array_path, len(cache))
        return cache
    key = cache_key(fingerprint)
    array_path = directory / f"features-{key}.npy"
    partial = directory / f".features-{key}.npy.partial"
    shape = (len(images), *token_shape)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # same key: same images, tower and preprocessing; overwritten below
            logger.warning("Refilling %s, the unfinished feature cache of a killed run.", partial)
        size_gb = np.prod(shape) * np.dtype(CACHE_DTYPE).itemsize / 1e9
        logger.info("Filling feature cache %s: %s float16, %.2f GB", array_path, shape, size_gb)
        np.lib.format.open_memmap(partial, mode="w+", dtype=CACHE_DTYPE, shape=shape).flush()
    barrier()
    array = np.load(partial, mmap_mode="r+")
    loader = DataLoader(
        Subset(images, range(rank, len(images), world_size)), batch_size=batch_size,
        num_workers=num_workers, shuffle=False,
    )
    for pixels, indices in tqdm(loader, desc="caching features", disable=rank != 0):
        features = encode(pixels)  # (B, T, C)
        array[indices.numpy()] = features.float().cpu().numpy().astype(CACHE_DTYPE)
    array.flush()
    del array
    barrier()
    if rank == 0:
        publish_file(partial, array_path)
        index = {"fingerprint": fingerprint, "shape": list(shape), "dtype": "float16"}
        atomic_write_text(array_path.with_suffix(".json"), json.dumps(index, indent=1, sort_keys=True))
    barrier()
    return FeatureCache(array_path)
