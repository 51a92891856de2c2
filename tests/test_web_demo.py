"""The web demo's page: its chat logic (fast) and the real page in headless Chromium (slow).

The fast tests cover ``llava.serve.web_chat`` without a browser or a server: each model's prompt in
side-by-side mode, the image limits, the refusals before sending, and the messages the page shows for
error chunks, HTTP errors and streams cut off. The slow tests start the controller, two stand-in
workers (576 and 144 image tokens) and the Gradio page (``tests/serve_cluster.py``), then drive the page
through Selenium: a side-by-side answer with its measurements, a worker killed mid-answer, a
template that needs an image asked without one, and Regenerate and Clear.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from prerequisites import skip_or_fail_under_ci

pytest.importorskip("requests")

import serve_cluster  # noqa: E402  (tests/ is on sys.path: conftest imports it the same way)
from llava.constants import DEFAULT_IMAGE_TOKEN  # noqa: E402
from llava.serve import web_chat  # noqa: E402
from llava.serve.protocol import ErrorCode, encode_chunk  # noqa: E402
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
    assert session.messages(1)[-1]["content"] == "He\n\nError: Lost the worker."
    assert session.status_line(1) == f"**{TOCONV}** · error" and session.messages(2) == []


class _StubHandler(http.server.BaseHTTPRequestHandler):
    """A controller and worker in one: the model name picks how ``/worker_generate_stream`` behaves."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
        model = data.get("model") if isinstance(data, dict) else None
        if self.path == "/get_worker_address":
            address = "" if model == "gone" else f"http://127.0.0.1:{self.server.server_address[1]}"
            return self._send(200, json.dumps({"address": address}).encode())
        prompt = data["prompt"]
        if model == "busy":
            return self._send(503, encode_chunk({"text": "5 generating, 16 waiting.", "error_code": 4}))
        first = encode_chunk({"text": prompt + " Half", "error_code": 0, "image_tokens": 144, "finished": False})
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(first), first))
        if model == "dies":  # the connection drops mid-stream, as when the worker is killed
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        last = encode_chunk({"text": prompt + " Half done.", "error_code": 0, "image_tokens": 144, "finished": True})
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("model, text, error", [
    ("ok", "Half done.", None),
    ("busy", "", "busy is busy: 5 generating, 16 waiting. Ask again in a moment"),
    ("dies", "Half", "Lost the worker of dies at http://127.0.0.1:"),
    ("gone", "", "No worker serves gone any more. Start one, then press Refresh models."),
])
def test_stream_answer_over_http_ends_every_failure_with_a_message(stub_url, model, text, error):
    conv = web_chat.build_conversation("llava_v1", [web_chat.UserTurn("Hi")], [None])
    answers = [replace(a) for a in web_chat.stream_answer(web_chat.ControllerClient(stub_url), model, conv,
                                                          web_chat.GenerationParams())]
    last = answers[-1]
    assert last.done and last.text == text
    assert (last.error is None) if error is None else last.error.startswith(error), last.error
    if model in ("ok", "dies"):
        assert answers[0].stats.image_tokens == 144
    unreachable = list(web_chat.stream_answer(web_chat.ControllerClient("http://127.0.0.1:9"), "m", conv,
                                              web_chat.GenerationParams()))
    assert unreachable[-1].error.startswith("The controller at http://127.0.0.1:9 did not answer /get_worker_address")


# ---- The page's handlers and flags (Gradio imported, no server) ------------------------------------


class _Controller:
    """Stands in for ``ControllerClient``: a fixed model list, or the error of an unreachable controller."""

    url = "http://127.0.0.1:9"

    def __init__(self, models=None, error=None):
        self.models, self.error = models or [], error

    def list_models(self):
        if self.error:
            raise web_chat.ControllerError(self.error)
        return list(self.models)


def test_the_page_says_when_no_model_is_available_or_the_controller_is_down():
    server = pytest.importorskip("llava.serve.gradio_web_server", exc_type=ImportError)
    models, notice = server.DemoPage(_Controller()).list_models(refresh=True)
    assert models == [] and notice.startswith("Error: no models are available: the controller at http://127.0.0.1:9")
    assert "press Refresh models" in notice
    models, notice = server.DemoPage(_Controller(error="The controller at X did not answer.")).list_models(True)
    assert (models, notice) == ([], "Error: The controller at X did not answer.")
    page = server.DemoPage(_Controller([BASE, TOCONV]))
    assert page.list_models(refresh=True) == ([BASE, TOCONV], "")


def test_asking_without_a_model_or_an_image_where_needed_sends_nothing():
    server = pytest.importorskip("llava.serve.gradio_web_server", exc_type=ImportError)
    page = server.DemoPage(_Controller([BASE]))
    (out,) = page.on_ask(ChatSession(), "Hi", None, "Default", [], web_chat.AUTO_TEMPLATE, 0.2, 0.7, 16)
    session, *panels, notice, _textbox = out
    assert notice == "Error: Pick a model first (up to three to compare their answers side by side)."
    assert session.turns == [] and panels[:3] == [[], [], []]
    (out,) = page.on_ask(ChatSession(), "Hi", None, "Default", [BASE], "v1_mmtag", 0.2, 0.7, 16)
    assert "'v1_mmtag' (for llava-v1.5-tiny) needs an image" in out[-2]


def test_the_page_takes_upstreams_flags():
    server = pytest.importorskip("llava.serve.gradio_web_server", exc_type=ImportError)
    args = server.build_parser().parse_args([
        "--host", "127.0.0.1", "--port", "7860", "--controller-url", "http://localhost:10000",
        "--concurrency-count", "4", "--model-list-mode", "reload", "--share", "--moderate", "--embed"])
    assert (args.host, args.port, args.controller_url, args.concurrency_count) == (
        "127.0.0.1", 7860, "http://localhost:10000", 4)
    assert args.model_list_mode == "reload" and args.share and args.moderate and args.embed


# ---- The real page in headless Chromium (slow) -----------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FIX = "apt-get install chromium chromium-driver (and pip install selenium)"
ANSWER_TIMEOUT_S = 120


def _browser_or_skip() -> None:
    """Skip without Chromium, chromedriver or Selenium; under CI (``$CI`` set) that is a failure instead."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    if not missing:
        return
    reason = f"The browser tests need {', '.join(missing)}: {BROWSER_FIX}"
    skip_or_fail_under_ci(reason, "CI must install them (.ci/run) so that the web demo is tested in a browser.")


@dataclass
class Demo:
    controller: Any
    workers: dict[str, Any]
    page: Any
    log_dir: Path

    def worker_requests(self) -> int:
        """How many generation requests the workers have received (their access logs)."""
        return sum(w.log_path.read_text(errors="replace").count("/worker_generate_stream")
                   for w in self.workers.values())


def _start_page(controller_url: str, log_dir: Path) -> Any:
    """``python -m llava.serve.gradio_web_server`` on a free port; returns once it serves the page."""
    port = serve_cluster.free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--controller-url", controller_url,
            "--model-list-mode", "reload", "--concurrency-count", "4"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        page = serve_cluster.start_service(f"web-page-{port}", "llava.serve.gradio_web_server", args, port, log_dir)

    def serving() -> bool:
        with urllib.request.urlopen(page.url + "/", timeout=5) as response:
            return response.status == 200

    serve_cluster.wait_until(page, serving, "serving the page", timeout=180)
    return page


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_llava, tiny_llava_compressed) -> Iterator[Demo]:
    """Controller (3 s heartbeat expiry), a 576-token and a 144-token worker, and the page, all on 127.0.0.1."""
    _browser_or_skip()
    log_dir = tmp_path_factory.mktemp("web-demo")
    controller = serve_cluster.start_controller(log_dir, heart_beat_expiration=3.0)
    try:
        workers = {BASE: serve_cluster.start_worker(controller, tiny_llava, BASE, wait=False),
                   TOCONV: serve_cluster.start_worker(controller, tiny_llava_compressed, TOCONV, wait=False)}
        page = _start_page(controller.url, log_dir)
        serve_cluster.wait_for_models(controller, [BASE, TOCONV])
        yield Demo(controller, workers, page, log_dir)
    finally:
        serve_cluster.stop_all()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for(driver, condition, what: str, timeout: float = ANSWER_TIMEOUT_S):
    """Poll ``condition(driver)`` until truthy; on timeout, fail with the page's text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(f"The page did not show {what} within {timeout} s. Page text:\n{_text(driver, 'body')}")


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id) if element_id != "body" else driver.find_elements(By.TAG_NAME,
                                                                                                        "body")
    return found[0].text if found else ""


def _open(driver, demo: Demo, models: list[str]) -> None:
    """Load the page with ``models`` preselected (``?model=a,b``); wait until a panel per model shows."""
    driver.get(f"{demo.page.url}/?model={','.join(models)}")
    _wait_for(driver, lambda d: all(name in _text(d, f"panel-{i}") for i, name in enumerate(models)),
              f"one panel per model ({models})", timeout=60)


def _set_parameters(driver, temperature: float, max_tokens: int) -> None:
    """Type into the sliders' number boxes (opening the Parameters accordion if it is closed)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if not any(box.is_displayed() for box in driver.find_elements(By.CSS_SELECTOR, "#max-tokens input[type=number]")):
        driver.find_element(By.XPATH, "//button[.//span[text()='Parameters']]").click()  # open the accordion
    for label, value in (("Temperature", temperature), ("Max output tokens", max_tokens)):
        box = _wait_for(driver, lambda d, label=label: d.find_element(
            By.XPATH, f"//*[text()='{label}']/ancestor::*[.//input[@type='number']][1]//input[@type='number']"),
            f"the {label} box", timeout=10)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)
        _wait_for(driver, lambda d, box=box, value=value: float(box.get_attribute("value")) == value,
                  f"{label} = {value}", timeout=10)


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#image-box input[type=file]").send_keys(str(path))
    _wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#image-box img"), "the uploaded image", timeout=30)


def _ask(driver, question: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    driver.find_element(By.ID, "send").click()


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save the page to ``tmp_path/name`` and, when ``$TOCONV_ARTIFACTS`` is set, into that folder too."""
    path = tmp_path / name
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1500, max(1000, min(int(height) + 120, 2400)))  # the whole page, not a scrolled view
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    if os.environ.get("TOCONV_ARTIFACTS"):
        folder = Path(os.environ["TOCONV_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def _png(tmp_path: Path) -> Path:
    """A 320×240 test picture: a blue field with a red square."""
    image = Image.new("RGB", (320, 240), (40, 110, 200))
    image.paste((220, 40, 40), (100, 60, 220, 180))
    path = tmp_path / "question.png"
    image.save(path)
    return path


@pytest.mark.slow
def test_side_by_side_answers_show_576_and_144_image_tokens(demo, browser, tmp_path):
    _open(browser, demo, [BASE, TOCONV])
    _upload(browser, _png(tmp_path))
    _set_parameters(browser, temperature=0.0, max_tokens=48)
    _ask(browser, "What is in the picture?")
    _wait_for(browser, lambda d: "576 image tokens" in _text(d, "stats-0") and "144 image tokens" in _text(d, "stats-1")
              and "new tokens" in _text(d, "stats-0") and "new tokens" in _text(d, "stats-1")
              and "▌" not in _text(d, "panel-0") + _text(d, "panel-1"), "both answers with their measurements")
    shot = _screenshot(browser, tmp_path, "web-demo.png")
    for i, model in enumerate((BASE, TOCONV)):
        panel, stats = _text(browser, f"panel-{i}"), _text(browser, f"stats-{i}")
        assert "What is in the picture?" in panel and "Error" not in panel, panel
        answer = panel.split("What is in the picture?", 1)[1].strip()
        assert answer, f"{model}'s panel shows no answer:\n{panel}"
        assert stats.startswith(model) and "first token" in stats and "tokens/s" in stats, stats
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_template_that_needs_an_image_is_refused_on_the_page_and_nothing_is_sent(demo, browser):
    from selenium.webdriver.common.by import By

    _open(browser, demo, [BASE])
    browser.find_element(By.CSS_SELECTOR, "#template-selector input").click()
    option = _wait_for(browser, lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "#template-selector li[role=option]")
                                           if o.text.strip() == "plain"], "the template menu", timeout=10)
    option[0].click()
    sent_before = demo.worker_requests()
    _ask(browser, "Describe it.")
    _wait_for(browser, lambda d: "needs an image" in _text(d, "notice"), "the missing-image message", timeout=30)
    assert _text(browser, "notice") == ("Error: The conversation template 'plain' (for llava-v1.5-tiny) needs an "
                                        "image: upload one, or pick another template. Nothing was sent.")
    assert "Describe it." not in _text(browser, "panel-0")
    assert demo.worker_requests() == sent_before


def _new_tokens(stats_line: str) -> int:
    """The "N new tokens" count of a panel's measurements line (0 before the first token)."""
    match = re.search(r"(\d+) new tokens", stats_line)
    return int(match.group(1)) if match else 0


@pytest.mark.slow
def test_a_worker_killed_mid_answer_gives_its_panel_an_error_and_leaves_the_controller(demo, browser, tmp_path):
    _open(browser, demo, [BASE, TOCONV])
    _upload(browser, _png(tmp_path))
    _set_parameters(browser, temperature=0.0, max_tokens=1024)  # greedy: the stand-ins write all 1024 tokens
    _ask(browser, "Describe the picture in detail.")
    _wait_for(browser, lambda d: 0 < _new_tokens(_text(d, "stats-1")) < 900, "the compressed model's answer streaming")
    demo.workers[TOCONV].kill()
    _wait_for(browser, lambda d: "Error:" in _text(d, "panel-1"), "an error in the killed worker's panel", timeout=60)
    _screenshot(browser, tmp_path, "web-demo-worker-killed.png")
    panel = _text(browser, "panel-1")
    assert "Lost the worker of llava-v1.5-tiny-toconv12" in panel or "stopped before finishing" in panel, panel
    assert _text(browser, "stats-1") == f"{TOCONV} · error"
    assert "Error" not in _text(browser, "panel-0")
    serve_cluster.wait_until_unlisted(demo.controller, TOCONV, timeout=30)
    assert serve_cluster.list_models(demo.controller) == [BASE]


@pytest.mark.slow
def test_regenerate_asks_again_and_clear_stops_a_streaming_answer(demo, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, demo, [BASE])
    _upload(browser, _png(tmp_path))
    _set_parameters(browser, temperature=0.0, max_tokens=8)
    _ask(browser, "What colour is the square?")
    _wait_for(browser, lambda d: _new_tokens(_text(d, "stats-0")) == 8, "the first answer")
    first = _text(browser, "panel-0")
    sent = demo.worker_requests()
    browser.find_element(By.ID, "regenerate").click()
    _wait_for(browser, lambda d: demo.worker_requests() == sent + 1 and _new_tokens(_text(d, "stats-0")) == 8
              and "▌" not in _text(d, "panel-0"), "the regenerated answer")
    assert _text(browser, "panel-0") == first, "greedy decoding regenerates the same single answer"
    _set_parameters(browser, temperature=0.0, max_tokens=1024)
    browser.find_element(By.ID, "regenerate").click()
    _wait_for(browser, lambda d: 8 < _new_tokens(_text(d, "stats-0")) < 900, "the long answer streaming")
    browser.find_element(By.ID, "clear").click()
    _wait_for(browser, lambda d: "What colour" not in _text(d, "panel-0") and not _text(d, "stats-0"),
              "empty panels after Clear", timeout=30)
    time.sleep(2)  # a stream that went on would write the chat back
    assert "What colour" not in _text(browser, "panel-0") and not _text(browser, "stats-0")
