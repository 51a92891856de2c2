"""The one layer that checks what the controller and the model workers receive.

``read_body`` reads a request's bytes up to a cap, ``parse_json`` turns them into JSON values (UTF-8,
bounded nesting; NaN, Infinity and absurd integers kept as ``UnusableValue`` so that the check of the field
they sit in refuses them by name) and the ``check_*`` functions check one field each. All
of them raise ``BadRequest``, whose message names the field, what came and what to send, and whose
``status_code`` the server answers with (400; 413 for a body over the cap). So a body the server cannot
use is a 4xx with a message, never a 500, whichever endpoint and field it hits.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import urlsplit

DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20  # a generation request: the prompt and its base64 images
MAX_JSON_DEPTH = 32  # upstream's bodies nest 3 deep
MAX_INTEGER_DIGITS = 30  # no field takes a longer integer (and int() refuses 4300 digits with no field named)
MAX_URL_CHARS = 2048


class BadRequest(ValueError):
    """A request the server refuses before doing any work on it; the message says what to change."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class UnusableValue(str):
    """A JSON literal no field takes (NaN, Infinity, a number out of float range, an integer of more than
    ``MAX_INTEGER_DIGITS`` digits), kept as its text so that the check of its field refuses it by name."""

    def describe(self) -> str:
        if self.lstrip("-").isdigit():
            return f"an integer of {len(self.lstrip('-'))} digits"
        if self in ("NaN", "Infinity", "-Infinity"):
            return f"{self} (which is not JSON: json.dumps(..., allow_nan=False) refuses it)"
        return f"{self} (beyond the range of a float)"


async def read_body(request, max_bytes: int, limit: str = "--max-request-bytes",
                    advice: str = "send fewer or smaller images (the model sees them at 336×336, or a few tiles of "
                                  "it, anyway)") -> bytes:
    """The body of a Starlette ``request``; ``BadRequest`` (413) once it passes ``max_bytes``, before the rest is
    read. ``limit`` names the setting and ``advice`` the fix in the message."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(f"The request body is {declared} bytes, more than this server takes ({max_bytes} bytes, "
                         f"{limit}); {advice}.", status_code=413)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise BadRequest(f"The request body is over {max_bytes} bytes, more than this server takes ({limit}); "
                             f"{advice}.", status_code=413)
    return bytes(body)


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body; ``BadRequest`` for anything else, naming where it breaks."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(f"The request body is not UTF-8 (byte {err.start} is {raw[err.start]:#04x}); "
                         f"send JSON encoded as UTF-8.") from None
    if not text.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        value = json.loads(text, parse_constant=UnusableValue, parse_int=_parse_int, parse_float=_parse_float)
    except RecursionError:
        raise BadRequest(_too_deep()) from None
    except ValueError as err:
        raise BadRequest(f"The request body is not JSON ({err}); send a JSON object.") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise BadRequest(_too_deep(_deep_field(value)))
    return value


def _too_deep(where: str = "The request body") -> str:
    return f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels; no field of this API nests like that."


def _deep_field(value: Any) -> str:
    """The top-level field that nests too deep (the body itself when it is not an object)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if _deeper_than(item, MAX_JSON_DEPTH - 1):
                return key if key.isidentifier() else describe(key)
    return "The request body"


def _parse_int(digits: str) -> int | UnusableValue:
    return UnusableValue(digits) if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS else int(digits)


def _parse_float(text: str) -> float | UnusableValue:
    value = float(text)
    return value if math.isfinite(value) else UnusableValue(text)


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)] if isinstance(value, list | dict) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
    return False


def describe(value: Any) -> str:
    """A short description of a JSON value for an error message (never the whole of a long one)."""
    if isinstance(value, UnusableValue):
        return value.describe()
    if isinstance(value, str):
        if len(value) <= 60:
            return ascii(value)
        return f"{ascii(value[:60])}... ({len(value)} characters)"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) or abs(value) < 10**MAX_INTEGER_DIGITS else "a huge integer"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) > 1 else ''}" if value else "an empty list"
    if isinstance(value, dict):
        keys = ", ".join(describe(key) for key in list(value)[:5])
        return f"an object with keys {keys}{', ...' if len(value) > 5 else ''}" if value else "an empty object"
    return type(value).__name__


def check_object(value: Any, what: str = "The request body") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {describe(value)}.")
    return value


def check_text(value: Any, field: str, *, non_empty: bool = False) -> str:
    """A string of Unicode text (no lone surrogates, which no encoding carries); ``BadRequest`` naming ``field``."""
    if not isinstance(value, str) or isinstance(value, UnusableValue) or (non_empty and not value):
        raise BadRequest(f"{field} must be a {'non-empty ' if non_empty else ''}string, got {describe(value)}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRequest(f"{field} holds a lone surrogate ({ascii(value[err.start])}) at character {err.start}, "
                         f"which is not Unicode text; send valid text (decode the client's bytes with "
                         f"errors='replace').") from None
    return value


def check_number(value: Any, field: str, low: float, high: float, *, low_open: bool = False,
                 example: float = 1.0) -> float:
    """A finite number in [low, high] (or (low, high]); ``BadRequest`` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float)
                                                                        and not math.isfinite(value)):
        raise BadRequest(f"{field} must be a number, got {describe(value)}; send e.g. {example}.")
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise BadRequest(f"{field} must be in {bounds}, got {describe(value)}; send e.g. {example}.")
    return float(value)


def check_integer(value: Any, field: str, low: int, high: int | None = None, hint: str = "") -> int:
    """An integer in [low, high] (a float with no fraction counts); ``BadRequest`` naming ``field``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if (isinstance(value, bool) or not isinstance(value, int) or value < low
            or (high is not None and value > high)):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise BadRequest(f"{field} must be an integer {bounds}, got {describe(value)}{hint}.")
    return value


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field} must be true or false, got {describe(value)}.")
    return value


def check_url(value: Any, field: str) -> str:
    """An http(s) URL with a host (a worker's address); ``BadRequest`` naming ``field``."""
    text = check_text(value, field)
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in 0..65535)
        valid_port = True
    except ValueError:
        valid_port = False
    if (len(text) > MAX_URL_CHARS or parts.scheme not in ("http", "https") or not parts.hostname or not valid_port
            or parts.query or parts.fragment or parts.username is not None
            or any(char.isspace() or not char.isprintable() for char in text)):
        raise BadRequest(f"{field} must be an http(s) URL such as http://localhost:21002 (at most {MAX_URL_CHARS} "
                         f"characters, no spaces, query or credentials), got {describe(value)}.")
    return text


def check_text_list(value: Any, field: str) -> list[str]:
    """A list of non-empty strings; ``BadRequest`` naming ``field`` (and the item)."""
    if not isinstance(value, list):
        raise BadRequest(f"{field} must be a list of strings, got {describe(value)}.")
    return [check_text(item, f"{field}[{index}]", non_empty=True) for index, item in enumerate(value)]
