"""The wire format shared by the controller, the model workers and their clients (upstream LLaVA's).

Every endpoint is an HTTP POST with a JSON body. ``/worker_generate_stream`` answers with a stream of
JSON objects, each followed by a NUL byte (``b"\\0"``), as upstream's clients read it
(``response.iter_lines(delimiter=b"\\0")``). Each object holds upstream's two fields:

- ``text``: the prompt followed by the answer so far (upstream's clients cut the prompt off), or an
  error message;
- ``error_code``: 0 while all is well, otherwise one of ``ErrorCode``.

Our workers add fields that upstream's clients ignore (they read only the two above):
``image_tokens`` (image embeddings the language model received), ``prompt_tokens`` (its whole input
sequence), ``output_tokens``, ``ttft_s`` (seconds from the start of the work on the request, image
preprocessing included, to the first new token), ``tokens_per_s`` (decoding speed after the first
token), ``queue_s`` (seconds spent waiting for a free slot), ``queue_position`` (only on the chunks
sent while waiting) and ``finished`` (true on the last chunk of a complete answer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

logger = logging.getLogger(__name__)

# Upstream's message for any failure it does not explain (llava.utils.server_error_msg there).
server_error_msg = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"

# Upstream's clients send this User-Agent.
HEADERS = {"User-Agent": "LLaVA Client"}

# Default addresses of upstream's launch commands (controller on 21001, first worker on 21002).
DEFAULT_CONTROLLER_ADDRESS = "http://localhost:21001"
DEFAULT_WORKER_ADDRESS = "http://localhost:21002"


class ErrorCode(IntEnum):
    """``error_code`` values. 0-3 are upstream's; clients test ``error_code == 0`` only."""

    OK = 0
    WORKER_ERROR = 1  # the worker refused the request or failed answering it (upstream: any exception)
    NO_WORKER = 2  # the controller knows no worker for the model
    WORKER_UNREACHABLE = 3  # the controller could not reach the worker, or lost it mid-answer
    WORKER_BUSY = 4  # ours: the worker's queue is full (HTTP 503)


def encode_chunk(data: dict[str, Any]) -> bytes:
    """One stream chunk: JSON followed by the NUL delimiter."""
    return json.dumps(data).encode() + b"\0"


def error_chunk(message: str, code: ErrorCode) -> bytes:
    return encode_chunk({"text": message, "error_code": int(code)})


def iter_chunks(response) -> Iterator[dict[str, Any]]:
    """The JSON objects of a ``requests`` streaming response, as upstream's clients split them."""
    for raw in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
        if raw:
            yield json.loads(raw.decode("utf-8"))


@dataclass
class AnswerStats:
    """The measurements our workers attach to each chunk (all None from an upstream worker)."""

    image_tokens: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    queue_s: float | None = None

    @classmethod
    def from_chunk(cls, data: dict[str, Any]) -> AnswerStats:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})

    def describe(self) -> str:
        """A one-line summary for the page, e.g. ``576 image tokens · first token 0.31 s · 42.5 tokens/s``."""
        parts = []
        if self.image_tokens is not None:
            parts.append(f"{self.image_tokens} image tokens")
        if self.ttft_s is not None:
            parts.append(f"first token {self.ttft_s:.2f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        if self.output_tokens is not None:
            parts.append(f"{self.output_tokens} new tokens")
        if self.queue_s:
            parts.append(f"queued {self.queue_s:.2f} s")
        return " · ".join(parts) if parts else "no measurements (not a ToConv worker)"
