"""Locally built stand-ins for CLIP and SigLIP towers, for machines that cannot download weights.

A stand-in has the real configuration of a published tower (hidden size, patch size, image
size, preprocessing) with random weights, saved with ``save_pretrained`` so that every code path
that loads a tower by name loads it by path instead. Its outputs mean nothing; its shapes are real.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]

# Vision configs of the towers LLaVA uses (from their published config.json files).
CLIP_VISION_CONFIGS: dict[str, dict] = {
    "openai/clip-vit-large-patch14": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
        "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
        "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
}


def find_local_tower(name: str) -> Path | None:
    """Real weights for ``name`` from a local directory or the Hugging Face cache, else None."""
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        path = Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return path if (path / "config.json").is_file() and has_weights else None


# The vision half of SigLIP towers LLaVA-NeXT / LLaVA-OneVision use (their published config.json and
# preprocessor_config.json): no CLS token, an attention-pooling head, resize to a square without crop.
SIGLIP_VISION_CONFIGS: dict[str, dict] = {
    "google/siglip-so400m-patch14-384": {
        "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
        "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    },
}


def build_clip_standin(
    name: str,
    out_dir: str | os.PathLike,
    *,
    num_hidden_layers: int | None = None,
    seed: int = 0,
    **overrides,
) -> Path:
    """Save a random-weight CLIP vision tower with ``name``'s real config (or ``overrides``) to ``out_dir``.

    ``num_hidden_layers`` trims the depth to keep CPU tests fast; every other shape is the
    published one unless overridden (e.g. ``hidden_size=32`` for logic tests). Reuses an existing
    stand-in in ``out_dir`` built with the same settings.
    """
    from vision_token_compression.towers import CLIP

    def processor(size: int):
        return CLIP.image_processor_type()(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            do_center_crop=True, do_resize=True, do_normalize=True,
            image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        )

    settings = _settings(CLIP_VISION_CONFIGS, name, num_hidden_layers, overrides)
    return _build_standin(CLIP, name, settings, processor, Path(out_dir), seed)


def build_siglip_standin(
    name: str = "google/siglip-so400m-patch14-384",
    out_dir: str | os.PathLike = "siglip-standin",
    *,
    num_hidden_layers: int | None = None,
    seed: int = 0,
    tiny: bool = False,
    **overrides,
) -> Path:
    """Save a random-weight SigLIP vision tower with ``name``'s real config (or ``overrides``) to ``out_dir``.

    As ``build_clip_standin``; ``tiny=True`` shrinks the width to 32 channels (2 heads) for logic
    tests while keeping the real image size and patch grid (27×27 for so400m-384). Its
    preprocessor_config.json is SigLIP's: resize to a square, no crop, mean and std 0.5.
    """
    from vision_token_compression.towers import SIGLIP

    if tiny:
        overrides = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, **overrides}

    def processor(size: int):
        return SIGLIP.image_processor_type()(
            size={"height": size, "width": size}, do_resize=True, do_rescale=True, do_normalize=True,
            resample=3, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
        )

    settings = _settings(SIGLIP_VISION_CONFIGS, name, num_hidden_layers, overrides)
    return _build_standin(SIGLIP, name, settings, processor, Path(out_dir), seed)


def _settings(known: dict[str, dict], name: str, num_hidden_layers: int | None, overrides: dict) -> dict:
    """``name``'s published vision config with ``overrides`` (and a trimmed depth) applied."""
    if name not in known:
        raise ValueError(f"No stand-in config for {name!r}; known: {sorted(known)}.")
    settings = dict(known[name], **overrides)
    if num_hidden_layers is not None:
        settings["num_hidden_layers"] = num_hidden_layers
    return settings


def _build_standin(family, name: str, settings: dict, processor, out_dir: Path, seed: int) -> Path:
    """Save a random ``family`` tower with ``settings`` and ``processor(image_size)`` to ``out_dir``, or reuse it."""
    import torch

    config_type = family.config_type()
    config = config_type(**settings)
    config.standin_of = name
    config.standin_seed = seed
    if (out_dir / "config.json").is_file() and (out_dir / "preprocessor_config.json").is_file():
        saved = config_type.from_pretrained(out_dir)
        if all(getattr(saved, k, None) == v for k, v in settings.items()) and getattr(saved, "standin_seed", None) == seed:
            return out_dir
    torch.manual_seed(seed)
    model = family.model_type()(config)
    # Built beside the target and renamed into place, so a concurrent reader (another test
    # process sharing the cache) never sees a half-written folder.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staging = Path(tmp) / "standin"
        model.save_pretrained(staging)
        processor(settings["image_size"]).save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            os.replace(staging, out_dir)
        except OSError:
            # Another process renamed its identical build into place first.
            if not (out_dir / "config.json").is_file():
                raise
    logger.info("Built a random-weight stand-in for %s at %s (layers=%d)", name, out_dir, config.num_hidden_layers)
    return out_dir
