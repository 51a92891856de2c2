"""``ToConvLlavaForConditionalGeneration``: vLLM's LLaVA with a ToConv compressor before the projector.

Image path: pixels → CLIP up to ``vision_feature_layer`` (vLLM builds only those layers) → select
features (``default`` drops CLS) → ``TokenCompressor`` (in² → out² tokens) → projector → the
language model, which sees out² image embeddings per ``<image>``. Everything else (CLIP, projector,
decoder, KV cache, sampling) is vLLM's ``LlavaForConditionalGeneration``, subclassed, not copied.

Weights: the hub's llava-hf layout that vLLM's LLaVA loader maps, plus ``token_compressor.conv.*``
and the grid-size record ``token_compressor.grid_sizes`` (``[in, out]``), which is checked against
the config before the compressor's weights load: a checkpoint whose compressor was made for another
geometry is refused at load, naming the fix. A local checkpoint's safetensors files are checked
against their headers when the model is built, before vLLM reads them: a truncated file is named with
its size (``vision_token_compression.check_checkpoint_safetensors``), not a bare ``SafetensorError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImagePixelInputs,
    LlavaMultiModalProcessor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from llava.hf import ToConvLlavaConfig, ToConvLlavaNextConfig
from llava.model.compressor_layout import VLLM
from vision_token_compression import (
    TokenCompressor,
    build_compressor,
    check_checkpoint_safetensors,
    load_compressor_tensors,
)

from .processing import ToConvLlavaProcessingInfo

DAMAGED_FIX = "Download or copy the checkpoint again, or convert its source again with toconv-convert-to-hf."
CONVERT_FIX = (
    "Convert the checkpoint again with `toconv-convert-to-hf SOURCE OUTPUT --compression-output-size N` (it adds "
    "the average-initialised compressor, or one you give with --token-compressor-path)."
)


class CompressorHost:
    """Mixin for a vLLM LLaVA model class: adds ``token_compressor`` and loads it from ``token_compressor.*``.

    Put it before the vLLM class (``class M(CompressorHost, LlavaForConditionalGeneration)``) and call
    ``_add_compressor`` at the end of ``__init__``.
    """

    token_compressor: TokenCompressor | torch.nn.Module

    def _add_compressor(self, vllm_config: VllmConfig) -> None:
        """Build the compressor the config names, as part of the vision tower (vLLM skips it with the tower)."""
        # The ToConv config has checked its grid sizes against the vision tower (and the patch-token
        # feature strategy, one feature layer) as vLLM loaded it.
        config: ToConvLlavaConfig | ToConvLlavaNextConfig = vllm_config.model_config.hf_config
        self._source = str(vllm_config.model_config.model)
        check_checkpoint_safetensors(self._source, DAMAGED_FIX)  # a local folder's files, before vLLM reads them
        towers = list(self._tower_model_names)
        with self._mark_tower_model(vllm_config, "image"):  # skipped with the tower under --limit-mm-per-prompt 0
            self.token_compressor = build_compressor(
                config.compression_input_size, config.compression_output_size, config.vision_config.hidden_size
            )
        self._tower_model_names = towers + self._tower_model_names

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader for everything but ``token_compressor.*``, which is checked against the config, then loaded."""
        compressor_state: dict[str, torch.Tensor] = {}

        def llava_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                own = VLLM.compressor_name(name)  # the Hub layout's top level, or transformers 5's names
                if own is None:
                    yield name, tensor
                else:
                    compressor_state[own] = tensor

        loaded = super().load_weights(llava_weights())  # the vLLM class after this mixin
        if isinstance(self.token_compressor, TokenCompressor):  # not a placeholder (image limit 0)
            load_compressor_tensors(
                self.token_compressor, compressor_state, self._source,
                features="CLIP features (vision_config.hidden_size)", fix=CONVERT_FIX,
            )
            loaded |= set(VLLM.place(compressor_state))
        return loaded


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=ToConvLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class ToConvLlavaForConditionalGeneration(CompressorHost, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with the ToConv ``TokenCompressor`` between CLIP's selected features and the projector."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._add_compressor(vllm_config)

    def _process_image_pixels(self, inputs: LlavaImagePixelInputs) -> torch.Tensor:
        features = super()._process_image_pixels(inputs)  # (N, in², C): CLIP's patch tokens at the selected layer
        return self.token_compressor(features)  # (N, out², C)
