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

A worker registered with ``check_heart_beat`` that has sent no heartbeat for ``--heart-beat-expiration``
seconds (upstream's 30 by default) is no longer listed or dispatched to, and is removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from llava.constants import CONTROLLER_HEART_BEAT_EXPIRATION

from .deps import require
from .protocol import HEADERS, ErrorCode, error_chunk, relay_chunks

requests = require("requests", "llava.serve.controller")
fastapi = require("fastapi", "llava.serve.controller")
responses = require("fastapi.responses", "llava.serve.controller")
Request = fastapi.Request  # at module level: FastAPI resolves the (string) annotations here

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5  # a worker that does not report its status within this is stale (upstream's)
# Forwarding a stream: connect within 5 s, then a chunk at least every 60 s (workers send one every
# few seconds while a request waits in their queue).
FORWARD_TIMEOUT_S = (5, 60)


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
    """

    def __init__(self, dispatch_method: str = DispatchMethod.SHORTEST_QUEUE.value,
                 heart_beat_expiration: float = CONTROLLER_HEART_BEAT_EXPIRATION) -> None:
        try:
            self.dispatch_method = DispatchMethod(dispatch_method)
        except ValueError:
            choices = ", ".join(m.value for m in DispatchMethod)
            raise ValueError(f"Unknown dispatch method {dispatch_method!r}; use one of: {choices}.") from None
        if not heart_beat_expiration > 0:
            raise ValueError(f"heart_beat_expiration must be > 0 seconds, got {heart_beat_expiration}.")
        self.heart_beat_expiration = heart_beat_expiration
        self.workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ---- Registry --------------------------------------------------------------------------------

    def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: dict | None) -> bool:
        """Add or update a worker; without ``worker_status`` the worker is asked for it. False if it cannot be."""
        if not worker_status:
            worker_status = self.get_worker_status(worker_name)
            if worker_status is None:
                return False
        info = WorkerInfo(
            model_names=list(worker_status["model_names"]), speed=float(worker_status.get("speed", 1)),
            queue_length=int(worker_status.get("queue_length", 0)), check_heart_beat=bool(check_heart_beat),
            last_heart_beat=time.time(),
        )
        with self._lock:
            known = worker_name in self.workers
            self.workers[worker_name] = info
        logger.info("%s worker %s: %s", "Re-registered" if known else "Registered", worker_name, worker_status)
        return True

    def get_worker_status(self, worker_name: str) -> dict | None:
        """The worker's ``/worker_get_status`` answer, or None if it does not give one."""
        try:
            response = requests.post(worker_name + "/worker_get_status", headers=HEADERS, timeout=STATUS_TIMEOUT_S)
            response.raise_for_status()
            status = response.json()
        except (requests.exceptions.RequestException, ValueError) as err:
            logger.warning("No status from worker %s: %s", worker_name, err)
            return None
        if not isinstance(status, dict) or "model_names" not in status:
            logger.warning("Worker %s answered /worker_get_status without model_names: %r", worker_name, status)
            return None
        return status

    def remove_worker(self, worker_name: str) -> None:
        with self._lock:
            self.workers.pop(worker_name, None)

    def refresh_all_workers(self) -> list[str]:
        """Ask every worker for its status again; returns the workers dropped because they did not answer."""
        with self._lock:
            known = dict(self.workers)
        dropped = []
        for name, info in known.items():
            status = self.get_worker_status(name)
            if status is None or not self.register_worker(name, info.check_heart_beat, status):
                self.remove_worker(name)
                dropped.append(name)
                logger.info("Dropped stale worker %s", name)
        return dropped

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        """Record a heartbeat; False for an unknown (or expired) worker, which should register again."""
        self.remove_expired_workers()
        with self._lock:
            info = self.workers.get(worker_name)
            if info is None:
                logger.info("Heartbeat from unknown worker %s", worker_name)
                return False
            info.queue_length = int(queue_length)
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

    def get_worker_address(self, model_name: str) -> str:
        """The address of a worker serving ``model_name`` by the dispatch method; ``""`` if there is none."""
        self.remove_expired_workers()
        with self._lock:
            candidates = [(name, info) for name, info in self.workers.items() if model_name in info.model_names]
            candidates = [(name, info) for name, info in candidates if info.speed > 0]
            if not candidates:
                return ""
            if self.dispatch_method == DispatchMethod.LOTTERY:
                names = [name for name, _ in candidates]
                return random.choices(names, weights=[info.speed for _, info in candidates])[0]
            name, info = min(candidates, key=lambda item: item[1].queue_length / item[1].speed)
            info.queue_length += 1  # until the next heartbeat reports the real length
            return name

    # ---- The controller as a worker (hierarchical mode) -------------------------------------------

    def open_stream(self, params: dict[str, Any]) -> tuple[int, Iterator[bytes]]:
        """Forward a ``/worker_generate_stream`` request to a worker of ``params["model"]``.

        Returns the worker's HTTP status (so a busy worker's 503 reaches the client) and its chunks; a
        worker that is missing, unreachable or lost mid-answer gives an error chunk instead.
        """
        model = params.get("model")
        address = self.get_worker_address(model) if isinstance(model, str) else ""
        if not address:
            return 200, iter([error_chunk(
                f"No worker serves the model {model!r}; the controller lists: {self.list_models()}. "
                f"Start a worker for it, or pick a listed model.", ErrorCode.NO_WORKER)])
        try:
            response = requests.post(address + "/worker_generate_stream", headers=HEADERS, json=params, stream=True,
                                     timeout=FORWARD_TIMEOUT_S)
        except requests.exceptions.RequestException as err:
            logger.warning("Cannot reach worker %s: %s", address, err)
            return 200, iter([error_chunk(
                f"The worker {address} for {model!r} cannot be reached ({type(err).__name__}); retry: the controller "
                f"drops it once its heartbeat expires ({self.heart_beat_expiration:g} s).", ErrorCode.WORKER_UNREACHABLE)])
        return response.status_code, self._relay(response, address, model)

    def _relay(self, response, address: str, model: str) -> Iterator[bytes]:
        """The worker's chunks as they come, then an error chunk if the worker stops before its answer ends."""
        lost = None
        last: dict[str, Any] = {}
        try:
            with response:
                for chunk in relay_chunks(response.iter_lines(decode_unicode=False, delimiter=b"\0")):
                    last = _peek(chunk)
                    yield chunk
        except requests.exceptions.RequestException as err:
            lost = f"{type(err).__name__}: the connection broke"
        # Our workers mark the last chunk of an answer ``finished``; upstream's mark nothing.
        if lost is None and "finished" in last and not last["finished"] and last.get("error_code") == 0:
            lost = "the stream ended before the answer was finished"
        if lost is not None:
            logger.warning("Lost worker %s mid-answer: %s", address, lost)
            yield error_chunk(
                f"The worker {address} serving {model!r} was lost mid-answer ({lost}); the answer above is incomplete. "
                f"Retry: the controller drops the worker once its heartbeat expires ({self.heart_beat_expiration:g} s) "
                f"and sends requests to the model's other workers.", ErrorCode.WORKER_UNREACHABLE)

    def generate_stream(self, params: dict[str, Any]) -> Iterator[bytes]:
        """The chunks of ``open_stream`` (upstream's ``worker_api_generate_stream``)."""
        yield from self.open_stream(params)[1]

    def aggregate_status(self) -> dict[str, Any]:
        """``/worker_get_status`` for the controller as a whole: every worker's models, speeds and queues."""
        with self._lock:
            names = list(self.workers)
        model_names: set[str] = set()
        speed, queue_length = 0.0, 0
        for name in names:
            status = self.get_worker_status(name)
            if status is not None:
                model_names.update(status["model_names"])
                speed += status.get("speed", 1)
                queue_length += status.get("queue_length", 0)
        return {"model_names": sorted(model_names), "speed": speed, "queue_length": queue_length}


# ---- HTTP ------------------------------------------------------------------------------------------


def _peek(chunk: bytes) -> dict[str, Any]:
    """The JSON object of a relayed chunk (``{}`` if it is not one)."""
    try:
        data = json.loads(chunk.rstrip(b"\0"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _fields(data: Any, *names: str) -> list[Any]:
    """``data[name]`` for each name; a 400 error naming what is missing."""
    missing = [name for name in names if not isinstance(data, dict) or name not in data]
    if missing:
        raise fastapi.HTTPException(status_code=400, detail=f"The JSON body lacks {', '.join(missing)}.")
    return [data[name] for name in names]


async def _json(request) -> Any:
    try:
        return await request.json()
    except ValueError as err:
        raise fastapi.HTTPException(status_code=400, detail=f"The body is not JSON: {err}") from err


def create_app(controller: Controller):
    """The FastAPI app serving ``controller`` (routes and bodies as upstream's)."""
    app = fastapi.FastAPI(title="LLaVA controller")

    @app.post("/register_worker")
    async def register_worker(request: Request):
        data = await _json(request)
        worker_name, check_heart_beat = _fields(data, "worker_name", "check_heart_beat")
        status = data.get("worker_status")
        ok = await fastapi.concurrency.run_in_threadpool(controller.register_worker, worker_name, check_heart_beat,
                                                         status)
        if not ok:
            return responses.JSONResponse(status_code=400, content={
                "registered": False,
                "detail": f"Worker {worker_name} did not answer /worker_get_status; is it running at that address?",
            })
        return {"registered": True}

    @app.post("/refresh_all_workers")
    def refresh_all_workers():
        return {"dropped": controller.refresh_all_workers()}

    @app.post("/list_models")
    async def list_models():
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request):
        (model,) = _fields(await _json(request), "model")
        return {"address": controller.get_worker_address(model)}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request):
        worker_name, queue_length = _fields(await _json(request), "worker_name", "queue_length")
        return {"exist": controller.receive_heart_beat(worker_name, queue_length)}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        params = await _json(request)
        status, chunks = await fastapi.concurrency.run_in_threadpool(
            controller.open_stream, params if isinstance(params, dict) else {})
        return responses.StreamingResponse(chunks, status_code=status)

    @app.post("/worker_get_status")
    def worker_get_status():
        return controller.aggregate_status()

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LLaVA controller: the registry of model workers.")
    parser.add_argument("--host", type=str, default="localhost")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument("--dispatch-method", type=str, default=DispatchMethod.SHORTEST_QUEUE.value,
                        choices=[m.value for m in DispatchMethod])
    parser.add_argument("--heart-beat-expiration", type=float, default=CONTROLLER_HEART_BEAT_EXPIRATION,
                        help="Seconds without a heartbeat after which a worker is dropped (default: %(default)s).")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        controller = Controller(args.dispatch_method, args.heart_beat_expiration)
    except ValueError as err:
        parser.error(str(err))
    logger.info("args: %s", args)
    controller.start_expiry_thread()
    uvicorn = require("uvicorn", "llava.serve.controller")
    uvicorn.run(create_app(controller), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main(sys.argv[1:])
