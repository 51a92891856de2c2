"""Read a LLaVA weights file (``mm_projector.bin``, ``non_lora_trainables.bin``, ``.safetensors``) with a clear error.

Shared by inference (``llava.model``) and training (``llava.train.checkpointing`` re-exports it), so
``llava.model`` never imports ``llava.train``. A missing, empty or truncated file (what a run killed
while writing it leaves) is a ``CheckpointError`` naming the file, its size and the fix, never a bare
``EOFError`` from deep inside ``torch.load``. A ``.safetensors`` file is checked against its header
first (``vision_token_compression.load_safetensors``), so a truncated one is named with the bytes it
lacks.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from vision_token_compression import CheckpointFileError, load_safetensors


class CheckpointError(RuntimeError):
    """A checkpoint file or folder is missing, incomplete or unreadable; the message names it and the fix."""


class WeightsFileNotFoundError(CheckpointError, FileNotFoundError):
    """The weights file does not exist (also a ``FileNotFoundError``, as callers of upstream's loaders expect)."""


def load_weights_file(path: str | os.PathLike, fix: str, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file (``.bin``, read with ``weights_only``) or a ``.safetensors`` file.

    A missing, empty, truncated or otherwise unreadable file is a ``CheckpointError`` that names it,
    its size and ``fix`` (what the user can do about it); a missing one is a ``WeightsFileNotFoundError``.
    ``mmap`` memory-maps a ``torch.save`` file of the zip format (the tensors are not read).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileNotFoundError(f"{path} does not exist. {fix}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a run was probably killed while writing it. {fix}")
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(path, fix)
        # The legacy (non-zip) format cannot be memory-mapped; a truncated zip is no zip and fails below.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except CheckpointFileError as err:  # names the file, its size and the fix already
        raise CheckpointError(str(err)) from err
    except Exception as err:  # EOFError, a zip reader's RuntimeError, UnpicklingError, SafetensorError, ...
        raise CheckpointError(
            f"{path} ({size} bytes) cannot be read ({type(err).__name__}: {err}): it is truncated or not a weights "
            f"file, as a run killed while writing it leaves it. {fix}"
        ) from err

