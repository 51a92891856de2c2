"""Refusing, at ``from_pretrained``, a stored compressor that does not fit the model its config describes.

Before loading (local folders): every safetensors file must be complete (a truncated one is named
with its size, not a bare ``SafetensorError``); the stored conv must have the shape the config's
tower and grid sizes give (C×C×k×k), where transformers would stop on a size mismatch without naming
a fix; and a ``processor_config.json`` beside it must count the image tokens the compressor makes.
After loading: the grid-size record must name the config's sizes (the library's
``check_weights_in_place``): 24→12 and 24→8 weights have kernels of the same shape.
"""

from __future__ import annotations

import os
from pathlib import Path

from vision_token_compression import (
    GRID_SIZES_KEY,
    check_checkpoint_safetensors,
    check_weights_in_place,
    choose_geometry,
    index_shards,
    open_safetensors,
    read_json_object,
)

from ..model.compressor_layout import HF_HUB
from .writer import PROCESSOR_CONFIG, SAFE_INDEX, SAFE_WEIGHTS

CONFIG_NAME = "config.json"
TOCONV_MODEL_TYPES = ("toconv_llava", "toconv_llava_next")
CONV_WEIGHT = HF_HUB.key("conv.weight")
RECORD = HF_HUB.key(GRID_SIZES_KEY)
_DAMAGED_FIX = "Download or copy the checkpoint again, or convert its source again with toconv-convert-to-hf."
_FIX = (
    "Convert the source checkpoint again with toconv-convert-to-hf (average init, or --token-compressor-path with a "
    "compressor trained for this tower and these sizes), or undo the edit of config.json."
)


def _stored(folder: Path, names: tuple[str, ...]) -> dict:
    """``name → tensor`` for those of ``names`` in the folder's safetensors files (small tensors only are read)."""
    index = folder / SAFE_INDEX
    if (folder / SAFE_WEIGHTS).is_file():
        files = {name: SAFE_WEIGHTS for name in names}
    elif index.is_file():
        weight_map = index_shards(index, _DAMAGED_FIX)[0]["weight_map"]
        files = {name: weight_map[name] for name in names if name in weight_map}
    else:
        return {}
    found = {}
    for name, file in files.items():
        with open_safetensors(folder / file, _DAMAGED_FIX) as f:
            if name in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                found[name] = f.get_slice(name)
    return found


def check_stored_compressor(path: str | os.PathLike, config) -> None:
    """Raise ``ValueError`` naming the fix if a local checkpoint's weight files are damaged, or its compressor conv
    does not fit ``config``."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a Hub id: transformers' own size check and check_loaded_compressor still apply
    check_checkpoint_safetensors(folder, _DAMAGED_FIX)
    stored = _stored(folder, (CONV_WEIGHT, RECORD))
    if CONV_WEIGHT not in stored:
        return
    hidden = config.vision_config.hidden_size
    kernel = choose_geometry(config.compression_input_size, config.compression_output_size).kernel_size
    wanted = (hidden, hidden, kernel, kernel)
    shape = tuple(stored[CONV_WEIGHT].get_shape())
    if shape == wanted:
        return
    record = stored.get(RECORD)
    recorded = f" (its grid-size record says {record[:].tolist()})" if record is not None else ""
    raise ValueError(
        f"{folder}: the token compressor's conv weight has shape {shape}{recorded}, but the config describes "
        f"{wanted}: hidden size {hidden} (vision_config.hidden_size) and a {kernel}×{kernel} kernel for "
        f"{config.compression_input_size}→{config.compression_output_size}. The compressor was made for another "
        f"vision tower or other grid sizes. {_FIX}"
    )


def check_loaded_compressor(loaded, source) -> None:
    """After ``from_pretrained``: the compressor's grid-size record must name the config's sizes."""
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
    # from_pretrained wrote the weights into the module itself, past load_state_dict's record check.
    check_weights_in_place(model.token_compressor, source)


# ---- the processor against the model it serves ------------------------------------------------------


def _model_config_beside(path: str | os.PathLike) -> dict | None:
    """The ToConv model config (a dict) of the checkpoint ``path`` a processor was loaded from; None without one."""
    if os.path.isdir(path):
        config_file = os.path.join(path, CONFIG_NAME)
        config_file = config_file if os.path.isfile(config_file) else None
    else:  # a Hub id: the config in the cache (fetched if need be, as loading the model would)
        from transformers.utils import cached_file

        config_file = cached_file(os.fspath(path), CONFIG_NAME, _raise_exceptions_for_missing_entries=False,
                                  _raise_exceptions_for_connection_errors=False)
    if config_file is None:
        return None
    config = read_json_object(config_file, _DAMAGED_FIX)
    return config if config.get("model_type") in TOCONV_MODEL_TYPES else None


def _tile(image_processor) -> int | None:
    crop = getattr(image_processor, "crop_size", None)
    crop = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
    return int(crop) if crop is not None else None


def processor_differences(processor, config: dict) -> list[str]:
    """What of ``processor``'s image-token count contradicts the model ``config`` (a ToConv config.json as a dict)."""
    diffs = []
    size = config.get("compression_output_size")
    if processor.compression_output_size != size:
        diffs.append(f"compression_output_size: processor {processor.compression_output_size} "
                     f"({processor.compression_output_size ** 2} tokens per image or tile) vs model {size} "
                     f"({size ** 2 if isinstance(size, int) else '?'} from its compressor)")
    if config.get("model_type") == "toconv_llava_next":
        pinpoints = [list(p) for p in getattr(processor.image_processor, "image_grid_pinpoints", None) or []]
        wanted = [list(p) for p in config.get("image_grid_pinpoints") or []]
        if pinpoints != wanted:
            diffs.append(f"image_grid_pinpoints: processor {pinpoints} vs model {wanted}")
        tile, image_size = _tile(processor.image_processor), (config.get("vision_config") or {}).get("image_size")
        if tile is not None and image_size is not None and tile != image_size:
            diffs.append(f"tile size: processor crop_size {tile} vs model vision_config.image_size {image_size}")
    return diffs


def check_processor_fits_model(processor, path: str | os.PathLike) -> None:
    """Refuse, at ``from_pretrained``, a processor whose image-token count contradicts the model saved beside it.

    Such a processor inserts a number of ``<image>`` placeholders that the model's compressor does
    not make, and ``generate`` (or vLLM's first request) would fail far from the cause. Only a
    ToConv config.json at ``path`` is compared; a processor loaded from elsewhere is not checked.
    """
    config = _model_config_beside(path)
    if config is None:
        return
    diffs = processor_differences(processor, config)
    if diffs:
        raise ValueError(
            f"{path}: the processor ({PROCESSOR_CONFIG}, or the arguments given to from_pretrained) does not count the "
            f"image tokens the model makes ({CONFIG_NAME}): {'; '.join(diffs)}. Every image would get a wrong number "
            f"of placeholders. Undo the edit of {PROCESSOR_CONFIG} or {CONFIG_NAME} (both are written by "
            f"toconv-convert-to-hf), or convert the source checkpoint again."
        )
