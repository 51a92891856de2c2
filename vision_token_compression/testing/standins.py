"""Locally built stand-ins for CLIP towers, for machines that cannot download weights.

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
    import torch
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # transformers 5's CLIPImageProcessor needs torchvision; its PIL twin writes the same config.
    CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor

    if name not in CLIP_VISION_CONFIGS:
        raise ValueError(f"No stand-in config for {name!r}; known: {sorted(CLIP_VISION_CONFIGS)}.")
    settings = dict(CLIP_VISION_CONFIGS[name], **overrides)
    if num_hidden_layers is not None:
        settings["num_hidden_layers"] = num_hidden_layers
    out_dir = Path(out_dir)
    config = CLIPVisionConfig(**settings)
    config.standin_of = name
    config.standin_seed = seed
    if (out_dir / "config.json").is_file() and (out_dir / "preprocessor_config.json").is_file():
        saved = CLIPVisionConfig.from_pretrained(out_dir)
        if all(getattr(saved, k, None) == v for k, v in settings.items()) and getattr(saved, "standin_seed", None) == seed:
            return out_dir
    torch.manual_seed(seed)
    model = CLIPVisionModel(config)
    size = settings["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_center_crop=True, do_resize=True, do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    # Built beside the target and renamed into place, so a concurrent reader (another test
    # process sharing the cache) never sees a half-written folder.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staging = Path(tmp) / "standin"
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
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
