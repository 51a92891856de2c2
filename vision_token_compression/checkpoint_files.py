"""Reading a checkpoint's files (safetensors weights, JSON) with errors that name the file, its size and the fix.

A download or copy that stopped early, a disk that filled up, or a run killed while writing leaves a
safetensors file shorter than its header says. The ``safetensors`` package then raises a bare
``SafetensorError: ... incomplete metadata, file not fully covered`` (no file, no size), and
transformers and vLLM pass it on. Every host here (the fork's loader, the converters, the Hugging
Face-native models, the vLLM plugin, the compressor's own checkpoints) checks a file's header
against its size first, which costs one small read, and raises ``CheckpointFileError`` instead:

- ``read_safetensors_header`` / ``check_safetensors_file``: the header, checked against the file size;
- ``load_safetensors`` / ``open_safetensors``: ``safetensors``' own readers, after that check;
- ``checkpoint_safetensors`` / ``check_checkpoint_safetensors``: the safetensors files of a Hugging
  Face checkpoint folder (``model.safetensors``, or the shards its index names), each checked;
  ``index_shards``: a weight index's map and shards (``.safetensors`` or ``.bin``);
- ``read_json_object``: a ``config.json`` or an index, refused by name when it is not a JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_FIX = "Download or copy the checkpoint again (or re-save it): the file is damaged."
# safetensors refuses headers above 100 MB; a length beyond that is not a header.
_MAX_HEADER_BYTES = 100_000_000


class CheckpointFileError(ValueError):
    """A checkpoint file is empty, truncated or not what its name says; the message names it, its size and the fix."""


def _fail(path: Path, size: int, problem: str, fix: str) -> CheckpointFileError:
    return CheckpointFileError(f"{path} ({size} bytes) {problem}. {fix}")


def _size(path: Path, fix: str) -> int:
    """``path``'s size in bytes; ``FileNotFoundError`` naming it when it is not a file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist{' (it is a folder)' if path.is_dir() else ''}. {fix}")
    return path.stat().st_size


def read_json_object(path: str | os.PathLike, fix: str = DEFAULT_FIX) -> dict:
    """The JSON object in ``path``; a ``CheckpointFileError`` naming the file when it is empty, not JSON or not an object.

    A missing file is a ``FileNotFoundError`` naming it.
    """
    path = Path(path)
    size = _size(path, fix)
    if size == 0:
        raise _fail(path, size, "is empty", fix)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _fail(path, size, f"is not UTF-8 text ({err.reason} at byte {err.start}), so not JSON", fix) from None
    except json.JSONDecodeError as err:
        raise _fail(path, size, f"is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}): it is "
                    f"truncated or was edited by hand", fix) from None
    if not isinstance(data, dict):
        raise _fail(path, size, f"holds a JSON {type(data).__name__}, not the object (key: value) expected", fix)
    return data


def read_safetensors_header(path: str | os.PathLike, fix: str = DEFAULT_FIX) -> dict:
    """The header of a safetensors file (tensor name → dtype, shape, offsets; ``__metadata__``), checked against its size.

    Reads only the header. Raises ``CheckpointFileError`` naming the file, its size and ``fix`` when
    the file is empty, shorter than the header says (truncated), longer (appended to) or has no
    valid header; ``FileNotFoundError`` when it does not exist.
    """
    path = Path(path)
    size = _size(path, fix)
    if size == 0:
        raise _fail(path, size, "is empty: a safetensors file holds at least an 8-byte length and a header", fix)
    if size < 8:
        raise _fail(path, size, "is truncated: too short for a safetensors file's 8-byte header length", fix)
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _MAX_HEADER_BYTES:
            raise _fail(path, size, f"is not a safetensors file: its first 8 bytes announce a {length}-byte header", fix)
        if 8 + length > size:
            raise _fail(path, size, f"is truncated: its {length}-byte header alone needs {8 + length} bytes", fix)
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise _fail(path, size, "is not a safetensors file: its header is not the JSON table of tensors", fix) from None
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise _fail(path, size, f"is truncated: its header describes {expected} bytes, {expected - size} more than "
                    f"the file holds", fix)
    if size > expected:
        raise _fail(path, size, f"is damaged: its header describes {expected} bytes, and {size - expected} bytes "
                    f"follow them", fix)
    return header


def check_safetensors_file(path: str | os.PathLike, fix: str = DEFAULT_FIX) -> Path:
    """Raise ``CheckpointFileError`` (see ``read_safetensors_header``) unless ``path`` is a complete safetensors file."""
    read_safetensors_header(path, fix)
    return Path(path)


def load_safetensors(path: str | os.PathLike, fix: str = DEFAULT_FIX) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file(path)`` on the CPU, after ``check_safetensors_file``; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_safetensors_file(path, fix)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:  # a header that passed our check but not safetensors' own
        raise _fail(path, path.stat().st_size, f"cannot be read ({type(err).__name__}: {err})", fix) from err


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, fix: str = DEFAULT_FIX) -> Iterator:
    """``safetensors.safe_open(path, framework="pt")`` after ``check_safetensors_file``; errors name the file."""
    from safetensors import SafetensorError, safe_open

    path = check_safetensors_file(path, fix)
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise _fail(path, path.stat().st_size, f"cannot be read ({type(err).__name__}: {err})", fix) from err
    with handle as f:
        yield f


def index_shards(index: str | os.PathLike, fix: str = DEFAULT_FIX) -> tuple[dict, list[Path]]:
    """(the index, the shard paths) of a weight index (``*.index.json``), each shard present.

    The index is read with ``read_json_object``; one without a ``weight_map`` of names to files is a
    ``CheckpointFileError``, a shard it names that is missing a ``FileNotFoundError``, each naming the index.
    """
    index = Path(index)
    data = read_json_object(index, fix)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _fail(index, index.stat().st_size, "has no weight_map of tensor names to shard files", fix)
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}. {fix}")
    return data, [index.parent / shard for shard in shards]


def checkpoint_safetensors(folder: str | os.PathLike, fix: str = DEFAULT_FIX) -> list[Path]:
    """The safetensors files transformers would load from the checkpoint ``folder``: ``model.safetensors``, or the shards
    ``model.safetensors.index.json`` names (``index_shards``); [] when it has neither (other formats).
    """
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS).is_file():
        return [folder / SAFE_WEIGHTS]
    if not (folder / SAFE_INDEX).is_file():
        return []
    return index_shards(folder / SAFE_INDEX, fix)[1]


def check_checkpoint_safetensors(folder: str | os.PathLike, fix: str = DEFAULT_FIX) -> list[Path]:
    """``checkpoint_safetensors(folder)``, each file checked (``check_safetensors_file``); a folder only."""
    return [check_safetensors_file(path, fix) for path in checkpoint_safetensors(folder, fix)]
