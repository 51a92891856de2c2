"""A ``vllm serve`` process on 127.0.0.1 and a small OpenAI-API client, for the vLLM benchmark and tests.

The server runs in the vLLM venv (``scripts/build_vllm_venv.sh``; its python is found through
``$TOCONV_VLLM_VENV``, default ``/tmp/toconv-vllm-venv``) as its own process group, so stopping it
stops vLLM's engine-core and worker processes with it. The client is the standard library only (it
runs in any venv): one JSON POST, or a streamed chat completion timed to its first token.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

DEFAULT_VENV = "/tmp/toconv-vllm-venv"
# What every server here runs with on a CPU: float32 (token-exact comparisons), no graph capture or
# compilation (start-up time), and a KV cache of 256 MiB: 65,536 tokens of the stand-ins' decoder (2
# layers × 256 channels), sixteen 2,900-token anyres prompts at once; several servers fit in memory
# at once (vLLM's CPU default would take most of it). On a GPU, vLLM's own defaults.
CPU_KV_CACHE_BYTES = 256 * 2**20
CPU_SERVE_ARGS = ("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES))


def vllm_venv() -> Path:
    """The vLLM venv's folder: ``$TOCONV_VLLM_VENV`` or the default that ``build_vllm_venv.sh`` builds."""
    return Path(os.environ.get("TOCONV_VLLM_VENV", DEFAULT_VENV))


def vllm_python() -> Path:
    return vllm_venv() / "bin" / "python"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without PYTHONPATH (so no checkout shadows the venv's packages), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra or {})
    return env


class ServerStartError(RuntimeError):
    """``vllm serve`` exited or did not become healthy; the message holds the end of its log."""


@dataclass
class VllmServer:
    """``vllm serve MODEL`` on 127.0.0.1 at a free port, as a context manager.

    Args:
        model: Checkpoint folder.
        args: Extra ``vllm serve`` arguments (after ``CPU_SERVE_ARGS`` on a CPU).
        env: Extra environment variables.
        log_path: Where the server's output goes (default: ``server-<port>.log`` in the model's parent).
        startup_timeout: Seconds to wait for ``/health``.
        venv: The vLLM venv (default ``vllm_venv()``).
        cpu: Serve with ``CPU_SERVE_ARGS``; None: when the machine has no NVIDIA GPU (no ``nvidia-smi``).
    """

    model: Path
    args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    log_path: Path | None = None
    startup_timeout: float = 600.0
    venv: Path | None = None
    cpu: bool | None = None

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(self.log_path or Path(self.model).parent / f"server-{self.port}.log")
        self._process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def command(self) -> list[str]:
        vllm = Path(self.venv or vllm_venv()) / "bin" / "vllm"
        return [
            str(vllm), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
            *(CPU_SERVE_ARGS if self.on_cpu else ()), *self.args,
        ]

    @property
    def on_cpu(self) -> bool:
        return shutil.which("nvidia-smi") is None if self.cpu is None else self.cpu

    def start(self) -> Self:
        """Start the server (returns at once); ``wait`` blocks until it answers."""
        self._started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=subprocess_env(self.env), cwd=Path(self.model).parent, start_new_session=True,
            )
        return self

    def wait(self) -> Self:
        """Block until ``/health`` answers 200; ``ServerStartError`` if the server exits or times out."""
        deadline = self._started + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerStartError(
                    f"vllm serve {self.model} exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        self.startup_seconds = time.monotonic() - self._started
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(f"vllm serve {self.model} not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start().wait()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the client ------------------------------------------------------------------------------


def image_data_url(image) -> str:
    """A PIL image as the ``data:image/png;base64,...`` URL the OpenAI API takes in ``image_url``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_message(text: str, images: Sequence[Any]) -> list[dict[str, Any]]:
    """One user turn: the images (as base64 data URLs), then the text."""
    content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def served_model(url: str) -> str:
    """The model name the server answers to (``vllm serve PATH`` serves PATH)."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def chat_completion(url: str, body: Mapping[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """POST ``/v1/chat/completions``; the response as a dict. An HTTP error raises with the server's message."""
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{url} answered {err.code}: {err.read().decode(errors='replace')}") from err


@dataclass
class StreamTiming:
    """One streamed request: time to the first generated token, total time, token counts."""

    ttft_s: float
    latency_s: float
    prompt_tokens: int
    completion_tokens: int


def timed_stream(url: str, body: Mapping[str, Any], timeout: float = 300.0) -> StreamTiming:
    """A streamed chat completion, timed from sending the request to the first chunk carrying a generated token.

    Chunks carry their token ids (``return_token_ids``: a token may decode to no text yet, e.g. part of a
    UTF-8 character); the server sends usage in a last chunk (``stream_options.include_usage``).
    """
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        start = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {response.read().decode(errors='replace')}")
        first, usage = None, None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and any(choice.get("token_ids") for choice in chunk.get("choices", ())):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
        end = time.perf_counter()
    finally:
        connection.close()
    if first is None or usage is None:
        raise RuntimeError(f"{url} streamed no token or no usage for {body.get('model')}")
    return StreamTiming(first - start, end - start, usage["prompt_tokens"], usage["completion_tokens"])
