"""Tiny stand-in checkpoints for serving: this fork's format, converted to Hugging Face's, and without compression.

``build_serving_standins`` makes, from random weights at tiny sizes (``llava.standins``):

- ``fork``: a LLaVA-1.5 checkpoint in this fork's format, trained with ToConv ``in→out`` (average init);
- ``compressed``: ``fork`` through ``toconv-convert-to-hf`` (``model_type: toconv_llava``), what the
  vLLM plugin serves with out² image tokens;
- ``baseline``: ``compressed`` without its compressor (``strip_compression``): a plain llava-hf
  ``LlavaForConditionalGeneration`` checkpoint with the very same CLIP, projector and decoder
  weights, which vLLM serves with its own LLaVA and 576 image tokens.

The decoder's head dimension is 64 (hidden 256, 4 heads): vLLM's CPU attention refuses small head
dimensions such as the 16 of ``llava.standins``'s default.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llava.model.compressor_layout import HF_HUB

# vLLM's CPU attention needs a supported head dimension: 256 / 4 heads = 64.
DECODER_HIDDEN_SIZE = 256
_TOCONV_CONFIG_KEYS = ("compression_input_size", "compression_output_size", "auto_map")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")


def build_fork_checkpoint(
    out_dir: str | os.PathLike, clip_dir: str | os.PathLike, *, compression_output_size: int | None,
    tokenizer_path: str | os.PathLike | None = None, seed: int = 0,
) -> Path:
    """A tiny LLaVA-1.5 in this fork's format (``llava.standins.build_tiny_llava``) that vLLM's CPU attention runs."""
    from llava.standins import build_tiny_llava

    return build_tiny_llava(
        out_dir, clip_dir, tokenizer_path=tokenizer_path, compression_output_size=compression_output_size,
        hidden_size=DECODER_HIDDEN_SIZE, seed=seed,
    )


def build_fork_next_checkpoint(
    out_dir: str | os.PathLike, clip_dir: str | os.PathLike, *, compression_output_size: int | None,
    tokenizer_path: str | os.PathLike | None = None, seed: int = 0,
) -> Path:
    """A tiny LLaVA-1.6 (anyres, ``spatial_unpad``, LLaVA-1.6's pinpoints) in this fork's format that vLLM's CPU attention runs."""
    from llava.standins import LLAVA_16_PINPOINTS, build_tiny_llava

    return build_tiny_llava(
        out_dir, clip_dir, tokenizer_path=tokenizer_path, compression_output_size=compression_output_size,
        hidden_size=DECODER_HIDDEN_SIZE, seed=seed, image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=LLAVA_16_PINPOINTS,
    )


def convert_to_hf(source: str | os.PathLike, output: str | os.PathLike, **options) -> Path:
    """``toconv-convert-to-hf SOURCE OUTPUT`` (its Python entry point); ``options`` as ``llava.hf.convert.convert``."""
    from llava.hf.convert import convert

    return convert(source, output, **options)


def strip_compression(converted: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A converted ``toconv_llava`` checkpoint as a plain llava-hf one: same weights, no compressor, 576 image tokens.

    The config becomes transformers' ``LlavaConfig`` (``model_type: llava``); the weights lose
    ``token_compressor.*``; the processor becomes ``LlavaProcessor`` (CLIP's resize and centre crop,
    no pad-to-square: identical pixels for square images).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    converted, out_dir = Path(converted), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((converted / "config.json").read_text())
    for key in _TOCONV_CONFIG_KEYS:
        config.pop(key, None)
    vision = config["vision_config"]
    config.update(
        model_type="llava", architectures=["LlavaForConditionalGeneration"],
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    tensors = {}
    for file in sorted(converted.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            names = [k for k in weights.keys() if not HF_HUB.owns(k)]  # noqa: SIM118 (not a dict)
            tensors.update({k: weights.get_tensor(k) for k in names})
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})

    for name in _COPIED:
        if (converted / name).is_file():
            shutil.copyfile(converted / name, out_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    chat_template = (converted / "chat_template.jinja").read_text() if (converted / "chat_template.jinja").is_file() else None
    processor = LlavaProcessor(
        AutoImageProcessor.from_pretrained(converted), tokenizer, patch_size=vision["patch_size"],
        vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
        chat_template=chat_template, num_additional_image_tokens=1,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def build_serving_standins(work_dir: str | os.PathLike, *, compression_output_size: int = 12) -> dict[str, Path]:
    """``fork``, ``compressed`` and ``baseline`` checkpoints under ``work_dir`` (reused when already there)."""
    from llava.standins import build_tiny_clip

    work_dir = Path(work_dir)
    paths = {
        "fork": work_dir / f"fork-24to{compression_output_size}",
        "compressed": work_dir / f"hf-24to{compression_output_size}",
        "baseline": work_dir / "hf-none",
    }
    if all((path / "config.json").is_file() for path in paths.values()):
        return paths
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    clip = build_tiny_clip(work_dir / "clip")
    build_fork_checkpoint(paths["fork"], clip, compression_output_size=compression_output_size)
    convert_to_hf(paths["fork"], paths["compressed"])
    strip_compression(paths["compressed"], paths["baseline"])
    return paths
