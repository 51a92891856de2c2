"""``ToConvLlavaNextProcessor``: ``LlavaNextProcessor`` whose placeholder count is the compressed anyres count."""

from __future__ import annotations

from transformers import LlavaNextProcessor
from transformers.processing_utils import MultiModalData

from .anyres import anyres_token_count
from .native import RegisteredNatively
from .processing import PilBackend, checked_output_size


class ToConvLlavaNextProcessor(RegisteredNatively, PilBackend, LlavaNextProcessor):
    """Expands each ``<image>`` to as many placeholders as ``ToConvLlavaNextForConditionalGeneration`` makes for it.

    ``anyres.anyres_token_count`` on the compressed grid: ``out²`` for the base tile, then the
    unpadded tiles' grid (``out`` tokens per tile side) with one newline per row; 348 tokens for a
    400×300 image at 24→12 (1,368 uncompressed).

    Args (beyond ``LlavaNextProcessor``'s):
        compression_output_size: Side of each tile's compressed grid (12 at 24→12, 8 at 24→8).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        compression_output_size: int | None = None,
        **kwargs,
    ):
        self.compression_output_size = checked_output_size(compression_output_size, type(self).__name__)
        super().__init__(
            image_processor, tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs,
        )

    def count_image_tokens(self, image_size) -> int:
        """Placeholders for an image of ``image_size`` (height, width)."""
        crop = self.image_processor.crop_size
        tile = crop["height"] if isinstance(crop, dict) else crop.height
        return anyres_token_count(image_size, self.image_processor.image_grid_pinpoints, tile,
                                  self.compression_output_size)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        size = image_inputs["image_sizes"][image_idx]
        return self.image_token * self.count_image_tokens(size.tolist() if hasattr(size, "tolist") else size)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder counts for images of ``image_sizes`` ((height, width) each); serving engines size caches by it."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.count_image_tokens(size) for size in image_sizes],
                              num_image_patches=[1] * len(image_sizes))
