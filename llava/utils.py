"""Small helpers the upstream scripts import."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def disable_torch_init() -> None:
    """Kept for upstream scripts; nothing to do.

    Upstream patched ``nn.Linear``/``nn.LayerNorm`` init away to load faster. transformers 5 builds
    models on the meta device and initialises only weights a checkpoint lacks, so the patch is not
    needed, and leaving torch's init alone keeps modules built later (a projector) initialised.
    """
    logger.debug("disable_torch_init: not needed with transformers >= 5; torch init left unchanged.")


def resolve_source(model_path: str | os.PathLike, *, cache_dir: str | None = None, download: bool = False,
                   download_flag: str | None = None) -> Path:
    """A local folder as given, or a Hugging Face Hub id's snapshot folder in the local HF cache.

    ``download`` fetches a Hub checkpoint that is not cached; ``download_flag`` is the caller's flag for
    that, named in the error when the checkpoint is missing.
    """
    if os.path.isdir(model_path):
        return Path(os.path.abspath(model_path))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model_path), cache_dir=cache_dir, local_files_only=not download))
    except HFValidationError as err:
        raise FileNotFoundError(f"{model_path} is neither a local folder nor a Hugging Face Hub id ({err}).") from err
    except LocalEntryNotFoundError as err:
        flag = f"pass {download_flag}, " if download_flag else ""
        raise FileNotFoundError(
            f"{model_path} is not a local folder and is not in the Hugging Face cache "
            f"({cache_dir or 'the default HF_HUB_CACHE'}). Download it first (hf download {model_path}), {flag}"
            f"or pass a local folder."
        ) from err


# ---- Shared by the eval and serve entry points -------------------------------------------------


def add_compression_args(parser) -> None:
    """The flags that switch ToConv compression on when loading a checkpoint trained without it."""
    group = parser.add_argument_group("token compression (for checkpoints trained without it)")
    group.add_argument("--use-token-compression", action="store_true",
                       help="Compress the vision tower's tokens with ToConv (e.g. 576 → 144).")
    group.add_argument("--compression-input-size", type=int, default=None,
                       help="Input grid side; default: the vision tower's grid (24 for CLIP ViT-L/14-336).")
    group.add_argument("--compression-output-size", type=int, default=None,
                       help="Output grid side: 12 → 144 tokens (default), 8 → 64 tokens.")
    group.add_argument("--token-compressor-path", type=str, default=None,
                       help="Compressor checkpoint (.safetensors); default: the average init (window mean).")


def compression_kwargs(args) -> dict:
    """``load_pretrained_model`` keyword arguments from the flags of ``add_compression_args``.

    Without ``--use-token-compression`` the checkpoint's own setting is kept. Upstream-style args
    objects without these attributes load the checkpoint as it is.
    """
    return {
        "use_token_compression": True if getattr(args, "use_token_compression", None) else None,
        "compression_input_size": getattr(args, "compression_input_size", None),
        "compression_output_size": getattr(args, "compression_output_size", None),
        "token_compressor_path": getattr(args, "token_compressor_path", None),
    }


# ---- Flag checks shared by the eval and serve entry points: run before the model loads ----------
# Each raises ValueError naming the flag and the value; ``llava.eval.vqa_common.parse_args`` turns it
# into the parser's usage line and exit status 2.

# Upstream's spelling of the generation flags (llava.eval.*); llava.serve.cli spells --max-new-tokens.
GENERATION_FLAGS = {
    "conv_mode": "--conv-mode",
    "temperature": "--temperature",
    "top_p": "--top_p",
    "num_beams": "--num_beams",
    "max_new_tokens": "--max_new_tokens",
}


def check_generation_args(args, flags: dict[str, str] | None = None) -> None:
    """``--conv-mode`` (a known template; None: inferred), ``--temperature`` ≥ 0, ``--top_p`` in (0, 1],
    ``--num_beams`` and ``--max_new_tokens`` ≥ 1; flags that ``args`` lacks are skipped.

    ``flags`` overrides how a flag is spelled in the message (``{"max_new_tokens": "--max-new-tokens"}``).
    """
    flags = {**GENERATION_FLAGS, **(flags or {})}
    conv_mode = getattr(args, "conv_mode", None)
    if conv_mode is not None:
        from .conversation import conv_templates

        if conv_mode not in conv_templates:
            raise ValueError(
                f"{flags['conv_mode']} {conv_mode!r} is not a known conversation template; "
                f"known: {', '.join(sorted(conv_templates))}."
            )
    temperature = getattr(args, "temperature", 0)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{flags['temperature']} must be >= 0 (0 decodes greedily), got {temperature}.")
    top_p = getattr(args, "top_p", None)
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(
            f"{flags['top_p']} must be in (0, 1] (the probability mass sampled from; 1 keeps every token), got "
            f"{top_p}. For greedy decoding pass {flags['temperature']} 0 instead."
        )
    for name in ("num_beams", "max_new_tokens"):
        value = getattr(args, name, 1)
        if value < 1:
            raise ValueError(f"{flags[name]} must be at least 1, got {value}.")


def check_compression_flags(args) -> None:
    """The flags of ``add_compression_args``, by the library's one check (``CompressionSettings``).

    Values of the wrong type or out of range, and a missing ``--token-compressor-path`` with
    ``--use-token-compression``, are refused before anything loads. Without that flag the
    checkpoint's own setting decides (``load_pretrained_model`` warns about sizes it then ignores).
    """
    from vision_token_compression import CompressionSettings, SettingNames

    names = SettingNames("--use-token-compression", "--compression-input-size", "--compression-output-size",
                         "--token-compressor-path", switch_on="add --use-token-compression")
    try:
        CompressionSettings.from_args(args, checkpoint_field="token_compressor_path", names=names, where="")
    except FileNotFoundError as err:  # a missing --token-compressor-path: a bad flag value like the others
        raise ValueError(str(err)) from err


def check_image_files(image_files, flag: str = "--image-file") -> None:
    """Every local image (not an http(s) URL) exists as a file."""
    for image_file in image_files:
        if image_file.startswith(("http://", "https://")):
            continue
        if not os.path.isfile(image_file):
            raise ValueError(f"{flag} {image_file!r} does not exist (or is not a file).")


def resolve_device(device: str | None) -> str:
    """``device`` as given, or ``cuda`` when available, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def infer_conv_mode(model_name: str) -> str:
    """Upstream's conversation template for a checkpoint name (the checkpoint itself does not record one)."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


def choose_conv_mode(model_name: str, conv_mode: str | None) -> str:
    """The template inferred from the model name, unless ``--conv-mode`` names another: then that one, with a warning."""
    inferred = infer_conv_mode(model_name)
    if conv_mode is not None and conv_mode != inferred:
        logger.warning("The inferred conversation mode is %s, while --conv-mode is %s; using %s.",
                       inferred, conv_mode, conv_mode)
        return conv_mode
    return inferred


def load_image(image_file: str):
    """An RGB PIL image from a path or an http(s) URL."""
    from io import BytesIO
    from urllib.request import urlopen

    from PIL import Image

    if image_file.startswith(("http://", "https://")):
        with urlopen(image_file) as response:
            return Image.open(BytesIO(response.read())).convert("RGB")
    return Image.open(image_file).convert("RGB")


def image_prompt(query: str, mm_use_im_start_end: bool) -> str:
    """``query`` with the image token in front (or in place of ``<image-placeholder>``), as upstream builds it."""
    from .constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER

    token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if mm_use_im_start_end else DEFAULT_IMAGE_TOKEN
    if IMAGE_PLACEHOLDER in query:
        return query.replace(IMAGE_PLACEHOLDER, token)
    return token + "\n" + query


def images_to(images, model):
    """Processed images (a tensor, or a list for anyres images of different crop counts) on the model's device and dtype."""
    if isinstance(images, list):
        return [image.to(device=model.device, dtype=model.dtype) for image in images]
    return images.to(device=model.device, dtype=model.dtype)
