"""Refusing, at ``from_pretrained``, a stored compressor that does not fit the model its config describes.

Before loading (local folders): the stored conv must have the shape the config's tower and grid
sizes give (C×C×k×k); transformers would otherwise stop on a size mismatch without naming a fix.
After loading: the grid-size record must name the config's sizes (the library's
``check_weights_in_place``): 24→12 and 24→8 weights have kernels of the same shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from vision_token_compression import GRID_SIZES_KEY, check_weights_in_place, choose_geometry

from ..model.compressor_layout import HF_HUB
from .writer import SAFE_INDEX, SAFE_WEIGHTS

CONV_WEIGHT = HF_HUB.key("conv.weight")
RECORD = HF_HUB.key(GRID_SIZES_KEY)
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
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: weight_map[name] for name in names if name in weight_map}
    else:
        return {}
    found = {}
    for name, file in files.items():
        with safe_open(str(folder / file), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                found[name] = f.get_slice(name)
    return found


def check_stored_compressor(path: str | os.PathLike, config) -> None:
    """Raise ``ValueError`` naming the fix if a local checkpoint's compressor conv does not fit ``config``."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a Hub id: transformers' own size check and check_loaded_compressor still apply
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
