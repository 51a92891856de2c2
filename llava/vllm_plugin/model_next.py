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

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor
from vllm.multimodal import MULTIMODAL_REGISTRY

from llava.hf import ToConvLlavaNextConfig
from llava.hf.anyres import anyres_tile_grid
from llava.hf.modeling_next import pack_tiles

from .model import CompressorHost
from .processing_next import ToConvLlavaNextProcessingInfo


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=ToConvLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class ToConvLlavaNextForConditionalGeneration(CompressorHost, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT (LLaVA-1.6) with the ToConv ``TokenCompressor`` between each tile's CLIP features and the projector."""

    config: ToConvLlavaNextConfig  # vLLM's __init__ sets it: the checkpoint's config

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._add_compressor(vllm_config)

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
