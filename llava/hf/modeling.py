"""``ToConvLlavaForConditionalGeneration``: transformers' LLaVA with the ToConv compressor before its projector.

Everything but the projector is transformers' own ``LlavaModel``: CLIP, feature selection (layer -2,
CLS dropped), the image-token splice, the language model, ``generate``. The projector module first
compresses the selected (B, 576, C) patch tokens to (B, 144, C), then applies LLaVA's
linear → GELU → linear, so ``get_image_features`` gives out² tokens per image and the processor
inserts out² placeholders. Module tree::

    model (ToConvLlavaModel)
      vision_tower            CLIPVisionModel
      multi_modal_projector   ToConvLlavaMultiModalProjector
        token_compressor      TokenCompressor (vision_token_compression)
        linear_1, act, linear_2
      language_model          LlamaModel
    lm_head

On disk the compressor is ``token_compressor.*`` beside ``multi_modal_projector.*`` (``layout``).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers import initialization as hf_init
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel

from vision_token_compression import TokenCompressor, build_compressor

from .configuration import ToConvLlavaConfig
from .native import RegisteredNatively


class ToConvLlavaMultiModalProjector(LlavaMultiModalProjector):
    """The ToConv compressor, then LLaVA's projector: (B, in², C) patch tokens → (B, out², D) embeddings."""

    def __init__(self, config: ToConvLlavaConfig) -> None:
        super().__init__(config)
        self.token_compressor = build_compressor(
            config.compression_input_size, config.compression_output_size, config.vision_config.hidden_size
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        compressed = self.token_compressor(image_features.to(self.token_compressor.dtype))  # (B, out², C)
        return super().forward(compressed.to(self.linear_1.weight.dtype))  # (B, out², D)


class _CompressorInit:
    """``_init_weights`` for models holding a compressor: its own init (the window average), not a random conv."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TokenCompressor):
            # hf_init.copy_ skips what from_pretrained loaded: only what the checkpoint lacked is set.
            module.reset_parameters(copy=hf_init.copy_)


def _check_loaded_compressor(loaded, source) -> None:
    """After ``from_pretrained``: the compressor's grid-size record must name the config's sizes."""
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
    compressor = model.token_compressor
    compressor.check_grid_sizes(source=os.fspath(source))
    compressor.restore_weight_layout()  # from_pretrained materialises the weights itself (a speed-up only)


class ToConvLlavaModel(RegisteredNatively, _CompressorInit, LlavaModel):
    """``LlavaModel`` whose projector compresses the patch tokens first (``ToConvLlavaMultiModalProjector``)."""

    config_class = ToConvLlavaConfig
    config: ToConvLlavaConfig

    def __init__(self, config: ToConvLlavaConfig) -> None:
        # LlavaModel.__init__ would build the plain projector; the same modules, with ours.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = ToConvLlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @property
    def token_compressor(self) -> TokenCompressor:
        return self.multi_modal_projector.token_compressor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        _check_loaded_compressor(loaded, pretrained_model_name_or_path)
        return loaded


class ToConvLlavaForConditionalGeneration(RegisteredNatively, _CompressorInit, LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with the ToConv compressor between CLIP's selected features and the projector.

    Loads checkpoints written by ``toconv-convert-to-hf``; ``from_pretrained`` refuses a compressor
    whose recorded grid sizes are not the config's (``GridSizeMismatchError``).
    """

    config_class = ToConvLlavaConfig
    config: ToConvLlavaConfig

    def __init__(self, config: ToConvLlavaConfig) -> None:
        # LlavaForConditionalGeneration.__init__ would build a plain LlavaModel; the same modules, with ours.
        LlavaPreTrainedModel.__init__(self, config)
        self.model = ToConvLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def token_compressor(self) -> TokenCompressor:
        return self.model.token_compressor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        _check_loaded_compressor(loaded, pretrained_model_name_or_path)
        return loaded
