"""The one check of a compressor's weights, wherever a host found them, and the one provenance rule.

A host (LLaVA's loaders, a vLLM plugin, a checkpoint converter) finds a compressor's tensors in its
own files under its own key prefix; once it has them keyed as the compressor names them
(``conv.weight``, ``conv.bias``, ``grid_sizes``), ``load_compressor_tensors`` checks and loads them:

- the grid-size record (``GRID_SIZES_KEY``) must name the compressor's sizes; weights saved without
  one are accepted (logged), optionally checked against a record the host found elsewhere;
- names and shapes must be the compressor's: a tensor of another width is refused before anything loads;
- non-finite values load with a warning that names the source and the tensor.

``check_weights_in_place`` is the same check for weights a framework already wrote into the module
(transformers' ``from_pretrained``). ``check_provenance`` is what a converter checks before it
writes a compressor checkpoint into a model for good.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .checkpoint import CompressorMetadata, check_metadata, provenance_differences, warn_non_finite
from .models.token_compressor import GRID_SIZES_KEY, TokenCompressor

logger = logging.getLogger(__name__)


def compressor_shapes(compressor: TokenCompressor) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor ``compressor`` holds, from its sizes (right under ZeRO-3 partitioning too)."""
    c, k = compressor.hidden_dim, compressor.kernel_size
    shapes = {"conv.weight": (c, c, k, k)}
    if compressor.conv.bias is not None:
        shapes["conv.bias"] = (c,)
    shapes[GRID_SIZES_KEY] = (2,)
    return shapes


def _fix_suffix(fix: str | None) -> str:
    return f" {fix}" if fix else ""


def _check_names_and_shapes(
    compressor: TokenCompressor, tensors: Mapping[str, torch.Tensor], source: str, fix: str | None, features: str,
) -> None:
    """Refuse missing or unexpected names, and tensors of another shape (another tower's width)."""
    wanted = compressor_shapes(compressor)
    missing = [name for name in wanted if name != GRID_SIZES_KEY and name not in tensors]
    if missing:
        raise ValueError(
            f"The token compressor weights in {source} lack {', '.join(missing)} (found: "
            f"{', '.join(sorted(tensors)) or 'none'}): the compressor would keep its initialisation.{_fix_suffix(fix)}"
        )
    misfits = [  # in the compressor's order: conv.weight, conv.bias, the record; then what it does not have
        f"{name} is {tuple(tensors[name].shape)}, expected {shape}"
        for name, shape in wanted.items() if name in tensors and tuple(tensors[name].shape) != shape
    ] + [f"unexpected {name}" for name in sorted(set(tensors) - set(wanted))]
    if misfits:
        raise ValueError(
            f"The token compressor weights in {source} do not fit a {compressor.name} compressor over "
            f"{compressor.hidden_dim}-channel {features}: {'; '.join(misfits)}. They were made for another vision "
            f"tower or another compressor.{_fix_suffix(fix)}"
        )


def check_compressor_tensors(
    compressor: TokenCompressor,
    tensors: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    recorded_grid_sizes: Sequence[int] | None = None,
    record_source: str | os.PathLike | None = None,
    fix: str | None = None,
    features: str = "features",
) -> dict[str, torch.Tensor]:
    """Check a compressor's tensors before they load; return them with the grid-size record to load.

    Nothing is changed in ``compressor``, so a host that must copy the tensors itself (e.g. into
    parameters that DeepSpeed ZeRO-3 partitions) checks with this and copies what it returns.

    Args:
        compressor: The compressor the tensors are meant for.
        tensors: Keyed as the compressor names them: ``conv.weight``, ``conv.bias`` and, when the
            weights were saved with it, ``grid_sizes`` (``GRID_SIZES_KEY``).
        source: Where they come from (a file or folder), named in every error and warning.
        recorded_grid_sizes: ``(input, output)`` sizes recorded elsewhere, used when ``tensors``
            hold no record (e.g. a compressor checkpoint saved beside the weights file).
        record_source: Where ``recorded_grid_sizes`` come from, named in the error.
        fix: What the user should do about a misfit, appended to the name and shape errors.
        features: What the compressor's input is, as the host names it (e.g. "CLIP features").

    Raises:
        GridSizeMismatchError: The record names other grid sizes.
        ValueError: Tensors missing, unexpected or of another shape.
    """
    source = os.fspath(source)
    state = dict(tensors)
    # The record first: for weights of another geometry its error names the settings that fit them.
    if GRID_SIZES_KEY in state:
        compressor.check_grid_sizes(state[GRID_SIZES_KEY], source=source)
    elif recorded_grid_sizes is not None:
        where = f"{source} (grid sizes recorded in {os.fspath(record_source)})" if record_source else source
        compressor.check_grid_sizes(recorded_grid_sizes, source=where)
        state[GRID_SIZES_KEY] = torch.tensor(list(recorded_grid_sizes), dtype=torch.int64)
    _check_names_and_shapes(compressor, tensors, source, fix, features)
    if GRID_SIZES_KEY not in state:
        # Saved before the record existed: accepted, said once; the compressor's own sizes are kept.
        compressor.accept_unrecorded_grid_sizes(source)
        state[GRID_SIZES_KEY] = torch.tensor([compressor.input_grid_size, compressor.output_grid_size])
    warn_non_finite(tensors, source)
    return state


def load_compressor_tensors(
    compressor: TokenCompressor,
    tensors: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    **options,
) -> dict[str, torch.Tensor]:
    """Check a compressor's tensors (``check_compressor_tensors``, same ``options``) and load them into it.

    What every host calls once it has the compressor's tensors from its own files. Returns what was
    loaded, the grid-size record included.
    """
    state = check_compressor_tensors(compressor, tensors, source, **options)
    compressor.load_state_dict(state)
    logger.info("Loaded token compressor [%s] from %s", compressor.name, os.fspath(source))
    return state


def check_weights_in_place(compressor: TokenCompressor, source: str | os.PathLike, *, recorded: bool = True) -> None:
    """Check weights that a framework loaded into ``compressor`` itself (transformers' ``from_pretrained``).

    Such loaders bypass ``load_state_dict`` and its record check. ``recorded=False`` says the loaded
    files held no grid-size record: they are accepted (logged once) and the compressor keeps its own.
    Non-finite values are logged as a warning, and the conv weight gets its fast layout back
    (``TokenCompressor.restore_weight_layout``).

    Raises:
        GridSizeMismatchError: The loaded record names other grid sizes.
    """
    source = os.fspath(source)
    if recorded:
        compressor.check_grid_sizes(source=source)
    else:
        compressor.accept_unrecorded_grid_sizes(source)
    warn_non_finite(compressor.state_dict(), source)
    compressor.restore_weight_layout()


def check_provenance(
    meta: CompressorMetadata,
    path: str | os.PathLike,
    *,
    input_grid_size: int,
    hidden_dim: int,
    output_grid_size: int | None = None,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    select_feature: str | None = None,
) -> None:
    """Refuse a compressor checkpoint that does not fit a tower, or was fitted to other features, for good.

    For a converter that writes the checkpoint's weights into a model: grid sizes and width are
    checked as ``check_metadata`` does (``output_grid_size=None`` takes the checkpoint's own), and
    another tower, select layer or select feature, which loading only warns about, is an error here,
    since the written model keeps the mismatch.
    """
    check_metadata(
        meta, path, input_grid_size=input_grid_size,
        output_grid_size=meta.output_grid_size if output_grid_size is None else output_grid_size,
        hidden_dim=hidden_dim,
    )
    diffs = provenance_differences(meta, vision_tower, select_layer, select_feature)
    if diffs:
        raise ValueError(
            f"Token compressor checkpoint {Path(path)} was fitted to other features than the model it would go into "
            f"({'; '.join(diffs)}). Use a compressor trained on {vision_tower or 'the same tower'} at select layer "
            f"{select_layer} and select feature {select_feature!r}."
        )
