"""vLLM multimodal processing for ToConv LLaVA-NeXT: vLLM's LLaVA-NeXT processing with the compressed anyres count.

vLLM runs the checkpoint's HF processor (``ToConvLlavaNextProcessor``: the fork's anyres tiling) on
the images, then replaces each ``<image>`` token by ``get_num_image_tokens`` placeholders. That count
is ``llava.hf.anyres.anyres_token_count`` on the compressed grid (the rule the HF processor and the
model's packing use), so the prompt, the KV-cache reservation, the scheduler's encoder budget and
the dummy inputs of memory profiling (the pinpoint with the most tokens) all follow from it.
"""

from __future__ import annotations

from vllm.model_executor.models.llava_next import LlavaNextProcessingInfo

from llava.hf import ToConvLlavaNextConfig, ToConvLlavaNextProcessor
from llava.hf.anyres import anyres_token_count


class ToConvLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """``LlavaNextProcessingInfo`` whose image token count is the compressed anyres count."""

    def get_hf_config(self) -> ToConvLlavaNextConfig:
        return self.ctx.get_hf_config(ToConvLlavaNextConfig)

    def get_hf_processor(self, **kwargs: object) -> ToConvLlavaNextProcessor:
        """The checkpoint's ``ToConvLlavaNextProcessor``, asked for by class.

        vLLM's own asks for ``LlavaNextProcessor``, which would load the torchvision image processor
        (tiles that differ from the fork's PIL ones) and count uncompressed placeholders.
        """
        return self.ctx.get_hf_processor(ToConvLlavaNextProcessor, **kwargs)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """Placeholders for an image of ``image_width`` × ``image_height``: base tile, unpadded tiles, newlines."""
        config = self.get_hf_config()
        return anyres_token_count(
            (image_height, image_width), config.image_grid_pinpoints, config.vision_config.image_size,
            config.compression_output_size,
        )
