"""Checking a ``/worker_generate_stream`` body before any generation (upstream's fields and defaults)."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from PIL import Image, UnidentifiedImageError

from llava.constants import DEFAULT_IMAGE_TOKEN

MAX_NEW_TOKENS_CAP = 1024  # upstream's cap on max_new_tokens
DEFAULT_MAX_NEW_TOKENS = 256  # upstream's defaults for missing parameters
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


class RequestError(ValueError):
    """A request the worker refuses before generating; the message says what to change."""


@dataclass
class GenerationRequest:
    """A checked ``/worker_generate_stream`` request."""

    prompt: str
    images: list[Image.Image]
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: str | None


def _number(params: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool) -> float:
    """``params[name]`` as a finite float in [low, high] (or (low, high]); ``RequestError`` naming it."""
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r}; send e.g. {default}.")
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(f"{name} must be in {bounds}, got {value}; send e.g. {default}.")
    return float(value)


def _max_new_tokens(params: dict[str, Any]) -> int:
    """``max_new_tokens``: an integer ≥ 1, capped at upstream's 1024."""
    value = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(
            f"max_new_tokens must be an integer >= 1, got {value!r}; send e.g. {DEFAULT_MAX_NEW_TOKENS} "
            f"(the worker caps it at {MAX_NEW_TOKENS_CAP})."
        )
    return min(value, MAX_NEW_TOKENS_CAP)


def decode_image(data: Any, index: int, max_pixels: int) -> Image.Image:
    """The RGB image of a base64 string; ``RequestError`` for undecodable or oversized images."""
    if not isinstance(data, str):
        raise RequestError(f"images[{index}] must be a base64 string, got {type(data).__name__}.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"images[{index}] is not valid base64 ({err}); send the image file's bytes "
                           f"base64-encoded (e.g. base64.b64encode(open(path, 'rb').read()).decode()).") from err
    try:
        image = Image.open(BytesIO(raw))  # reads the header only: the size is known before decoding pixels
    except (UnidentifiedImageError, OSError) as err:
        raise RequestError(f"images[{index}] ({len(raw)} bytes) is not an image file PIL can read; "
                           f"send a PNG, JPEG or WebP file.") from err
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(f"images[{index}] is {width}×{height} = {width * height} pixels, over the worker's limit "
                           f"of {max_pixels} (--max-image-pixels); downscale it first.")
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise RequestError(f"images[{index}] ({width}×{height}) could not be decoded: {err}.") from err


def parse_request(params: Any, model_name: str, multimodal: bool, max_pixels: int) -> GenerationRequest:
    """Check a ``/worker_generate_stream`` body; ``RequestError`` naming the field and the fix."""
    if not isinstance(params, dict):
        raise RequestError(f"The body must be a JSON object, got {type(params).__name__}.")
    model = params.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"This worker serves {model_name!r}, not {model!r}; ask the controller's "
                           f"/get_worker_address for a worker of {model!r}.")
    prompt = params.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(f"prompt must be a non-empty string, got {prompt!r}.")
    images = params.get("images") or []
    if not isinstance(images, list):
        raise RequestError(f"images must be a list of base64 strings, got {type(images).__name__}.")
    if images and not multimodal:
        raise RequestError(f"{model_name!r} is a language-only model; send the request without images.")
    n_tokens = prompt.count(DEFAULT_IMAGE_TOKEN) if multimodal else 0
    if len(images) != n_tokens:
        raise RequestError(
            f"The prompt has {n_tokens} {DEFAULT_IMAGE_TOKEN} tokens but {len(images)} images came with it; "
            f"send one image per {DEFAULT_IMAGE_TOKEN} (upload an image, or drop {DEFAULT_IMAGE_TOKEN} from the prompt)."
        )
    stop = params.get("stop")
    if stop is not None and not isinstance(stop, str):
        raise RequestError(f"stop must be a string or null, got {stop!r}.")
    return GenerationRequest(
        prompt=prompt, images=[decode_image(data, i, max_pixels) for i, data in enumerate(images)],
        temperature=_number(params, "temperature", DEFAULT_TEMPERATURE, 0.0, 100.0, low_open=False),
        top_p=_number(params, "top_p", DEFAULT_TOP_P, 0.0, 1.0, low_open=True),
        max_new_tokens=_max_new_tokens(params), stop=stop or None,
    )
