"""Small helpers the upstream scripts import."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def disable_torch_init() -> None:
    """Kept for upstream scripts; nothing to do.

    Upstream patched ``nn.Linear``/``nn.LayerNorm`` init away to load faster. transformers 5 builds
    models on the meta device and initialises only weights a checkpoint lacks, so the patch is not
    needed, and leaving torch's init alone keeps modules built later (a projector) initialised.
    """
    logger.debug("disable_torch_init: not needed with transformers >= 5; torch init left unchanged.")
