"""``ToConvLlavaForConditionalGeneration``: vLLM's LLaVA with a ToConv compressor before the projector.

Image path: pixels → CLIP up to ``vision_feature_layer`` (vLLM builds only those layers) → select
features (``default`` drops CLS) → ``TokenCompressor`` (in² → out² tokens) → projector → the
language model, which sees out² image embeddings per ``<image>``. Everything else (CLIP, projector,
decoder, KV cache, sampling) is vLLM's ``LlavaForConditionalGeneration``, subclassed, not copied.

Weights: the hub's llava-hf layout that vLLM's LLaVA loader maps, plus ``token_compressor.conv.*``
and the grid-size record ``token_compressor.grid_sizes`` (``[in, out]``), which is checked against
the config before the compressor's weights load: a checkpoint whose compressor was made for another
geometry is refused at load, naming the fix.
"""

from __future__ import annotations

import logging
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

from llava.hf import ToConvLlavaConfig
from vision_token_compression import GRID_SIZES_KEY, TokenCompressor, build_compressor, warn_non_finite

from .processing import ToConvLlavaProcessingInfo

logger = logging.getLogger(__name__)

COMPRESSOR = "token_compressor"
# Where checkpoints keep the compressor: the Hub layout's top level (toconv-convert-to-hf), or inside the
# projector, as llava.hf's modules name it (a ToConvLlavaForConditionalGeneration saved by transformers 5).
_COMPRESSOR_PREFIXES = (
    f"{COMPRESSOR}.", f"multi_modal_projector.{COMPRESSOR}.", f"model.multi_modal_projector.{COMPRESSOR}.",
)
CONVERT_HINT = "convert the checkpoint again with `toconv-convert-to-hf SOURCE OUTPUT --compression-output-size N`"


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=ToConvLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class ToConvLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with the ToConv ``TokenCompressor`` between CLIP's selected features and the projector."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # ToConvLlavaConfig has checked its grid sizes against the vision tower (and the patch-token
        # feature strategy, one feature layer) as vLLM loaded it.
        config: ToConvLlavaConfig = vllm_config.model_config.hf_config
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._source = str(vllm_config.model_config.model)
        towers = list(self._tower_model_names)
        with self._mark_tower_model(vllm_config, "image"):  # skipped with the tower under --limit-mm-per-prompt 0
            self.token_compressor = build_compressor(
                config.compression_input_size, config.compression_output_size, config.vision_config.hidden_size
            )
        self._tower_model_names = towers + self._tower_model_names

    # -- forward: the image path --------------------------------------------------------------

    def _process_image_pixels(self, inputs: LlavaImagePixelInputs) -> torch.Tensor:
        features = super()._process_image_pixels(inputs)  # (N, in², C): CLIP's patch tokens at the selected layer
        return self.token_compressor(features)  # (N, out², C)

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        compressor_state: dict[str, torch.Tensor] = {}

        def llava_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                prefix = next((p for p in _COMPRESSOR_PREFIXES if name.startswith(p)), None)
                if prefix is None:
                    yield name, tensor
                else:
                    compressor_state[name.removeprefix(prefix)] = tensor

        loaded = super().load_weights(llava_weights())
        if isinstance(self.token_compressor, TokenCompressor):  # not a placeholder (image limit 0)
            self._load_compressor(compressor_state)
            loaded |= {f"{COMPRESSOR}.{name}" for name in compressor_state}
        return loaded

    def _load_compressor(self, state: dict[str, torch.Tensor]) -> None:
        """Check the checkpoint's compressor against this model's geometry, then load it."""
        compressor, source = self.token_compressor, self._source
        if not any(name.startswith("conv.") for name in state):
            raise ValueError(
                f"{source} has no {COMPRESSOR}.* weights, but its config asks for a {compressor.name} token "
                f"compressor: {CONVERT_HINT} (it adds the average-initialised compressor or one you give with "
                f"--token-compressor-path)."
            )
        if GRID_SIZES_KEY in state:
            compressor.check_grid_sizes(state[GRID_SIZES_KEY], source=source)
        else:
            compressor.accept_unrecorded_grid_sizes(source=source)
        expected = {name: tuple(tensor.shape) for name, tensor in compressor.state_dict().items()}
        misfits = [  # in the module's order: conv.weight, conv.bias, then anything it does not have
            f"{name} is {tuple(state[name].shape)}, expected {shape}"
            for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape
        ] + [f"unexpected {name}" for name in sorted(set(state) - set(expected))]
        if misfits:  # e.g. a compressor over another tower's hidden size
            raise ValueError(
                f"The {COMPRESSOR} weights in {source} do not fit a {compressor.name} compressor over "
                f"{compressor.hidden_dim}-channel CLIP features (vision_config.hidden_size): {'; '.join(misfits)}. "
                f"They were made for another vision tower; {CONVERT_HINT}."
            )
        warn_non_finite(state, source)
        compressor.load_state_dict(state, strict=True)
        logger.info("Loaded token compressor [%s] from %s", compressor.name, source)
