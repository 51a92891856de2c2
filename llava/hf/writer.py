"""Writing a converted checkpoint folder: complete or not at all.

Everything is written into a hidden, marked folder beside the output (``make_staging_folder``) and
renamed into place at the end (``publish_new_folder``), so a killed conversion leaves no half
checkpoint, and a file that appears in the output meanwhile is kept (the conversion then fails). The
next conversion to the same output removes what a killed one left (``remove_stale_staging``).
Weights go to safetensors in the Hub's llava-hf layout (``layout.hub_state_dict``), sharded as the
Hub does above ``max_shard_bytes`` (with ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vision_token_compression import make_staging_folder, publish_new_folder

from .layout import hub_state_dict

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PROCESSOR_CONFIG = "processor_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# The loader stub (llava/hf/loader_stub.py) under the name auto_map gives it in the checkpoint.
LOADER_MODULE = "toconv_llava_loader"


def auto_map(prefix: str = "ToConvLlava") -> dict[str, str]:
    """``auto_map`` of a converted config: the stub's classes named ``{prefix}Config``, ``{prefix}Model``, ..."""
    return {
        "AutoConfig": f"{LOADER_MODULE}.{prefix}Config",
        "AutoModel": f"{LOADER_MODULE}.{prefix}Model",
        "AutoModelForImageTextToText": f"{LOADER_MODULE}.{prefix}ForConditionalGeneration",
    }


def auto_map_for(config) -> dict[str, str]:
    """``auto_map`` for ``config`` (a ``ToConvLlavaConfig`` or ``ToConvLlavaNextConfig``), by its class name."""
    return auto_map(type(config).__name__.removesuffix("Config"))


AUTO_MAP = auto_map()
PROCESSOR_AUTO_MAP = {"AutoProcessor": f"{LOADER_MODULE}.ToConvLlavaProcessor"}


@dataclass
class ConvertedCheckpoint:
    """What a converted folder holds: weights under transformers 5's module names, config, processor, generation."""

    config: object  # ToConvLlavaConfig
    weights: dict[str, torch.Tensor]
    processor: object  # ToConvLlavaProcessor
    generation_config: object  # GenerationConfig


def check_output(output: Path) -> Path:
    """Refuse an output that exists, unless it is an empty folder; before anything is read or written."""
    output = Path(output).absolute()
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise FileExistsError(f"OUTPUT {output} exists and is not an empty folder: pass a new folder, or remove it.")
    return output


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every tensor that shares memory with an earlier one cloned (safetensors refuses them).

    Tied embeddings (``lm_head`` = ``embed_tokens``) are stored twice, as the Hub's llava-hf files do.
    """
    seen, out = set(), {}
    for key in sorted(tensors):
        tensor = tensors[key]
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    return [*shards, current]


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """``tensors`` as ``model.safetensors``, or as shards plus an index when larger than ``max_shard_bytes``."""
    shards = _shards(_unshared(tensors), max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFE_WEIGHTS), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _default_permissions(folder: Path) -> None:
    """What a new folder and new files get under the umask (``mkdtemp`` and safetensors make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def add_loader_stub(folder: Path) -> None:
    """Copy the loader stub that ``AUTO_MAP`` names into ``folder`` (see ``loader_stub.py``)."""
    shutil.copyfile(Path(__file__).with_name("loader_stub.py"), folder / f"{LOADER_MODULE}.py")


def _add_processor_auto_map(folder: Path, processor_class: str) -> None:
    path = folder / PROCESSOR_CONFIG
    data = json.loads(path.read_text()) if path.is_file() else {"processor_class": processor_class}
    data["auto_map"] = {"AutoProcessor": f"{LOADER_MODULE}.{processor_class}"}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_checkpoint(
    checkpoint: ConvertedCheckpoint, output: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``checkpoint`` to the folder ``output`` (new or empty), atomically; returns it."""
    output = check_output(output)
    staging = make_staging_folder(output, "toconv-convert-to-hf")
    try:
        checkpoint.config.auto_map = auto_map_for(checkpoint.config)
        checkpoint.config.save_pretrained(staging)
        write_weights(hub_state_dict(checkpoint.weights), staging, max_shard_bytes)
        checkpoint.generation_config.save_pretrained(staging)
        checkpoint.processor.save_pretrained(staging)
        # transformers 5 keeps the image processor in processor_config.json; preprocessor_config.json is what
        # llava-hf checkpoints (and readers of the image processor alone) have.
        checkpoint.processor.image_processor.save_pretrained(staging)
        _add_processor_auto_map(staging, type(checkpoint.processor).__name__)
        add_loader_stub(staging)
        _default_permissions(staging)
        publish_new_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
