"""The web demo's page (Gradio 6): chat with one model, or ask up to three at once and compare.

``python -m llava.serve.gradio_web_server --controller-url http://localhost:10000 --model-list-mode reload``

Upstream LLaVA's flags and chat flow (image upload, image process mode, a conversation template per
model name, regenerate, clear, temperature / top-p / max output tokens). Selecting two or three models
sends each question to all of them at once; each answer streams into its own panel with its
measurements (image tokens, time to first token, tokens/s). ``?model=a,b`` in the page's address
preselects models. The chat logic lives in ``llava.serve.web_chat``; this module is the layout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from llava.conversation import Conversation, conv_templates

from .deps import require
from .protocol import DEFAULT_CONTROLLER_ADDRESS
from .web_chat import (
    AUTO_TEMPLATE,
    IMAGE_PROCESS_MODES,
    MAX_MODELS,
    MAX_NEW_TOKENS,
    MODERATION_MESSAGE,
    Answer,
    ChatSession,
    ControllerClient,
    ControllerError,
    GenerationParams,
    InputError,
    stream_answer,
    stream_side_by_side,
    violates_moderation,
)

gr = require("gradio", "llava.serve.gradio_web_server")

logger = logging.getLogger(__name__)

TITLE = """# LLaVA with ToConv token compression
Ask one model, or pick two or three (e.g. the same checkpoint uncompressed, 24→12 and 24→8) to see their
answers side by side, each with the number of image tokens it received, its time to first token and its
decoding speed."""

TERMS = """### Terms of use
A research preview for non-commercial use. The models may produce wrong or offensive text; do not rely on
their answers. Requests and images are sent to the model workers you pick and are not stored by this page."""

CSS = """
.answer-stats p { font-size: 0.9em; margin: 0; }
"""
MAX_UPLOAD = "50mb"  # Gradio refuses larger files before they reach the page's checks


def no_models_message(controller_url: str) -> str:
    """The notice shown when the controller lists no model."""
    return (f"Error: no models are available: the controller at {controller_url} lists no workers. Start one "
            f"(`python -m llava.serve.model_worker --controller-address {controller_url} --model-path ...`), "
            f"then press Refresh models.")


class DemoPage:
    """The page's event handlers, bound to one controller.

    Args:
        client: The controller client.
        model_list_mode: ``"once"`` (list the models at start-up) or ``"reload"`` (on every page load).
        moderate: Check each question with OpenAI's moderation endpoint first.
        models: The model list read at start-up (used as it is in ``"once"`` mode).
    """

    def __init__(self, client: ControllerClient, model_list_mode: str = "once", moderate: bool = False,
                 models: Sequence[str] = ()) -> None:
        self.client = client
        self.model_list_mode = model_list_mode
        self.moderate = moderate
        self.models = list(models)

    # ---- Models ----------------------------------------------------------------------------------

    def list_models(self, refresh: bool) -> tuple[list[str], str]:
        """The models and a notice (empty when all is well); asks the controller when ``refresh``."""
        if refresh:
            try:
                self.models = self.client.list_models()
            except ControllerError as err:
                logger.warning("%s", err)
                return [], f"Error: {err}"
        if not self.models:
            logger.warning("The controller at %s lists no models.", self.client.url)
            return [], no_models_message(self.client.url)
        return self.models, ""

    def on_load(self, request: gr.Request) -> tuple[Any, ...]:
        """Page load: the model menu (``?model=a,b`` preselects), a fresh chat and the notice."""
        models, notice = self.list_models(refresh=self.model_list_mode == "reload")
        wanted = [name for name in request.query_params.get("model", "").split(",") if name in models]
        selected = wanted[:MAX_MODELS] or models[:1]
        return ChatSession(), gr.Dropdown(choices=models, value=selected), notice

    def on_refresh(self, selected: list[str] | None) -> tuple[Any, ...]:
        """Refresh models: ask the controller again, keep the selected models it still lists."""
        models, notice = self.list_models(refresh=True)
        kept = [name for name in selected or [] if name in models] or models[:1]
        return gr.Dropdown(choices=models, value=kept), notice or f"Models: {', '.join(models)}."

    def on_models_changed(self, selected: list[str] | None) -> tuple[Any, ...]:
        """Another selection: a new chat, one visible panel per selected model."""
        selected = list(selected or [])[:MAX_MODELS]
        shown = max(1, len(selected))
        columns = [gr.Column(visible=i < shown) for i in range(MAX_MODELS)]
        chatbots = [gr.Chatbot(value=[], label=selected[i] if i < len(selected) else "Answer")
                    for i in range(MAX_MODELS)]
        return (ChatSession(), *columns, *chatbots, *([""] * MAX_MODELS))

    # ---- Chat ------------------------------------------------------------------------------------

    def render(self, session: ChatSession, notice: str, textbox: Any = None) -> tuple[Any, ...]:
        """The outputs of a chat event: state, the panels, their stats lines, the notice, the text box."""
        chats = [session.messages(i) for i in range(MAX_MODELS)]
        stats = [session.status_line(i) for i in range(MAX_MODELS)]
        return (session, *chats, *stats, notice, gr.skip() if textbox is None else textbox)

    def on_ask(self, session: ChatSession, text: str, image, process_mode: str, models: list[str] | None,
               template_choice: str, temperature: float, top_p: float, max_new_tokens: int) -> Iterator[tuple]:
        """Send: check the input, then stream every selected model's answer into its panel."""
        try:
            if self.moderate and violates_moderation(text or ""):
                raise InputError(MODERATION_MESSAGE)
            notes = session.ask(text, image, process_mode, models or [], template_choice)
        except InputError as err:
            logger.info("Refused a question: %s", err)
            yield self.render(session, f"Error: {err}")
            return
        yield from self.stream(session, GenerationParams(temperature, top_p, int(max_new_tokens)), notes, "")

    def on_regenerate(self, session: ChatSession, process_mode: str, temperature: float, top_p: float,
                      max_new_tokens: int) -> Iterator[tuple]:
        """Regenerate: ask the last question again (with the image process mode now selected)."""
        try:
            session.retry_last(process_mode)
        except InputError as err:
            yield self.render(session, f"Error: {err}")
            return
        yield from self.stream(session, GenerationParams(temperature, top_p, int(max_new_tokens)), [], None)

    def stream(self, session: ChatSession, params: GenerationParams, notes: list[str], textbox: Any) -> Iterator[tuple]:
        """Stream the open answers of ``session`` (one thread per model) into the panels."""
        notice = "\n\n".join(notes)
        yield self.render(session, notice, textbox)
        one = partial(self._stream_one, params)
        for answers in stream_side_by_side(session.conversations(), one):
            session.record(answers)
            yield self.render(session, notice)

    def _stream_one(self, params: GenerationParams, model: str, conv: Conversation,
                    cancel: threading.Event) -> Iterator[Answer]:
        return stream_answer(self.client, model, conv, params, cancel)

    def on_clear(self) -> tuple[Any, ...]:
        """Clear: a new chat, empty panels, no image."""
        session = ChatSession()
        return (*self.render(session, "", ""), None)


def _panels() -> tuple[list[Any], list[Any], list[Any]]:
    """Up to three answer panels side by side, each a chatbot above its measurements line."""
    columns, chatbots, stats = [], [], []
    with gr.Row(equal_height=True):
        for i in range(MAX_MODELS):
            with gr.Column(min_width=280, visible=i == 0, elem_id=f"panel-column-{i}") as column:
                columns.append(column)
                chatbots.append(gr.Chatbot(label="Answer", elem_id=f"panel-{i}", height=460, layout="panel",
                                           buttons=["copy"]))
                stats.append(gr.Markdown(elem_id=f"stats-{i}", elem_classes=["answer-stats"]))
    return columns, chatbots, stats


def _controls(models: Sequence[str]) -> dict[str, Any]:
    """The left column: models, image, process mode, template and parameters."""
    c: dict[str, Any] = {}
    c["models"] = gr.Dropdown(choices=list(models), value=list(models[:1]), multiselect=True,
                              max_choices=MAX_MODELS, label=f"Models (up to {MAX_MODELS}: side by side)",
                              elem_id="model-selector")
    c["refresh"] = gr.Button("Refresh models", elem_id="refresh-models", size="sm")
    c["image"] = gr.Image(type="pil", label="Image", elem_id="image-box", sources=["upload", "clipboard"])
    c["mode"] = gr.Radio(list(IMAGE_PROCESS_MODES), value="Default", label="Preprocess for non-square image")
    c["template"] = gr.Dropdown([AUTO_TEMPLATE, *sorted(conv_templates)], value=AUTO_TEMPLATE,
                                label="Conversation template", elem_id="template-selector")
    with gr.Accordion("Parameters", open=False):
        c["temperature"] = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature")
        c["top_p"] = gr.Slider(0.1, 1.0, value=0.7, step=0.1, label="Top P")
        c["max_tokens"] = gr.Slider(1, MAX_NEW_TOKENS, value=512, step=1, label="Max output tokens",
                                    elem_id="max-tokens")
    return c


def build_demo(page: DemoPage, embed: bool = False, concurrency_count: int = 16) -> gr.Blocks:
    """The page's layout and its events."""
    with gr.Blocks(title="LLaVA · ToConv") as demo:
        state = gr.State(ChatSession())
        if not embed:
            gr.Markdown(TITLE)
        with gr.Row():
            with gr.Column(scale=4, min_width=320):
                c = _controls(page.models)
            with gr.Column(scale=9):
                notice = gr.Markdown(elem_id="notice")
                columns, chatbots, stats = _panels()
                with gr.Row():
                    textbox = gr.Textbox(show_label=False, placeholder="Ask about the image and press Enter",
                                         container=False, scale=8, elem_id="question")
                    send = gr.Button("Send", variant="primary", scale=1, min_width=60, elem_id="send")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
        if not embed:
            gr.Markdown(TERMS)

        chat_outputs = [state, *chatbots, *stats, notice, textbox]
        params = [c["temperature"], c["top_p"], c["max_tokens"]]
        ask_inputs = [state, textbox, c["image"], c["mode"], c["models"], c["template"], *params]
        # A second Send while answers stream is ignored ("once"); Clear or another model selection stops
        # the streams first, so that they cannot write the old chat back over the new one.
        ask = gr.on([send.click, textbox.submit], page.on_ask, ask_inputs, chat_outputs,
                    concurrency_limit=concurrency_count, trigger_mode="once")
        again = regenerate.click(page.on_regenerate, [state, c["mode"], *params], chat_outputs,
                                 concurrency_limit=concurrency_count, trigger_mode="once")
        clear.click(None, cancels=[ask, again]).then(page.on_clear, None, [*chat_outputs, c["image"]])
        c["refresh"].click(page.on_refresh, [c["models"]], [c["models"], notice], queue=False)
        c["models"].change(None, cancels=[ask, again]).then(page.on_models_changed, [c["models"]],
                                                             [state, *columns, *chatbots, *stats])
        demo.load(page.on_load, None, [state, c["models"], notice], queue=False)
    return demo


def build_parser() -> argparse.ArgumentParser:
    """Upstream's flags."""
    parser = argparse.ArgumentParser(description="LLaVA web demo: chat with the models a controller lists.")
    parser.add_argument("--host", type=str, default="0.0.0.0")
    parser.add_argument("--port", type=int, default=None, help="Default: Gradio's (7860, or the next free port).")
    parser.add_argument("--controller-url", type=str, default=DEFAULT_CONTROLLER_ADDRESS)
    parser.add_argument("--concurrency-count", type=int, default=16,
                        help="Chat events the page runs at once (each may ask up to three workers).")
    parser.add_argument("--model-list-mode", type=str, default="once", choices=["once", "reload"],
                        help="once: list the models at start-up; reload: on every page load.")
    parser.add_argument("--share", action="store_true", help="Also serve the page through a public Gradio link.")
    parser.add_argument("--moderate", action="store_true",
                        help="Check questions with OpenAI's moderation endpoint (needs OPENAI_API_KEY).")
    parser.add_argument("--embed", action="store_true", help="Leave out the title and the terms of use.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Start the page: ``python -m llava.serve.gradio_web_server --controller-url URL``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concurrency_count < 1:
        parser.error(f"--concurrency-count must be at least 1, got {args.concurrency_count}.")
    if args.moderate and not os.environ.get("OPENAI_API_KEY"):
        parser.error("--moderate needs OPENAI_API_KEY in the environment; set it or drop --moderate.")
    logger.info("args: %s", args)
    page = DemoPage(ControllerClient(args.controller_url), args.model_list_mode, args.moderate)
    page.list_models(refresh=True)  # logs why when there is none
    demo = build_demo(page, embed=args.embed, concurrency_count=args.concurrency_count)
    demo.queue(api_open=False).launch(server_name=args.host, server_port=args.port, share=args.share,
                                      max_file_size=MAX_UPLOAD, theme=gr.themes.Default(), css=CSS)


if __name__ == "__main__":
    main(sys.argv[1:])
