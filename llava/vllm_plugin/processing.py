"""vLLM multimodal processing for ToConv LLaVA: vLLM's LLaVA processing with the compressed placeholder count.

vLLM tokenises the prompt itself, runs the checkpoint's HF processor (``ToConvLlavaProcessor``:
LLaVA-1.5's pad-to-square, then CLIP's preprocessing) on the images alone, then replaces each
``<image>`` token by ``get_num_image_tokens`` placeholders. Counting out² there (144 at 24→12, 64 at
24→8) is all the processing needs: the prompt, the KV-cache reservation, the scheduler's encoder
budget and the dummy inputs of memory profiling (``get_max_image_tokens``) all follow from it.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaProcessingInfo

from llava.hf import ToConvLlavaConfig, ToConvLlavaProcessor


class ToConvLlavaProcessingInfo(LlavaProcessingInfo):
    """``LlavaProcessingInfo`` whose image token count is the compressor's output grid."""

    def get_hf_config(self) -> ToConvLlavaConfig:
        return self.ctx.get_hf_config(ToConvLlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> ToConvLlavaProcessor:
        """The checkpoint's ``ToConvLlavaProcessor``, asked for by class.

        vLLM's own asks for ``LlavaProcessor``, which would skip LLaVA-1.5's pad-to-square and load the
        torchvision image processor: other pixels than the fork's for every non-square image.
        """
        return self.ctx.get_hf_processor(ToConvLlavaProcessor, **kwargs)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.get_hf_config().compression_output_size ** 2  # any image: CLIP sees it at 336×336
