"""Start the web demo's controller and model workers as real processes on 127.0.0.1, for tests.

Used by ``tests/test_serve_api.py`` and the Gradio page's browser test; registered in ``tests/conftest.py``
(one import) so that a failing test's report shows the tail of every running service's log.

API (stdlib only, so importing it never needs the ``serve`` extra)::

    controller = start_controller(tmp_path, heart_beat_expiration=3.0)
    plain = start_worker(controller, tiny_llava, "llava-v1.5-tiny", wait=False)
    small = start_worker(controller, tiny_llava_compressed, "llava-v1.5-tiny-toconv12", wait=False,
                         extra_args=["--limit-model-concurrency", "1"])
    wait_for_models(controller, ["llava-v1.5-tiny", "llava-v1.5-tiny-toconv12"])
    post_json(controller.url, "/list_models")        # -> {"models": [...]}
    plain.kill()                                      # SIGKILL its process group (a crash)
    controller.stop()                                 # SIGTERM, then SIGKILL after a grace period

- ``start_controller(log_dir, heart_beat_expiration=30.0, extra_args=())`` → ``Service``, once it answers.
- ``start_worker(controller, model_path, model_name, log_dir=None, extra_args=(), heart_beat_interval=1.0,
  wait=True)`` → ``Service``; with ``wait`` it returns once the controller lists ``model_name``. Workers run
  on the CPU (``--device cpu``) unless ``extra_args`` names a device.
- ``wait_for_models(controller, names, timeout=180)`` / ``wait_until_unlisted(controller, name, timeout=30)``.
- ``Service``: ``.name``, ``.url``, ``.proc`` (``subprocess.Popen``), ``.log_path``, ``.kill()``, ``.stop()``,
  ``.log_tail()``. Every service runs in its own process group (``start_new_session``), logging to
  ``<log_dir>/<name>.log``; a service that exits while being waited for raises with its log tail.
- ``stop_all()``: stop every service still running (for fixture teardown).
- Workers that never answer, to register beside real ones: ``FakeWorker("hang" | "trickle" | "garbage")``
  listens on 127.0.0.1 (``.url``; ``.stop()``); see its docstring.
- Bad bodies: ``png_header(width, height)`` is a PNG file announcing any size (no real pixels);
  ``nested_json(depth)`` is ``[[...]]`` nested ``depth`` deep.
- Another service (the Gradio page): ``start_service(name, module, args, port, log_dir)`` runs
  ``python -m module *args`` the same way, and ``wait_until(service, ready, what, timeout)`` polls
  ``ready()`` (``_spawn`` and ``_wait`` are the same functions under their first names).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 5.0
LOG_TAIL_CHARS = 6000

_services: list[Service] = []  # started and not yet stopped: their logs go into failing tests' reports


@dataclass
class Service:
    """A controller or worker process."""

    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    _log_file: Any = field(repr=False, default=None)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would; the log stays in failing tests' reports."""
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=STOP_GRACE_S)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``STOP_GRACE_S``; closes the log."""
        if self.alive:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait(timeout=STOP_GRACE_S)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self in _services:
            _services.remove(self)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return text[-chars:]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, path: str, data: dict | None = None, timeout: float = 10) -> Any:
    """POST ``data`` as JSON to ``url + path``; the JSON answer."""
    body = json.dumps(data or {}).encode()
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def start_service(name: str, module: str, args: Sequence[str], port: int, log_dir: Path) -> Service:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "w")  # noqa: SIM115 (closed by Service.stop)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # several processes share the machine's cores
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    service = Service(name, f"http://127.0.0.1:{port}", proc, log_path, log_file)
    _services.append(service)
    return service


def wait_until(service: Service, ready, what: str, timeout: float) -> None:
    """Poll ``ready()`` until true; an error with the service's log if it exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive:
            raise RuntimeError(f"{service.name} exited with {service.proc.returncode} before {what}; its log "
                               f"({service.log_path}):\n{service.log_tail()}")
        try:
            if ready():
                return
        except (OSError, ValueError):  # not listening yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{service.name} did not reach '{what}' within {timeout} s; its log ({service.log_path}):\n"
                       f"{service.log_tail()}")


def start_controller(log_dir: Path, heart_beat_expiration: float = 30.0, extra_args: Sequence[str] = (),
                     timeout: float = 60) -> Service:
    """``python -m llava.serve.controller`` on a free port; returns once it answers ``/list_models``."""
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--heart-beat-expiration", str(heart_beat_expiration),
            *extra_args]
    service = start_service(f"controller-{port}", "llava.serve.controller", args, port, log_dir)
    wait_until(service, lambda: post_json(service.url, "/list_models", timeout=2) is not None, "answering", timeout)
    return service


def start_worker(controller: Service, model_path: str | Path, model_name: str, log_dir: Path | None = None,
                 extra_args: Sequence[str] = (), heart_beat_interval: float = 1.0, wait: bool = True,
                 timeout: float = 180) -> Service:
    """``python -m llava.serve.model_worker`` for ``model_path`` on a free port, registered with ``controller``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--host", "127.0.0.1", "--port", str(port), "--worker-address", url,
            "--controller-address", controller.url, "--model-path", str(model_path), "--model-name", model_name,
            "--heart-beat-interval", str(heart_beat_interval), *extra_args]
    if "--device" not in extra_args:
        args += ["--device", "cpu"]
    service = start_service(f"worker-{model_name}-{port}", "llava.serve.model_worker", args, port,
                     log_dir or controller.log_path.parent)
    if wait:
        wait_for_models(controller, [model_name], timeout=timeout, workers=[service])
    return service


def list_models(controller: Service) -> list[str]:
    return post_json(controller.url, "/list_models", timeout=5)["models"]


def wait_for_models(controller: Service, names: Sequence[str], timeout: float = 180,
                    workers: Sequence[Service] | None = None) -> list[str]:
    """Wait until the controller lists every one of ``names``; fails early if a worker (or it) exits."""
    watched = [controller, *(s for s in (workers if workers is not None else _services) if s is not controller)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in watched:
            if not service.alive and service.proc.returncode != -signal.SIGKILL:
                raise RuntimeError(f"{service.name} exited with {service.proc.returncode} while waiting for "
                                   f"{list(names)}; its log ({service.log_path}):\n{service.log_tail()}")
        try:
            models = list_models(controller)
            if set(names) <= set(models):
                return models
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    logs = "\n".join(f"--- {s.name} ({s.log_path}):\n{s.log_tail(2000)}" for s in watched)
    raise TimeoutError(f"The controller did not list {list(names)} within {timeout} s.\n{logs}")


def wait_until_unlisted(controller: Service, name: str, timeout: float = 30) -> float:
    """Wait until the controller no longer lists ``name``; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if name not in list_models(controller):
            return time.monotonic() - start
        time.sleep(0.2)
    raise TimeoutError(f"The controller still lists {name!r} after {timeout} s.\n{controller.log_tail(3000)}")


def png_header(width: int, height: int) -> bytes:
    """A PNG file whose header announces ``width``×``height`` (its pixel data is one empty IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")



def nested_json(depth: int) -> bytes:
    """``[[...]]`` nested ``depth`` deep (far beyond Python's recursion limit for a large ``depth``)."""
    return b"[" * depth + b"]" * depth



class FakeWorker:
    """A worker address on 127.0.0.1 that accepts connections and then, by ``behaviour``: ``hang`` (reads
    the request, never answers), ``trickle`` (HTTP headers, then one body byte a second, for ever) or
    ``garbage`` (answers at once with a ``/worker_get_status`` of the wrong types)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            if self.behaviour == "garbage":
                body = json.dumps({"model_names": 7, "speed": "fast", "queue_length": "x"}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                return
            if self.behaviour == "trickle":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            while not self.stopped.wait(1.0):
                if self.behaviour == "trickle":
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        return

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()


def stop_all() -> None:
    """Stop every service started here and not yet stopped."""
    for service in list(_services):
        service.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report gets the log tail of every service still registered here."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _services:
        for service in _services:
            state = "running" if service.alive else f"exited {service.proc.returncode}"
            report.sections.append((f"serve log: {service.name} ({state}, {service.log_path})",
                                    service.log_tail(3000)))
