"""Reading every tensor of a checkpoint folder, whichever of transformers' weight file layouts it uses."""

from __future__ import annotations

from pathlib import Path

import torch

from vision_token_compression import index_shards

from ..model.weights_io import load_weights_file

_FIX = "Download or copy the checkpoint again (or re-save it), then convert it."
# In transformers' order of lookup: a single file wins over an index beside it.
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files of LLaVA checkpoints that hold only part of a model.
PARTIAL_FILES = {
    "mm_projector.bin": "a projector-only checkpoint (from pretraining)",
    "adapter_config.json": "a LoRA checkpoint",
}


def weight_files(folder: Path) -> list[Path]:
    """The files holding ``folder``'s weights; a ``FileNotFoundError`` naming what it has instead."""
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            return index_shards(index, _FIX)[1]
    partial = [what for name, what in PARTIAL_FILES.items() if (folder / name).exists()]
    if partial:
        raise FileNotFoundError(
            f"{folder} is {partial[0]}, not a full model: it holds no {' or '.join(SINGLE_FILES)}. Merge it into its "
            f"base model first (load it with llava.model.builder.load_pretrained_model(path, model_base, ...) and "
            f"save_pretrained the result), then convert the merged folder."
        )
    raise FileNotFoundError(
        f"{folder} holds no model weights ({', '.join(SINGLE_FILES + INDEX_FILES)})."
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder``, under its names in the files.

    A truncated, empty or unreadable file is a ``CheckpointError`` naming it and its size.
    """
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        tensors.update(load_weights_file(path, _FIX))
    return tensors
