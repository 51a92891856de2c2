"""A model worker: serves one checkpoint over upstream LLaVA's worker API, registered with a controller.

``python -m llava.serve.model_worker --controller-address http://localhost:21001 --port 21002
--worker-address http://localhost:21002 --model-path liuhaotian/llava-v1.5-7b [--use-token-compression ...]``

HTTP API (upstream's; POST with a JSON body):

- ``/worker_generate_stream`` ``{"model", "prompt", "temperature", "top_p", "max_new_tokens", "stop",
  "images": [base64, ...]}`` → NUL-delimited JSON chunks (``llava.serve.protocol``): upstream's ``text``
  and ``error_code`` plus this fork's measurements (image tokens, time to first token, tokens/s, ...);
- ``/worker_get_status`` → ``{"model_names", "speed", "queue_length"}``.

At most ``--limit-model-concurrency`` requests generate at once; up to ``--max-queued-requests`` more
wait in order (their chunks carry ``queue_position``), and beyond that a request is refused at once
with HTTP 503 and a ``WORKER_BUSY`` chunk. A body the worker cannot use (not JSON, a field of the wrong
type, text that is not Unicode, no image for an ``<image>``, an image that is not one or whose header
announces more than ``--max-image-pixels``, more image tokens than the context holds, another model's
name) gets HTTP 400 (413 over ``--max-request-bytes``) and one error chunk naming the field, before it is
admitted. Images stay encoded until the request holds a slot, then are decoded one at a time, so the
memory a worker spends on pixels is bounded by ``--limit-model-concurrency``, not by what clients send.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteriaList

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    WORKER_HEART_BEAT_INTERVAL,
    config_value,
)
from llava.eval.vqa_common import parse_args
from llava.mm_utils import get_model_name_from_path, preprocessed_pixels, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.utils import add_compression_args, check_compression_flags, compression_kwargs, images_to, resolve_device

from .admission import AdmissionGate, QueueFull, Ticket
from .deps import require
from .measure import CancelCriteria, Job, PromptLengthProbe, TimedStreamer
from .protocol import DEFAULT_CONTROLLER_ADDRESS, DEFAULT_WORKER_ADDRESS, HEADERS, ErrorCode, encode_chunk, error_chunk
from .validation import DEFAULT_MAX_REQUEST_BYTES, BadRequest, check_url, parse_json, read_body
from .worker_request import EncodedImage, GenerationRequest, parse_request

requests = require("requests", "llava.serve.model_worker")
fastapi = require("fastapi", "llava.serve.model_worker")
responses = require("fastapi.responses", "llava.serve.model_worker")
concurrency = require("starlette.concurrency", "llava.serve.model_worker")
Request = fastapi.Request  # at module level: FastAPI resolves the (string) annotations here

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_QUEUED_REQUESTS = 16
QUEUE_CHUNK_INTERVAL_S = 1.0  # a waiting request gets a queue chunk this often (keeps relays alive)
HEART_BEAT_TIMEOUT_S = 5



# ---- The worker ---------------------------------------------------------------------------------


@dataclass
class WorkerLimits:
    """The worker's request limits (command-line flags)."""

    limit_model_concurrency: int = 5
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    stream_interval: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


class ModelWorker:
    """One loaded checkpoint answering streaming requests, at most ``limit_model_concurrency`` at once.

    Args:
        tokenizer, model, image_processor, context_len: What ``load_pretrained_model`` returns.
        model_name: The name clients ask the controller for.
        limits: Slots, queue length, image size and chunk interval.
    """

    def __init__(self, tokenizer, model, image_processor, context_len: int, model_name: str,
                 limits: WorkerLimits | None = None) -> None:
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.context_len = context_len
        self.model_name = model_name
        self.limits = limits or WorkerLimits()
        get_tower = getattr(model, "get_vision_tower", None)
        self.vision_tower = get_tower() if get_tower is not None else None
        self.gate = AdmissionGate(self.limits.limit_model_concurrency, self.limits.max_queued_requests)
        decoder = model.get_model() if hasattr(model, "get_model") else model
        self.probe = PromptLengthProbe(decoder)
        self.on_queue_change = lambda: None  # ControllerLink.poke once registered

    @property
    def multimodal(self) -> bool:
        return self.vision_tower is not None

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """Image tokens the LLM will receive for an image of ``image_size`` (anyres: it depends on the size)."""
        count = getattr(self.model, "image_token_count", None)
        return count(image_size) if count is not None else self.vision_tower.num_patches

    def get_status(self) -> dict[str, Any]:
        """``/worker_get_status``: upstream's fields."""
        return {"model_names": [self.model_name], "speed": 1, "queue_length": self.gate.queue_length}

    def parse(self, params: Any) -> GenerationRequest:
        """``parse_request`` with this worker's model name and limits, then the images' tokens against the context
        and the canvas each one's preprocessing makes against the pixel limit.

        Everything here reads headers only: no image is decoded before the request is admitted.
        """
        request = parse_request(params, self.model_name, self.multimodal, self.limits.max_image_pixels)
        image_tokens = sum(self.image_token_count(image.size) for image in request.images)
        if image_tokens >= self.context_len:
            raise BadRequest(f"The {len(request.images)} images take {image_tokens} image tokens, which fills the "
                             f"model's context of {self.context_len} tokens before any text; send fewer images.")
        for image in request.images:
            self._check_canvas(image)
        return request

    def _check_canvas(self, image: EncodedImage) -> None:
        """Refuse an image whose preprocessing would make a canvas over the pixel limit (a thin image, padded)."""
        canvas = preprocessed_pixels(image.size, self.image_processor, self.model.config)
        if canvas > self.limits.max_image_pixels:
            width, height = image.size
            mode = config_value(self.model.config, "image_aspect_ratio")
            raise BadRequest(f"images[{image.index}] is {width}×{height}, which this model's preprocessing "
                             f"(image_aspect_ratio {mode!r}) turns into {canvas} pixels, over the worker's limit of "
                             f"{self.limits.max_image_pixels} (--max-image-pixels); crop it to a less extreme aspect "
                             f"ratio or downscale it first.")

    def parse_body(self, raw: bytes) -> GenerationRequest:
        """``parse`` of a request body's bytes (``BadRequest`` for a body that is not usable JSON)."""
        return self.parse(parse_json(raw))

    def admit(self) -> Ticket:
        """A slot or a queue place for a request; ``QueueFull`` when there is neither."""
        ticket = self.gate.enter()
        self.on_queue_change()
        return ticket

    def release_unless_generating(self, ticket: Ticket) -> None:
        """Give back ``ticket``'s slot or queue place, unless a generate thread holds it (that thread releases it)."""
        if not ticket.in_generation:
            self.gate.release(ticket)
            self.on_queue_change()

    def stream(self, request: GenerationRequest, ticket: Ticket) -> Iterator[bytes]:
        """The response chunks for an admitted request: queue chunks while it waits, then the answer."""
        cancel = threading.Event()
        try:
            yield from self._queue_chunks(request, ticket)
            kwargs, job = self._prepare(request, ticket)
            streamer = TimedStreamer(self.tokenizer, job)
            self._start_generation(kwargs, streamer, job, cancel, ticket)
            yield from self._answer_chunks(request, streamer, job, cancel)
        except BadRequest as err:
            yield error_chunk(str(err), ErrorCode.WORKER_ERROR)
        except Exception as err:  # the client gets a message instead of a broken stream
            logger.exception("Request failed")
            yield error_chunk(f"The worker failed on this request: {type(err).__name__}: {err}. "
                              f"See the worker's log.", ErrorCode.WORKER_ERROR)
        finally:
            cancel.set()  # the client is gone or the answer is complete: stop generating
            self.release_unless_generating(ticket)

    def _queue_chunks(self, request: GenerationRequest, ticket: Ticket) -> Iterator[bytes]:
        """While ``ticket`` waits for a slot: a chunk at once, then one every ``QUEUE_CHUNK_INTERVAL_S``."""
        timeout = 0.0
        while not self.gate.wait(ticket, timeout):
            timeout = QUEUE_CHUNK_INTERVAL_S
            yield encode_chunk({"text": request.prompt, "error_code": int(ErrorCode.OK),
                                "queue_position": self.gate.position(ticket),
                                "queue_s": round(time.perf_counter() - ticket.arrived, 4), "finished": False})

    def _prepare(self, request: GenerationRequest, ticket: Ticket) -> tuple[dict[str, Any], Job]:
        """``generate``'s keyword arguments and the request's ``Job``; ``BadRequest`` if it cannot fit."""
        started = time.perf_counter()
        prompt, image_kwargs = request.prompt, {}
        if request.images:
            if config_value(self.model.config, "mm_use_im_start_end"):
                prompt = prompt.replace(DEFAULT_IMAGE_TOKEN,
                                        DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)
            image_kwargs = {"images": images_to(self._pixels(request.images), self.model),
                            "image_sizes": [image.size for image in request.images]}
        input_ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        input_ids = input_ids.unsqueeze(0).to(self.model.device)  # (1, L) with IMAGE_TOKEN_INDEX per image
        text_tokens = int((input_ids != IMAGE_TOKEN_INDEX).sum())
        # The context check needs a count before the vision tower runs; the reported count is measured.
        expected_image_tokens = sum(self.image_token_count(image.size) for image in request.images)
        room = self.context_len - text_tokens - expected_image_tokens
        if room < 1:
            raise BadRequest(
                f"The prompt takes {text_tokens} text + {expected_image_tokens} image tokens, which fills the "
                f"model's context of {self.context_len} tokens; start a new conversation or shorten the prompt."
            )
        sampling = ({"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
                    if request.temperature > 0.001 else {"do_sample": False})
        kwargs = {"inputs": input_ids, "max_new_tokens": min(request.max_new_tokens, room), "use_cache": True,
                  "pad_token_id": self.tokenizer.pad_token_id, **sampling, **image_kwargs}
        return kwargs, Job(started=started, queue_s=started - ticket.arrived, text_tokens=text_tokens)

    def _pixels(self, images: list[EncodedImage]) -> torch.Tensor | list[torch.Tensor]:
        """``process_images`` of ``images``, decoding one at a time: one full-size image in memory, not all."""
        parts = []
        for image in images:
            pixels = image.decode()
            try:
                parts.append(process_images([pixels], self.image_processor, self.model.config))
            except ValueError as err:  # an image the model cannot take: the client's fix
                raise BadRequest(f"images[{image.index}]: {err}") from err
        if all(part.shape[1:] == parts[0].shape[1:] for part in parts):
            return torch.cat(parts)
        return [part[0] for part in parts]  # anyres images of different crop counts, as process_images gives them

    def _start_generation(self, kwargs: dict[str, Any], streamer: TimedStreamer, job: Job,
                          cancel: threading.Event, ticket: Ticket) -> None:
        """Run ``generate`` in a thread that owns the request's slot until it ends."""

        def run() -> None:
            self.probe.attach(job)
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]))
            except Exception as err:
                logger.exception("generate failed")
                job.error = err
                streamer.end()
            finally:
                self.probe.detach()
                self.gate.release(ticket)
                self.on_queue_change()

        ticket.in_generation = True
        threading.Thread(target=run, name="model-worker-generate", daemon=True).start()

    def _answer_chunks(self, request: GenerationRequest, streamer: TimedStreamer, job: Job,
                       cancel: threading.Event) -> Iterator[bytes]:
        """A chunk per ``stream_interval`` pieces of text, then the last one (``finished``) or an error."""
        answer, shown, sent, pieces = "", "", "", 0
        for piece in streamer:
            if not piece:  # a token that completes no printable text yet
                continue
            answer += piece
            pieces += 1
            shown, stopped = apply_stop(answer, request.stop)
            if stopped:
                cancel.set()
                break
            if shown != sent and pieces % self.limits.stream_interval == 0:
                sent = shown
                yield encode_chunk({"text": request.prompt + shown, "error_code": int(ErrorCode.OK),
                                    **job.stats(finished=False)})
        if job.error is not None:
            yield encode_chunk({"text": f"Generation failed on the worker: {type(job.error).__name__}: {job.error}. "
                                        f"See the worker's log.", "error_code": int(ErrorCode.WORKER_ERROR),
                                **job.stats(finished=False)})
            return
        yield encode_chunk({"text": request.prompt + shown, "error_code": int(ErrorCode.OK),
                            **job.stats(finished=True)})


def apply_stop(answer: str, stop: str | None) -> tuple[str, bool]:
    """``answer`` cut before the stop string, and whether it occurred.

    A stop string of whitespace only (upstream's ``test_message`` sends the vicuna template's ``" "``,
    which separates words) is dropped from the end of the answer but does not stop it, as upstream does.
    """
    if not stop:
        return answer, False
    if not stop.strip():
        return (answer[: -len(stop)] if answer.endswith(stop) else answer), False
    index = answer.find(stop)
    return (answer, False) if index < 0 else (answer[:index], True)


# ---- The controller link: registration and heartbeats ---------------------------------------------


class ControllerLink:
    """Registers the worker with its controller once the server listens, then sends heartbeats.

    A heartbeat goes every ``interval`` seconds and whenever the worker's queue changes (``poke``);
    a controller that no longer knows the worker (it expired, or restarted) gets a new registration.

    Args:
        controller_address: The controller's URL (``--controller-address``).
        worker_address: The URL the controller and clients reach this worker at (``--worker-address``).
        worker: The worker whose status is reported.
        interval: Seconds between heartbeats (``--heart-beat-interval``; upstream's 15).
    """

    def __init__(self, controller_address: str, worker_address: str, worker: ModelWorker,
                 interval: float = WORKER_HEART_BEAT_INTERVAL) -> None:
        self.controller_address = controller_address.rstrip("/")
        self.worker_address = worker_address
        self.worker = worker
        self.interval = interval
        self._wake = threading.Event()
        worker.on_queue_change = self.poke

    def register(self) -> bool:
        """Announce the worker; False (and an error in the log) when the controller does not take it."""
        data = {"worker_name": self.worker_address, "check_heart_beat": True, "worker_status": self.worker.get_status()}
        try:
            response = requests.post(self.controller_address + "/register_worker", json=data, headers=HEADERS,
                                     timeout=HEART_BEAT_TIMEOUT_S)
        except requests.exceptions.RequestException as err:
            logger.error("Cannot register with the controller at %s (%s); is it running there? Retrying every %.1f s.",
                         self.controller_address, err, self.interval)
            return False
        if response.status_code != 200:
            logger.error("The controller at %s refused the registration: HTTP %s %s",
                         self.controller_address, response.status_code, response.text[:500])
            return False
        logger.info("Registered %s (%s) with the controller at %s",
                    self.worker_address, self.worker.model_name, self.controller_address)
        return True

    def send_heart_beat(self) -> None:
        """One heartbeat; registers again when the controller answers that it does not know the worker."""
        data = {"worker_name": self.worker_address, "queue_length": self.worker.gate.queue_length}
        try:
            response = requests.post(self.controller_address + "/receive_heart_beat", json=data, headers=HEADERS,
                                     timeout=HEART_BEAT_TIMEOUT_S)
            exist = response.json()["exist"]
        except (requests.exceptions.RequestException, ValueError, KeyError, TypeError) as err:
            logger.error("Heartbeat to %s failed: %s", self.controller_address, err)
            return
        if not exist:
            self.register()

    def poke(self) -> None:
        """Send a heartbeat now (the queue changed)."""
        self._wake.set()

    def start(self, server_started) -> threading.Thread:
        """Register once ``server_started()`` is true, then keep the heartbeats going (a daemon thread)."""

        def loop() -> None:
            while not server_started():
                time.sleep(0.05)
            registered = self.register()
            while True:
                self._wake.wait(self.interval)
                self._wake.clear()
                if registered:
                    self.send_heart_beat()
                else:
                    registered = self.register()

        thread = threading.Thread(target=loop, name="model-worker-heartbeat", daemon=True)
        thread.start()
        return thread


# ---- HTTP -----------------------------------------------------------------------------------------


def _refusal(message: str, code: ErrorCode, status_code: int):
    """A response of one error chunk, for requests refused before streaming."""
    return responses.Response(content=error_chunk(message, code), status_code=status_code)


def create_app(worker: ModelWorker):
    """The FastAPI app serving ``worker`` (upstream's routes and bodies)."""
    app = fastapi.FastAPI(title="LLaVA model worker")

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        try:
            raw = await read_body(request, worker.limits.max_request_bytes)
            parsed = await concurrency.run_in_threadpool(worker.parse_body, raw)
        except BadRequest as err:
            logger.info("Refused a request: %s", err)
            return _refusal(str(err), ErrorCode.WORKER_ERROR, err.status_code)
        try:
            ticket = worker.admit()
        except QueueFull as err:
            logger.warning("%s", err)
            return _refusal(str(err), ErrorCode.WORKER_BUSY, 503)
        chunks = worker.stream(parsed, ticket)
        # A response that never starts (client gone at once) never runs the generator's cleanup.
        weakref.finalize(chunks, worker.release_unless_generating, ticket)
        return responses.StreamingResponse(chunks)

    @app.post("/worker_get_status")
    async def worker_get_status():
        return worker.get_status()

    return app


# ---- Command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Upstream's flags, plus the queue, image-size and heartbeat limits and the compression flags."""
    parser = argparse.ArgumentParser(description="LLaVA model worker: serves one checkpoint to a controller.")
    parser.add_argument("--host", type=str, default="localhost")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", type=str, default=DEFAULT_WORKER_ADDRESS,
                        help="The URL the controller and clients reach this worker at.")
    parser.add_argument("--controller-address", type=str, default=DEFAULT_CONTROLLER_ADDRESS)
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--model-name", type=str, default=None, help="Default: the checkpoint folder's name.")
    parser.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--multi-modal", action="store_true",
                        help="Not needed: a checkpoint with a vision tower is served with images.")
    parser.add_argument("--limit-model-concurrency", type=int, default=5, help="Requests generating at once.")
    parser.add_argument("--stream-interval", type=int, default=1, help="Send a chunk every N pieces of text.")
    parser.add_argument("--no-register", action="store_true", help="Do not register with the controller.")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--use-flash-attn", action="store_true")
    parser.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                        help="Requests that may wait for a slot; more are refused with HTTP 503 (default: %(default)s).")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="Larger images are refused from their header, before decoding (width × height; "
                             "default: %(default)s). It replaces Pillow's decompression-bomb limit in the worker.")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="Larger request bodies (prompt plus base64 images) are refused with HTTP 413 before "
                             "they are read (default: %(default)s).")
    parser.add_argument("--heart-beat-interval", type=float, default=WORKER_HEART_BEAT_INTERVAL,
                        help="Seconds between heartbeats to the controller (default: %(default)s); keep it below "
                             "the controller's --heart-beat-expiration.")
    add_compression_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values before the model loads (``ValueError`` naming the flag)."""
    for flag, value, low in (("--limit-model-concurrency", args.limit_model_concurrency, 1),
                             ("--stream-interval", args.stream_interval, 1),
                             ("--max-queued-requests", args.max_queued_requests, 0),
                             ("--max-image-pixels", args.max_image_pixels, 1),
                             ("--max-request-bytes", args.max_request_bytes, 1)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}.")
    if not args.heart_beat_interval > 0:
        raise ValueError(f"--heart-beat-interval must be > 0 seconds, got {args.heart_beat_interval}.")
    if not args.no_register:  # the controller refuses a worker_name that is not one (after the model loaded)
        check_url(args.worker_address, "--worker-address")
        check_url(args.controller_address, "--controller-address")
    check_compression_flags(args)


def load_worker(args: argparse.Namespace) -> ModelWorker:
    """Load ``--model-path`` (with the compression flags) into a ``ModelWorker``."""
    model_name = args.model_name or get_model_name_from_path(args.model_path)
    logger.info("Loading %s from %s ...", model_name, args.model_path)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        args.model_path, args.model_base, model_name, args.load_8bit, args.load_4bit,
        device=resolve_device(args.device), use_flash_attn=args.use_flash_attn, **compression_kwargs(args),
    )
    limits = WorkerLimits(args.limit_model_concurrency, args.max_queued_requests, args.max_image_pixels,
                          args.stream_interval, args.max_request_bytes)
    worker = ModelWorker(tokenizer, model, image_processor, context_len, model_name, limits)
    tower = worker.vision_tower
    if tower is None:
        logger.info("Serving %s: language only", model_name)
    elif config_value(worker.model.config, "image_aspect_ratio") == "anyres":
        logger.info("Serving %s: anyres, %d image tokens per tile; a 1000×1000 image takes %d", model_name,
                    tower.num_patches, worker.image_token_count((1000, 1000)))
    else:
        logger.info("Serving %s: %d image tokens per image", model_name, tower.num_patches)
    return worker


def main(argv: Sequence[str] | None = None) -> None:
    """Load the model, start the HTTP server and register with the controller."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(build_parser(), argv, check_args)
    logger.info("args: %s", args)
    if args.multi_modal:
        logger.info("--multi-modal is not needed: images are served whenever the checkpoint has a vision tower.")
    # The worker checks every image's header against --max-image-pixels before decoding it; Pillow's own
    # limit would only add a warning (or, at twice its 89 MP, an error) for images the flag lets through.
    Image.MAX_IMAGE_PIXELS = None
    worker = load_worker(args)
    uvicorn = require("uvicorn", "llava.serve.model_worker")
    server = uvicorn.Server(uvicorn.Config(create_app(worker), host=args.host, port=args.port, log_level="info"))
    if not args.no_register:
        ControllerLink(args.controller_address, args.worker_address, worker, args.heart_beat_interval).start(
            lambda: server.started)
    server.run()


if __name__ == "__main__":
    main(sys.argv[1:])
