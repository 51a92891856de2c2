"""``ToConvLlavaNextForConditionalGeneration``: vLLM's LLaVA-NeXT with a ToConv compressor on every tile.

Image path: the HF processor's tiles (base tile first) → CLIP up to ``vision_feature_layer`` →
selected features (CLS dropped) → ``TokenCompressor`` per tile (in² → out²) → projector → packing on
the compressed grid (``llava.hf.modeling_next.pack_tiles``: out tokens per tile side, padding cropped
by the fork's ``unpadded_size``, one ``image_newline`` per row) → the language model. The
placeholder count (``processing_next.py``) is ``anyres_token_count``, the same rule. Everything else
is vLLM's ``LlavaNextForConditionalGeneration``, subclassed, not copied.

Weights: llava-hf's LLaVA-NeXT layout plus ``token_compressor.*``; a compressor made for another grid
or vision width is refused at load (``load_compressor_tensors``), naming the fix, as for LLaVA-1.5.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor
from vllm.multimodal import MULTIMODAL_REGISTRY

from llava.hf import ToConvLlavaNextConfig
from llava.hf.anyres import anyres_tile_grid
from llava.hf.modeling_next import pack_tiles
from llava.model.compressor_layout import VLLM
from vision_token_compression import TokenCompressor, build_compressor, load_compressor_tensors

from .model import CONVERT_FIX
from .processing_next import ToConvLlavaNextProcessingInfo


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=ToConvLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class ToConvLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT (LLaVA-1.6) with the ToConv ``TokenCompressor`` between each tile's CLIP features and the projector."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # ToConvLlavaNextConfig has checked its grid sizes, pinpoints and feature strategy (CLS dropped, one
        # feature layer) against the vision tower as vLLM loaded it.
        config: ToConvLlavaNextConfig = vllm_config.model_config.hf_config
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._source = str(vllm_config.model_config.model)
        towers = list(self._tower_model_names)
        with self._mark_tower_model(vllm_config, "image"):  # skipped with the tower under --limit-mm-per-prompt 0
            self.token_compressor = build_compressor(
                config.compression_input_size, config.compression_output_size, config.vision_config.hidden_size
            )
        self._tower_model_names = towers + self._tower_model_names

    # -- forward: the image path --------------------------------------------------------------

    def _image_pixels_to_features(self, vision_tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        features = super()._image_pixels_to_features(vision_tower, pixel_values)  # (tiles, in², C)
        return self.token_compressor(features)  # (tiles, out², C): the projector then sees the compressed grid

    def _merge_image_patch_embeddings(
        self, image_size: torch.Tensor, patch_embeddings: torch.Tensor, *, strategy: str
    ) -> torch.Tensor:
        """One image's (1 + tiles, out², D) embeddings packed as the HF-native model packs them.

        vLLM's own packing assumes CLIP's uncompressed grid and transformers' unpad rounding; the
        placeholder count is the fork's rule on the compressed grid, so the packing must be too.
        """
        if strategy != "spatial_unpad":  # vLLM's LLaVA-NeXT only asks for this one
            raise ValueError(f"ToConv LLaVA-NeXT packs tiles by 'spatial_unpad' only, got {strategy!r}.")
        size = [int(x) for x in image_size.tolist()]  # (height, width), on the CPU
        rows, cols = anyres_tile_grid(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
        # A batch pads every image's tiles to the longest; this image's are the first 1 + rows × cols.
        return pack_tiles(patch_embeddings[: 1 + rows * cols], size, self.config, self.image_newline)

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        compressor_state: dict[str, torch.Tensor] = {}

        def llava_next_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                own = VLLM.compressor_name(name)  # the Hub layout's top level, or transformers 5's names
                if own is None:
                    yield name, tensor
                else:
                    compressor_state[own] = tensor

        loaded = super().load_weights(llava_next_weights())
        if isinstance(self.token_compressor, TokenCompressor):  # not a placeholder (image limit 0)
            load_compressor_tensors(
                self.token_compressor, compressor_state, self._source,
                features="CLIP features (vision_config.hidden_size)", fix=CONVERT_FIX,
            )
            loaded |= set(VLLM.place(compressor_state))
        return loaded
