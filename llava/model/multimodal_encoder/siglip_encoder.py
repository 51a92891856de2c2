"""SigLIP vision towers for LLaVA (LLaVA-NeXT / LLaVA-OneVision's ``SigLipVisionTower``), with optional ToConv compression.

Everything but the tower family is ``ViTVisionTower``'s (clip_encoder.py): the constructor, the
properties, the forward contract and the compression fields. What differs is the library's
``towers.SIGLIP``: ``SiglipVisionModel`` / ``SiglipImageProcessor`` (resize to a square, no crop), no
CLS token (``mm_vision_select_feature`` must be ``patch``), and a pooling head that the early exit
never runs. ``mm_vision_select_layer=-2`` gives what LLaVA-OneVision feeds its projector: the
second-to-last layer's output, before ``post_layernorm`` and the head (26 of 27 layers run for
so400m). ``google/siglip-so400m-patch14-384`` has a 27×27 grid (729 tokens); compression takes it
to any smaller side (14 → 196 tokens, 9 → 81).
"""

from __future__ import annotations

from vision_token_compression import towers

from .clip_encoder import ViTVisionTower


class SigLipVisionTower(ViTVisionTower):
    """SigLIP vision encoder returning LLaVA's selected features, optionally compressed (see ``ViTVisionTower``)."""

    family = towers.SIGLIP
