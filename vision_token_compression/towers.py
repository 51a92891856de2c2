"""What the library needs to know of a vision tower: its patch grid (more to come: feature selection)."""

from __future__ import annotations


def grid_side(config) -> int:
    """Side of a ViT tower's patch grid, ``image_size // patch_size`` (24 for CLIP ViT-L/14-336, 27 for SigLIP-384/14).

    ``config`` is any object with ``image_size`` and ``patch_size`` (a transformers vision config, or a
    dict-like namespace). A patch size that does not divide the image leaves the remainder unused, as the
    towers' patch embedding (a strided convolution without padding) does.
    """
    try:
        image_size, patch_size = config.image_size, config.patch_size
    except AttributeError as err:
        raise ValueError(
            f"{type(config).__name__} has no image_size/patch_size: pass a ViT vision config (e.g. CLIPVisionConfig, "
            f"SiglipVisionConfig) to get its patch grid."
        ) from err
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name}={value!r}: a vision config needs a positive int here.")
    if patch_size > image_size:
        raise ValueError(
            f"{type(config).__name__} has patch_size {patch_size} > image_size {image_size}: no patch grid."
        )
    return image_size // patch_size
