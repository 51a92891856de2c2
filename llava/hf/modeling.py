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
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers import initialization as hf_init
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel

from vision_token_compression import TokenCompressor, build_compressor

from .configuration import ToConvLlavaConfig
from .load_checks import check_loaded_compressor, check_stored_compressor
from .native import RegisteredNatively
from .writer import add_loader_stub, auto_map_for


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


class _CompressorHost:
    """What both models do for their compressor: its own init, checks around ``from_pretrained``, the stub on save."""

    def _init_weights(self, module: nn.Module) -> None:
        """HF init, but a compressor gets its own (the window average), not a random conv's."""
        super()._init_weights(module)
        if isinstance(module, TokenCompressor):
            # hf_init.copy_ skips what from_pretrained loaded: only what the checkpoint lacked is set.
            module.reset_parameters(copy=hf_init.copy_)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``; a compressor that does not fit the config is refused (``load_checks``)."""
        config = kwargs.get("config")
        if os.path.isdir(pretrained_model_name_or_path) and not isinstance(config, cls.config_class):
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path)
        if isinstance(config, cls.config_class):
            check_stored_compressor(pretrained_model_name_or_path, config)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        check_loaded_compressor(loaded, pretrained_model_name_or_path)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained`` (the Hub key layout), plus the loader stub that ``auto_map`` names.

        So that a saved folder, like a converted one, tells a transformers without ``llava.hf`` what to install.
        """
        self.config.auto_map = auto_map_for(self.config)
        super().save_pretrained(save_directory, *args, **kwargs)
        add_loader_stub(Path(save_directory))


class ToConvLlavaModel(RegisteredNatively, _CompressorHost, LlavaModel):
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


class ToConvLlavaForConditionalGeneration(RegisteredNatively, _CompressorHost, LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with the ToConv compressor between CLIP's selected features and the projector.

    Loads checkpoints written by ``toconv-convert-to-hf``; ``from_pretrained`` refuses a compressor
    whose shapes do not fit the config's tower and grid sizes (``ValueError``), or whose recorded
    grid sizes are not the config's (``GridSizeMismatchError``), each naming the fix.
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

