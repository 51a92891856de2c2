"""Compressor checkpoints: safetensors weights plus metadata that says what they were made for."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .models.token_compressor import TokenCompressor

logger = logging.getLogger(__name__)

FORMAT_NAME = "toconv-token-compressor"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class CompressorMetadata:
    """What a compressor checkpoint was built for. Unknown provenance fields are None."""

    input_grid_size: int
    output_grid_size: int
    hidden_dim: int
    kernel_size: int
    stride: int
    padding: int
    vision_tower: str | None = None
    select_layer: int | None = None
    select_feature: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        """Flatten to the string-to-string mapping safetensors stores."""
        out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        for key, value in asdict(self).items():
            if key == "extra":
                out["extra"] = json.dumps(value, sort_keys=True)
            elif value is not None:
                out[key] = str(value)
        return out

    @classmethod
    def from_strings(cls, meta: Mapping[str, str], path: Path) -> CompressorMetadata:
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{path} is not a token compressor checkpoint (metadata format={meta.get('format')!r}, "
                f"expected {FORMAT_NAME!r}). Save compressors with vision_token_compression.save_compressor."
            )
        try:
            return cls(
                input_grid_size=int(meta["input_grid_size"]),
                output_grid_size=int(meta["output_grid_size"]),
                hidden_dim=int(meta["hidden_dim"]),
                kernel_size=int(meta["kernel_size"]),
                stride=int(meta["stride"]),
                padding=int(meta["padding"]),
                vision_tower=meta.get("vision_tower"),
                select_layer=int(meta["select_layer"]) if "select_layer" in meta else None,
                select_feature=meta.get("select_feature"),
                extra=json.loads(meta.get("extra", "{}")),
            )
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path} has incomplete or malformed compressor metadata ({err}): {dict(meta)}") from err


def metadata_of(
    compressor: TokenCompressor,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    select_feature: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> CompressorMetadata:
    """Metadata describing ``compressor`` and, optionally, the tower it was trained against."""
    return CompressorMetadata(
        input_grid_size=compressor.input_grid_size,
        output_grid_size=compressor.output_grid_size,
        hidden_dim=compressor.hidden_dim,
        kernel_size=compressor.kernel_size,
        stride=compressor.stride,
        padding=compressor.padding,
        vision_tower=vision_tower,
        select_layer=select_layer,
        select_feature=select_feature,
        extra=dict(extra or {}),
    )


def save_compressor(
    compressor: TokenCompressor,
    path: str | os.PathLike,
    *,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    select_feature: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``compressor`` to ``path`` as safetensors with metadata, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata_of(compressor, vision_tower, select_layer, select_feature, extra)
    tensors = {k: v.detach().to("cpu") for k, v in compressor.state_dict().items()}  # contiguous already
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta.to_strings())
        # mkstemp's file is 0600; give the checkpoint the permissions of any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("Saved token compressor [%s] to %s", compressor.name, path)
    return path


def _read(path: Path) -> tuple[CompressorMetadata, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"Token compressor checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"Could not read token compressor checkpoint {path}: {err}. The file is corrupt or not "
            f"safetensors; re-save it with vision_token_compression.save_compressor."
        ) from err
    return CompressorMetadata.from_strings(raw_meta, path), tensors


def read_metadata(path: str | os.PathLike) -> CompressorMetadata:
    """Metadata of a compressor checkpoint, without building a module."""
    return _read(Path(path))[0]


def check_metadata(
    meta: CompressorMetadata,
    path: str | os.PathLike,
    *,
    input_grid_size: int,
    output_grid_size: int,
    hidden_dim: int,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    select_feature: str | None = None,
) -> None:
    """Raise ``ValueError`` if the checkpoint's shape-defining fields differ; warn on provenance.

    Grids and hidden size decide the weights' shapes, so a difference is an error. The tower
    name and selected layer/feature say what features it was fitted to: a difference there is
    logged as a warning (a local copy of the same tower has another path).
    """
    wanted = {"input_grid_size": input_grid_size, "output_grid_size": output_grid_size, "hidden_dim": hidden_dim}
    diffs = [f"{k}: checkpoint {getattr(meta, k)} vs expected {v}" for k, v in wanted.items() if getattr(meta, k) != v]
    if diffs:
        raise ValueError(
            f"Token compressor checkpoint {path} does not fit this vision tower ({'; '.join(diffs)}). "
            f"Use a checkpoint trained for {input_grid_size}→{output_grid_size} at hidden size {hidden_dim}, "
            f"or set compression_input_size/compression_output_size to "
            f"{meta.input_grid_size}/{meta.output_grid_size}."
        )
    soft = []
    if vision_tower and meta.vision_tower and Path(vision_tower).name != Path(meta.vision_tower).name:
        soft.append(f"vision_tower: checkpoint {meta.vision_tower!r} vs {vision_tower!r}")
    if select_layer is not None and meta.select_layer is not None and select_layer != meta.select_layer:
        soft.append(f"select_layer: checkpoint {meta.select_layer} vs {select_layer}")
    if select_feature and meta.select_feature and select_feature != meta.select_feature:
        soft.append(f"select_feature: checkpoint {meta.select_feature!r} vs {select_feature!r}")
    if soft:
        logger.warning("Token compressor checkpoint %s was fitted to other features: %s", path, "; ".join(soft))


def load_compressor_into(
    compressor: TokenCompressor,
    path: str | os.PathLike,
    *,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    select_feature: str | None = None,
) -> CompressorMetadata:
    """Load a checkpoint's weights into an existing compressor after checking its metadata."""
    path = Path(path)
    meta, tensors = _read(path)
    check_metadata(
        meta, path,
        input_grid_size=compressor.input_grid_size,
        output_grid_size=compressor.output_grid_size,
        hidden_dim=compressor.hidden_dim,
        vision_tower=vision_tower, select_layer=select_layer, select_feature=select_feature,
    )
    expected = set(compressor.state_dict())
    if set(tensors) != expected:
        raise ValueError(
            f"Token compressor checkpoint {path} holds tensors {sorted(tensors)}, expected {sorted(expected)}."
        )
    compressor.load_state_dict(tensors)
    logger.info("Loaded token compressor [%s] from %s", compressor.name, path)
    return meta


def load_compressor(path: str | os.PathLike, device: torch.device | str = "cpu") -> TokenCompressor:
    """Build a compressor from a checkpoint's metadata and load its weights."""
    meta = read_metadata(path)
    compressor = TokenCompressor(meta.input_grid_size, meta.output_grid_size, meta.hidden_dim)
    if (compressor.kernel_size, compressor.stride, compressor.padding) != (meta.kernel_size, meta.stride, meta.padding):
        raise ValueError(
            f"Token compressor checkpoint {path} uses PartialConv(k={meta.kernel_size}, s={meta.stride}, "
            f"p={meta.padding}) but this version builds k={compressor.kernel_size}, s={compressor.stride}, "
            f"p={compressor.padding} for {meta.input_grid_size}→{meta.output_grid_size}."
        )
    load_compressor_into(compressor, path)
    return compressor.to(device)
