"""Frozen tower features exactly as LLaVA's vision tower selects them, for training compressors.

``vision_token_compression`` never imports ``llava``; both LLaVA's towers and this module call the
library's ``towers``: the same model and image processor classes per family (CLIP, SigLIP), the same
hidden state (``select_layer``, -2 in LLaVA-1.5 and LLaVA-OneVision), the same ``patch`` /
``cls_patch`` selection and the same early exit (``EarlyExit``: 23 of 24 CLIP layers run for -2,
26 of 27 SigLIP layers and no pooling head).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from PIL import Image
from torch import nn

from vision_token_compression import check_checkpoint_safetensors, expand_to_square, require_pretrained
from vision_token_compression.towers import (
    EarlyExit,
    check_select_feature,
    check_select_layer,
    grid_side,
    grid_tokens,
    load_image_processor,
    select_features,
    tower_family,
)

logger = logging.getLogger(__name__)

SelectFeature = Literal["patch", "cls_patch"]
AspectMode = Literal["pad", "crop"]

__all__ = ["FrozenCLIPFeatures", "FrozenTowerFeatures", "ImagePreprocessor", "load_image_processor"]


class ImagePreprocessor:
    """PIL image → (3, H, W) pixel tensor, as LLaVA prepares images for the tower.

    ``aspect="pad"`` pads to a square filled with the processor's mean colour before resizing
    (LLaVA-1.5 training and eval); ``"crop"`` leaves it to the processor's resize + centre crop.
    Picklable, so DataLoader workers can run it.
    """

    def __init__(self, image_processor, aspect: AspectMode = "pad") -> None:
        if aspect not in ("pad", "crop"):
            raise ValueError(f"aspect must be 'pad' or 'crop', got {aspect!r}.")
        self.image_processor = image_processor
        self.aspect = aspect
        self.background = tuple(round(m * 255) for m in image_processor.image_mean)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.aspect == "pad":
            image = expand_to_square(image, self.background)
        return self.image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]  # (3, H, W)


class FrozenTowerFeatures(nn.Module):
    """A frozen vision tower (CLIP or SigLIP) returning LLaVA's selected features (B, N, C).

    Args:
        tower: Hub name or local path of a vision model (with its preprocessor config); its family
            follows ``tower_family`` (SigLIP when the name or config says so, else CLIP).
        select_layer: Index into ``hidden_states`` (LLaVA's ``mm_vision_select_layer``).
        select_feature: ``"patch"`` gives the grid tokens alone, ``"cls_patch"`` keeps CLIP's CLS token in front.
        dtype: dtype to hold the weights in (e.g. ``torch.bfloat16`` on a GPU).
    """

    def __init__(
        self,
        tower: str,
        select_layer: int = -2,
        select_feature: SelectFeature = "patch",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        require_pretrained(tower, "Vision tower", "Pass a local folder or a Hub name of a vision model as --vision-tower.")
        self.family = tower_family(tower)
        self.select_feature = check_select_feature(select_feature, self.family, tower, "select_feature")
        self.tower_name = tower
        check_checkpoint_safetensors(tower, f"Download or copy the vision tower {tower} again.")  # names a truncated file
        # Load in the saved dtype, then cast: the dtype keyword differs between transformers 4 and 5.
        self.model = self.family.model_type().from_pretrained(tower).to(dtype)
        self.model.requires_grad_(False)
        self.model.eval()
        layers = self.config.num_hidden_layers
        self.select_layer = check_select_layer(select_layer, layers, tower, "select_layer")
        self.early_exit = EarlyExit(tower)
        self.layers_run = self.early_exit.layers_needed(select_layer, layers) or layers
        logger.info("%s: running %d of %d layers (select_layer=%d)", tower, self.layers_run, layers, select_layer)

    @property
    def config(self):
        return self.model.config

    @property
    def grid_size(self) -> int:
        """Side of the patch grid (24 for CLIP ViT-L/14-336, 27 for SigLIP-so400m-384)."""
        return grid_side(self.config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> FrozenTowerFeatures:
        """Stay in eval mode: the tower is frozen (no dropout, whatever the caller's mode)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels → (B, N, C) selected hidden states, N = grid² (+1 with ``cls_patch``)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        hidden = self.early_exit.selected(self.model, pixel_values, self.select_layer)
        return select_features(hidden, self.select_feature, self.family.has_cls_token)

    def patch_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The grid tokens of ``forward``'s output: drops the CLS token under ``cls_patch``."""
        return grid_tokens(features, self.select_feature)


FrozenCLIPFeatures = FrozenTowerFeatures  # its name from before SigLIP towers
