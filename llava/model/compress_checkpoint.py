"""Write a compressed variant of a LLaVA checkpoint, so that clients that know nothing of compression use it.

::

    python -m llava.model.compress_checkpoint --model-path liuhaotian/llava-v1.5-7b \\
        --save-path checkpoints/llava-v1.5-7b-toconv12 --compression-output-size 12

An upstream-style ``load_pretrained_model(save_path, None, name)`` (lmms-eval, VLMEvalKit, upstream's
eval scripts) then loads the model with 144 (12×12) image tokens instead of 576. The output folder
holds only

- ``config.json``: the source config with ``use_token_compression``, ``compression_input_size``
  (the tower's grid) and ``compression_output_size`` set; written last, so a folder with a config is
  complete (the folder is assembled under a temporary name and renamed into place);
- the token compressor's weights under the model's parameter names
  (``model.vision_tower.token_compressor.conv.weight``, ``...conv.bias``), float32, and its grid
  sizes (``...token_compressor.grid_sizes``, int64; a loader refuses the weights for another
  geometry): the average init (each token the mean of its window) or a compressor checkpoint
  (``--token-compressor-path``);
- for a full checkpoint, a weight index that sends the source's tensors to links of the source's
  weight files and the compressor's to a new small file.

Everything else (weights, tokenizer, generation config, adapters) is linked: symlinks by default,
hardlinks with ``--link hardlink``. How each kind of source is written:

==========================================  ==================================================================
source (in transformers' order of lookup)   output
==========================================  ==================================================================
``model.safetensors``                       ``model-00001-of-00001.safetensors`` (link),
                                            ``model-token_compressor.safetensors``, ``model.safetensors.index.json``
``model.safetensors.index.json`` + shards   the shards (links), ``model-token_compressor.safetensors``, new index
``pytorch_model.bin``                       ``pytorch_model-00001-of-00001.bin`` (link),
                                            ``pytorch_model-token_compressor.bin``, ``pytorch_model.bin.index.json``
``pytorch_model.bin.index.json`` + shards   the shards (links), ``pytorch_model-token_compressor.bin``, new index
``mm_projector.bin`` (projector only)       a new ``mm_projector.bin``: the projector plus the compressor
                                            (and ``token_compressor.safetensors``, as pretraining writes)
``non_lora_trainables.bin`` (LoRA)          a new ``non_lora_trainables.bin``: plus the compressor, PEFT names
==========================================  ==================================================================

A single weight file is linked under a shard name because transformers loads ``model.safetensors``
(or ``pytorch_model.bin``) as the whole model when it exists and ignores an index beside it. The
compressor shard of a ``.bin`` checkpoint is a ``.bin`` too (tensors only, read with
``weights_only``): loaders pick one format for all files an index names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from vision_token_compression import (
    DEFAULT_COMPRESSION_OUTPUT_SIZE,
    CompressionSettings,
    grid_side,
    index_shards,
    load_pretrained_config,
    make_staging_folder,
    publish_new_folder,
    read_json_object,
    read_safetensors_header,
    remove_stale_staging,
)

from ..constants import MM_PROJECTOR_FILE, NON_LORA_FILE, TOKEN_COMPRESSOR_FILE
from ..utils import resolve_source
from .compressor_layout import FORK, MM_PROJECTOR, NON_LORA, CompressorLayout, is_compressor_key
from .multimodal_encoder.clip_encoder import DEFAULT_MM_VISION_SELECT_FEATURE
from .weights_io import CheckpointError, load_weights_file

logger = logging.getLogger(__name__)

LinkMode = Literal["symlink", "hardlink"]
TOOL = "toconv-compress-llava"
# What a damaged source file needs: the output would link it, and every load of it would fail.
SOURCE_FIX = "Download or copy the source checkpoint again, then compress it."

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"

# Per weight format: (single file, index, the single file's link name, the compressor shard's name).
_FORMATS = {
    "safetensors": (SAFE_WEIGHTS, SAFE_INDEX, "model-00001-of-00001.safetensors", "model-token_compressor.safetensors"),
    "bin": (BIN_WEIGHTS, BIN_INDEX, "pytorch_model-00001-of-00001.bin", "pytorch_model-token_compressor.bin"),
}


@dataclass(frozen=True)
class TowerInfo:
    """What the compressor must fit: the CLIP tower's name, patch grid, width and selected features."""

    name: str
    grid: int
    hidden_size: int
    select_layer: int | None
    select_feature: str


@dataclass
class _Plan:
    """The output folder's contents: files to link (name → source file) and files to write (name → writer)."""

    links: dict[str, Path] = field(default_factory=dict)
    writes: dict[str, Callable[[Path], None]] = field(default_factory=dict)


# ---- resolving the source ----------------------------------------------------------------------


def _read_config(source: Path) -> dict:
    path = source / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{source} is not a LLaVA checkpoint: it has no {CONFIG_NAME}.")
    config = read_json_object(path, SOURCE_FIX)
    if not config.get("mm_vision_tower"):
        raise ValueError(
            f"{source} is not a LLaVA checkpoint: its {CONFIG_NAME} has no mm_vision_tower "
            f"(model_type={config.get('model_type')!r}). Pass a LLaVA checkpoint in upstream LLaVA's format (full, "
            f"projector-only or LoRA); Hugging Face-format LLaVA (llava-hf/*) is another format."
        )
    if config.get("use_token_compression"):
        inp, out = config.get("compression_input_size"), config.get("compression_output_size")
        tokens = f", {out * out} image tokens" if isinstance(out, int) else ""
        raise ValueError(
            f"{source} is already compressed: use_token_compression=true with compression_input_size={inp}, "
            f"compression_output_size={out}{tokens}. Evaluate it as it is; for other sizes, start from the "
            f"checkpoint it was made from."
        )
    return config


def resolve_tower(
    config: Mapping, vision_tower: str | None = None, *, cache_dir: str | None = None, download: bool = False
) -> TowerInfo:
    """Grid and width of the checkpoint's CLIP tower, from its config (local folder or HF cache).

    ``vision_tower`` reads the config from another place (a local copy); the checkpoint keeps its
    ``mm_vision_tower``.
    """
    from transformers import CLIPVisionConfig

    name = config["mm_vision_tower"]
    where = vision_tower or name
    clip = load_pretrained_config(
        CLIPVisionConfig, where, "--vision-tower" if vision_tower else "The vision tower (mm_vision_tower)",
        f"Its config gives the patch grid and width: pass --vision-tower with a local folder holding {name}'s "
        f"config.json, or download it (hf download {name} config.json).",
        cache_dir=cache_dir, local_files_only=not download,
    )
    return TowerInfo(
        name=name,
        grid=grid_side(clip),
        hidden_size=clip.hidden_size,
        select_layer=config.get("mm_vision_select_layer"),
        select_feature=config.get("mm_vision_select_feature") or DEFAULT_MM_VISION_SELECT_FEATURE,
    )


def _check_output(save_path: Path) -> None:
    """Refuse an output that holds anything; before anything is read or written."""
    if save_path.is_dir() and any(save_path.iterdir()):
        raise FileExistsError(f"Output folder {save_path} exists and is not empty: pass a new --save-path or empty it.")
    if save_path.exists() and not save_path.is_dir():
        raise FileExistsError(f"--save-path {save_path} exists and is not a folder.")


def _check_sizes(tower: TowerInfo, compression_input_size: int | None, compression_output_size: int) -> None:
    CompressionSettings.check(True, compression_input_size, compression_output_size, grid=tower.grid, tower=tower.name)


# ---- the compressor ----------------------------------------------------------------------------


def build_compressor(tower: TowerInfo, output_size: int, token_compressor_path: str | os.PathLike | None = None):
    """The compressor to write: the average init, or ``token_compressor_path`` checked against the tower.

    A written checkpoint keeps a compressor fitted to other features for good, so another tower,
    select layer or feature is an error here (``check_provenance``), not the warning of loading.
    """
    from vision_token_compression import build_compressor, check_provenance, read_metadata

    if token_compressor_path:
        check_provenance(
            read_metadata(token_compressor_path), token_compressor_path, input_grid_size=tower.grid,
            output_grid_size=output_size, hidden_dim=tower.hidden_size, vision_tower=tower.name,
            select_layer=tower.select_layer, select_feature=tower.select_feature,
        )
    return build_compressor(
        tower.grid, output_size, tower.hidden_size, token_compressor_path, vision_tower=tower.name,
        select_layer=tower.select_layer, select_feature=tower.select_feature,
    )


def _compressor_tensors(compressor, layout: CompressorLayout) -> dict[str, torch.Tensor]:
    """The compressor's state dict under ``layout``'s names, contiguous; weights float32 (any loader casts them).

    The integer ``grid_sizes`` record stays an integer: with it, a loader refuses the weights for
    another geometry (e.g. after an edit of ``compression_output_size`` in the written config).
    """
    return layout.place({
        name: tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype).contiguous()
        for name, tensor in compressor.state_dict().items()
    })


def _refuse_compressor_keys(keys, where: str) -> None:
    found = [k for k in keys if is_compressor_key(k)]
    if found:
        raise ValueError(
            f"{where} holds token compressor weights ({found[:2]}) but its config has use_token_compression "
            f"false: the checkpoint is inconsistent. Set the compression fields in its config.json instead."
        )


# ---- planning each kind of weights -------------------------------------------------------------


def _safetensors_sizes(path: Path) -> dict[str, int]:
    """Tensor name → byte size, from a safetensors file's header, checked against the file's size (a truncated
    file is refused, naming it); the tensors are not read."""
    header = read_safetensors_header(path, SOURCE_FIX)
    header.pop("__metadata__", None)
    return {name: info["data_offsets"][1] - info["data_offsets"][0] for name, info in header.items()}


def _bin_sizes(path: Path) -> dict[str, int]:
    """Tensor name → byte size of a ``torch.save`` state dict (memory-mapped when the format allows); a damaged
    file is refused, naming it."""
    state = load_weights_file(path, SOURCE_FIX, mmap=True)
    return {name: t.numel() * t.element_size() for name, t in state.items()}


def _weight_sizes(path: Path, fmt: str) -> dict[str, int]:
    return _safetensors_sizes(path) if fmt == "safetensors" else _bin_sizes(path)


def _write_json(data: Mapping) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return write


def _write_tensors(tensors: dict[str, torch.Tensor], fmt: Literal["safetensors", "bin"]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    return write


def _weight_format(source: Path) -> str | None:
    """The weight format transformers would load from ``source``, in its order of lookup; None if none."""
    for fmt, (single, index, _, _) in _FORMATS.items():
        if (source / single).is_file() or (source / index).is_file():
            return fmt
    return None


def _plan_full_weights(source: Path, fmt: str, compressor, plan: _Plan) -> set[str]:
    """Link the weight files and index them with a new compressor shard; returns the source names handled."""
    single, index_name, single_link, compressor_file = _FORMATS[fmt]
    if (source / single).is_file():
        sizes = _weight_sizes(source / single, fmt)
        weight_map = dict.fromkeys(sizes, single_link)
        metadata = {"total_size": sum(sizes.values())}
        plan.links[single_link] = source / single
        handled = {single}
    else:
        index, shard_paths = index_shards(source / index_name, SOURCE_FIX)
        weight_map = dict(index["weight_map"])
        metadata = dict(index["metadata"]) if isinstance(index.get("metadata"), dict) else {}
        shards = [path.name for path in shard_paths]
        for path in shard_paths:  # the output links them: a damaged shard is refused now, not at every load
            _weight_sizes(path, fmt)
        if compressor_file in shards:
            raise ValueError(f"{source} already has a shard named {compressor_file}; is it already compressed?")
        plan.links.update({shard: source / shard for shard in shards})
        handled = {index_name, *shards}
    _refuse_compressor_keys(weight_map, f"{source}'s weights")
    tensors = _compressor_tensors(compressor, FORK)
    weight_map.update(dict.fromkeys(tensors, compressor_file))
    if "total_size" in metadata:
        metadata["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    plan.writes[compressor_file] = _write_tensors(tensors, fmt)
    plan.writes[index_name] = _write_json({"metadata": metadata, "weight_map": weight_map})
    return handled


def _plan_adapter_file(source: Path, name: str, compressor, layout: CompressorLayout, plan: _Plan) -> None:
    """A new ``mm_projector.bin`` / ``non_lora_trainables.bin``: the source's tensors plus the compressor's."""
    weights = load_weights_file(source / name, SOURCE_FIX)
    _refuse_compressor_keys(weights, str(source / name))
    tensors = _compressor_tensors(compressor, layout)
    plan.writes[name] = _write_tensors({**weights, **tensors}, "bin")


def plan_output(source: Path, config: dict, tower: TowerInfo, compressor) -> _Plan:
    """What the output folder holds; refuses a source without weights it can extend."""
    plan = _Plan()
    handled = {CONFIG_NAME}
    fmt = _weight_format(source)
    if fmt is not None:
        handled |= _plan_full_weights(source, fmt, compressor, plan)
    if (source / MM_PROJECTOR_FILE).is_file():
        _plan_adapter_file(source, MM_PROJECTOR_FILE, compressor, MM_PROJECTOR, plan)
        plan.writes[TOKEN_COMPRESSOR_FILE] = _write_portable(compressor, tower)
    if (source / NON_LORA_FILE).is_file():
        _plan_adapter_file(source, NON_LORA_FILE, compressor, NON_LORA, plan)
    elif (source / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{source} is a LoRA checkpoint without {NON_LORA_FILE} (its projector): nothing to add the compressor to."
        )
    if not plan.writes:
        raise FileNotFoundError(
            f"{source} has no weights to add the compressor to: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS}, "
            f"{BIN_INDEX}, {MM_PROJECTOR_FILE} (projector only) or {NON_LORA_FILE} (LoRA)."
        )
    _plan_other_files(source, handled, plan)
    settings = CompressionSettings(True, compressor.input_grid_size, compressor.output_grid_size)
    new_config = {**config, **settings.config_fields()}
    plan.writes[CONFIG_NAME] = _write_json(new_config)
    return plan


def _plan_other_files(source: Path, handled: set[str], plan: _Plan) -> None:
    """Link the source's other files (tokenizer, generation config, adapter, ...).

    Weight files that no index of the output names are left out (the other format, shards beside a
    single file): a loader that picked them would miss the compressor. So are folders.
    """
    weight_names = {name for names in _FORMATS.values() for name in names[:2]}
    skipped = []
    for entry in sorted(source.iterdir()):
        name = entry.name
        if name in handled or name in plan.writes or name in plan.links:
            continue
        if not entry.is_file() or name in weight_names or _is_shard_of(name, weight_names):
            skipped.append(name)
            continue
        plan.links[name] = entry
    if skipped:
        logger.info("Not linked from %s: %s", source, ", ".join(skipped))


def _is_shard_of(name: str, weight_names: set[str]) -> bool:
    """True for ``model-00001-of-00002.safetensors`` style shards of one of ``weight_names``."""
    return any(name.startswith(Path(w).stem + "-") and name.endswith(Path(w).suffix) for w in weight_names
               if not w.endswith(".json"))


def _write_portable(compressor, tower: TowerInfo) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from vision_token_compression import save_compressor

        save_compressor(compressor, path, vision_tower=tower.name, select_layer=tower.select_layer,
                        select_feature=tower.select_feature)

    return write


# ---- writing ------------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _check_hardlinks(plan: _Plan, save_path: Path) -> None:
    device = os.stat(_existing_ancestor(save_path.parent)).st_dev
    elsewhere = [str(p) for p in plan.links.values() if os.stat(p).st_dev != device]
    if elsewhere:
        raise ValueError(
            f"--link hardlink needs the source and {save_path} on one filesystem, but {elsewhere[0]} is on another: "
            f"use --link symlink or another --save-path."
        )


def _link(source: Path, target: Path, mode: LinkMode) -> None:
    if mode == "symlink":
        os.symlink(os.path.abspath(source), target)
    else:
        os.link(source, target)  # follows a symlinked source (HF cache snapshot) to its file


def _materialise(plan: _Plan, save_path: Path, link: LinkMode) -> None:
    """Assemble the folder in a marked staging folder, config last, then rename it to ``save_path``.

    The rename replaces at most an empty folder: what appeared at ``save_path`` meanwhile is kept
    (``publish_new_folder``'s ``FileExistsError``).
    """
    staging = make_staging_folder(save_path, TOOL)
    umask = os.umask(0)
    os.umask(umask)
    try:
        for name, source in plan.links.items():
            _link(source, staging / name, link)
        for name in sorted(plan.writes, key=lambda n: n == CONFIG_NAME):  # config last
            plan.writes[name](staging / name)
            os.chmod(staging / name, 0o666 & ~umask)  # safetensors writes private files; give the usual permissions
        publish_new_folder(staging, save_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _own_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.iterdir() if p.is_file() and not p.is_symlink()
               and p.stat().st_nlink == 1)


def compress_checkpoint(
    model_path: str | os.PathLike,
    save_path: str | os.PathLike,
    compression_output_size: int | None = None,
    *,
    compression_input_size: int | None = None,
    token_compressor_path: str | os.PathLike | None = None,
    vision_tower: str | None = None,
    link: LinkMode = "symlink",
    cache_dir: str | None = None,
    download: bool = False,
) -> Path:
    """Write a compressed variant of the LLaVA checkpoint ``model_path`` to ``save_path``; returns ``save_path``.

    Everything is checked before anything is written; on an error nothing is left at ``save_path``.

    Args:
        model_path: Checkpoint folder or Hugging Face Hub id (resolved in the local HF cache).
        save_path: New or empty output folder.
        compression_output_size: Output grid side, 1..grid-1 (12 → 144 tokens, 8 → 64). Default: the
            compressor checkpoint's, else 12.
        compression_input_size: Must equal the tower's grid if given (it is recorded either way).
        token_compressor_path: A compressor checkpoint (safetensors with metadata) instead of the average init.
        vision_tower: Read the CLIP config from here when ``mm_vision_tower`` is not available locally.
        link: ``"symlink"`` or ``"hardlink"`` for the files taken over from the source.
        cache_dir: Hugging Face cache to resolve Hub ids in (default: HF_HUB_CACHE).
        download: Download a Hub checkpoint or tower config that is not cached (default: cache only).
    """
    if link not in ("symlink", "hardlink"):
        raise ValueError(f"link must be 'symlink' or 'hardlink', got {link!r}.")
    save_path = Path(os.path.abspath(save_path))
    _check_output(save_path)
    remove_stale_staging(save_path)  # what a killed run for this output left; logged
    source = resolve_source(model_path, cache_dir=cache_dir, download=download, download_flag="--download")
    config = _read_config(source)
    tower = resolve_tower(config, vision_tower, cache_dir=cache_dir, download=download)
    if compression_output_size is None:
        if token_compressor_path:
            from vision_token_compression import read_metadata

            compression_output_size = read_metadata(token_compressor_path).output_grid_size
        else:
            compression_output_size = DEFAULT_COMPRESSION_OUTPUT_SIZE
    _check_sizes(tower, compression_input_size, compression_output_size)
    compressor = build_compressor(tower, compression_output_size, token_compressor_path)
    plan = plan_output(source, config, tower, compressor)
    if link == "hardlink":
        _check_hardlinks(plan, save_path)
    _materialise(plan, save_path, link)

    out = compression_output_size
    linked = sum(os.stat(p).st_size for p in plan.links.values())
    logger.info(
        "Wrote %s: %s with ToConv %d×%d → %d×%d (%d image tokens), compressor from %s; %d files %sed (%.1f MB), "
        "%d written (%.1f KB).", save_path, source, tower.grid, tower.grid, out, out, out * out,
        token_compressor_path or "the average init (window mean)", len(plan.links), link, linked / 1e6,
        len(plan.writes), _own_bytes(save_path) / 1e3,
    )
    return save_path


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m llava.model.compress_checkpoint --model-path SRC --save-path DST``."""
    parser = argparse.ArgumentParser(
        description="Write a compressed variant of a LLaVA checkpoint (config + compressor weights, everything "
                    "else linked) that clients without compression support evaluate with fewer image tokens.",
    )
    parser.add_argument("--model-path", required=True, help="LLaVA checkpoint folder or Hub id (local HF cache).")
    parser.add_argument("--save-path", required=True, help="New or empty output folder.")
    parser.add_argument("--compression-output-size", type=int, default=None,
                        help="Output grid side: 12 → 144 image tokens (default), 8 → 64; default with "
                             "--token-compressor-path: the checkpoint's.")
    parser.add_argument("--compression-input-size", type=int, default=None,
                        help="Input grid side; must be the vision tower's grid (24 for CLIP ViT-L/14-336).")
    parser.add_argument("--token-compressor-path", default=None,
                        help="Compressor checkpoint (.safetensors); default: the average init (window mean).")
    parser.add_argument("--vision-tower", default=None,
                        help="Local folder to read the CLIP config from when mm_vision_tower is not available here "
                             "(the output keeps mm_vision_tower).")
    parser.add_argument("--link", choices=("symlink", "hardlink"), default="symlink",
                        help="How the source's files appear in the output (default: symlink).")
    parser.add_argument("--download", action="store_true",
                        help="Download a Hub checkpoint or tower config that is not in the local cache.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        compress_checkpoint(
            args.model_path, args.save_path, args.compression_output_size,
            compression_input_size=args.compression_input_size, token_compressor_path=args.token_compressor_path,
            vision_tower=args.vision_tower, link=args.link, download=args.download,
        )
    except (ValueError, OSError, CheckpointError) as err:
        sys.exit(f"compress_checkpoint: error: {err}")


if __name__ == "__main__":
    main()
