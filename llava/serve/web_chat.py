"""The web demo's chat logic without Gradio: templates, prompts, image limits and streamed answers.

``llava.serve.gradio_web_server`` lays out the page and calls this module; everything here is plain
Python so that it can be tested without a browser. A chat holds the user's turns once and one answer
per turn for each selected model; each model's prompt is rendered with that model's own conversation
template, so the same question reaches a LLaVA-1.5 worker and a ToConv worker in the form each expects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import Conversation, SeparatorStyle, conv_templates

from .deps import require
from .protocol import HEADERS, AnswerStats, ErrorCode, iter_chunks

requests = require("requests", "llava.serve.web_chat")

logger = logging.getLogger(__name__)

IMAGE_PROCESS_MODES = ("Crop", "Resize", "Pad", "Default")
AUTO_TEMPLATE = "auto (from the model name)"
MAX_MODELS = 3  # side by side: at most this many answers to one question
MAX_TEXT_CHARS = 1536  # upstream's cut-off for a question
MAX_TEXT_CHARS_WITH_IMAGE = 1200  # upstream's cut-off for a question about an image
MAX_NEW_TOKENS = 1024  # upstream's worker caps max_new_tokens here
# Images: refused above this many pixels (decoding and re-encoding them would stall the page), and
# downscaled to this longest side otherwise (what Conversation.process_image sends at most).
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_SIDE = 1344
CONTROLLER_TIMEOUT_S = 10
# A worker stream: connect within 5 s, then a chunk at least every 60 s (queued requests get one every
# few seconds), so a worker that hangs ends the answer with an error instead of a spinning page.
STREAM_TIMEOUT_S = (5, 60)
UPDATE_INTERVAL_S = 0.2  # the page shows the answers at most this often (5 updates a second)
MODERATION_URL = "https://api.openai.com/v1/moderations"
MODERATION_MESSAGE = "Your input violates the content moderation guidelines; please ask something else."


class InputError(ValueError):
    """A request the page refuses before anything is sent; the message is shown to the user as it is."""


class ControllerError(RuntimeError):
    """The controller could not be reached or gave an answer that is not its API's."""


# ---- Templates and prompts -------------------------------------------------------------------------


def template_for_model(model_name: str) -> str:
    """The conversation template upstream's web page picks for a model name.

    LLaVA names choose among the LLaVA templates (llama-2, mistral/mixtral, v1.6-34b, v1, mpt, else
    v0); "mmtag" or a projector-only "plain" checkpoint (not "finetune") get the ``*_mmtag`` variant.
    Names without "llava" get the text-only chat templates. Upstream names ``mistral_orca`` and
    ``mpt_text``, which its own ``conv_templates`` lacks; those fall back to ``mistral_instruct`` and ``mpt``.
    """
    name = model_name.lower()
    pretrain_only = "mmtag" in name or ("plain" in name and "finetune" not in name)
    if "llava" not in name:
        if "mpt" in name:
            return "mpt"
        return "llama_2" if "llama-2" in name else "vicuna_v1"
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name or "mixtral" in name:
        return "chatml_direct" if "hermes" in name else "mistral_instruct"
    if "llava-v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "v1_mmtag" if pretrain_only else "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "v0_mmtag" if pretrain_only else "llava_v0"


def resolve_template(choice: str | None, model_name: str) -> str:
    """``choice`` from the page's template menu, or the model's own template for ``AUTO_TEMPLATE``/None."""
    if not choice or choice == AUTO_TEMPLATE:
        return template_for_model(model_name)
    if choice not in conv_templates:
        raise InputError(f"Unknown conversation template {choice!r}; pick one of: {', '.join(sorted(conv_templates))}.")
    return choice


def template_needs_image(template_name: str) -> bool:
    """True for templates whose prompt is built around an image: ``plain`` (image → caption) and ``*_mmtag``."""
    template = conv_templates[template_name]
    return template.sep_style == SeparatorStyle.PLAIN or "mmtag" in template.version


@dataclass
class UserTurn:
    """One question: its text and, on the first turn of a chat, the image with its process mode."""

    text: str
    image: Image.Image | None = None
    process_mode: str = "Default"

    def message(self) -> str | tuple[str, Image.Image, str]:
        """The message as ``Conversation`` takes it: an image turn is ``(text with <image>, image, mode)``."""
        if self.image is None:
            return self.text
        return (f"{self.text}\n{DEFAULT_IMAGE_TOKEN}", self.image, self.process_mode)


def build_conversation(template_name: str, turns: Sequence[UserTurn], answers: Sequence[str | None]) -> Conversation:
    """The template filled with the chat so far; the last turn's answer is left open for the model."""
    if len(answers) != len(turns):
        raise ValueError(f"A chat needs one answer slot per turn, got {len(turns)} turns and {len(answers)} answers.")
    conv = conv_templates[template_name].copy()
    for i, (turn, answer) in enumerate(zip(turns, answers)):
        conv.append_message(conv.roles[0], turn.message())
        conv.append_message(conv.roles[1], None if i == len(turns) - 1 else (answer or ""))
    return conv


@dataclass
class GenerationParams:
    """The page's sampling parameters, clamped as upstream clamps them."""

    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512


def request_payload(model_name: str, conv: Conversation, params: GenerationParams) -> dict[str, Any]:
    """The ``/worker_generate_stream`` body for ``conv`` (upstream's fields; images as base64 PNG)."""
    stop = conv.sep if conv.sep_style in (SeparatorStyle.SINGLE, SeparatorStyle.MPT) else conv.sep2
    return {
        "model": model_name,
        "prompt": conv.get_prompt(),
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "max_new_tokens": max(1, min(int(params.max_new_tokens), MAX_NEW_TOKENS)),
        "stop": stop,
        "images": conv.get_images(),
    }


# ---- Input checks ----------------------------------------------------------------------------------


def prepare_image(image: Image.Image | None) -> tuple[Image.Image | None, str | None]:
    """The image as sent (RGB, longest side ≤ ``MAX_IMAGE_SIDE``) and a note when it was downscaled.

    Raises ``InputError`` for images over ``MAX_IMAGE_PIXELS``: they are refused, not shrunk.
    """
    if image is None:
        return None, None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"The image is {width}×{height} ({width * height / 1e6:.1f} megapixels); the page takes at most "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels. Downscale it (the model sees 336×336 anyway) and upload it again."
        )
    image = image.convert("RGB")
    if max(width, height) <= MAX_IMAGE_SIDE:
        return image, None
    scale = MAX_IMAGE_SIDE / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    note = f"The image was downscaled from {width}×{height} to {size[0]}×{size[1]} before sending."
    return image.resize(size, Image.Resampling.LANCZOS), note


def clean_question(text: str | None, has_image: bool) -> str:
    """The question stripped, without stray ``<image>`` tokens, cut to upstream's length limits."""
    text = (text or "").replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return text[: MAX_TEXT_CHARS_WITH_IMAGE if has_image else MAX_TEXT_CHARS]


def image_fingerprint(image: Image.Image | None) -> str | None:
    """A hash of the pixels: the same picture left in the upload box continues the chat, a new one starts one."""
    if image is None:
        return None
    return hashlib.md5(image.tobytes() + repr(image.size).encode()).hexdigest()


def violates_moderation(text: str) -> bool:
    """Ask OpenAI's moderation endpoint (needs ``OPENAI_API_KEY``), as upstream's ``--moderate`` does."""
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise InputError("--moderate needs OPENAI_API_KEY in the web server's environment; set it or drop --moderate.")
    try:
        response = requests.post(MODERATION_URL, json={"input": text.replace("\n", " ")}, timeout=5,
                                 headers={"Authorization": f"Bearer {key}"})
        response.raise_for_status()
        return bool(response.json()["results"][0]["flagged"])
    except (requests.exceptions.RequestException, KeyError, IndexError, ValueError) as err:
        raise InputError(f"The moderation check at {MODERATION_URL} failed ({err}); try again.") from err


# ---- Errors the page shows -------------------------------------------------------------------------


def chunk_error_message(model_name: str, chunk: dict[str, Any]) -> str:
    """What the page says for a stream chunk with a non-zero ``error_code``."""
    code = chunk.get("error_code")
    text = str(chunk.get("text", "")).strip() or "(no message)"
    if code == ErrorCode.WORKER_BUSY:
        return f"{model_name} is busy: {text} Ask again in a moment, or start another worker for this model."
    if code == ErrorCode.NO_WORKER:
        return f"No worker serves {model_name}: {text} Start one, then press Refresh models."
    if code == ErrorCode.WORKER_UNREACHABLE:
        return f"Lost the worker of {model_name}: {text} Press Regenerate to try again."
    if code == ErrorCode.WORKER_ERROR:
        return f"The worker of {model_name} failed: {text}"
    return f"The worker of {model_name} answered error_code {code}: {text}"


def http_error_message(model_name: str, status: int, body: bytes) -> str:
    """What the page says when a worker answers with an HTTP error instead of a stream (503: busy)."""
    for raw in body.split(b"\0"):
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("error_code"):
            return chunk_error_message(model_name, data)
        if isinstance(data, dict) and "detail" in data:
            return f"The worker of {model_name} refused the request (HTTP {status}): {data['detail']}"
    if status == 503:
        return chunk_error_message(model_name, {"error_code": ErrorCode.WORKER_BUSY, "text": "HTTP 503."})
    snippet = body[:200].decode("utf-8", "replace").strip()
    return f"The worker of {model_name} refused the request (HTTP {status}): {snippet or '(empty body)'}"


# ---- The controller --------------------------------------------------------------------------------


class ControllerClient:
    """The controller's ``/refresh_all_workers``, ``/list_models`` and ``/get_worker_address``."""

    def __init__(self, url: str, timeout: float = CONTROLLER_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _post(self, route: str, body: dict | None = None) -> dict[str, Any]:
        try:
            response = requests.post(self.url + route, json=body, headers=HEADERS, timeout=self.timeout)
            response.raise_for_status()
            return response.json()
        except (requests.exceptions.RequestException, ValueError) as err:
            raise ControllerError(
                f"The controller at {self.url} did not answer {route} ({type(err).__name__}: {err}). Start it with "
                f"`python -m llava.serve.controller --port PORT` or pass its address as --controller-url."
            ) from err

    def list_models(self, refresh: bool = True) -> list[str]:
        """The models of the registered workers (after asking every worker for its status, if ``refresh``)."""
        if refresh:
            self._post("/refresh_all_workers")
        models = self._post("/list_models").get("models", [])
        logger.info("Models: %s", models)
        return sorted(models)

    def worker_address(self, model_name: str) -> str:
        """The address of a worker serving ``model_name``; ``""`` when none does."""
        return str(self._post("/get_worker_address", {"model": model_name}).get("address", ""))


# ---- Streamed answers ------------------------------------------------------------------------------


@dataclass
class Answer:
    """One model's answer as it streams: its text so far, measurements, and how it ended."""

    model: str
    text: str = ""
    stats: AnswerStats = field(default_factory=AnswerStats)
    queue_position: int | None = None
    error: str | None = None
    done: bool = False

    def status_line(self) -> str:
        """The line under the panel: the measurements, the queue position, or the error."""
        if self.error:
            return f"**{self.model}** · error"
        if self.queue_position is not None and not self.text:
            return f"**{self.model}** · waiting in the worker's queue (position {self.queue_position})"
        return f"**{self.model}** · {self.stats.describe()}"


def read_stream(answer: Answer, chunks: Iterator[dict[str, Any]], prompt: str) -> Iterator[Answer]:
    """Fold the chunks of a worker stream into ``answer``, yielding it after each one.

    A ToConv worker marks its last chunk ``finished``; a stream of such a worker that ends without it
    was cut off (the worker died), and ends with an error. Upstream workers send no ``finished``.
    """
    ours = False
    for chunk in chunks:
        if chunk.get("error_code", 0) != 0:
            answer.error, answer.done = chunk_error_message(answer.model, chunk), True
            yield answer
            return
        text = str(chunk.get("text", ""))
        answer.text = (text[len(prompt):] if text.startswith(prompt) else text).strip()
        answer.stats = AnswerStats.from_chunk(chunk)
        answer.queue_position = chunk.get("queue_position")
        ours = ours or "finished" in chunk
        if chunk.get("finished"):
            answer.done = True
        yield answer
        if answer.done:
            return
    if ours:
        answer.error = (f"The worker of {answer.model} stopped before finishing the answer (it may have crashed or "
                        f"been stopped). Press Regenerate to try again; the controller drops a dead worker "
                        f"once its heartbeat expires.")
    answer.done = True
    yield answer


def stream_answer(client: ControllerClient, model_name: str, conv: Conversation, params: GenerationParams,
                  cancel: threading.Event | None = None) -> Iterator[Answer]:
    """Ask the controller for a worker of ``model_name`` and stream its answer to ``conv``.

    Every failure (no worker, HTTP error, error chunk, lost connection) ends in an ``Answer`` with
    ``error`` set and ``done`` true; nothing is raised. ``cancel`` stops reading and closes the stream.
    """
    answer = Answer(model_name)
    try:
        address = client.worker_address(model_name)
    except ControllerError as err:
        answer.error, answer.done = str(err), True
        yield answer
        return
    if not address:
        answer.error = f"No worker serves {model_name} any more. Start one, then press Refresh models."
        answer.done = True
        yield answer
        return
    payload = request_payload(model_name, conv, params)
    try:
        with requests.post(address + "/worker_generate_stream", headers=HEADERS, json=payload, stream=True,
                           timeout=STREAM_TIMEOUT_S) as response:
            if response.status_code != 200:
                answer.error, answer.done = http_error_message(model_name, response.status_code, response.content), True
                yield answer
                return
            for update in read_stream(answer, iter_chunks(response), payload["prompt"]):
                yield update
                if cancel is not None and cancel.is_set():
                    return
    except (requests.exceptions.RequestException, ValueError) as err:
        logger.warning("Lost worker %s of %s: %s", address, model_name, err)
        answer.error = (f"Lost the worker of {model_name} at {address} mid-answer ({type(err).__name__}). "
                        f"Press Regenerate to try again; the controller drops a dead worker once its heartbeat expires.")
        answer.done = True
        yield answer


StreamFn = Callable[[str, Conversation, threading.Event], Iterator[Answer]]


def stream_side_by_side(jobs: Sequence[tuple[str, Conversation]], stream: StreamFn,
                        update_interval_s: float = UPDATE_INTERVAL_S) -> Iterator[list[Answer]]:
    """Stream several answers at once, one thread each; yields every model's latest ``Answer`` as they change.

    Args:
        jobs: ``(model name, conversation)`` for each panel, in panel order.
        stream: ``stream(model, conv, cancel)`` yielding that model's ``Answer`` as it grows
            (``stream_answer`` bound to a client and parameters).
        update_interval_s: Changes within this many seconds of the first are yielded together: a
            browser re-rendering three growing answers for every token falls behind (and so does
            anything driving it).
    """
    updates: queue.Queue[tuple[int, Answer]] = queue.Queue()
    cancel = threading.Event()

    def run(index: int, model: str, conv: Conversation) -> None:
        last = Answer(model)
        try:
            for last in stream(model, conv, cancel):
                updates.put((index, replace(last)))
        except Exception as err:  # a bug must end this panel, not leave the page waiting
            logger.exception("Answer of %s failed", model)
            last = replace(last, error=f"The page failed reading {model}'s answer: {type(err).__name__}: {err}")
        finally:
            updates.put((index, replace(last, done=True)))

    latest = [Answer(model) for model, _ in jobs]
    threads = [threading.Thread(target=run, args=(i, model, conv), name=f"answer-{model}", daemon=True)
               for i, (model, conv) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    try:
        while not all(answer.done for answer in latest):
            index, answer = updates.get()
            latest[index] = answer
            _drain(updates, latest, time.monotonic() + update_interval_s)
            yield list(latest)
    finally:
        cancel.set()


def _drain(updates: queue.Queue, latest: list[Answer], deadline: float) -> None:
    """Fold further updates into ``latest`` until ``deadline`` or until every answer is done."""
    while not all(answer.done for answer in latest):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            index, answer = updates.get(timeout=remaining)
        except queue.Empty:
            return
        latest[index] = answer


# ---- The page's chat -------------------------------------------------------------------------------


@dataclass
class ChatSession:
    """A chat as the page keeps it: the user's turns once, and per selected model its template and answers.

    A new image, another model selection or another template choice starts a new chat, as a new image
    does on upstream's page; the image stays in the first turn, where LLaVA's templates put it.
    """

    models: list[str] = field(default_factory=list)
    template_choice: str = AUTO_TEMPLATE
    templates: list[str] = field(default_factory=list)
    turns: list[UserTurn] = field(default_factory=list)
    answers: list[list[Answer]] = field(default_factory=list)  # answers[model index][turn index]
    image_key: str | None = None

    def ask(self, text: str | None, image: Image.Image | None, process_mode: str, models: Sequence[str],
            template_choice: str | None) -> list[str]:
        """Add a question (starting a new chat when needed); returns notes for the page.

        Raises ``InputError``, leaving the session as it was, for a request the page must not send.
        """
        models = list(models or [])
        if not models:
            raise InputError("Pick a model first (up to three to compare their answers side by side).")
        if len(models) > MAX_MODELS:
            raise InputError(f"{len(models)} models are selected; pick at most {MAX_MODELS} to compare side by side.")
        if process_mode not in IMAGE_PROCESS_MODES:
            raise InputError(f"Unknown image process mode {process_mode!r}; pick one of {', '.join(IMAGE_PROCESS_MODES)}.")
        prepared, note = prepare_image(image)
        key = image_fingerprint(prepared)
        choice = template_choice or AUTO_TEMPLATE
        new_chat = (not self.turns or models != self.models or choice != self.template_choice
                    or (key is not None and key != self.image_key))
        question = clean_question(text, prepared is not None)
        if not question and not (new_chat and prepared is not None):
            raise InputError("Type a question first.")
        templates = [resolve_template(choice, model) for model in models]
        if new_chat and prepared is None:
            for model, template in zip(models, templates):
                if template_needs_image(template):
                    raise InputError(f"The conversation template {template!r} (for {model}) needs an image: upload "
                                     f"one, or pick another template. Nothing was sent.")
        if new_chat:
            self.models, self.template_choice, self.templates = models, choice, templates
            self.turns, self.answers, self.image_key = [], [[] for _ in models], key
        turn_image = prepared if new_chat else None
        self.turns.append(UserTurn(question, turn_image, process_mode))
        for model, answers in zip(self.models, self.answers):
            answers.append(Answer(model))
        return [note] if note and turn_image is not None else []

    def retry_last(self, process_mode: str) -> None:
        """Forget the last answers so they are asked again (Regenerate), with the image process mode given."""
        if not self.turns:
            raise InputError("Nothing to regenerate yet: ask a question first.")
        if self.turns[-1].image is not None:
            self.turns[-1].process_mode = process_mode
        for model, answers in zip(self.models, self.answers):
            answers[-1] = Answer(model)

    def conversations(self) -> list[tuple[str, Conversation]]:
        """``(model, conversation with the last answer open)`` for each model, in panel order."""
        return [(model, build_conversation(template, self.turns, [a.text for a in answers]))
                for model, template, answers in zip(self.models, self.templates, self.answers)]

    def record(self, answers: Sequence[Answer]) -> None:
        """Store the latest state of each model's answer to the last question."""
        for index, answer in enumerate(answers):
            self.answers[index][-1] = answer

    def messages(self, index: int) -> list[dict[str, str]]:
        """The chat of panel ``index`` as Gradio chatbot messages (``role``/``content``)."""
        out: list[dict[str, str]] = []
        for turn, answer in zip(self.turns, self.answers[index] if index < len(self.answers) else []):
            prefix = f"[image, {turn.process_mode}] " if turn.image is not None else ""
            out.append({"role": "user", "content": prefix + turn.text})
            if answer.error:
                body = (answer.text + "\n\n" if answer.text else "") + f"Error: {answer.error}"
            elif answer.done:
                body = answer.text
            elif answer.queue_position is not None and not answer.text:
                body = f"Waiting in the worker's queue (position {answer.queue_position})"
            else:
                body = answer.text + "▌"
            out.append({"role": "assistant", "content": body})
        return out

    def status_line(self, index: int) -> str:
        """The measurement line under panel ``index`` (empty before its first answer)."""
        if index >= len(self.answers) or not self.answers[index]:
            return ""
        return self.answers[index][-1].status_line()
