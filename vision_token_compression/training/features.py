"""Frozen CLIP features exactly as LLaVA's vision tower selects them, for training compressors.

``vision_token_compression`` never imports ``llava``, so this is a small, self-contained twin of
``CLIPVisionTower``'s encoder half: the same model and image processor classes, the same hidden
state (``select_layer``, -2 in LLaVA-1.5) and the same ``patch`` / ``cls_patch`` selection.

The tower is private to this module and never trains, so the layers after the selected one are
dropped once at load time (23 of 24 run for layer -2): the encoder's ``*encoder.layers`` list,
where transformers 4.x and 5.x both keep it, is cut to its first layers, and the model's own
forward returns the selected hidden state as its ``last_hidden_state`` (CLIP applies its final
norm to the pooled token only). Any other layout runs every layer and indexes ``hidden_states``.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import transformers
from PIL import Image
from torch import nn
from transformers import CLIPVisionModel

from vision_token_compression import expand_to_square

logger = logging.getLogger(__name__)

SelectFeature = Literal["patch", "cls_patch"]
AspectMode = Literal["pad", "crop"]

# transformers 5 makes CLIPImageProcessor depend on torchvision; its PIL twin preprocesses as 4.x did.
CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def load_image_processor(tower: str):
    """The CLIP image processor saved with ``tower`` (hub name or local path)."""
    return CLIPImageProcessor.from_pretrained(tower)


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


class FrozenCLIPFeatures(nn.Module):
    """A frozen CLIP vision model returning LLaVA's selected features (B, N, C).

    Args:
        tower: Hub name or local path of a CLIP vision model (with its preprocessor config).
        select_layer: Index into ``hidden_states`` (LLaVA's ``mm_vision_select_layer``).
        select_feature: ``"patch"`` drops the CLS token, ``"cls_patch"`` keeps it in front.
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
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}.")
        self.tower_name = tower
        self.select_layer = select_layer
        self.select_feature = select_feature
        # Load in the saved dtype, then cast: the dtype keyword differs between transformers 4 and 5.
        self.model = CLIPVisionModel.from_pretrained(tower).to(dtype)
        self.model.requires_grad_(False)
        self.model.eval()
        layers = self.config.num_hidden_layers
        if not -(layers + 1) <= select_layer <= layers:
            raise ValueError(
                f"select_layer={select_layer} is out of range for {tower}, which has {layers + 1} hidden "
                f"states (embeddings + {layers} layers); LLaVA-1.5 uses -2."
            )
        self.layers_run = self._drop_unused_layers(select_layer % (layers + 1))

    def _drop_unused_layers(self, needed: int) -> int | None:
        """Keep only the first ``needed`` encoder layers; return ``needed``, or None if the layout is unknown."""
        total = self.config.num_hidden_layers
        found = [
            name for name, module in self.model.named_modules()
            if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList) and len(module) == total
        ]
        if len(found) != 1:
            logger.warning("%s: no unique '*encoder.layers' list of %d layers; running all of them.",
                           self.tower_name, total)
            return None
        parent_name, _, attribute = found[0].rpartition(".")
        parent = self.model.get_submodule(parent_name)
        setattr(parent, attribute, nn.ModuleList(list(getattr(parent, attribute))[:needed]))
        logger.info("%s: running %d of %d layers (select_layer=%d)", self.tower_name, needed, total, self.select_layer)
        return needed

    @property
    def config(self):
        return self.model.config

    @property
    def grid_size(self) -> int:
        """Side of the patch grid (24 for ViT-L/14-336)."""
        return self.config.image_size // self.config.patch_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> FrozenCLIPFeatures:
        """Stay in eval mode: the tower is frozen (no dropout, whatever the caller's mode)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels → (B, N, C) selected hidden states, N = grid² (+1 with ``cls_patch``)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if self.layers_run is None:
            hidden = self.model(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        else:
            hidden = self.model(pixel_values).last_hidden_state  # (B, 1 + N, C): the selected layer's output
        return hidden[:, 1:] if self.select_feature == "patch" else hidden

    def patch_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The grid tokens of ``forward``'s output: drops the CLS token under ``cls_patch``."""
        return features[:, 1:] if self.select_feature == "cls_patch" else features
