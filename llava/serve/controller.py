"""The controller: keeps the list of model workers and tells clients which worker serves a model.

``python -m llava.serve.controller --host 0.0.0.0 --port 10000``

HTTP API (upstream LLaVA's; every route is a POST with a JSON body):

- ``/register_worker`` ``{"worker_name": URL, "check_heart_beat": bool, "worker_status": {...} or null}``:
  a worker announces itself (without a status the controller asks the worker for it);
- ``/receive_heart_beat`` ``{"worker_name", "queue_length"}`` → ``{"exist": bool}`` (False: register again);
- ``/refresh_all_workers``: ask every worker for its status, drop those that do not answer;
- ``/list_models`` → ``{"models": [...]}``;
- ``/get_worker_address`` ``{"model"}`` → ``{"address": URL}`` (``""`` when no worker serves it);
- ``/worker_generate_stream`` and ``/worker_get_status``: the controller acting as one worker that
  forwards to its workers (upstream's hierarchical mode).

Bodies go through ``llava.serve.validation``: one the controller cannot use is answered HTTP 400
``{"detail": ...}`` naming the field (``worker_name`` an http(s) URL, ``check_heart_beat`` a boolean,
``worker_status.model_names`` a list of strings, ``.speed`` a number, ``queue_length`` an integer, ``model``
a string); the relay answers with an error chunk instead, as a worker does.

A worker registered with ``check_heart_beat`` that has sent no heartbeat for ``--heart-beat-expiration``
seconds (upstream's 30 by default) is no longer listed or dispatched to, and is removed. A worker that
does not answer is dropped at once: ``/refresh_all_workers`` asks all workers together, each within
5 s in all; a relay to a worker that refuses the connection goes to another worker of the model, and
one that takes a relayed request but stays silent for ``--worker-timeout`` seconds ends with an error
chunk. None of them holds up the others (all network calls are asynchronous).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
import threading
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from llava.constants import CONTROLLER_HEART_BEAT_EXPIRATION

from .deps import require
from .protocol import HEADERS, ErrorCode, error_chunk
from .validation import (
    DEFAULT_MAX_REQUEST_BYTES,
    BadRequest,
    check_bool,
    check_integer,
    check_object,
    check_text,
    check_url,
    parse_json,
    read_body,
)
from .worker_link import (
    MAX_QUEUE_LENGTH,
    NO_ANSWER,
    WorkerStatus,
    describe_failure,
    fetch_status,
    httpx,
    one_chunk,
    parse_worker_status,
    relay_chunks,
)

fastapi = require("fastapi", "llava.serve.controller")
responses = require("fastapi.responses", "llava.serve.controller")
concurrency = require("starlette.concurrency", "llava.serve.controller")
Request = fastapi.Request  # at module level: FastAPI resolves the (string) annotations here

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# A relayed stream may be silent this long (for its first chunk, then between chunks); our workers send
# a chunk at least every second while a request waits in their queue.
DEFAULT_WORKER_TIMEOUT_S = 60.0
REGISTRY_MAX_BODY_BYTES = 64 * 1024  # /register_worker, /receive_heart_beat, /get_worker_address


class DispatchMethod(Enum):
    """How ``get_worker_address`` picks among the workers of a model."""

    LOTTERY = "lottery"  # at random, weighted by each worker's speed
    SHORTEST_QUEUE = "shortest_queue"  # the worker with the fewest queued requests per unit of speed


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float


class Controller:
    """The registry of workers, their heartbeats and the dispatch rule.

    Args:
        dispatch_method: ``"lottery"`` or ``"shortest_queue"``.
        heart_beat_expiration: Seconds without a heartbeat after which a worker registered with
            ``check_heart_beat`` is dropped.
        worker_timeout: Seconds a worker may stay silent in a relayed stream before it is given up.
        max_request_bytes: Largest ``/worker_generate_stream`` body the relay reads.
    """

    def __init__(self, dispatch_method: str = DispatchMethod.SHORTEST_QUEUE.value,
                 heart_beat_expiration: float = CONTROLLER_HEART_BEAT_EXPIRATION,
                 worker_timeout: float = DEFAULT_WORKER_TIMEOUT_S,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        try:
            self.dispatch_method = DispatchMethod(dispatch_method)
        except ValueError:
            choices = ", ".join(m.value for m in DispatchMethod)
            raise ValueError(f"Unknown dispatch method {dispatch_method!r}; use one of: {choices}.") from None
        for flag, value in (("--heart-beat-expiration", heart_beat_expiration), ("--worker-timeout", worker_timeout),
                            ("--max-request-bytes", max_request_bytes)):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}.")
        self.heart_beat_expiration = heart_beat_expiration
        self.worker_timeout = worker_timeout
        self.max_request_bytes = max_request_bytes
        self.workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = None  # the httpx.AsyncClient of ``connected``

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Hold the HTTP client the controller talks to workers with (the app's lifespan)."""
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)  # no pool to wait for
        async with httpx.AsyncClient(headers=HEADERS, limits=limits) as client:
            self._client = client
            try:
                yield
            finally:
                self._client = None

    # ---- Registry --------------------------------------------------------------------------------

    def add_worker(self, worker_name: str, check_heart_beat: bool, status: WorkerStatus) -> None:
        """Add or update a worker with a (checked) status."""
        info = WorkerInfo(model_names=list(status.model_names), speed=status.speed, queue_length=status.queue_length,
                          check_heart_beat=check_heart_beat, last_heart_beat=time.time())
        with self._lock:
            known = worker_name in self.workers
            self.workers[worker_name] = info
        logger.info("%s worker %s: %s", "Re-registered" if known else "Registered", worker_name, status)

    async def register_worker(self, worker_name: str, check_heart_beat: bool, status: WorkerStatus | None) -> bool:
        """Add or update a worker; without ``status`` the worker is asked for it. False if it gives none."""
        if status is None:
            status = await fetch_status(self._client, worker_name)
            if status is None:
                return False
        self.add_worker(worker_name, check_heart_beat, status)
        return True

    def remove_worker(self, worker_name: str, reason: str = "") -> None:
        with self._lock:
            known = self.workers.pop(worker_name, None) is not None
        if known and reason:
            logger.warning("Dropped worker %s: %s", worker_name, reason)

    async def refresh_all_workers(self) -> list[str]:
        """Ask every worker for its status at once; returns the workers dropped because they gave none."""
        with self._lock:
            known = dict(self.workers)
        statuses = await asyncio.gather(*(fetch_status(self._client, name) for name in known))
        dropped = []
        for (name, info), status in zip(known.items(), statuses):
            if status is None:
                self.remove_worker(name, "no usable /worker_get_status answer")
                dropped.append(name)
            else:
                self.add_worker(name, info.check_heart_beat, status)
        return dropped

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        """Record a heartbeat; False for an unknown (or expired) worker, which should register again."""
        self.remove_expired_workers()
        with self._lock:
            info = self.workers.get(worker_name)
            if info is None:
                logger.info("Heartbeat from unknown worker %s", worker_name)
                return False
            info.queue_length = queue_length
            info.last_heart_beat = time.time()
        logger.debug("Heartbeat from %s (queue %s)", worker_name, queue_length)
        return True

    def remove_expired_workers(self) -> list[str]:
        """Drop workers whose last heartbeat is older than the expiration; returns their names."""
        deadline = time.time() - self.heart_beat_expiration
        with self._lock:
            expired = [name for name, info in self.workers.items()
                       if info.check_heart_beat and info.last_heart_beat < deadline]
            for name in expired:
                del self.workers[name]
        for name in expired:
            logger.info("Dropped worker %s: no heartbeat for %.1f s", name, self.heart_beat_expiration)
        return expired

    def start_expiry_thread(self) -> threading.Thread:
        """Sweep expired workers in the background (queries sweep too, so listings are exact)."""

        def sweep() -> None:
            while not self._stop.wait(self.heart_beat_expiration):
                self.remove_expired_workers()

        thread = threading.Thread(target=sweep, name="controller-heartbeat-expiry", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    # ---- Queries ---------------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        self.remove_expired_workers()
        with self._lock:
            return sorted({name for info in self.workers.values() for name in info.model_names})

    def get_worker_address(self, model_name: str, exclude: Collection[str] = ()) -> str:
        """The address of a worker serving ``model_name`` by the dispatch method; ``""`` if there is none."""
        self.remove_expired_workers()
        with self._lock:
            candidates = [(name, info) for name, info in self.workers.items()
                          if model_name in info.model_names and info.speed > 0 and name not in exclude]
            if not candidates:
                return ""
            if self.dispatch_method == DispatchMethod.LOTTERY:
                names = [name for name, _ in candidates]
                return random.choices(names, weights=[info.speed for _, info in candidates])[0]
            name, info = min(candidates, key=lambda item: item[1].queue_length / item[1].speed)
            info.queue_length += 1  # until the next heartbeat reports the real length
            return name

    # ---- The controller as a worker (hierarchical mode) -------------------------------------------

    async def open_stream(self, model: str, body: bytes) -> tuple[int, AsyncIterator[bytes]]:
        """Forward a ``/worker_generate_stream`` body to a worker of ``model``.

        Returns the worker's HTTP status (so a busy worker's 503 reaches the client) and its chunks. A
        worker that refuses the connection is dropped and the next worker of the model tried; one that
        takes the request but does not answer within ``worker_timeout`` is dropped and the client gets
        an error chunk, as it does when no worker serves the model.
        """
        refused: list[str] = []
        while address := self.get_worker_address(model, exclude=refused):
            timeout = httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=self.worker_timeout, write=self.worker_timeout,
                                    pool=None)
            request = self._client.build_request("POST", address + "/worker_generate_stream", content=body,
                                                 headers={"Content-Type": "application/json"}, timeout=timeout)
            try:
                response = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:  # it got nothing: another worker may answer
                reason = describe_failure(err, CONNECT_TIMEOUT_S)
                self.remove_worker(address, f"it refused a relayed request's connection ({reason})")
                refused.append(address)
                continue
            except NO_ANSWER as err:
                reason = describe_failure(err, self.worker_timeout)
                self.remove_worker(address, f"it did not answer a relayed request ({reason})")
                return 200, one_chunk(error_chunk(
                    f"The worker {address} for {model!r} did not answer ({reason}); the controller dropped it. "
                    f"Retry: the model's other workers, or this one once it registers again, take the request.",
                    ErrorCode.WORKER_UNREACHABLE))
            return response.status_code, self._relay(response, address, model)
        if refused:
            return 200, one_chunk(error_chunk(
                f"No worker of {model!r} could be reached: {', '.join(refused)} refused the connection and "
                f"{'were' if len(refused) > 1 else 'was'} dropped. Start a worker for it, or retry once a worker "
                f"registers again (at its next heartbeat).", ErrorCode.WORKER_UNREACHABLE))
        return 200, one_chunk(error_chunk(
            f"No worker serves the model {model!r}; the controller lists: {self.list_models()}. "
            f"Start a worker for it, or pick a listed model.", ErrorCode.NO_WORKER))

    async def _relay(self, response, address: str, model: str) -> AsyncIterator[bytes]:
        """The worker's chunks as they come, then an error chunk if the worker stops before its answer ends."""
        lost = None
        last: dict[str, Any] = {}
        try:
            async for chunk in relay_chunks(response.aiter_raw()):
                last = _peek(chunk)
                yield chunk
        except httpx.HTTPError as err:
            lost = (f"silent for {self.worker_timeout:g} s" if isinstance(err, httpx.TimeoutException)
                    else f"{type(err).__name__}: the connection broke")
        finally:
            await response.aclose()
        # Our workers mark the last chunk of an answer ``finished``; upstream's mark nothing.
        if lost is None and "finished" in last and not last["finished"] and last.get("error_code") == 0:
            lost = "the stream ended before the answer was finished"
        if lost is not None:
            logger.warning("Lost worker %s mid-answer: %s", address, lost)
            yield error_chunk(
                f"The worker {address} serving {model!r} was lost mid-answer ({lost}); the answer above is incomplete. "
                f"Retry: the controller drops the worker once its heartbeat expires ({self.heart_beat_expiration:g} s) "
                f"and sends requests to the model's other workers.", ErrorCode.WORKER_UNREACHABLE)

    async def aggregate_status(self) -> dict[str, Any]:
        """``/worker_get_status`` for the controller as a whole: every worker's models, speeds and queues."""
        with self._lock:
            names = list(self.workers)
        answers = await asyncio.gather(*(fetch_status(self._client, name) for name in names))
        statuses = [status for status in answers if status is not None]
        return {"model_names": sorted({name for s in statuses for name in s.model_names}),
                "speed": sum(s.speed for s in statuses), "queue_length": sum(s.queue_length for s in statuses)}


# ---- HTTP ------------------------------------------------------------------------------------------


def _peek(chunk: bytes) -> dict[str, Any]:
    """The JSON object of a relayed chunk (``{}`` if it is not one)."""
    try:
        data = json.loads(chunk.rstrip(b"\0"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _field(data: dict[str, Any], name: str) -> Any:
    """``data[name]``; ``BadRequest`` naming it when it is missing."""
    if name not in data:
        raise BadRequest(f"The JSON body lacks {name}.")
    return data[name]


async def _registry_body(request) -> dict[str, Any]:
    raw = await read_body(request, REGISTRY_MAX_BODY_BYTES, "the controller's limit for this endpoint",
                          "upstream's bodies here are a few hundred bytes")
    return check_object(parse_json(raw))


def create_app(controller: Controller):
    """The FastAPI app serving ``controller`` (routes and bodies as upstream's)."""
    app = fastapi.FastAPI(title="LLaVA controller", lifespan=lambda _app: controller.connected())

    @app.exception_handler(BadRequest)
    async def refuse(_request, err: BadRequest):
        logger.info("Refused a request: %s", err)
        return responses.JSONResponse(status_code=err.status_code, content={"detail": str(err)})

    @app.post("/register_worker")
    async def register_worker(request: Request):
        data = await _registry_body(request)
        worker_name = check_url(_field(data, "worker_name"), "worker_name")
        check_heart_beat = check_bool(_field(data, "check_heart_beat"), "check_heart_beat")
        status = data.get("worker_status")
        status = None if status is None or status == {} else parse_worker_status(status)  # upstream: falsy → ask
        if not await controller.register_worker(worker_name, check_heart_beat, status):
            return responses.JSONResponse(status_code=400, content={
                "registered": False,
                "detail": f"Worker {worker_name} did not answer /worker_get_status with a usable status; is it "
                          f"running at that address?",
            })
        return {"registered": True}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers():
        return {"dropped": await controller.refresh_all_workers()}

    @app.post("/list_models")
    async def list_models():
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request):
        model = check_text(_field(await _registry_body(request), "model"), "model")
        return {"address": controller.get_worker_address(model)}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request):
        data = await _registry_body(request)
        worker_name = check_url(_field(data, "worker_name"), "worker_name")
        queue_length = check_integer(_field(data, "queue_length"), "queue_length", 0, MAX_QUEUE_LENGTH)
        return {"exist": controller.receive_heart_beat(worker_name, queue_length)}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        try:
            raw = await read_body(request, controller.max_request_bytes)
            params = check_object(await concurrency.run_in_threadpool(parse_json, raw))
            model = check_text(_field(params, "model"), "model")
        except BadRequest as err:  # answered as a worker answers it: one error chunk
            logger.info("Refused a request: %s", err)
            return responses.Response(content=error_chunk(str(err), ErrorCode.WORKER_ERROR),
                                      status_code=err.status_code)
        status, chunks = await controller.open_stream(model, raw)
        return responses.StreamingResponse(chunks, status_code=status)

    @app.post("/worker_get_status")
    async def worker_get_status():
        return await controller.aggregate_status()

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LLaVA controller: the registry of model workers.")
    parser.add_argument("--host", type=str, default="localhost")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument("--dispatch-method", type=str, default=DispatchMethod.SHORTEST_QUEUE.value,
                        choices=[m.value for m in DispatchMethod])
    parser.add_argument("--heart-beat-expiration", type=float, default=CONTROLLER_HEART_BEAT_EXPIRATION,
                        help="Seconds without a heartbeat after which a worker is dropped (default: %(default)s).")
    parser.add_argument("--worker-timeout", type=float, default=DEFAULT_WORKER_TIMEOUT_S,
                        help="Seconds a worker may stay silent in a relayed stream (for its first chunk, then "
                             "between chunks) before the relay gives up on it (default: %(default)s).")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="Larger /worker_generate_stream bodies are refused with HTTP 413 (default: %(default)s).")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per status poll and relay otherwise
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        controller = Controller(args.dispatch_method, args.heart_beat_expiration, args.worker_timeout,
                                args.max_request_bytes)
    except ValueError as err:
        parser.error(str(err))
    logger.info("args: %s", args)
    controller.start_expiry_thread()
    uvicorn = require("uvicorn", "llava.serve.controller")
    uvicorn.run(create_app(controller), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main(sys.argv[1:])
