"""Ask a model one question through the controller and print the streamed answer (upstream's client).

``python -m llava.serve.test_message --controller-address http://localhost:21001
--model-name llava-v1.5-7b --message "Describe the image." [--image-file view.jpg]``

As upstream's: refreshes the controller's workers, prints the models it lists and the worker it
picks for ``--model-name`` (or uses ``--worker-address`` directly), then streams the answer. Ours adds
``--image-file`` (sent as the conversation's image) and prints the worker's measurements at the end
(image tokens, time to first token, tokens/s).
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import default_conversation

from .deps import require
from .protocol import DEFAULT_CONTROLLER_ADDRESS, HEADERS, AnswerStats, ErrorCode, iter_chunks

STREAM_TIMEOUT_S = (10, 300)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Send one message to a model worker and print the answer.")
    parser.add_argument("--controller-address", type=str, default=DEFAULT_CONTROLLER_ADDRESS)
    parser.add_argument("--worker-address", type=str, default=None, help="Skip the controller: ask this worker.")
    parser.add_argument("--model-name", type=str, default="facebook/opt-350m")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--message", type=str, default="Tell me a story with more than 1000 words.")
    parser.add_argument("--image-file", type=str, default=None, help="An image to ask about (ours).")
    return parser


def find_worker(requests, controller_address: str, model_name: str) -> str:
    """The worker address the controller gives for ``model_name`` (``""`` when none serves it)."""
    requests.post(controller_address + "/refresh_all_workers", headers=HEADERS, timeout=60)
    models = sorted(requests.post(controller_address + "/list_models", headers=HEADERS, timeout=10).json()["models"])
    print(f"Models: {models}")
    response = requests.post(controller_address + "/get_worker_address", json={"model": model_name},
                             headers=HEADERS, timeout=10)
    address = response.json()["address"]
    print(f"worker_addr: {address}")
    return address


def build_payload(args: argparse.Namespace) -> tuple[dict, str]:
    """The ``/worker_generate_stream`` body for the message, and the conversation's separator."""
    conv = default_conversation.copy()
    message, images = args.message, []
    if args.image_file:
        with open(args.image_file, "rb") as f:
            images = [base64.b64encode(f.read()).decode()]
        message = DEFAULT_IMAGE_TOKEN + "\n" + message
    conv.append_message(conv.roles[0], message)
    conv.append_message(conv.roles[1], None)
    payload = {"model": args.model_name, "prompt": conv.get_prompt(), "max_new_tokens": args.max_new_tokens,
               "temperature": 0.7, "stop": conv.sep, "images": images}
    return payload, conv.sep


def main(argv: Sequence[str] | None = None) -> int:
    """Stream one answer to stdout; exit status 1 when no worker serves the model or the worker fails."""
    args = build_parser().parse_args(argv)
    requests = require("requests", "llava.serve.test_message")
    address = args.worker_address or find_worker(requests, args.controller_address.rstrip("/"), args.model_name)
    if not address:
        print(f"error: no worker serves {args.model_name!r}; start one, or pass a listed --model-name.",
              file=sys.stderr)
        return 1
    payload, sep = build_payload(args)
    print(payload["prompt"].replace(sep, "\n"), end="")
    answer, last = "", {}
    with requests.post(address + "/worker_generate_stream", headers=HEADERS, json=payload, stream=True,
                       timeout=STREAM_TIMEOUT_S) as response:
        for last in iter_chunks(response):
            if last.get("error_code", 0) != ErrorCode.OK:
                print(f"\nerror: {last['text']}", file=sys.stderr)
                return 1
            if "queue_position" in last:
                continue
            text = last["text"][len(payload["prompt"]):]
            if text.startswith(answer):  # a trailing stop string may be cut off again later
                print(text[len(answer):], end="", flush=True)
                answer = text
    print()
    print(f"[{AnswerStats.from_chunk(last).describe()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
