"""Build LLaVA's vision tower from model args or a model config."""

from __future__ import annotations

import logging

from vision_token_compression.towers import SIGLIP, tower_family

from .clip_encoder import DEFAULT_S2, CLIPVisionTower, CLIPVisionTowerS2, ViTVisionTower, parse_bool_setting
from .siglip_encoder import SigLipVisionTower

logger = logging.getLogger(__name__)


def build_vision_tower(vision_tower_cfg, **kwargs) -> ViTVisionTower:
    """The vision tower for ``mm_vision_tower``: ``SigLipVisionTower`` or ``CLIPVisionTower`` (``CLIPVisionTowerS2`` with ``s2``).

    SigLIP when the tower's name or path contains ``siglip`` (LLaVA-NeXT's rule) or its local
    config.json is a SigLIP config; CLIP otherwise. Keyword arguments such as ``delay_load`` pass
    through to the tower, which checks the settings (see ``clip_encoder``).
    """
    vision_tower = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not vision_tower:
        raise ValueError("No vision tower given: set mm_vision_tower (config) or vision_tower (model args).")
    s2 = parse_bool_setting(getattr(vision_tower_cfg, "s2", DEFAULT_S2), "s2")
    if tower_family(vision_tower) is SIGLIP:
        if s2:
            raise ValueError(
                f"s2=True (multi-scale) is for CLIP towers, but mm_vision_tower={vision_tower!r} is a SigLIP tower: "
                f"set s2=False, or use a CLIP tower for S2."
            )
        return SigLipVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)
    if s2:
        return CLIPVisionTowerS2(vision_tower, args=vision_tower_cfg, **kwargs)
    return CLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)
