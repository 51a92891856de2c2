"""``toconv-convert-to-hf``: a LLaVA-1.5 or 1.6 checkpoint → a Hugging Face-format LLaVA with the ToConv compressor.

::

    toconv-convert-to-hf SOURCE OUTPUT [--compression-output-size N] [--token-compressor-path P]

SOURCE is either

- a checkpoint in this fork's format (upstream LLaVA's: ``LlavaLlamaForCausalLM``, ``mm_projector``,
  CLIP from ``mm_vision_tower``). Trained with compression, its own compressor is used; trained
  without, the compressor is the window average or ``--token-compressor-path`` (24→12 unless
  ``--compression-output-size`` says otherwise). ``<image>`` is added to its tokenizer, as llava-hf
  does; or
- a ``llava-hf/*``-format checkpoint (model_type ``llava`` or ``llava_next``): the compressor is added the
  same way.

LLaVA-1.6 sources (fork: ``image_aspect_ratio anyres`` with ``mm_patch_merge_type spatial_unpad``;
llava-hf: ``llava_next``) become ``toconv_llava_next`` (every anyres tile compressed); LLaVA-1.5 ones
``toconv_llava``. OUTPUT is a new folder that ``import llava.hf`` lets
``AutoModelForImageTextToText`` / ``AutoProcessor`` load and the vLLM plugin serve. Every setting is
checked before anything is written; the folder appears complete or not at all, and never over files
that appeared in OUTPUT meanwhile. What a killed conversion to OUTPUT left is removed first, and logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from vision_token_compression import (
    DEFAULT_COMPRESSION_OUTPUT_SIZE,
    CompressionSettings,
    SettingNames,
    TokenCompressor,
    build_compressor,
    check_provenance,
    load_compressor_tensors,
    read_metadata,
    remove_stale_staging,
)

from ..model.compressor_layout import HF_MODULE
from ..model.weights_io import CheckpointError
from ..utils import resolve_source
from .chat_template import DEFAULT_CONV_MODE
from .configuration import ToConvLlavaConfig
from .configuration_next import ToConvLlavaNextConfig
from .processing import ToConvLlavaProcessor
from .processing_next import ToConvLlavaNextProcessor
from .source import SourceParts, read_config, source_kind
from .vocab import add_image_token, grow_rows, vocab_rows
from .writer import DEFAULT_MAX_SHARD_BYTES, ConvertedCheckpoint, check_output, write_checkpoint

logger = logging.getLogger(__name__)

_EMBEDDINGS = ("lm_head.weight", "model.language_model.embed_tokens.weight")


# ---- the compressor ------------------------------------------------------------------------------


def _check_output_size(size, parts: SourceParts, where: str = "", flag: str = "--compression-output-size") -> None:
    """``size`` against the tower's grid, by the library's one check (named as ``flag`` in messages)."""
    CompressionSettings.check(True, None, size, grid=parts.grid, tower=f"the vision tower {parts.tower_name}",
                              names=SettingNames(output_size=flag), where=where)


def _trained_compressor(parts: SourceParts, output_size: int | None, token_compressor_path) -> TokenCompressor:
    """The compressor ``parts`` was trained with, checked against its config and its tower."""
    trained_in, trained_out = parts.compressor_sizes
    if token_compressor_path:
        raise ValueError(
            f"{parts.folder} was trained with its own token compressor ({trained_in}→{trained_out}); "
            f"--token-compressor-path would replace the weights it was trained with. Drop --token-compressor-path."
        )
    if output_size is not None and output_size != trained_out:
        raise ValueError(
            f"{parts.folder} was trained with compression_output_size={trained_out}: its compressor only fits "
            f"{trained_out}. Drop --compression-output-size (or pass {trained_out})."
        )
    if trained_in is not None and trained_in != parts.grid:
        raise ValueError(
            f"{parts.folder} was trained with compression_input_size={trained_in}, but the vision tower "
            f"{parts.tower_name} has a {parts.grid}×{parts.grid} patch grid: it is not the tower the checkpoint was "
            f"trained with. Pass the right one as --vision-tower."
        )
    _check_output_size(trained_out, parts, where=f"{parts.folder}'s config: ", flag="compression_output_size")
    compressor = build_compressor(parts.grid, trained_out, parts.vision_config.hidden_size)
    load_compressor_tensors(  # refuses a grid-size record of other sizes, or another tower's width
        compressor, parts.compressor_weights, parts.folder, features=f"features of {parts.tower_name}",
        fix="Pass the tower the checkpoint was trained with as --vision-tower.",
    )
    return compressor


def _check_provenance(path, parts: SourceParts) -> None:
    """Refuse a compressor checkpoint that does not fit the tower, or was fitted to other features."""
    check_provenance(
        read_metadata(path), path, input_grid_size=parts.grid, hidden_dim=parts.vision_config.hidden_size,
        vision_tower=parts.tower_name, select_layer=parts.select_layer, select_feature="patch",
    )


def resolve_compressor(
    parts: SourceParts, output_size: int | None = None, token_compressor_path: str | os.PathLike | None = None,
) -> tuple[TokenCompressor, str]:
    """The compressor to write and where it comes from: the source's own, a checked checkpoint, or the average."""
    if parts.compressor_weights is not None:
        compressor = _trained_compressor(parts, output_size, token_compressor_path)
        origin = "trained with the source"
    else:
        if token_compressor_path:
            _check_provenance(token_compressor_path, parts)
            if output_size is None:
                output_size = read_metadata(token_compressor_path).output_grid_size
        output_size = DEFAULT_COMPRESSION_OUTPUT_SIZE if output_size is None else output_size
        _check_output_size(output_size, parts)
        compressor = build_compressor(
            parts.grid, output_size, parts.vision_config.hidden_size, token_compressor_path,
            vision_tower=parts.tower_name, select_layer=parts.select_layer, select_feature="patch",
        )
        origin = f"from {token_compressor_path}" if token_compressor_path else "average init (window means)"
    return compressor.to(parts.dtype), origin


# ---- assembling the converted checkpoint ---------------------------------------------------------


def _vocabulary(parts: SourceParts) -> tuple[int, dict[str, torch.Tensor]]:
    """The image token's id, and the embeddings grown for the tokens added (upstream LLaVA has no ``<image>``)."""
    image_token_id = parts.image_token_id
    if image_token_id is None:
        image_token_id = add_image_token(parts.tokenizer)
    rows = vocab_rows(len(parts.tokenizer), parts.weights["lm_head.weight"].shape[0])
    grown = {key: grow_rows(parts.weights[key], rows) for key in _EMBEDDINGS if key in parts.weights}
    parts.text_config.vocab_size = rows
    if getattr(parts.text_config, "pad_token_id", None) is None:
        parts.text_config.pad_token_id = parts.tokenizer.pad_token_id
    return image_token_id, grown


def next_image_processor(image_processor, pinpoints: list[list[int]]):
    """LLaVA-NeXT's image processor (PIL backend) with ``image_processor``'s settings and ``pinpoints`` ([h, w]).

    A llava-hf LLaVA-NeXT source has one already (kept, with the checked pinpoints); a fork source has
    CLIP's, whose resize, crop, mean and std the tiles get, as the fork's ``process_anyres_image``.
    """
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    if "LlavaNext" in type(image_processor).__name__:
        image_processor.image_grid_pinpoints = pinpoints
        return image_processor
    settings = {key: getattr(image_processor, key) for key in (
        "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
        "do_normalize", "image_mean", "image_std", "do_convert_rgb") if getattr(image_processor, key, None) is not None}
    settings = {key: dict(value) if hasattr(value, "keys") else value for key, value in settings.items()}
    return LlavaNextImageProcessorPil(**settings, image_grid_pinpoints=pinpoints)


def assemble(
    parts: SourceParts, compressor: TokenCompressor, *, pad_to_square: bool | None = None,
) -> ConvertedCheckpoint:
    """The converted checkpoint: config, weights (the compressor's included), processor, generation config."""
    from transformers import GenerationConfig

    image_token_id, grown = _vocabulary(parts)
    weights = {**parts.weights, **grown}
    weights.update(HF_MODULE.place(compressor.state_dict()))
    common = dict(
        text_config=parts.text_config, vision_config=parts.vision_config, image_token_index=image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=parts.select_layer,
        compression_input_size=compressor.input_grid_size, compression_output_size=compressor.output_grid_size,
        **parts.projector,
    )
    processor_common = dict(
        tokenizer=parts.tokenizer, patch_size=parts.vision_config.patch_size, vision_feature_select_strategy="default",
        chat_template=parts.chat_template, image_token="<image>",
        num_additional_image_tokens=parts.num_additional_image_tokens,
        compression_output_size=compressor.output_grid_size,
    )
    if parts.image_grid_pinpoints is not None:  # LLaVA-1.6: anyres tiles, each compressed
        config = ToConvLlavaNextConfig(
            **common, image_grid_pinpoints=parts.image_grid_pinpoints,
            architectures=["ToConvLlavaNextForConditionalGeneration"],
        )
        processor = ToConvLlavaNextProcessor(
            image_processor=next_image_processor(parts.image_processor, parts.image_grid_pinpoints), **processor_common,
        )
    else:
        config = ToConvLlavaConfig(**common, architectures=["ToConvLlavaForConditionalGeneration"])
        processor = ToConvLlavaProcessor(
            image_processor=parts.image_processor, **processor_common,
            pad_to_square=parts.pad_to_square if pad_to_square is None else pad_to_square,
        )
    config.dtype = parts.dtype
    text = parts.text_config
    generation_config = parts.generation_config or GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
    )
    return ConvertedCheckpoint(config, weights, processor, generation_config)


def read_source(folder: Path, *, vision_tower: str | None = None, conv_mode: str | None = DEFAULT_CONV_MODE):
    """``SourceParts`` of the checkpoint in ``folder``, whichever of the two formats it is."""
    config = read_config(folder)
    if source_kind(config, folder) == "llava-hf":
        if vision_tower:
            raise ValueError("--vision-tower is for checkpoints in upstream LLaVA's format; llava-hf holds its tower.")
        from .source_llava_hf import read_llava_hf_checkpoint

        return read_llava_hf_checkpoint(folder)
    from .source_llava import read_llava_checkpoint

    return read_llava_checkpoint(folder, config, vision_tower=vision_tower, conv_mode=conv_mode)


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    compression_output_size: int | None = None,
    token_compressor_path: str | os.PathLike | None = None,
    vision_tower: str | None = None,
    image_aspect_ratio: str | None = None,
    conv_mode: str | None = DEFAULT_CONV_MODE,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert ``source`` into the new folder ``output``; see the module docstring. Returns ``output``.

    Args:
        source: A checkpoint folder (or a Hub id in the local cache) in upstream LLaVA's or llava-hf's format.
        output: The folder to create (or an empty one).
        compression_output_size: Compressed grid side for a source trained without compression
            (default 12, or the compressor checkpoint's); must match a trained source's.
        token_compressor_path: A compressor checkpoint (``save_compressor`` / the trainer), checked
            against the tower; default: the average init.
        vision_tower: A local copy of the source's ``mm_vision_tower`` (upstream format only).
        image_aspect_ratio: ``"pad"`` or ``"square"``: whether the processor pads images to
            squares; default: the source's (its ``image_aspect_ratio``; llava-hf: square).
        conv_mode: The conversation template the chat template reproduces (upstream format;
            None: none); a llava-hf source keeps its own.
        max_shard_bytes: Largest safetensors file before the weights are sharded.
    """
    if image_aspect_ratio not in (None, "pad", "square"):
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}.")
    output = check_output(Path(output))
    remove_stale_staging(output)  # a killed conversion's hidden copy of the weights, before reading the source
    folder = resolve_source(source)
    parts = read_source(folder, vision_tower=vision_tower, conv_mode=conv_mode)
    compressor, origin = resolve_compressor(parts, compression_output_size, token_compressor_path)
    checkpoint = assemble(parts, compressor, pad_to_square=None if image_aspect_ratio is None
                          else image_aspect_ratio == "pad")
    write_checkpoint(checkpoint, output, max_shard_bytes=max_shard_bytes)
    for note in parts.notes:
        logger.info("%s", note)
    logger.info(
        "Converted %s (%s format) to %s: %d→%d compression (%d image tokens), compressor %s; images %s.",
        folder, parts.kind, output, compressor.input_grid_size, compressor.output_grid_size,
        compressor.num_output_tokens, origin, _images_note(checkpoint.processor),
    )
    return output


def _images_note(processor) -> str:
    if isinstance(processor, ToConvLlavaNextProcessor):
        return f"anyres tiles on image_grid_pinpoints {processor.image_processor.image_grid_pinpoints} ([h, w])"
    return "padded to squares" if processor.pad_to_square else "as given"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toconv-convert-to-hf",
        description="Convert a LLaVA-1.5 or LLaVA-1.6 (anyres, spatial_unpad) checkpoint (this fork's / upstream "
        "LLaVA's format, or llava-hf's llava / llava_next) to a Hugging Face-format LLaVA with the ToConv token "
        "compressor (model_type toconv_llava, or toconv_llava_next for LLaVA-1.6).",
    )
    parser.add_argument("source", metavar="SOURCE", help="checkpoint folder, or a Hub id in the local cache")
    parser.add_argument("output", metavar="OUTPUT", help="new folder to write")
    parser.add_argument("--compression-output-size", type=int, default=None, metavar="N",
                        help="compressed grid side: 12 → 144 image tokens (default), 8 → 64; a source trained with "
                        "compression keeps its own")
    parser.add_argument("--token-compressor-path", default=None, metavar="P",
                        help="compressor checkpoint (.safetensors) for a source without one; default: average init")
    parser.add_argument("--vision-tower", default=None, help="local copy of the source's mm_vision_tower")
    parser.add_argument("--image-aspect-ratio", choices=("pad", "square"), default=None,
                        help="pad images to squares first (LLaVA-1.5 training) or not (llava-hf); default: the "
                        "source's")
    parser.add_argument("--conv-mode", default=DEFAULT_CONV_MODE,
                        help=f"conversation template the chat template reproduces (default {DEFAULT_CONV_MODE}; "
                        "'none' for none)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command line: ``toconv-convert-to-hf SOURCE OUTPUT``; a refusal exits with status 1 and its message."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        output = convert(
            args.source, args.output, compression_output_size=args.compression_output_size,
            token_compressor_path=args.token_compressor_path, vision_tower=args.vision_tower,
            image_aspect_ratio=args.image_aspect_ratio, conv_mode=None if args.conv_mode == "none" else args.conv_mode,
        )
    except (ValueError, OSError, CheckpointError) as err:
        sys.exit(f"toconv-convert-to-hf: error: {err}")
    print(output)


if __name__ == "__main__":
    main()
