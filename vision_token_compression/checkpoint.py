"""Compressor checkpoints: safetensors weights plus metadata that says what they were made for."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
from .checkpoint_files import read_safetensors_header
from .models.geometry import choose_geometry
from .models.token_compressor import GRID_SIZES_KEY, InitMode, TokenCompressor

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


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Name → what is wrong (``"3 NaN, 1 inf of 9216 values"``) for each floating tensor holding NaN or ±inf."""
    found = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        found[name] = f"{nan} NaN, {tensor.numel() - int(finite.sum()) - nan} inf of {tensor.numel()} values"
    return found


def warn_non_finite(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike) -> list[str]:
    """Log a warning naming ``source`` and every tensor of ``tensors`` that holds NaN or ±inf; return their names.

    A warning, not an error: the weights still load (a user may want to inspect them), but a
    compressor with such weights turns every image into NaN features.
    """
    found = non_finite_tensors(tensors)
    if found:
        logger.warning(
            "Token compressor weights from %s hold non-finite values: %s. Every compressed token will be NaN or "
            "inf; use an earlier checkpoint of the run that wrote them.",
            source, "; ".join(f"{name} ({what})" for name, what in found.items()),
        )
    return sorted(found)


def save_compressor(
    compressor: TokenCompressor,
    path: str | os.PathLike,
    *,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    select_feature: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``compressor`` to ``path`` as safetensors with metadata, atomically (``atomic_write``)."""
    path = Path(path)
    meta = metadata_of(compressor, vision_tower, select_layer, select_feature, extra)
    tensors = {k: v.detach().to("cpu") for k, v in compressor.state_dict().items()}  # contiguous already
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta.to_strings())
    logger.info("Saved token compressor [%s] to %s", compressor.name, path)
    return path


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, I64, ...


def _read_header(path: Path) -> tuple[CompressorMetadata, dict[str, _TensorInfo]]:
    """Metadata and tensor shapes of a checkpoint, from its header alone (no tensor is read)."""
    if not path.is_file():
        raise FileNotFoundError(f"Token compressor checkpoint not found: {path}")
    # A truncated or empty file is named with its size (safetensors' own error names neither).
    read_safetensors_header(path, "The file is corrupt, truncated or not safetensors; re-save it with "
                            "vision_token_compression.save_compressor.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            infos = {}
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                view = f.get_slice(key)
                infos[key] = _TensorInfo(tuple(view.get_shape()), view.get_dtype())
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"Could not read token compressor checkpoint {path}: {err}. The file is corrupt, truncated or not "
            f"safetensors; re-save it with vision_token_compression.save_compressor."
        ) from err
    return CompressorMetadata.from_strings(raw_meta, path), infos


def expected_shapes(meta: CompressorMetadata) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a compressor with ``meta``'s sizes holds (the bias is optional)."""
    c, k = meta.hidden_dim, meta.kernel_size
    return {"conv.weight": (c, c, k, k), "conv.bias": (c,), GRID_SIZES_KEY: (2,)}


def _check_header(meta: CompressorMetadata, infos: Mapping[str, _TensorInfo], path: Path) -> None:
    """Refuse a checkpoint whose metadata contradicts its own tensors or this version's geometry.

    Runs on the header alone, before any module is built: metadata claiming hidden_dim 20000 in a
    file of 3×3 kernels of width 2 would otherwise allocate the claimed 14 GB first.
    """
    for name in ("input_grid_size", "output_grid_size", "hidden_dim"):
        if getattr(meta, name) < 1:
            raise ValueError(f"Token compressor checkpoint {path} has nonsense metadata: {name}={getattr(meta, name)}.")
    try:
        geometry = choose_geometry(meta.input_grid_size, meta.output_grid_size)
    except ValueError as err:
        raise ValueError(f"Token compressor checkpoint {path} has nonsense grid sizes in its metadata: {err}") from err
    if (geometry.kernel_size, geometry.stride, geometry.padding) != (meta.kernel_size, meta.stride, meta.padding):
        raise ValueError(
            f"Token compressor checkpoint {path} uses PartialConv(k={meta.kernel_size}, s={meta.stride}, "
            f"p={meta.padding}) but this version builds k={geometry.kernel_size}, s={geometry.stride}, "
            f"p={geometry.padding} for {meta.input_grid_size}→{meta.output_grid_size}."
        )
    wanted = expected_shapes(meta)
    if "conv.weight" not in infos:
        raise ValueError(f"Token compressor checkpoint {path} holds no conv.weight (tensors: {sorted(infos)}).")
    for name, shape in wanted.items():
        info = infos.get(name)
        if info is not None and info.shape != shape:
            raise ValueError(
                f"Token compressor checkpoint {path} is inconsistent: its metadata claims "
                f"{meta.input_grid_size}→{meta.output_grid_size} at hidden_dim {meta.hidden_dim} (kernel "
                f"{meta.kernel_size}), so {name} should have shape {shape}, but the file holds {name} of "
                f"shape {info.shape}. The file is damaged or its metadata was edited; re-save it with "
                f"vision_token_compression.save_compressor."
            )


def _read_tensors(path: Path, meta: CompressorMetadata) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (read after ``_check_header``), with its grid-size record checked or added."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"Could not read the tensors of token compressor checkpoint {path}: {err}.") from err
    claimed = [meta.input_grid_size, meta.output_grid_size]
    record = tensors.get(GRID_SIZES_KEY)
    if record is None:  # saved before the record existed: the metadata says the same
        tensors[GRID_SIZES_KEY] = torch.tensor(claimed)
    elif record.tolist() != claimed:
        raise ValueError(
            f"Token compressor checkpoint {path} is inconsistent: its metadata says "
            f"{claimed[0]}→{claimed[1]} but its {GRID_SIZES_KEY} tensor says {record.tolist()}."
        )
    warn_non_finite(tensors, path)
    return tensors


def read_metadata(path: str | os.PathLike) -> CompressorMetadata:
    """Metadata of a compressor checkpoint, read from its header (no tensor is loaded)."""
    return _read_header(Path(path))[0]


def provenance_differences(
    meta: CompressorMetadata,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    select_feature: str | None = None,
) -> list[str]:
    """What a checkpoint was fitted to that differs from the given tower, select layer and feature.

    ``"select_layer: checkpoint -1 vs -2"``, one string a difference. Fields unknown on
    either side are not compared; towers are compared by their last path part (a local copy of
    ``openai/clip-vit-large-patch14-336`` is the same tower).
    """
    diffs = []
    if vision_tower and meta.vision_tower and Path(vision_tower).name != Path(meta.vision_tower).name:
        diffs.append(f"vision_tower: checkpoint {meta.vision_tower!r} vs {vision_tower!r}")
    if select_layer is not None and meta.select_layer is not None and select_layer != meta.select_layer:
        diffs.append(f"select_layer: checkpoint {meta.select_layer} vs {select_layer}")
    if select_feature and meta.select_feature and select_feature != meta.select_feature:
        diffs.append(f"select_feature: checkpoint {meta.select_feature!r} vs {select_feature!r}")
    return diffs


def _metadata_fix(meta: CompressorMetadata, input_grid_size: int, output_grid_size: int, hidden_dim: int) -> str:
    """What to do about a misfit: the grid sizes can be set to the checkpoint's; a tower's width cannot."""
    if meta.hidden_dim != hidden_dim:
        made_for = f" ({meta.vision_tower})" if meta.vision_tower else ""
        return (f"It was fitted to a {meta.hidden_dim}-channel vision tower{made_for}, and this one has {hidden_dim} "
                f"channels: use a compressor trained on this tower (toconv-train-compressor --vision-tower with this "
                f"tower), or the tower it was made for.")
    return (f"Use a checkpoint trained for {input_grid_size}→{output_grid_size}, or set "
            f"compression_input_size/compression_output_size to {meta.input_grid_size}/{meta.output_grid_size}.")


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
            f"{_metadata_fix(meta, input_grid_size, output_grid_size, hidden_dim)}"
        )
    soft = provenance_differences(meta, vision_tower, select_layer, select_feature)
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
    """Load a checkpoint's weights into an existing compressor after checking its metadata and shapes.

    Everything is checked from the file's header before a tensor is read; non-finite weights load
    with a warning that names the file and the tensor.
    """
    path = Path(path)
    meta, infos = _read_header(path)
    check_metadata(
        meta, path,
        input_grid_size=compressor.input_grid_size,
        output_grid_size=compressor.output_grid_size,
        hidden_dim=compressor.hidden_dim,
        vision_tower=vision_tower, select_layer=select_layer, select_feature=select_feature,
    )
    _check_header(meta, infos, path)
    expected = set(compressor.state_dict())
    if set(infos) | {GRID_SIZES_KEY} != expected:
        raise ValueError(
            f"Token compressor checkpoint {path} holds tensors {sorted(infos)}, expected {sorted(expected)}."
        )
    compressor.load_state_dict(_read_tensors(path, meta))
    logger.info("Loaded token compressor [%s] from %s", compressor.name, path)
    return meta


def load_compressor(path: str | os.PathLike, device: torch.device | str = "cpu") -> TokenCompressor:
    """Build a compressor from a checkpoint's metadata and load its weights.

    The metadata is checked against the file's own tensor shapes first, so a file that claims a
    larger compressor than it holds is refused before anything of the claimed size is allocated.
    """
    path = Path(path)
    meta, infos = _read_header(path)
    _check_header(meta, infos, path)
    compressor = TokenCompressor(meta.input_grid_size, meta.output_grid_size, meta.hidden_dim)
    load_compressor_into(compressor, path)
    return compressor.to(device)


def build_compressor(
    input_grid_size: int,
    output_grid_size: int,
    hidden_dim: int,
    checkpoint: str | os.PathLike | None = None,
    *,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    select_feature: str | None = None,
    init: InitMode = "average",
) -> TokenCompressor:
    """The compressor for a vision tower's geometry, with a checkpoint's weights when one is given.

    What a host (a vision tower, a checkpoint converter) calls to get its compressor. Without a
    checkpoint the weights are ``init``'s (the window average by default). With one, its metadata
    is checked against the tower first (``load_compressor_into``): other grid sizes or hidden size
    are a ``ValueError`` naming what differs, another tower or select layer/feature a warning.

    Args:
        input_grid_size: Side of the tower's patch grid (24 for CLIP ViT-L/14-336).
        output_grid_size: Side of the compressed grid.
        hidden_dim: The tower's hidden size (1024 for ViT-L).
        checkpoint: A compressor checkpoint (safetensors, from ``save_compressor`` or the trainer).
        vision_tower: The tower's name or path, compared with the checkpoint's.
        select_layer: The tower's selected hidden state (LLaVA's ``mm_vision_select_layer``).
        select_feature: ``"patch"`` or ``"cls_patch"`` (LLaVA's ``mm_vision_select_feature``).
        init: Weights without a checkpoint: ``"average"`` or ``"random"``.
    """
    compressor = TokenCompressor(input_grid_size, output_grid_size, hidden_dim, init=init)
    if checkpoint:
        load_compressor_into(
            compressor, checkpoint, vision_tower=vision_tower, select_layer=select_layer, select_feature=select_feature,
        )
    return compressor
