"""Checking a ``/worker_generate_stream`` body before the worker admits it (upstream's fields and defaults).

Every field goes through ``llava.serve.validation``. Images are checked from their files' headers (count,
size, announced pixels) and kept encoded: ``EncodedImage.decode`` runs only once the request holds a
generation slot, so memory is bounded by admission, not by what clients send.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.mm_utils import IMAGE_DECODE_ERRORS, check_image_size

from .validation import BadRequest, check_integer, check_number, check_object, check_text, describe

MAX_NEW_TOKENS_CAP = 1024  # upstream's cap on max_new_tokens
DEFAULT_MAX_NEW_TOKENS = 256  # upstream's defaults for missing parameters
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # the warning: under ``-W error``


@dataclass(frozen=True)
class EncodedImage:
    """One image file of a request, checked from its header; its pixels are decoded by ``decode``."""

    index: int
    data: bytes
    size: tuple[int, int]  # (width, height), as the header announces it
    format: str

    def decode(self) -> Image.Image:
        """The RGB pixels; ``BadRequest`` when the data behind a valid header is corrupt or truncated."""
        try:
            # Not a ``with`` block: closing the image would drop the pixels. An RGB file is decoded once,
            # without convert's copy (a 4096×4096 image is 48 MB).
            image = Image.open(BytesIO(self.data), formats=[self.format])
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
        except (*IMAGE_DECODE_ERRORS, *_BOMB) as err:
            width, height = self.size
            raise BadRequest(f"images[{self.index}] ({self.format}, {width}×{height}) could not be decoded: {err}; "
                             f"send the complete image file.") from err


@dataclass
class GenerationRequest:
    """A checked ``/worker_generate_stream`` request."""

    prompt: str
    images: list[EncodedImage]
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: str | None


def read_image_header(data: Any, index: int, max_pixels: int) -> EncodedImage:
    """``images[index]`` checked from its header (no pixel is decoded); ``BadRequest`` naming it."""
    field = f"images[{index}]"
    check_text(data, field)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"{field} is not valid base64 ({err}); send the image file's bytes base64-encoded "
                         f"(e.g. base64.b64encode(open(path, 'rb').read()).decode()).") from None
    try:
        with Image.open(BytesIO(raw)) as image:  # reads the header: size and format, no pixels
            size, image_format = image.size, image.format
            image.verify()  # PNG: every chunk's checksum, so a truncated upload is refused here (no decoding)
    except _BOMB as err:  # Pillow's own limit, below the worker's (a process that kept Pillow's default)
        raise BadRequest(f"{field}'s header announces more pixels than Pillow opens ({err}); the worker takes at "
                         f"most {max_pixels} (--max-image-pixels): downscale it first.") from None
    except IMAGE_DECODE_ERRORS as err:
        raise BadRequest(f"{field} ({len(raw)} bytes) is not an image file PIL can read ({err}); "
                         f"send a complete PNG, JPEG or WebP file.") from None
    width, height = size
    if width * height > max_pixels:
        raise BadRequest(f"{field} is {width}×{height} = {width * height} pixels, over the worker's limit "
                         f"of {max_pixels} (--max-image-pixels); downscale it first.")
    try:
        check_image_size(size, index)  # no pixels, or over PIL.Image.MAX_IMAGE_PIXELS where that is lower
    except ValueError as err:
        raise BadRequest(f"{field}: {err}") from None
    return EncodedImage(index, raw, size, image_format)


def parse_request(params: Any, model_name: str, multimodal: bool, max_pixels: int) -> GenerationRequest:
    """Check a ``/worker_generate_stream`` body; ``BadRequest`` naming the field and the fix.

    The scalar fields are checked first, then each image from its header.
    """
    params = check_object(params)
    model = params.get("model")
    if model is not None and check_text(model, "model") != model_name:
        raise BadRequest(f"This worker serves {model_name!r}, not {describe(model)}; ask the controller's "
                         f"/get_worker_address for a worker of that model.")
    prompt = check_text(params.get("prompt"), "prompt", non_empty=True)
    stop = params.get("stop")
    if stop is not None:
        check_text(stop, "stop")
    temperature = check_number(_optional(params, "temperature", DEFAULT_TEMPERATURE), "temperature", 0.0, 100.0,
                               example=DEFAULT_TEMPERATURE)
    top_p = check_number(_optional(params, "top_p", DEFAULT_TOP_P), "top_p", 0.0, 1.0, low_open=True,
                         example=DEFAULT_TOP_P)
    max_new_tokens = check_integer(
        _optional(params, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS), "max_new_tokens", 1,
        hint=f"; send e.g. {DEFAULT_MAX_NEW_TOKENS} (the worker caps it at {MAX_NEW_TOKENS_CAP})")
    images = params.get("images")
    images = [] if images is None else images
    if not isinstance(images, list):
        raise BadRequest(f"images must be a list of base64 strings, got {describe(images)}.")
    if images and not multimodal:
        raise BadRequest(f"{model_name!r} is a language-only model; send the request without images.")
    n_tokens = prompt.count(DEFAULT_IMAGE_TOKEN) if multimodal else 0
    if len(images) != n_tokens:
        raise BadRequest(
            f"The prompt has {n_tokens} {DEFAULT_IMAGE_TOKEN} tokens but {len(images)} images came with it; "
            f"send one image per {DEFAULT_IMAGE_TOKEN} (upload an image, or drop {DEFAULT_IMAGE_TOKEN} from the prompt)."
        )
    return GenerationRequest(
        prompt=prompt, images=[read_image_header(data, i, max_pixels) for i, data in enumerate(images)],
        temperature=temperature, top_p=top_p, max_new_tokens=min(max_new_tokens, MAX_NEW_TOKENS_CAP),
        stop=stop or None,
    )


def _optional(params: dict[str, Any], name: str, default: Any) -> Any:
    """``params[name]``, or ``default`` when it is missing or null (upstream's defaults)."""
    value = params.get(name)
    return default if value is None else value
