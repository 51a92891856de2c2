"""``ToConvLlavaNextConfig``: transformers' ``LlavaNextConfig`` (LLaVA-1.6, anyres) plus the compressor's grid sizes."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaNextConfig

from vision_token_compression import DEFAULT_COMPRESSION_OUTPUT_SIZE

from .anyres import check_pinpoints
from .configuration import check_compression_fields
from .native import RegisteredNatively

NEXT_MODEL_TYPE = "toconv_llava_next"


@strict
class ToConvLlavaNextConfig(RegisteredNatively, LlavaNextConfig):
    """A LLaVA-NeXT config (``llava-hf`` layout) whose every tile's CLIP patch grid is compressed before the projector.

    Every ``LlavaNextConfig`` field keeps its meaning (``image_grid_pinpoints`` are [height, width]);
    the anyres arithmetic (tiles, unpadding, one newline per row) runs on the compressed grid.

    Args:
        compression_input_size: Side of CLIP's patch grid per tile (24 for ViT-L/14-336); None: read from
            ``vision_config``. Given, it must equal that grid.
        compression_output_size: Side of each tile's compressed grid, ``1 <= out < in`` (12: 144 tokens per tile).
    """

    model_type = NEXT_MODEL_TYPE

    compression_input_size: int | None = None
    compression_output_size: int = DEFAULT_COMPRESSION_OUTPUT_SIZE

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_compression_fields(self, "ToConvLlavaNextConfig")
        self.image_grid_pinpoints = check_pinpoints(
            self.image_grid_pinpoints, self.vision_config.image_size, "ToConvLlavaNextConfig (config.json): "
        )
        # Tokens of the base tile alone; an image's count depends on its size (anyres_token_count).
        self.image_seq_length = self.compression_output_size**2
