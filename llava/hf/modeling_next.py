"""``ToConvLlavaNextForConditionalGeneration``: transformers' LLaVA-NeXT with the ToConv compressor on every tile.

Everything but the projector and the packing is transformers' own ``LlavaNextModel``: the tiling
(``image_sizes`` → tiles per image), CLIP, feature selection (CLS dropped), ``image_newline``, the
image-token splice, the language model, ``generate``. The projector module first compresses each
tile's (576, C) patch tokens to (out², C), base tile and high-res tiles alike, as the fork's tower
does; packing then lays the tiles out on the compressed grid (out per tile side) and crops the
padding by ``anyres.unpadded_size``, the rule the processor counts placeholders with. Module tree::

    model (ToConvLlavaNextModel)
      vision_tower            CLIPVisionModel
      multi_modal_projector   ToConvLlavaNextMultiModalProjector
        token_compressor      TokenCompressor (vision_token_compression)
        linear_1, act, linear_2
      image_newline
      language_model          LlamaModel
    lm_head

On disk the compressor is ``token_compressor.*`` beside ``multi_modal_projector.*`` and ``image_newline``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModel, LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextMultiModalProjector,
    LlavaNextPreTrainedModel,
)

from vision_token_compression import TokenCompressor, build_compressor

from .anyres import anyres_tile_grid, unpadded_size
from .configuration_next import ToConvLlavaNextConfig
from .modeling import _CompressorHost
from .native import RegisteredNatively


class ToConvLlavaNextMultiModalProjector(LlavaNextMultiModalProjector):
    """The ToConv compressor, then LLaVA's projector: (tiles, in², C) patch tokens → (tiles, out², D)."""

    def __init__(self, config: ToConvLlavaNextConfig) -> None:
        super().__init__(config)
        self.token_compressor = build_compressor(
            config.compression_input_size, config.compression_output_size, config.vision_config.hidden_size
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        compressed = self.token_compressor(image_features.to(self.token_compressor.dtype))  # (tiles, out², C)
        return super().forward(compressed.to(self.linear_1.weight.dtype))


def pack_tiles(
    features: torch.Tensor, image_size, config: ToConvLlavaNextConfig, newline: torch.Tensor | None,
) -> torch.Tensor:
    """(1 + tiles, side², D) features of one image of ``image_size`` (height, width) → (tokens, D).

    The base tile's tokens, then the tiles' grid cropped to the image's aspect ratio, each row
    closed by ``newline``; ``side`` is the compressed grid's.
    """
    side = config.compression_output_size
    if features.shape[0] == 1:  # not tiled: transformers' own layout for it
        return features[0] if newline is None else torch.cat((features[0], newline[None].to(features)), dim=0)
    base, tiles = features[0], features[1:]
    rows, cols = anyres_tile_grid(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    if rows * cols != tiles.shape[0] or base.shape[0] != side * side:
        raise ValueError(
            f"An image of size {tuple(int(x) for x in image_size)} (height, width) makes {rows}×{cols} tiles of "
            f"{side}×{side} tokens under image_grid_pinpoints, but its features are {tuple(features.shape)}: process "
            f"images with this checkpoint's processor (its image_grid_pinpoints)."
        )
    grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, H, W)
    height, width = unpadded_size(grid.shape[1], grid.shape[2], image_size)
    top, left = (grid.shape[1] - height) // 2, (grid.shape[2] - width) // 2
    grid = grid[:, top:top + height, left:left + width]
    if newline is not None:
        grid = torch.cat((grid, newline[:, None, None].expand(-1, height, 1).to(grid)), dim=-1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


class ToConvLlavaNextModel(RegisteredNatively, _CompressorHost, LlavaNextModel):
    """``LlavaNextModel`` whose projector compresses each tile first and whose packing uses the compressed grid."""

    config_class = ToConvLlavaNextConfig
    config: ToConvLlavaNextConfig

    def __init__(self, config: ToConvLlavaNextConfig) -> None:
        # LlavaNextModel.__init__ would build the plain projector; the same modules, with ours.
        LlavaNextPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = ToConvLlavaNextMultiModalProjector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @property
    def token_compressor(self) -> TokenCompressor:
        return self.multi_modal_projector.token_compressor

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        """Each image's tiles packed by ``pack_tiles`` on the compressed grid; (features, their lengths)."""
        packed = [
            pack_tiles(features, image_sizes[i], self.config, image_newline) for i, features in enumerate(image_features)
        ]
        lengths = torch.tensor([f.shape[0] for f in packed], dtype=torch.long, device=image_features[0].device)
        return packed, lengths


class ToConvLlavaNextForConditionalGeneration(RegisteredNatively, _CompressorHost, LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` with the ToConv compressor on every tile before the projector.

    Loads checkpoints written by ``toconv-convert-to-hf`` from LLaVA-1.6 sources; ``from_pretrained``
    refuses a compressor that does not fit the config (``ValueError``, ``GridSizeMismatchError``).
    """

    config_class = ToConvLlavaNextConfig
    config: ToConvLlavaNextConfig

    def __init__(self, config: ToConvLlavaNextConfig) -> None:
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = ToConvLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def token_compressor(self) -> TokenCompressor:
        return self.model.token_compressor
