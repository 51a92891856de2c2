"""An adversarial probe of the controller's and a model worker's HTTP bodies (a script, not a test module).

``python tests/serve_probe.py [--json probe.json]`` builds the tiny LLaVA-1.5 stand-in (random weights,
576 image tokens), starts a controller and one worker on 127.0.0.1 (``serve_cluster``), sends every case
below and prints, per endpoint and per class, how many came back clean, then each unclean case.

A case is **clean** when the answer comes within ``ANSWER_TIMEOUT_S``, with a 4xx status, and its message
(the worker's error chunk ``text``, the controller's ``detail``) names the field that is wrong; for the
fault cases (workers that never answer) the check is the case's own. Everything runs on the CPU in about
a minute. ``tests/test_serve_api.py`` asserts the same classes case by case.

``python tests/serve_probe.py --memory`` measures instead how far three concurrent requests of sixteen
4096×4096 PNG images each raise a worker's peak RSS (Linux's VmHWM, reset just before), on the 576-token
stand-in and on the same checkpoint served at 64 tokens (``--use-token-compression
--compression-output-size 8``, where sixteen images fit the context and are answered), with five
generation slots (the default) and with one.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_cluster import (
    ROOT,
    FakeWorker,
    Service,
    free_port,
    list_models,
    nested_json,
    png_header,
    post_json,
    start_controller,
    start_worker,
    stop_all,
)

sys.path.insert(0, str(ROOT))  # run as a script, it builds the stand-ins with this checkout's llava, as the servers do

ANSWER_TIMEOUT_S = 15
MODEL = "llava-v1.5-tiny"
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
DEEP = 100_000  # nesting far beyond json's recursion limit
SURROGATE = "\ud800"


@dataclass
class Case:
    """One request: ``body`` is sent as JSON (``raw`` bytes when given), ``field`` must be named in the answer."""

    endpoint: str  # "controller /path" or "worker /path"
    name: str
    cls: str  # json, type, encoding, image, range
    field: str
    body: Any = None
    raw: bytes | None = None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def small_png() -> str:
    from llava.standins import make_images

    buffer = io.BytesIO()
    make_images(1, size=(64, 48), seed=1)[0].save(buffer, format="PNG")
    return b64(buffer.getvalue())


def thin_png(width: int) -> str:
    """A real PNG of ``width``×1 pixels (a few hundred bytes), base64."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, 1), (200, 30, 30)).save(buffer, format="PNG")
    return b64(buffer.getvalue())


WRONG_TYPES = {"bool": True, "int": 7, "float": 2.5, "list": ["x"], "object": {"a": 1}}


def generate_cases(endpoint: str, image: str) -> list[Case]:
    """``/worker_generate_stream`` bodies, sent to the worker or to the controller's relay."""
    base = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "top_p": 1.0, "max_new_tokens": 4, "stop": "</s>",
            "images": [image]}
    cases = []

    def add(name: str, cls: str, field: str, **changes) -> None:
        cases.append(Case(endpoint, name, cls, field, {**base, **changes}))

    for field in ("prompt", "temperature", "top_p", "max_new_tokens", "stop", "images"):
        for kind, value in WRONG_TYPES.items():
            if field in ("temperature", "top_p") and kind in ("int", "float"):
                continue
            if field == "max_new_tokens" and kind == "int":
                continue
            if field == "images" and kind == "list":
                value = [7]
            add(f"{field} {kind}", "type", field, **{field: value})
    add("images {} (falsy object)", "type", "images", images={})
    add("images '' (falsy string)", "type", "images", images="")
    add("images 0 (falsy number)", "type", "images", images=0)
    add("images [null]", "type", "images", images=[None])
    add("model int", "type", "model", model=7)
    add("model list", "type", "model", model=[MODEL])
    add("prompt missing", "type", "prompt", prompt=None)
    add("prompt lone surrogate", "encoding", "prompt", prompt=PROMPT + SURROGATE)
    add("stop lone surrogate", "encoding", "stop", stop=SURROGATE)
    add("model lone surrogate", "encoding", "model", model=MODEL + SURROGATE)
    add("prompt nested 200 deep", "json", "prompt", prompt=json.loads(nested_json(200)))
    add("temperature 1e400 (inf)", "range", "temperature", temperature=float("inf"))
    add("max_new_tokens 10**30", "range", "max_new_tokens", max_new_tokens=-(10 ** 30))
    add("image header 100000×100000 (Pillow's bomb error)", "image", "images[0]", images=[b64(png_header(100_000, 100_000))])
    add("image header 10000×10000 (Pillow's bomb warning)", "image", "images[0]", images=[b64(png_header(10_000, 10_000))])
    add("image header 65535×300 over the limit", "image", "images[0]", images=[b64(png_header(65_535, 300))])
    add("image 12000×1 (padding makes a 144 MP square)", "image", "images[0]", images=[thin_png(12_000)])
    raw = [
        ("body nested 100000 deep", "json", "body", nested_json(DEEP)),
        ("field nested 100000 deep", "json", "body", b'{"model": "m", "prompt": ' + nested_json(DEEP) + b"}"),
        ("body not UTF-8", "json", "body", b'{"prompt": "\xff\xfe"}'),
        ("NaN temperature", "json", "temperature", json.dumps(base).replace('"temperature": 0', '"temperature": NaN').encode()),
        ("Infinity top_p", "json", "top_p", json.dumps(base).replace('"top_p": 1.0', '"top_p": Infinity').encode()),
        ("integer of 5000 digits", "json", "max_new_tokens",
         json.dumps(base).replace('"max_new_tokens": 4', '"max_new_tokens": ' + "9" * 5000).encode()),
        ("body a list", "json", "body", b"[]"),
        ("body a string", "json", "body", b'"x"'),
        ("body empty", "json", "body", b""),
    ]
    cases += [Case(endpoint, name, cls, field, raw=data) for name, cls, field, data in raw]
    return cases


def registry_cases() -> list[Case]:
    """``/register_worker``, ``/receive_heart_beat`` and ``/get_worker_address`` bodies."""
    url = "http://127.0.0.1:9"
    status = {"model_names": ["probe-model"], "speed": 1, "queue_length": 0}
    register = {"worker_name": url, "check_heart_beat": False, "worker_status": status}
    cases = []

    def reg(name: str, cls: str, field: str, **changes) -> None:
        cases.append(Case("controller /register_worker", name, cls, field, {**register, **changes}))

    for kind, value in {**WRONG_TYPES, "null": None}.items():
        reg(f"worker_name {kind}", "type", "worker_name", worker_name=value)
        if kind != "bool":
            reg(f"check_heart_beat {kind}", "type", "check_heart_beat", check_heart_beat=value)
        if kind != "null":
            reg(f"worker_status {kind}", "type", "worker_status", worker_status=value)
        if kind != "list":  # ["x"] is a valid model_names
            reg(f"model_names {kind}", "type", "model_names", worker_status={**status, "model_names": value})
        if kind not in ("int", "float"):
            reg(f"speed {kind}", "type", "speed", worker_status={**status, "speed": value})
        if kind != "int":
            reg(f"queue_length {kind}", "type", "queue_length", worker_status={**status, "queue_length": value})
    for value in ("localhost:21002", "ftp://127.0.0.1:21002", "http://", "http://127.0.0.1:99999", "", "http://a b:1"):
        reg(f"worker_name {value!r}", "type", "worker_name", worker_name=value)
    reg("worker_name lone surrogate", "encoding", "worker_name", worker_name=url + SURROGATE)
    reg("model_names [7]", "type", "model_names", worker_status={**status, "model_names": [7]})
    reg("model_names 'abc' (a string)", "type", "model_names", worker_status={**status, "model_names": "abc"})
    reg("model_names lone surrogate", "encoding", "model_names", worker_status={**status, "model_names": [SURROGATE]})
    reg("speed -1", "range", "speed", worker_status={**status, "speed": -1})
    reg("speed 1e308", "range", "speed", worker_status={**status, "speed": 1e308})
    reg("queue_length -1", "range", "queue_length", worker_status={**status, "queue_length": -1})
    reg("queue_length 10**400", "range", "queue_length", worker_status={**status, "queue_length": 10 ** 400})
    reg("worker_name missing", "type", "worker_name", worker_name=None)
    beat = {"worker_name": url, "queue_length": 0}
    for kind, value in {**WRONG_TYPES, "null": None}.items():
        cases.append(Case("controller /receive_heart_beat", f"worker_name {kind}", "type", "worker_name",
                          {**beat, "worker_name": value}))
        if kind != "int":
            cases.append(Case("controller /receive_heart_beat", f"queue_length {kind}", "type", "queue_length",
                              {**beat, "queue_length": value}))
        cases.append(Case("controller /get_worker_address", f"model {kind}", "type", "model", {"model": value}))
    cases.append(Case("controller /receive_heart_beat", "worker_name lone surrogate", "encoding", "worker_name",
                      {**beat, "worker_name": url + SURROGATE}))
    cases.append(Case("controller /receive_heart_beat", "queue_length -5", "range", "queue_length",
                      {**beat, "queue_length": -5}))
    cases.append(Case("controller /get_worker_address", "model lone surrogate", "encoding", "model",
                      {"model": SURROGATE}))
    for endpoint, field in (("controller /register_worker", "worker_name"), ("controller /receive_heart_beat",
                            "worker_name"), ("controller /get_worker_address", "model")):
        cases.append(Case(endpoint, "body nested 100000 deep", "json", "body", raw=nested_json(DEEP)))
        cases.append(Case(endpoint, "body a list", "json", "body", raw=b"[]"))
        cases.append(Case(endpoint, "NaN", "json", field, raw=b'{"model": NaN, "worker_name": NaN, "queue_length": NaN}'))
    return cases


def send(case: Case, urls: dict[str, str]) -> tuple[bool, str]:
    """Send ``case``; (clean, what came back)."""
    import requests

    target, path = case.endpoint.split(" ")
    data = case.raw if case.raw is not None else json.dumps(case.body).encode()
    start = time.monotonic()
    try:
        response = requests.post(urls[target] + path, data=data, headers={"Content-Type": "application/json"},
                                 timeout=ANSWER_TIMEOUT_S)
        body = response.content
    except requests.exceptions.RequestException as err:
        return False, f"no answer after {time.monotonic() - start:.1f} s: {type(err).__name__}"
    message = body.decode("utf-8", "replace").rstrip("\0")
    try:
        data = json.loads(message)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("text") or data.get("detail"), str):
        message = data.get("text") or data.get("detail")
    clean = 400 <= response.status_code < 500 and case.field.split("[")[0] in message
    return clean, f"HTTP {response.status_code}: {message[:160]!r}"


# ---- Workers that never answer -------------------------------------------------------------------


def fault_cases(controller: Service, worker: Service) -> list[tuple[str, bool, str]]:
    """Register workers that never answer beside the real one; refresh and relay must still work."""
    import requests

    fakes = {name: FakeWorker(name) for name in ("hang", "trickle", "garbage")}
    dead = f"http://127.0.0.1:{free_port()}"
    results = []
    try:
        names = {**{k: f.url for k, f in fakes.items()}, "dead": dead}
        for kind, url in names.items():
            post_json(controller.url, "/register_worker", {"worker_name": url, "check_heart_beat": False,
                      "worker_status": {"model_names": [f"ghost-{kind}"], "speed": 1, "queue_length": 0}})
        # Relays to the silent workers, while a relay to the real worker must go on unhindered.
        outcome: dict[str, Any] = {}

        def relay(model: str) -> None:
            start = time.monotonic()
            body = {"model": model, "prompt": "USER: Hi ASSISTANT:", "max_new_tokens": 4, "temperature": 0}
            try:
                with requests.post(controller.url + "/worker_generate_stream", json=body, stream=True,
                                   timeout=(5, 90)) as response:
                    chunks = [json.loads(c) for c in response.iter_lines(delimiter=b"\0") if c]
                outcome[model] = (time.monotonic() - start, response.status_code, chunks[-1] if chunks else None)
            except (requests.exceptions.RequestException, ValueError) as err:
                outcome[model] = (time.monotonic() - start, None, repr(err))

        threads = [threading.Thread(target=relay, args=(m,)) for m in ("ghost-hang", "ghost-dead", MODEL)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        took, status, last = outcome.get(MODEL, (None, None, None))
        ok = status == 200 and isinstance(last, dict) and last.get("error_code") == 0 and took < 30
        results.append(("relay to the real worker while others hang", ok, f"{took and round(took, 1)} s, {status}"))
        for model in ("ghost-hang", "ghost-dead"):
            took, status, last = outcome.get(model, (None, None, None))
            ok = isinstance(last, dict) and last.get("error_code") == 3
            results.append((f"relay to {model} ends with error_code 3", ok, f"{took and round(took, 1)} s: {last}"))
            results.append((f"{model} dropped after its failed relay", model not in list_models(controller),
                            str(list_models(controller))))
        start = time.monotonic()
        try:
            response = requests.post(controller.url + "/refresh_all_workers", timeout=30)
            took, status = time.monotonic() - start, response.status_code
        except requests.exceptions.RequestException as err:
            took, status = time.monotonic() - start, repr(err)
        results.append(("refresh_all_workers answers within 15 s", status == 200 and took < 15,
                         f"{took:.1f} s, {status}"))
        models = list_models(controller)
        results.append(("refresh drops every silent or broken worker, keeps the real one",
                        MODEL in models and not any(m.startswith("ghost") for m in models), str(models)))
    finally:
        for fake in fakes.values():
            fake.stop()
    return results


def probe(workdir: Path) -> dict[str, Any]:
    from llava.standins import build_tiny_clip, build_tiny_llava

    clip = build_tiny_clip(workdir / "clip")
    checkpoint = build_tiny_llava(workdir / MODEL, clip)
    controller = start_controller(workdir / "logs", heart_beat_expiration=30)
    try:
        worker = start_worker(controller, checkpoint, MODEL)
        urls = {"controller": controller.url, "worker": worker.url}
        image = small_png()
        cases = [*generate_cases("worker /worker_generate_stream", image),
                 *generate_cases("controller /worker_generate_stream", image), *registry_cases()]
        rows = []
        for case in cases:
            clean, answer = send(case, urls)
            rows.append({"endpoint": case.endpoint, "case": case.name, "class": case.cls, "clean": clean,
                         "answer": answer})
        faults = fault_cases(controller, worker)
        rows += [{"endpoint": "faults", "case": name, "class": "fault", "clean": ok, "answer": detail}
                 for name, ok, detail in faults]
        alive = worker.alive and controller.alive
        return {"rows": rows, "services_alive": alive}
    finally:
        stop_all()


# ---- Memory: images decoded before or after admission ------------------------------------------------

COMPRESS_TO_64 = ["--use-token-compression", "--compression-output-size", "8"]
MEMORY_SCENARIOS = {"llava-v1.5-tiny-576": [], "llava-v1.5-tiny-64": COMPRESS_TO_64,
                    "llava-v1.5-tiny-64-one-slot": [*COMPRESS_TO_64, "--limit-model-concurrency", "1"]}


def _proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _concurrent(url: str, body: bytes, n: int) -> list[Any]:
    """``n`` requests of ``body`` at once; each one's (HTTP status, last error_code, end of its last text)."""
    import requests

    answers: list[Any] = [None] * n

    def ask(i: int) -> None:
        with requests.post(url + "/worker_generate_stream", data=body, timeout=(5, 300),
                           headers={"Content-Type": "application/json"}, stream=True) as response:
            chunks = [json.loads(c) for c in response.iter_lines(delimiter=b"\0") if c]
        answers[i] = (response.status_code, chunks[-1]["error_code"], chunks[-1]["text"][-100:])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def memory_probe(workdir: Path) -> list[dict[str, Any]]:
    """Peak RSS growth of a worker answering three concurrent requests of sixteen 4096×4096 images."""
    from llava.standins import build_tiny_clip, build_tiny_llava, make_images

    checkpoint = build_tiny_llava(workdir / MODEL, build_tiny_clip(workdir / "clip"))
    buffer = io.BytesIO()
    make_images(1, size=(4096, 4096), seed=2)[0].save(buffer, format="PNG")
    image = b64(buffer.getvalue())
    rows = []
    controller = start_controller(workdir / "logs", heart_beat_expiration=30)
    try:
        for name, extra in MEMORY_SCENARIOS.items():
            body = json.dumps({"model": name, "prompt": "USER: " + "<image>\n" * 16 + "Describe. ASSISTANT:",
                               "temperature": 0, "max_new_tokens": 4, "images": [image] * 16}).encode()
            worker = start_worker(controller, checkpoint, name, extra_args=extra)
            baseline = _proc_kib(worker.proc.pid, "VmRSS")
            Path(f"/proc/{worker.proc.pid}/clear_refs").write_text("5")  # VmHWM := the current RSS
            answers = _concurrent(worker.url, body, 3)
            peak = _proc_kib(worker.proc.pid, "VmHWM")
            rows.append({"worker": name, "flags": extra, "body_bytes": len(body),
                         "baseline_mib": round(baseline / 1024, 1), "peak_growth_mib": round((peak - baseline) / 1024, 1),
                         "answers": answers})
            worker.stop()
    finally:
        stop_all()
    return rows


def report(result: dict[str, Any], out: Callable[[str], None] = print) -> None:
    rows = result["rows"]
    for key in ("endpoint", "class"):
        total, clean = Counter(r[key] for r in rows), Counter(r[key] for r in rows if r["clean"])
        out(f"\nby {key}:")
        for name in sorted(total):
            out(f"  {name:45s} {clean[name]:4d} / {total[name]:4d} clean")
    out(f"\nall: {sum(r['clean'] for r in rows)} / {len(rows)} clean; services alive at the end: "
        f"{result['services_alive']}")
    unclean = [r for r in rows if not r["clean"]]
    if unclean:
        out("\nnot clean:")
        for r in unclean:
            out(f"  [{r['endpoint']}] {r['case']}: {r['answer']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="Also write every case's result here.")
    parser.add_argument("--memory", action="store_true", help="Measure the worker's peak RSS instead.")
    args = parser.parse_args(argv)
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="serve-probe-") as workdir:
            rows = memory_probe(Path(workdir))
        for row in rows:
            print(json.dumps(row))
        return 0
    with tempfile.TemporaryDirectory(prefix="serve-probe-") as workdir:
        result = probe(Path(workdir))
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(r["clean"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
