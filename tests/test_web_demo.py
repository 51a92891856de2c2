"""The web demo's page: its chat logic (fast) and the real page in headless Chromium (slow).

The fast tests cover ``llava.serve.web_chat`` without a browser or a server: each model's prompt in
side-by-side mode, the image limits, the refusals before sending, and the messages the page shows for
error chunks, HTTP errors and streams cut off. The slow tests start the controller, two stand-in
workers (576 and 144 image tokens) and the Gradio page (``tests/serve_cluster.py``), then drive the page
through Selenium: a side-by-side answer with its measurements, a worker killed mid-answer, and a
template that needs an image asked without one.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from PIL import Image

pytest.importorskip("requests")

from llava.constants import DEFAULT_IMAGE_TOKEN  # noqa: E402
from llava.serve import web_chat  # noqa: E402
from llava.serve.protocol import ErrorCode  # noqa: E402
from llava.serve.web_chat import Answer, ChatSession, InputError  # noqa: E402

BASE = "llava-v1.5-tiny"
TOCONV = "llava-v1.5-tiny-toconv12"


# ---- Templates and prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("name, template", [
    ("llava-v1.5-7b", "llava_v1"),
    ("llava-v1.5-7b-toconv12", "llava_v1"),
    ("llava-v1.6-mistral-7b", "mistral_instruct"),
    ("llava-v1.6-34b", "chatml_direct"),
    ("llava-llama-2-13b-chat", "llava_llama_2"),
    ("llava-v1.5-7b-plain", "v1_mmtag"),
    ("llava-v1.5-7b-plain-finetune", "llava_v1"),
    ("llava-7b", "llava_v0"),
    ("vicuna-7b-v1.5", "vicuna_v1"),
])
def test_template_follows_the_model_name_as_upstreams_page(name, template):
    assert web_chat.template_for_model(name) == template


def test_only_image_built_templates_need_an_image():
    needing = {name for name in web_chat.conv_templates if web_chat.template_needs_image(name)}
    assert needing == {"plain", "v0_plain", "v0_mmtag", "v1_mmtag"}


def _image(size=(64, 48), color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_side_by_side_gives_each_model_its_own_template_and_the_same_question_and_image():
    session = ChatSession()
    session.ask("What is red?", _image(), "Pad", [BASE, "llava-7b"], None)
    (model_a, conv_a), (model_b, conv_b) = session.conversations()
    assert (model_a, model_b) == (BASE, "llava-7b")
    assert session.templates == ["llava_v1", "llava_v0"]
    payload_a = web_chat.request_payload(model_a, conv_a, web_chat.GenerationParams(0.0, 0.7, 5000))
    payload_b = web_chat.request_payload(model_b, conv_b, web_chat.GenerationParams(0.0, 0.7, 16))
    assert payload_a["prompt"].endswith(f"USER: {DEFAULT_IMAGE_TOKEN}\nWhat is red? ASSISTANT:")
    assert payload_b["prompt"].endswith(f"Human: {DEFAULT_IMAGE_TOKEN}\nWhat is red?###Assistant:")
    assert payload_a["stop"] == "</s>" and payload_b["stop"] == "###"
    assert payload_a["max_new_tokens"] == web_chat.MAX_NEW_TOKENS and payload_b["max_new_tokens"] == 16
    for payload in (payload_a, payload_b):
        assert payload["prompt"].count(DEFAULT_IMAGE_TOKEN) == len(payload["images"]) == 1
    assert payload_a["images"] == payload_b["images"]


def test_follow_up_keeps_the_image_in_the_first_turn_and_each_models_own_answers():
    session = ChatSession()
    session.ask("Describe it.", _image(), "Default", [BASE, TOCONV], None)
    session.record([Answer(BASE, text="A red square.", done=True), Answer(TOCONV, text="Red.", done=True)])
    assert session.ask("And the size?", _image(), "Default", [BASE, TOCONV], None) == []  # same image: same chat
    (_, conv_a), (_, conv_b) = session.conversations()
    prompt_a, prompt_b = conv_a.get_prompt(), conv_b.get_prompt()
    assert prompt_a.count(DEFAULT_IMAGE_TOKEN) == 1 and len(conv_a.get_images()) == 1
    assert "ASSISTANT: A red square.</s>USER: And the size? ASSISTANT:" in prompt_a
    assert "ASSISTANT: Red.</s>USER: And the size? ASSISTANT:" in prompt_b
    session.ask("And this one?", _image(color=(0, 0, 255)), "Default", [BASE, TOCONV], None)
    assert len(session.turns) == 1, "a new image starts a new chat"


def test_regenerate_forgets_only_the_last_answers_and_takes_the_new_process_mode():
    session = ChatSession()
    session.ask("Describe it.", _image(), "Default", [BASE], None)
    session.record([Answer(BASE, text="Blue.", done=True)])
    session.retry_last("Crop")
    assert session.turns[0].process_mode == "Crop" and session.answers[0][-1].text == ""
    with pytest.raises(InputError, match="ask a question first"):
        ChatSession().retry_last("Default")


# ---- Refused before sending ------------------------------------------------------------------------


def test_a_template_that_needs_an_image_is_refused_without_one_and_the_session_is_unchanged():
    session = ChatSession()
    with pytest.raises(InputError, match=r"'plain' \(for llava-v1.5-tiny\) needs an image: upload one"):
        session.ask("Describe it.", None, "Default", [BASE], "plain")
    assert session.turns == [] and session.models == []
    session.ask("Hello?", None, "Default", [BASE], None)  # llava_v1 takes text alone
    assert session.conversations()[0][1].get_images() == []


@pytest.mark.parametrize("models, text, mode, match", [
    ([], "Hi", "Default", "Pick a model first"),
    ([BASE, TOCONV, "a", "b"], "Hi", "Default", "4 models are selected; pick at most 3"),
    ([BASE], "  ", "Default", "Type a question first"),
    ([BASE], "Hi", "Stretch", "Unknown image process mode 'Stretch'"),
])
def test_bad_requests_name_the_fix(models, text, mode, match):
    with pytest.raises(InputError, match=match):
        ChatSession().ask(text, None, mode, models, None)
    with pytest.raises(InputError, match="Unknown conversation template 'nope'"):
        ChatSession().ask("Hi", None, "Default", [BASE], "nope")


def test_stray_image_tokens_are_dropped_from_the_question_so_images_and_tokens_match():
    session = ChatSession()
    session.ask(f"{DEFAULT_IMAGE_TOKEN} what is here? {DEFAULT_IMAGE_TOKEN}", None, "Default", [BASE], None)
    assert DEFAULT_IMAGE_TOKEN not in session.conversations()[0][1].get_prompt()


def test_large_images_are_downscaled_with_a_note_and_huge_ones_refused():
    image, note = web_chat.prepare_image(_image((4000, 1000)))
    assert image.size == (web_chat.MAX_IMAGE_SIDE, 336)
    assert note == "The image was downscaled from 4000×1000 to 1344×336 before sending."
    small, none = web_chat.prepare_image(_image((300, 200)))
    assert small.size == (300, 200) and none is None
    notes = ChatSession().ask("Hi", _image((2688, 100)), "Default", [BASE], None)
    assert notes == ["The image was downscaled from 2688×100 to 1344×50 before sending."]
    with pytest.raises(InputError, match=r"8000×6000 \(48.0 megapixels\); the page takes at most 40 megapixels"):
        web_chat.prepare_image(Image.new("L", (8000, 6000)))


# ---- What the page says about errors ---------------------------------------------------------------


@pytest.mark.parametrize("code, expected", [
    (ErrorCode.WORKER_BUSY, "M is busy: queue full. Ask again in a moment"),
    (ErrorCode.NO_WORKER, "No worker serves M: queue full. Start one, then press Refresh models."),
    (ErrorCode.WORKER_UNREACHABLE, "Lost the worker of M: queue full. Press Regenerate"),
    (ErrorCode.WORKER_ERROR, "The worker of M failed: queue full."),
    (7, "The worker of M answered error_code 7: queue full."),
])
def test_error_chunks_become_messages(code, expected):
    assert web_chat.chunk_error_message("M", {"text": "queue full.", "error_code": int(code)}).startswith(expected)


def test_http_errors_use_the_error_chunk_in_the_body():
    busy = b'{"text": "2 requests queued (limit 2).", "error_code": 4}\x00'
    assert web_chat.http_error_message("M", 503, busy).startswith("M is busy: 2 requests queued (limit 2).")
    assert web_chat.http_error_message("M", 503, b"").startswith("M is busy: HTTP 503.")
    assert web_chat.http_error_message("M", 422, b'{"detail": "bad body"}') == (
        "The worker of M refused the request (HTTP 422): bad body")
    assert web_chat.http_error_message("M", 500, b"oops") == "The worker of M refused the request (HTTP 500): oops"


def _chunk(text: str, **fields) -> dict:
    return {"text": "PROMPT" + text, "error_code": 0, **fields}


def test_a_stream_that_ends_without_finished_is_reported_as_cut_off():
    chunks = [_chunk("", queue_position=1, finished=False), _chunk(" A", image_tokens=144, finished=False)]
    *steps, last = [replace(a) for a in web_chat.read_stream(Answer(TOCONV), iter(chunks), "PROMPT")]
    assert steps[0].queue_position == 1 and "queue (position 1)" in steps[0].status_line()
    assert last.done and last.text == "A" and "stopped before finishing the answer" in last.error


def test_a_finished_stream_carries_its_measurements_and_an_upstream_stream_needs_no_finished():
    chunks = [_chunk(" Red", finished=False), _chunk(" Red.", image_tokens=576, ttft_s=0.5, tokens_per_s=20.0,
                                                      output_tokens=3, finished=True)]
    last = list(web_chat.read_stream(Answer(BASE), iter(chunks), "PROMPT"))[-1]
    assert (last.done, last.error, last.text) == (True, None, "Red.")
    assert last.status_line() == f"**{BASE}** · 576 image tokens · first token 0.50 s · 20.0 tokens/s · 3 new tokens"
    upstream = list(web_chat.read_stream(Answer("m"), iter([{"text": "PROMPT hi", "error_code": 0}]), "PROMPT"))
    assert upstream[-1].done and upstream[-1].error is None and upstream[-1].text == "hi"


def test_side_by_side_streams_concurrently_and_one_failure_stays_in_its_panel():
    both_started = threading.Barrier(2, timeout=5)

    def stream(model, conv, cancel):
        both_started.wait()  # deadlocks (BrokenBarrierError) unless the two answers run at once
        if model == "bad":
            yield Answer(model, text="par")
            raise RuntimeError("socket closed")
        yield Answer(model, text="ok", done=True)

    *_, last = web_chat.stream_side_by_side([("good", None), ("bad", None)], stream)
    assert (last[0].text, last[0].error) == ("ok", None)
    assert last[1].done and last[1].text == "par" and "RuntimeError: socket closed" in last[1].error


def test_messages_show_the_cursor_while_streaming_and_the_error_when_it_failed():
    session = ChatSession()
    session.ask("Hi", _image(), "Pad", [BASE, TOCONV], None)
    session.record([Answer(BASE, text="Hel"), Answer(TOCONV, text="He", error="Lost the worker.", done=True)])
    assert session.messages(0) == [{"role": "user", "content": "[image, Pad] Hi"},
                                   {"role": "assistant", "content": "Hel▌"}]
    assert session.messages(1)[-1]["content"] == "He\n\n⚠️ Lost the worker."
    assert session.status_line(1) == f"**{TOCONV}** · error" and session.messages(2) == []
