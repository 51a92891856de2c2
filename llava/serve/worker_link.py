"""The controller's side of talking to workers: their status, checked, and their answer streams, relayed.

Everything here is asynchronous (httpx) and bounded in time, so a worker that never answers (a dead
port, a socket that accepts and then hangs or trickles bytes) holds no thread and delays no other worker:

- ``fetch_status``: a worker's ``/worker_get_status`` within ``STATUS_TIMEOUT_S`` in all (not per read),
  at most ``STATUS_MAX_BYTES``, checked like a registration's ``worker_status``; None otherwise;
- ``relay_chunks``: the NUL-delimited chunks of a worker's stream as each completes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

from .deps import require
from .validation import BadRequest, check_integer, check_number, check_object, check_text_list, parse_json

httpx = require("httpx", "llava.serve.controller")

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0  # upstream's timeout for /worker_get_status; here a deadline for the whole answer
STATUS_MAX_BYTES = 64 * 1024
MAX_SPEED = 1e6  # upstream's workers report 1; the bound keeps the lottery's weights finite
MAX_QUEUE_LENGTH = 2**31 - 1
# What a worker that does not answer raises: transport errors, HTTP errors, an unusable URL, the deadline.
NO_ANSWER = (httpx.HTTPError, httpx.InvalidURL, asyncio.TimeoutError)


@dataclass(frozen=True)
class WorkerStatus:
    """A worker's ``/worker_get_status`` (upstream's fields), checked."""

    model_names: list[str]
    speed: float
    queue_length: int


def parse_worker_status(value: Any, field: str = "worker_status") -> WorkerStatus:
    """``value`` as a ``WorkerStatus``; ``BadRequest`` naming the field (e.g. ``worker_status.speed``)."""
    data = check_object(value, field)
    if "model_names" not in data:
        raise BadRequest(f"{field} lacks model_names; send e.g. {{\"model_names\": [\"llava-v1.5-7b\"], "
                         f"\"speed\": 1, \"queue_length\": 0}}.")
    return WorkerStatus(
        model_names=check_text_list(data["model_names"], f"{field}.model_names"),
        speed=check_number(data.get("speed", 1), f"{field}.speed", 0.0, MAX_SPEED, example=1),
        queue_length=check_integer(data.get("queue_length", 0), f"{field}.queue_length", 0, MAX_QUEUE_LENGTH),
    )


def describe_failure(err: BaseException, timeout: float) -> str:
    """Why a worker gave no answer, for logs and error chunks."""
    if isinstance(err, asyncio.TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


async def fetch_status(client, worker_name: str) -> WorkerStatus | None:
    """The worker's checked ``/worker_get_status``, or None (logged) when it gives none in time."""
    try:
        raw = await asyncio.wait_for(_read_small(client, worker_name + "/worker_get_status"), STATUS_TIMEOUT_S)
        return parse_worker_status(parse_json(raw))
    except NO_ANSWER as err:
        logger.warning("No status from worker %s: %s", worker_name, describe_failure(err, STATUS_TIMEOUT_S))
    except BadRequest as err:
        logger.warning("Worker %s answered /worker_get_status with an unusable status: %s", worker_name, err)
    return None


async def _read_small(client, url: str) -> bytes:
    async with client.stream("POST", url, timeout=STATUS_TIMEOUT_S) as response:
        response.raise_for_status()
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) > STATUS_MAX_BYTES:
                raise BadRequest(f"the answer is over {STATUS_MAX_BYTES} bytes")
    return bytes(body)


async def relay_chunks(pieces: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The NUL-delimited chunks of a byte stream as each completes (NUL kept, empty ones dropped); a last
    chunk without its NUL gets one, as ``iter_lines`` hands it to upstream's clients."""
    pending = bytearray()
    async for piece in pieces:
        pending += piece
        while (end := pending.find(b"\0")) >= 0:
            chunk = bytes(pending[:end])
            del pending[: end + 1]
            if chunk:
                yield chunk + b"\0"
    if pending:
        yield bytes(pending) + b"\0"


async def one_chunk(chunk: bytes) -> AsyncIterator[bytes]:
    """A stream of one chunk (an error the relay answers with itself)."""
    yield chunk
