"""Build LLaVA's vision tower from model args or a model config."""

from __future__ import annotations

import logging

from .clip_encoder import DEFAULT_S2, CLIPVisionTower, CLIPVisionTowerS2, parse_bool_setting

logger = logging.getLogger(__name__)


def build_vision_tower(vision_tower_cfg, **kwargs) -> CLIPVisionTower:
    """``CLIPVisionTower`` (or ``CLIPVisionTowerS2`` when ``s2`` is set) for ``mm_vision_tower``.

    Accepts any name or path whose config is a CLIP vision config; keyword arguments such as
    ``delay_load`` pass through to the tower, which checks the settings (see ``clip_encoder``).
    """
    vision_tower = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not vision_tower:
        raise ValueError("No vision tower given: set mm_vision_tower (config) or vision_tower (model args).")
    if parse_bool_setting(getattr(vision_tower_cfg, "s2", DEFAULT_S2), "s2"):
        return CLIPVisionTowerS2(vision_tower, args=vision_tower_cfg, **kwargs)
    return CLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)
