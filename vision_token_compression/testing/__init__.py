"""Test fixtures for machines without downloads: CLIP and SigLIP stand-ins and generated images.

Not part of the compressor library (``import vision_token_compression`` never imports this
package); the tests, the acceptance script, the benchmarks and the upstream drop-in check use it.

- ``standins``: random-weight CLIP and SigLIP vision towers with the real configs LLaVA uses, saved locally.
- ``synthetic``: structured images (gradients, shapes, text) for smoke runs
  (``python -m vision_token_compression.testing.synthetic OUT_DIR``).
"""

from .standins import (
    CLIP_VISION_CONFIGS,
    SIGLIP_VISION_CONFIGS,
    build_clip_standin,
    build_siglip_standin,
    find_local_tower,
)

# ``synthetic`` is also run as a script (python -m ...testing.synthetic): importing it here, with the
# package, would make runpy warn that the module is already imported. Its names load on first use.
_SYNTHETIC = ("make_structured_image", "make_structured_images")


def __getattr__(name: str):
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLIP_VISION_CONFIGS",
    "SIGLIP_VISION_CONFIGS",
    "build_clip_standin",
    "build_siglip_standin",
    "find_local_tower",
    "make_structured_image",
    "make_structured_images",
]
