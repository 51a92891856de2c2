"""The web demo's backend as real processes: a controller and three model workers on 127.0.0.1.

Workers: the tiny LLaVA-1.5 stand-in without compression (576 image tokens; one slot, one queue place,
a 1 MP image limit, for the limit tests; the last test kills it mid-answer) and the same stand-in trained
with 24→12 compression (144 image tokens). Heartbeats every second, expiry after 3 s.
Upstream's own client (``llava.serve.test_message`` of llava-torch 1.2.2.post1, from the venv that
``scripts/check_upstream_dropin.sh`` builds) talks to our controller too.

Skipped without fastapi, uvicorn, requests and httpx, except under CI (``$CI`` set), where that is a failure.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from prerequisites import skip_or_fail_under_ci
from serve_cluster import (
    FakeWorker,
    Service,
    free_port,
    list_models,
    nested_json,
    png_header,
    start_controller,
    start_worker,
    stop_all,
    wait_for_models,
)

SERVE_PACKAGES = ("fastapi", "uvicorn", "requests", "httpx")
UPSTREAM_VENV = Path(os.environ.get("TOCONV_UPSTREAM_VENV", "/tmp/toconv-upstream-venv"))
PLAIN, SMALL = "llava-v1.5-tiny", "llava-v1.5-tiny-toconv12"
EXPIRATION_S = 3.0
PLAIN_MAX_PIXELS = 1_000_000
PLAIN_MAX_REQUEST_BYTES = 2_000_000
PROMPT = ("A chat between a curious human and an artificial intelligence assistant. USER: <image>\n"
          "What is in the image? ASSISTANT:")


def _missing_or_fail(names) -> None:
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if not missing:
        return
    reason = f"the web demo needs {', '.join(missing)}: pip install -e '.[serve]'"
    skip_or_fail_under_ci(reason, "CI installs the test extra, so the serve tests must run there.")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_llava, tiny_llava_compressed):
    """The controller and the two workers, started together (about 15 s on two cores)."""
    _missing_or_fail(SERVE_PACKAGES)
    logs = tmp_path_factory.mktemp("serve-logs")
    controller = start_controller(logs, heart_beat_expiration=EXPIRATION_S)
    try:
        plain = start_worker(controller, tiny_llava, PLAIN, wait=False, extra_args=[
            "--limit-model-concurrency", "1", "--max-queued-requests", "1",
            "--max-image-pixels", str(PLAIN_MAX_PIXELS), "--max-request-bytes", str(PLAIN_MAX_REQUEST_BYTES)])
        small = start_worker(controller, tiny_llava_compressed, SMALL, wait=False)
        wait_for_models(controller, [PLAIN, SMALL])
        yield SimpleNamespace(controller=controller, plain=plain, small=small)
    finally:
        stop_all()


@pytest.fixture(scope="module")
def image_b64() -> str:
    from llava.standins import make_images

    return _png_b64(make_images(1, size=(400, 300), seed=3)[0])


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _payload(model: str, image: str | None, **overrides) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "top_p": 1.0, "max_new_tokens": 24,
            "stop": "</s>", "images": [image] if image else []}
    return {**body, **overrides}


def _stream(url: str, body: Any, timeout: float = 120) -> tuple[int, list[dict[str, Any]]]:
    """POST to ``url``/worker_generate_stream; the HTTP status and every chunk (upstream's framing)."""
    import requests

    from llava.serve.protocol import iter_chunks

    with requests.post(url + "/worker_generate_stream", json=body, stream=True, timeout=(5, timeout)) as response:
        return response.status_code, list(iter_chunks(response))


def _post(url: str, path: str, body: dict | None = None) -> Any:
    import requests

    response = requests.post(url + path, json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()


# ---- Registry ---------------------------------------------------------------------------------------


@pytest.mark.slow  # the module's controller and two worker processes
def test_controller_lists_workers_and_dispatches(cluster):
    """list_models, get_worker_address and each worker's status, as upstream's clients read them."""
    assert list_models(cluster.controller) == [PLAIN, SMALL]
    for worker, name in ((cluster.plain, PLAIN), (cluster.small, SMALL)):
        assert _post(cluster.controller.url, "/get_worker_address", {"model": name}) == {"address": worker.url}
        status = _post(worker.url, "/worker_get_status")
        assert status["model_names"] == [name] and status["speed"] == 1 and status["queue_length"] == 0
    assert _post(cluster.controller.url, "/get_worker_address", {"model": "no-such-model"}) == {"address": ""}


# ---- Streaming -------------------------------------------------------------------------------------


def _check_answer(chunks: list[dict[str, Any]], prompt: str) -> dict[str, Any]:
    """Every chunk OK and growing from the prompt; the last one finished. Returns the last chunk."""
    assert chunks, "no chunks"
    assert all(c["error_code"] == 0 for c in chunks), chunks[-1]
    texts = [c["text"] for c in chunks]
    assert texts[0].startswith(prompt)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
    assert [c["finished"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    return chunks[-1]


@pytest.mark.slow  # the module's controller and two worker processes
def test_stream_reports_measured_image_tokens(cluster, image_b64):
    """Through each worker and through the controller's relay: 576 vs 144 image tokens, the prompt
    432 tokens shorter with compression, timings present, and greedy answers identical on both routes."""
    finals = {}
    for worker, name in ((cluster.plain, PLAIN), (cluster.small, SMALL)):
        for route, url in (("direct", worker.url), ("relay", cluster.controller.url)):
            status, chunks = _stream(url, _payload(name, image_b64))
            assert status == 200
            finals[name, route] = _check_answer(chunks, PROMPT)
    plain, small = finals[PLAIN, "direct"], finals[SMALL, "direct"]
    assert (plain["image_tokens"], small["image_tokens"]) == (576, 144)
    assert plain["prompt_tokens"] - small["prompt_tokens"] == 432
    for final in finals.values():
        assert 1 <= final["output_tokens"] <= 24
        assert final["ttft_s"] > 0 and final["queue_s"] >= 0
        assert final["tokens_per_s"] is None or final["tokens_per_s"] > 0
    for name in (PLAIN, SMALL):
        assert finals[name, "direct"]["text"] == finals[name, "relay"]["text"]
        assert finals[name, "direct"]["output_tokens"] == finals[name, "relay"]["output_tokens"]


@pytest.mark.slow  # the module's controller and two worker processes
def test_stream_without_image_and_stop_string(cluster):
    """A text-only prompt is answered by a LLaVA worker (0 image tokens); the stop string ends the answer."""
    prompt = "USER: Say something. ASSISTANT:"
    status, chunks = _stream(cluster.small.url, _payload(SMALL, None, prompt=prompt, max_new_tokens=12))
    assert status == 200
    final = _check_answer(chunks, prompt)
    assert final["image_tokens"] == 0
    answer = final["text"][len(prompt):]
    assert answer, "empty answer"
    stop = answer.strip()[:1]
    _, chunks = _stream(cluster.small.url, _payload(SMALL, None, prompt=prompt, max_new_tokens=12, stop=stop))
    stopped = _check_answer(chunks, prompt)["text"][len(prompt):]
    assert stop not in stopped and answer.startswith(stopped)


@pytest.mark.slow  # the module's controller and two worker processes
def test_concurrent_requests_are_measured_apart(cluster, image_b64):
    """Requests generating at once on one worker (with and without an image), twice over: each gets its
    own image-token count and the greedy answer it gets alone (the vision tower runs one call at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    with_image, text_only = _payload(SMALL, image_b64), _payload(SMALL, None, prompt="USER: Hi ASSISTANT:")
    alone = {True: _stream(cluster.small.url, with_image)[1][-1], False: _stream(cluster.small.url, text_only)[1][-1]}
    bodies = [with_image, text_only, with_image, with_image]
    for _ in range(2):
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = [chunks[-1] for _, chunks in pool.map(lambda body: _stream(cluster.small.url, body), bodies)]
        assert [c["image_tokens"] for c in together] == [144, 0, 144, 144]
        assert [c["text"] for c in together] == [alone[bool(b["images"])]["text"] for b in bodies]
        assert all(c["finished"] for c in together)


# ---- Clients: upstream's test_message, ours, register_worker ---------------------------------------


@pytest.mark.slow  # the module's controller and two worker processes
def test_upstream_test_message_against_our_controller(cluster):
    """llava-torch 1.2.2.post1's own ``llava.serve.test_message`` gets the models, a worker and an answer."""
    python = UPSTREAM_VENV / "bin" / "python"
    if not python.exists():
        reason = f"upstream LLaVA venv not found ({python}); build it with `bash scripts/check_upstream_dropin.sh`"
        skip_or_fail_under_ci(reason, "CI builds it in .ci/run before pytest.")
    # From the venv and without PYTHONPATH, so this repository's llava/ cannot shadow upstream's.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-m", "llava.serve.test_message", "--controller-address", cluster.controller.url,
         "--model-name", SMALL, "--max-new-tokens", "8", "--message", "Tell me a story."],
        cwd=UPSTREAM_VENV, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"Models: {[PLAIN, SMALL]}" in result.stdout
    assert f"worker_addr: {cluster.small.url}" in result.stdout
    # It prints the prompt with the separator (" " in its default template) as line breaks, then the answer.
    assert "USER:\nTell\nme\na\nstory." in result.stdout


@pytest.mark.slow  # the module's controller and two worker processes
def test_our_test_message_prints_answer_and_measurements(cluster, tmp_path, capsys):
    """Ours, with an image: the worker it picked, the streamed answer and the 144-token measurement."""
    from llava.serve import test_message
    from llava.standins import make_images

    image = tmp_path / "shapes.png"
    make_images(1, size=(336, 336), seed=5)[0].save(image)
    argv = ["--controller-address", cluster.controller.url, "--model-name", SMALL, "--max-new-tokens", "8",
            "--message", "What is this?", "--image-file", str(image)]
    assert test_message.main(argv) == 0
    out = capsys.readouterr().out
    assert f"worker_addr: {cluster.small.url}" in out
    assert "144 image tokens" in out and "first token" in out
    assert test_message.main(["--controller-address", cluster.controller.url, "--model-name", "nope"]) == 1
    assert "no worker serves 'nope'" in capsys.readouterr().err


@pytest.mark.slow  # the module's controller and two worker processes
def test_register_worker_cli(cluster, capsys):
    """Upstream's manual registration: a running worker is taken, a dead address is refused with a reason."""
    from llava.serve import register_worker

    assert register_worker.main(["--controller-address", cluster.controller.url,
                                 "--worker-name", cluster.small.url, "--check-heart-beat"]) == 0
    dead = "http://127.0.0.1:9"  # the discard port: nothing answers there
    assert register_worker.main(["--controller-address", cluster.controller.url, "--worker-name", dead]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and dead in err
    assert SMALL in list_models(cluster.controller)


# ---- Bad input ---------------------------------------------------------------------------------------


def _big_png_b64() -> str:
    from PIL import Image

    return _png_b64(Image.new("RGB", (1200, 1000), (200, 30, 30)))  # 1.2 MP, over the plain worker's 1 MP


def _thin_png_b64() -> str:
    from PIL import Image

    return _png_b64(Image.new("RGB", (10_000, 1), (200, 30, 30)))  # 10 kP: padding to a square makes 100 MP


BAD_INPUTS = {
    "no image for <image>": ({"images": []}, "1 <image> tokens but 0 images"),
    "two images, one <image>": ({"images": ["IMG", "IMG"]}, "1 <image> tokens but 2 images"),
    "undecodable base64": ({"images": ["not base64 at all!"]}, "images[0] is not valid base64"),
    "base64 of no image": ({"images": [base64.b64encode(b"plain text").decode()]}, "not an image file"),
    "oversized image": ({"images": ["BIG"]}, "over the worker's limit of 1000000 (--max-image-pixels)"),
    "max_new_tokens 0": ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    "max_new_tokens text": ({"max_new_tokens": "many"}, "max_new_tokens must be an integer >= 1, got 'many'"),
    "max_new_tokens fraction": ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    "negative temperature": ({"temperature": -1}, "temperature must be in [0.0, 100.0], got -1"),
    "top_p 0": ({"top_p": 0}, "top_p must be in (0.0, 1.0], got 0"),
    "another model": ({"model": "llava-v1.5-13b"}, f"This worker serves '{PLAIN}', not 'llava-v1.5-13b'"),
    "empty prompt": ({"prompt": ""}, "prompt must be a non-empty string"),
    # Each field's wrong types, named; text that is not Unicode; headers announcing too many pixels.
    "model a number": ({"model": 7}, "model must be a string, got 7"),
    "images an object": ({"images": {}}, "images must be a list of base64 strings, got an empty object"),
    "images a falsy string": ({"images": ""}, "images must be a list of base64 strings, got ''"),
    "an image a number": ({"images": [7]}, "images[0] must be a string, got 7"),
    "temperature a string": ({"temperature": "0.5"}, "temperature must be a number, got '0.5'"),
    "top_p a list": ({"top_p": [1]}, "top_p must be a number, got a list of 1 item"),
    "stop a number": ({"stop": 7}, "stop must be a string, got 7"),
    "prompt a lone surrogate": ({"prompt": PROMPT + "\ud800"}, "prompt holds a lone surrogate ('\\ud800') at character 119"),
    "stop a lone surrogate": ({"stop": "\udfff"}, "stop holds a lone surrogate ('\\udfff') at character 0"),
    "prompt nested lists": ({"prompt": json.loads(nested_json(40))}, "prompt nests JSON deeper than 32 levels"),
    "header of 100000×100000 (Pillow's bomb error)": ({"images": [base64.b64encode(png_header(100_000, 100_000)).decode()]},
                                                      "images[0] is 100000×100000 = 10000000000 pixels, over the "
                                                      "worker's limit of 1000000 (--max-image-pixels)"),
    "header of 10000×10000 (Pillow's bomb warning)": ({"images": [base64.b64encode(png_header(10_000, 10_000)).decode()]},
                                                      "images[0] is 10000×10000 = 100000000 pixels, over the worker's"),
    "a truncated PNG": ({"images": ["CUT"]}, "images[0] (200 bytes) is not an image file PIL can read (Truncated"),
    "a thin image that pads to 100 MP": ({"images": ["THIN"]}, "images[0] is 10000×1, which this model's preprocessing "
                                         "(image_aspect_ratio 'pad') turns into 100000000 pixels, over the worker's "
                                         "limit of 1000000 (--max-image-pixels)"),
    "16 images over the context": ({"prompt": "USER: " + "<image>\n" * 16 + "Hi ASSISTANT:", "images": ["IMG"] * 16},
                                   "The 16 images take 9216 image tokens, which fills the model's context of 2048 "
                                   "tokens before any text"),
}


@pytest.mark.slow  # the module's controller and two worker processes
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_refused_before_generation(cluster, image_b64, case):
    """HTTP 400 and one error chunk naming the problem, at once, from the worker and through the relay."""
    overrides, message = BAD_INPUTS[case]
    images = overrides.get("images")
    if images:
        overrides = {**overrides, "images": [{"IMG": image_b64, "BIG": _big_png_b64(), "THIN": _thin_png_b64(),
                                     "CUT": base64.b64encode(base64.b64decode(image_b64)[:200]).decode()}.get(i, i)
                                    for i in images]}
    body = {**_payload(PLAIN, image_b64), **overrides}
    for url in (cluster.plain.url, cluster.controller.url):
        if url == cluster.controller.url and case == "another model":
            continue  # the controller routes by model: covered by the next test
        start = time.monotonic()
        status, chunks = _stream(url, body, timeout=30)
        assert time.monotonic() - start < 10
        assert status == 400 and len(chunks) == 1, chunks
        assert chunks[0]["error_code"] == 1 and message in chunks[0]["text"], chunks[0]["text"]


def _raw_body(**replace: str) -> bytes:
    """A valid text-only request for the plain worker as JSON text, with ``field: "raw JSON"`` spliced in."""
    body = json.dumps(_payload(PLAIN, None, prompt="USER: Hi ASSISTANT:"))
    for name, raw in replace.items():
        body = body.replace(f'"{name}": {json.dumps(_payload(PLAIN, None)[name])}', f'"{name}": {raw}')
        assert raw in body, name
    return body.encode()


RAW_BODIES = {
    "JSON nested 100000 deep": (nested_json(100_000), 400, "The request body nests JSON deeper than 32 levels"),
    "a field nested 100000 deep": (b'{"model": "x", "prompt": ' + nested_json(100_000) + b"}", 400,
                                   "The request body nests JSON deeper than 32 levels"),
    "NaN temperature": (_raw_body(temperature="NaN"), 400, "temperature must be a number, got NaN (which is not JSON"),
    "-Infinity top_p": (_raw_body(top_p="-Infinity"), 400, "top_p must be a number, got -Infinity"),
    "1e400 temperature": (_raw_body(temperature="1e400"), 400, "temperature must be a number, got 1e400 (beyond the"),
    "an integer of 5000 digits": (_raw_body(max_new_tokens="9" * 5000), 400,
                                  "max_new_tokens must be an integer >= 1, got an integer of 5000 digits"),
    "not UTF-8": (b'{"prompt": "\xff"}', 400, "The request body is not UTF-8 (byte 12 is 0xff)"),
    "empty": (b"", 400, "The request body is empty"),
    "a JSON list": (b"[]", 400, "The request body must be a JSON object, got an empty list"),
    "over --max-request-bytes": (_raw_body(stop=json.dumps("x" * PLAIN_MAX_REQUEST_BYTES)), 413,
                                 f"more than this server takes ({PLAIN_MAX_REQUEST_BYTES} bytes, --max-request-bytes)"),
}


@pytest.mark.slow  # the module's controller and two worker processes
@pytest.mark.parametrize("case", list(RAW_BODIES))
def test_unusable_body_refused_with_a_message(cluster, case):
    """A body the worker cannot use is a 4xx with one error chunk naming the field, never a 500: from the
    worker and from the relay (which checks bodies with the same layer before it forwards them)."""
    import requests

    raw, status, message = RAW_BODIES[case]
    for url in (cluster.plain.url, cluster.controller.url):
        start = time.monotonic()
        response = requests.post(url + "/worker_generate_stream", data=raw, timeout=30,
                                 headers={"Content-Type": "application/json"})
        assert time.monotonic() - start < 10
        chunks = [json.loads(c) for c in response.content.split(b"\0") if c]
        assert response.status_code == status and len(chunks) == 1, (url, response.status_code, response.content[:300])
        assert chunks[0]["error_code"] == 1 and message in chunks[0]["text"], chunks[0]["text"]
    assert cluster.plain.alive and cluster.controller.alive


@pytest.mark.slow  # the module's controller and two worker processes
def test_unknown_model_and_non_json_body(cluster):
    """The relay names the models it has; a worker refuses a body that is not JSON."""
    import requests

    status, chunks = _stream(cluster.controller.url, _payload("no-such-model", None, prompt="Hi"))
    assert status == 200 and chunks[0]["error_code"] == 2
    assert "No worker serves the model 'no-such-model'" in chunks[0]["text"] and SMALL in chunks[0]["text"]
    response = requests.post(cluster.plain.url + "/worker_generate_stream", data=b"{not json", timeout=10)
    assert response.status_code == 400
    chunk = json.loads(response.content.rstrip(b"\0"))
    assert chunk["error_code"] == 1 and "not JSON" in chunk["text"]


@pytest.mark.slow  # the module's controller and two worker processes
def test_prompt_longer_than_the_context(cluster, image_b64):
    """A prompt that leaves no room to answer gets an error chunk with the numbers, not a truncated answer."""
    prompt = "USER: <image>\n" + "one two three " * 800 + "ASSISTANT:"
    status, chunks = _stream(cluster.small.url, _payload(SMALL, image_b64, prompt=prompt))
    assert status == 200 and len(chunks) == 1 and chunks[0]["error_code"] == 1
    assert "144 image tokens, which fills the model's context of 2048 tokens" in chunks[0]["text"]


# ---- The controller's bodies, and workers that never answer -------------------------------------------

DEAD = "http://127.0.0.1:9"  # the discard port: nothing answers there
STATUS = {"model_names": ["probe-model"], "speed": 1, "queue_length": 0}


def _register(**changes: Any) -> bytes:
    return json.dumps({"worker_name": DEAD, "check_heart_beat": False, "worker_status": STATUS, **changes}).encode()


def _status(**changes: Any) -> bytes:
    return _register(worker_status={**STATUS, **changes})


QUEUE_BOUNDS = "queue_length must be an integer >= 0 and <= 2147483647"
REGISTRY_BODIES = {
    "worker_name not a URL": ("/register_worker", _register(worker_name="localhost:21002"),
                              "worker_name must be an http(s) URL such as http://localhost:21002"),
    "worker_name ftp": ("/register_worker", _register(worker_name="ftp://127.0.0.1:21002"), "worker_name must be an http"),
    "worker_name port 99999": ("/register_worker", _register(worker_name="http://127.0.0.1:99999"),
                               "worker_name must be an http(s) URL"),
    "worker_name a number": ("/register_worker", _register(worker_name=7), "worker_name must be a string, got 7"),
    "worker_name a lone surrogate": ("/register_worker", _register(worker_name=DEAD + "\ud800"),
                                     "worker_name holds a lone surrogate"),
    "worker_name missing": ("/register_worker", json.dumps({"check_heart_beat": True}).encode(),
                            "The JSON body lacks worker_name"),
    "check_heart_beat a string": ("/register_worker", _register(check_heart_beat="yes"),
                                  "check_heart_beat must be true or false, got 'yes'"),
    "worker_status a list": ("/register_worker", _register(worker_status=[]),
                             "worker_status must be a JSON object, got an empty list"),
    "model_names a string": ("/register_worker", _status(model_names="abc"),
                             "worker_status.model_names must be a list of strings, got 'abc'"),
    "model_names holding a number": ("/register_worker", _status(model_names=[7]),
                                     "worker_status.model_names[0] must be a non-empty string, got 7"),
    "speed a string": ("/register_worker", _status(speed="fast"), "worker_status.speed must be a number, got 'fast'"),
    "speed negative": ("/register_worker", _status(speed=-1), "worker_status.speed must be in [0.0, 1000000.0], got -1"),
    "queue_length a fraction": ("/register_worker", _status(queue_length=1.5), f"worker_status.{QUEUE_BOUNDS}, got 1.5"),
    "queue_length of 41 digits": ("/register_worker", _status(queue_length=10**40),
                                  f"worker_status.{QUEUE_BOUNDS}, got an integer of 41 digits"),
    "registration nested 10000 deep": ("/register_worker", nested_json(10_000), "nests JSON deeper than 32 levels"),
    "heartbeat worker_name a list": ("/receive_heart_beat", json.dumps({"worker_name": [DEAD], "queue_length": 0}).encode(),
                                     "worker_name must be a string, got a list of 1 item"),
    "heartbeat queue_length a string": ("/receive_heart_beat", json.dumps({"worker_name": DEAD, "queue_length": "3"}).encode(),
                                        f"{QUEUE_BOUNDS}, got '3'"),
    "heartbeat queue_length NaN": ("/receive_heart_beat", b'{"worker_name": "http://127.0.0.1:9", "queue_length": NaN}',
                                   f"{QUEUE_BOUNDS}, got NaN"),
    "heartbeat nested 10000 deep": ("/receive_heart_beat", nested_json(10_000), "nests JSON deeper than 32 levels"),
    "heartbeat of 100 kB": ("/receive_heart_beat", json.dumps({"worker_name": DEAD, "queue_length": 0,
                                                               "x": "x" * 100_000}).encode(),
                            "more than this server takes (65536 bytes, the controller's limit for this endpoint)"),
    "get_worker_address model a list": ("/get_worker_address", b'{"model": ["x"]}',
                                        "model must be a string, got a list of 1 item"),
    "get_worker_address model a lone surrogate": ("/get_worker_address", b'{"model": "\\ud800"}',
                                                  "model holds a lone surrogate ('\\ud800')"),
}


@pytest.mark.slow  # the module's controller and two worker processes
@pytest.mark.parametrize("case", list(REGISTRY_BODIES))
def test_controller_refuses_unusable_registry_bodies(cluster, case):
    """/register_worker, /receive_heart_beat and /get_worker_address: HTTP 400 whose detail names the field
    and the value, never a 500 and never a registration of a malformed worker."""
    import requests

    path, raw, message = REGISTRY_BODIES[case]
    response = requests.post(cluster.controller.url + path, data=raw, timeout=10)
    assert response.status_code == (413 if len(raw) > 65536 else 400), (response.status_code, response.text[:300])
    assert message in response.json()["detail"], response.json()
    assert list_models(cluster.controller) == [PLAIN, SMALL]


@pytest.fixture(scope="module")
def strict_controller(cluster, tmp_path_factory):
    """A second controller that gives up on silent workers after 2 s and reads bodies of up to 100 kB, with
    the cluster's 144-token worker registered by hand (no heartbeats: its own go to the cluster's controller)."""
    controller = start_controller(tmp_path_factory.mktemp("strict-controller"),
                                  extra_args=["--worker-timeout", "2", "--max-request-bytes", "100000"])
    try:
        assert _post(controller.url, "/register_worker", {"worker_name": cluster.small.url,
                                                          "check_heart_beat": False}) == {"registered": True}
        yield controller
    finally:
        controller.stop()


def _timed_stream(url: str, body: dict[str, Any]) -> tuple[float, int, list[dict[str, Any]]]:
    start = time.monotonic()
    status, chunks = _stream(url, body, timeout=60)
    return time.monotonic() - start, status, chunks


@pytest.mark.slow  # the module's controller and two worker processes
def test_workers_that_never_answer_are_dropped_and_hold_up_no_one(cluster, strict_controller):
    """Beside a real worker, workers that never answer: a dead port, a socket that accepts and hangs, one that
    trickles a byte a second, one whose status has the wrong types. A relay to a dead or hung one ends with
    error_code 3 and drops it, while a relay to the real worker is answered meanwhile; /refresh_all_workers
    answers within its 5 s deadline, drops the rest and keeps the real worker."""
    from concurrent.futures import ThreadPoolExecutor

    fakes = {kind: FakeWorker(kind) for kind in ("hang", "trickle", "garbage")}
    dead = f"http://127.0.0.1:{free_port()}"
    ghosts = {f"ghost-{kind}": url for kind, url in {**{k: f.url for k, f in fakes.items()}, "dead": dead}.items()}
    try:
        for model, url in ghosts.items():
            body = {"worker_name": url, "check_heart_beat": False,
                    "worker_status": {"model_names": [model], "speed": 1, "queue_length": 0}}
            assert _post(strict_controller.url, "/register_worker", body) == {"registered": True}
        assert list_models(strict_controller) == sorted([*ghosts, SMALL])
        with ThreadPoolExecutor(3) as pool:
            hung, refused, real = [pool.submit(_timed_stream, strict_controller.url, _payload(
                model, None, prompt="USER: Hi ASSISTANT:", max_new_tokens=4)) for model in ("ghost-hang", "ghost-dead", SMALL)]
        (hung_s, status, chunks), (_, refused_status, refused_chunks), (real_s, real_status, real_chunks) = (
            hung.result(), refused.result(), real.result())
        assert status == 200 and len(chunks) == 1 and chunks[0]["error_code"] == 3, chunks
        assert f"The worker {ghosts['ghost-hang']} for 'ghost-hang' did not answer (no answer within 2 s)" in chunks[0]["text"]
        assert 2 <= hung_s < 10
        assert refused_status == 200 and refused_chunks[0]["error_code"] == 3
        assert f"{dead} refused the connection and was dropped" in refused_chunks[0]["text"]
        assert real_status == 200 and real_chunks[-1]["finished"] and real_s < hung_s
        assert list_models(strict_controller) == ["ghost-garbage", "ghost-trickle", SMALL]
        start = time.monotonic()
        dropped = _post(strict_controller.url, "/refresh_all_workers")["dropped"]
        assert time.monotonic() - start < 8
        assert sorted(dropped) == sorted([fakes["trickle"].url, fakes["garbage"].url])
        assert list_models(strict_controller) == [SMALL]
    finally:
        for fake in fakes.values():
            fake.stop()


@pytest.mark.slow  # the module's controller and two worker processes
def test_relay_refuses_a_body_over_its_limit(strict_controller):
    """The relay reads at most --max-request-bytes of a body: beyond that HTTP 413 and one error chunk."""
    body = _payload(SMALL, None, prompt="USER: " + "x" * 200_000 + " ASSISTANT:")
    status, chunks = _stream(strict_controller.url, body, timeout=10)
    assert status == 413 and len(chunks) == 1 and chunks[0]["error_code"] == 1
    assert "more than this server takes (100000 bytes, --max-request-bytes)" in chunks[0]["text"]


# ---- Limits ------------------------------------------------------------------------------------------


@pytest.mark.slow  # the module's controller and two worker processes
def test_queue_then_answer_and_full_queue_refused(cluster):
    """One slot, one queue place: a second request waits (queue chunks at once) and is answered once the
    first client hangs up (its slot freed); a third is refused at once with 503, direct and via the controller."""
    import requests

    from llava.serve.protocol import ErrorCode, iter_chunks

    long_body = _payload(PLAIN, None, prompt="USER: Count. ASSISTANT:", max_new_tokens=1024, stop=None)
    url = "/worker_generate_stream"
    first = requests.post(cluster.plain.url + url, json=long_body, stream=True, timeout=(5, 60))
    second = requests.post(cluster.controller.url + url, json=long_body, stream=True, timeout=(5, 60))
    try:
        assert "queue_position" not in next(iter_chunks(first))  # generating
        waiting = iter_chunks(second)
        queued = next(waiting)
        assert queued["error_code"] == 0 and queued["queue_position"] == 1 and queued["finished"] is False
        for base in (cluster.plain.url, cluster.controller.url):
            start = time.monotonic()
            status, chunks = _stream(base, long_body, timeout=10)
            assert time.monotonic() - start < 3
            assert status == 503 and len(chunks) == 1
            assert chunks[0]["error_code"] == ErrorCode.WORKER_BUSY
            assert "busy" in chunks[0]["text"] and "--max-queued-requests 1" in chunks[0]["text"]
        first.close()  # the first client hangs up: its generation stops and the slot goes to the second
        answer = next(c for c in waiting if "queue_position" not in c)
        assert answer["error_code"] == 0 and answer["text"].startswith(long_body["prompt"])
        assert answer["queue_s"] > 0 and answer["output_tokens"] >= 1
    finally:
        first.close()
        second.close()
    _wait_for_queue_length(cluster.plain, 0, at_most=True)  # both generations stopped with their clients


def _wait_for_queue_length(worker: Service, length: int, timeout: float = 30, at_most: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = _post(worker.url, "/worker_get_status")["queue_length"]
        if (current <= length) if at_most else (current >= length):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{worker.name}'s queue_length stayed {current}, not {'<=' if at_most else '>='} {length}")


# ---- A worker lost mid-answer (last: it kills the uncompressed worker) ---------------------------------


@pytest.mark.slow  # the module's controller and two worker processes
def test_worker_killed_mid_stream(cluster):
    """The relay's client gets an error chunk saying the worker was lost; after the heartbeat expiry the
    controller lists the model no more, and the other worker keeps answering."""
    import requests

    from llava.serve.protocol import iter_chunks

    victim = cluster.plain
    body = _payload(PLAIN, None, prompt="USER: Count. ASSISTANT:", max_new_tokens=1024, stop=None)
    with requests.post(cluster.controller.url + "/worker_generate_stream", json=body, stream=True,
                       timeout=(5, 60)) as response:
        chunks = iter_chunks(response)
        first = next(chunks)
        assert first["error_code"] == 0 and not first["finished"]
        victim.kill()
        killed_at = time.monotonic()
        rest = list(chunks)
    assert rest and rest[-1]["error_code"] != 0, rest[-1:]
    assert "was lost mid-answer" in rest[-1]["text"] and victim.url in rest[-1]["text"]
    assert PLAIN in list_models(cluster.controller)  # still within its heartbeat expiry
    while PLAIN in list_models(cluster.controller):
        assert time.monotonic() - killed_at < EXPIRATION_S + 10, "the controller still lists the killed worker"
        time.sleep(0.2)
    assert time.monotonic() - killed_at >= 1.0  # dropped by the expiry, not at once
    assert _post(cluster.controller.url, "/get_worker_address", {"model": PLAIN}) == {"address": ""}
    status, chunks = _stream(cluster.controller.url, _payload(SMALL, None, prompt="USER: Hi ASSISTANT:"))
    assert status == 200 and chunks[-1]["finished"]


# ---- In-process: flags, compression switched on by flag, the admission gate ---------------------------


def test_worker_flags_match_upstream_and_bad_values_are_refused(capsys):
    """Upstream's flags and defaults parse; a bad limit exits with the parser's usage naming the flag."""
    _missing_or_fail(SERVE_PACKAGES)
    from llava.eval.vqa_common import parse_args
    from llava.serve import model_worker

    args = model_worker.build_parser().parse_args(["--multi-modal", "--no-register", "--load-8bit", "--use-flash-attn"])
    assert (args.host, args.port, args.worker_address, args.controller_address) == (
        "localhost", 21002, "http://localhost:21002", "http://localhost:21001")
    assert (args.model_path, args.limit_model_concurrency, args.stream_interval) == ("facebook/opt-350m", 5, 1)
    assert args.multi_modal and args.no_register and args.load_8bit and args.use_flash_attn
    with pytest.raises(SystemExit) as exit_info:
        parse_args(model_worker.build_parser(), ["--limit-model-concurrency", "0"], model_worker.check_args)
    assert exit_info.value.code == 2
    assert "--limit-model-concurrency must be at least 1, got 0" in capsys.readouterr().err
    for flags, message in ((["--max-request-bytes", "0"], "--max-request-bytes must be at least 1, got 0"),
                           (["--worker-address", "localhost:21002"], "--worker-address must be an http(s) URL"),
                           (["--controller-address", "ftp://c:1"], "--controller-address must be an http(s) URL")):
        with pytest.raises(SystemExit):
            parse_args(model_worker.build_parser(), flags, model_worker.check_args)
        assert message in capsys.readouterr().err
    parse_args(model_worker.build_parser(), ["--no-register", "--worker-address", "x"], model_worker.check_args)


def test_controller_flags_match_upstream_and_bad_values_are_refused(capsys):
    """Upstream's controller flags and defaults, ours beside them; a bad value exits naming the flag."""
    _missing_or_fail(SERVE_PACKAGES)
    from llava.serve import controller

    args = controller.build_parser().parse_args([])
    assert (args.host, args.port, args.dispatch_method) == ("localhost", 21001, "shortest_queue")
    assert (args.heart_beat_expiration, args.worker_timeout, args.max_request_bytes) == (30, 60, 64 * 2**20)
    for flag in ("--worker-timeout", "--max-request-bytes", "--heart-beat-expiration"):
        with pytest.raises(SystemExit) as exit_info:
            controller.main([flag, "0"])
        assert exit_info.value.code == 2 and f"{flag} must be > 0, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def worker_64(tiny_llava):
    """An in-process worker of the uncompressed checkpoint with --use-token-compression --compression-output-size 8."""
    _missing_or_fail(SERVE_PACKAGES)
    from llava.eval.vqa_common import parse_args
    from llava.serve import model_worker

    argv = ["--model-path", str(tiny_llava), "--device", "cpu", "--no-register", "--use-token-compression",
            "--compression-output-size", "8"]
    return model_worker.load_worker(parse_args(model_worker.build_parser(), argv, model_worker.check_args))


def test_compression_flags_switch_a_plain_checkpoint_to_64_tokens(worker_64, image_b64):
    """--use-token-compression --compression-output-size 8 on the uncompressed checkpoint: 64 image tokens
    measured, as llava.serve.cli takes the flags; the slot is free again after the answer."""
    worker = worker_64
    request = worker.parse(_payload(worker.model_name, image_b64, max_new_tokens=6))
    chunks = [json.loads(raw.rstrip(b"\0")) for raw in worker.stream(request, worker.admit())]
    final = _check_answer(chunks, PROMPT)
    assert final["image_tokens"] == 64 and worker.vision_tower.num_patches == 64
    deadline = time.monotonic() + 10
    while worker.gate.queue_length and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.gate.queue_length == 0


def test_images_are_decoded_only_inside_the_admitted_slot(worker_64, image_b64, monkeypatch):
    """Parsing reads each image's header (its size) and decodes no pixel; the request decodes its images one
    at a time once it holds a slot, so a queue of requests holds encoded files, not decoded images."""
    from PIL import ImageFile

    from llava.standins import make_images

    decoded = []
    load = ImageFile.ImageFile.load

    def counting_load(image):
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    prompt = "USER: <image>\n<image>\nWhat? ASSISTANT:"
    other = _png_b64(make_images(1, size=(50, 70))[0])
    request = worker_64.parse(_payload(worker_64.model_name, image_b64, prompt=prompt, max_new_tokens=2,
                                       images=[image_b64, other]))
    assert decoded == [] and [image.size for image in request.images] == [(400, 300), (50, 70)]
    chunks = [json.loads(raw.rstrip(b"\0")) for raw in worker_64.stream(request, worker_64.admit())]
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["image_tokens"] == 128
    assert list(dict.fromkeys(decoded)) == [(400, 300), (50, 70)]  # load() runs again on loaded images: a no-op


def test_corrupt_pixels_behind_a_valid_header_end_the_answer_in_its_slot(worker_64, image_b64):
    """A JPEG cut short passes the header checks (JPEG has no checksums to verify); decoding it in the slot
    fails, and the answer is one error chunk naming the image, as upstream's worker answers a failure."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB").save(buffer, format="JPEG")
    cut = base64.b64encode(buffer.getvalue()[: len(buffer.getvalue()) // 2]).decode()
    request = worker_64.parse(_payload(worker_64.model_name, cut))
    [chunk] = [json.loads(raw.rstrip(b"\0")) for raw in worker_64.stream(request, worker_64.admit())]
    assert chunk["error_code"] == 1
    assert "images[0] (JPEG, 400×300) could not be decoded: image file is truncated" in chunk["text"], chunk["text"]
    deadline = time.monotonic() + 10
    while worker_64.gate.queue_length and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker_64.gate.queue_length == 0


def test_admission_gate_order_and_refusal():
    """Slots first come first served, a bounded queue in order, a clear refusal beyond it; release is idempotent."""
    _missing_or_fail(SERVE_PACKAGES)
    from llava.serve.admission import AdmissionGate, QueueFull

    gate = AdmissionGate(limit=1, max_queued=2)
    first, second, third = gate.enter(), gate.enter(), gate.enter()
    assert first.granted and not second.granted and (gate.position(second), gate.position(third)) == (1, 2)
    with pytest.raises(QueueFull, match=r"1 requests are generating .* 2 are waiting .*--max-queued-requests"):
        gate.enter()
    gate.release(second)  # gave up while waiting
    assert gate.position(third) == 1 and gate.queue_length == 2
    gate.release(first)
    gate.release(first)
    assert gate.wait(third, 0) and gate.queue_length == 1
