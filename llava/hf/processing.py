"""``ToConvLlavaProcessor``: ``LlavaProcessor`` with out² image placeholders and LLaVA-1.5's pad-to-square."""

from __future__ import annotations

from collections.abc import Callable

from transformers import LlavaProcessor
from transformers.processing_utils import MultiModalData

from vision_token_compression import expand_to_square

from .load_checks import check_processor_fits_model
from .native import RegisteredNatively


def checked_output_size(value, processor: str) -> int:
    """A processor's ``compression_output_size``: a positive int, else an error naming where it is recorded."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{processor} needs compression_output_size, the side of the compressed grid (12 gives 144 image tokens "
            f"per tile), got {value!r}. A converted checkpoint records it in processor_config.json."
        )
    return value


class PilBackend:
    """Processors whose images load with PIL's resize by default, as LLaVA's towers do."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``ProcessorMixin.from_pretrained``, with the PIL backend for images unless ``backend`` says otherwise.

        LLaVA was trained on PIL's resize (the fork's tower loads ``CLIPImageProcessorPil``); with
        torchvision installed transformers would pick its torchvision twin, whose bicubic resize
        differs slightly. ``backend="torchvision"`` chooses that one.

        A processor whose image-token count contradicts the model saved beside it (its config.json) is
        refused here (``load_checks.check_processor_fits_model``), not at ``generate``.
        """
        kwargs.setdefault("backend", "pil")
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        check_processor_fits_model(processor, pretrained_model_name_or_path)
        return processor


class ToConvLlavaProcessor(RegisteredNatively, PilBackend, LlavaProcessor):
    """Expands each ``<image>`` to ``compression_output_size ** 2`` placeholders (144 at 24→12, 64 at 24→8).

    Args (beyond ``LlavaProcessor``'s):
        compression_output_size: Side of the compressed grid; the placeholder count is its square.
        pad_to_square: Pad each image to a centred square filled with the image processor's mean
            colour before resizing, as LLaVA-1.5 does with ``image_aspect_ratio='pad'`` (this fork's
            ``process_images``). llava-hf's processor does not pad: it resizes the short side and
            centre-crops, so a non-square image loses its edges. Converted checkpoints of models
            trained with ``pad`` set it, so that they see the pixels they were trained on.
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
        pad_to_square: bool = False,
        **kwargs,
    ):
        self.compression_output_size = checked_output_size(compression_output_size, type(self).__name__)
        self.pad_to_square = bool(pad_to_square)
        super().__init__(
            image_processor, tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs,
        )

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per image: the compressed grid's token count."""
        return self.compression_output_size**2

    def __call__(self, images=None, text=None, *args, **kwargs):
        return super().__call__(self.expand_images(images), text, *args, **kwargs)

    def expand_images(self, images):
        """``images`` (one, a list or a list of lists) padded to squares when ``pad_to_square``; else as given."""
        if images is None or not self.pad_to_square:
            return images
        background = tuple(int(x * 255) for x in self.image_processor.image_mean)  # as LLaVA's process_images
        return _map_images(images, lambda image: expand_to_square(_as_pil(image), background))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder counts for images of ``image_sizes`` (serving engines size their caches with it)."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )


def _map_images(images, fn: Callable):
    if isinstance(images, (list, tuple)):
        return [_map_images(image, fn) for image in images]
    return fn(images)


def _as_pil(image):
    """A PIL image from what transformers' processors accept: PIL, a path or URL, a NumPy array or a tensor."""
    from PIL import Image
    from transformers.image_transforms import to_pil_image
    from transformers.image_utils import load_image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str):
        return load_image(image)
    return to_pil_image(image)
