"""Tiny stand-in checkpoints for serving: this fork's format, converted to Hugging Face's, and without compression.

``build_serving_standins`` makes, from random weights at tiny sizes (``llava.standins``):

- ``fork``: a LLaVA-1.5 checkpoint in this fork's format, trained with ToConv ``in→out`` (average init);
- ``compressed``: ``fork`` through ``toconv-convert-to-hf`` (``model_type: toconv_llava``), what the
  vLLM plugin serves with out² image tokens;
- ``baseline``: ``compressed`` without its compressor (``strip_compression``): a plain llava-hf
  ``LlavaForConditionalGeneration`` checkpoint with the very same CLIP, projector and decoder
  weights, which vLLM serves with its own LLaVA and 576 image tokens.

``build_serving_standins(..., anyres=True)`` makes the same for LLaVA-1.6 (anyres, ``spatial_unpad``):
the converted checkpoints are ``toconv_llava_next`` and the baseline a plain llava-hf
``LlavaNextForConditionalGeneration``, which vLLM serves with its own LLaVA-NeXT (up to 2,928 image
tokens per image).

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
# What a converted checkpoint becomes without its compressor: transformers' own model and processor.
_PLAIN = {
    "toconv_llava": ("llava", "LlavaForConditionalGeneration", "LlavaProcessor"),
    "toconv_llava_next": ("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
}
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
    """A converted checkpoint as a plain llava-hf one: same weights, no compressor, every tower token.

    ``toconv_llava`` becomes transformers' ``LlavaConfig`` (576 image tokens) with ``LlavaProcessor``
    (CLIP's resize and centre crop, no pad-to-square: identical pixels for square images);
    ``toconv_llava_next`` becomes ``LlavaNextConfig`` with ``LlavaNextProcessor`` (the same anyres
    tiling, on the uncompressed 24×24 grid). The weights lose ``token_compressor.*``.
    """
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoTokenizer

    converted, out_dir = Path(converted), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((converted / "config.json").read_text())
    model_type, architecture, processor_class = _PLAIN[config["model_type"]]
    for key in _TOCONV_CONFIG_KEYS:
        config.pop(key, None)
    vision = config["vision_config"]
    config.update(
        model_type=model_type, architectures=[architecture],
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
    processor = getattr(transformers, processor_class)(
        AutoImageProcessor.from_pretrained(converted), tokenizer, patch_size=vision["patch_size"],
        vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
        chat_template=chat_template, num_additional_image_tokens=1,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def build_serving_standins(
    work_dir: str | os.PathLike, *, levels: tuple[int, ...] = (12,), anyres: bool = False,
) -> dict[str, Path]:
    """The served checkpoints under ``work_dir`` (reused when already there), by variant name.

    ``none``: the plain llava-hf baseline; ``24to{N}`` for each compressed grid side N in ``levels``
    (each converted from the fork checkpoint ``fork_source`` names). All share the tower, projector and
    decoder weights (one seed), so the variants differ only in the compressor. ``anyres``: LLaVA-1.6.
    """
    from llava.standins import build_tiny_clip

    work_dir = Path(work_dir) / ("llava-1.6" if anyres else "llava-1.5")
    served = {f"24to{n}": work_dir / f"hf-24to{n}" for n in levels}
    paths = {"none": work_dir / "hf-none", **served}
    if all((path / "config.json").is_file() for path in paths.values()):
        return paths
    for path in (*paths.values(), *map(fork_source, served.values())):
        if path.exists():  # a run that stopped half-way, or someone else's folder: not ours to delete
            raise SystemExit(f"{path} exists but the stand-ins under {work_dir} are incomplete; remove {work_dir} "
                             f"or choose another work folder.")
    build = build_fork_next_checkpoint if anyres else build_fork_checkpoint
    clip = build_tiny_clip(work_dir / "clip")
    tokenizer = None
    for n, path in served.items():
        fork = fork_source(path)
        build(fork, clip, compression_output_size=int(n.removeprefix("24to")), tokenizer_path=tokenizer)
        tokenizer = tokenizer or fork
        convert_to_hf(fork, path)
    strip_compression(served[f"24to{levels[0]}"], paths["none"])
    return paths


def fork_source(served: str | os.PathLike) -> Path:
    """The fork checkpoint a ``build_serving_standins`` checkpoint ``hf-24toN`` was converted from: ``fork-24toN`` beside it."""
    served = Path(served)
    return served.with_name("fork-" + served.name.removeprefix("hf-"))
