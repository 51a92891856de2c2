"""Register a running model worker with a controller by hand (upstream's ``llava.serve.register_worker``).

``python -m llava.serve.register_worker --controller-address http://localhost:21001
--worker-name http://localhost:21002 [--check-heart-beat]``

The controller asks the worker for its status (``/worker_get_status``), so the worker must be running
at ``--worker-name``. Without ``--check-heart-beat`` the controller keeps it listed without heartbeats
(for workers started with ``--no-register``, which send none).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .deps import require
from .protocol import DEFAULT_CONTROLLER_ADDRESS, HEADERS

REGISTER_TIMEOUT_S = 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Register a model worker with a controller.")
    parser.add_argument("--controller-address", type=str, default=DEFAULT_CONTROLLER_ADDRESS)
    parser.add_argument("--worker-name", type=str, required=True, help="The worker's URL, e.g. http://localhost:21002.")
    parser.add_argument("--check-heart-beat", action="store_true",
                        help="Drop the worker when its heartbeats stop (only for workers that send them).")
    return parser


def register(controller_address: str, worker_name: str, check_heart_beat: bool) -> None:
    """POST ``/register_worker``; ``RuntimeError`` naming the controller's answer when it refuses."""
    requests = require("requests", "llava.serve.register_worker")
    url = controller_address.rstrip("/") + "/register_worker"
    data = {"worker_name": worker_name, "check_heart_beat": check_heart_beat, "worker_status": None}
    try:
        response = requests.post(url, json=data, headers=HEADERS, timeout=REGISTER_TIMEOUT_S)
    except requests.exceptions.RequestException as err:
        raise RuntimeError(f"Cannot reach the controller at {controller_address} ({err}); "
                           f"is it running there (--controller-address)?") from err
    if response.status_code != 200:
        raise RuntimeError(f"The controller at {controller_address} refused {worker_name}: HTTP "
                           f"{response.status_code} {response.text[:500]}. Is the worker running at that URL?")


def main(argv: Sequence[str] | None = None) -> int:
    """Register the worker; exit status 1 (and the reason on stderr) when it cannot be."""
    args = build_parser().parse_args(argv)
    try:
        register(args.controller_address, args.worker_name, args.check_heart_beat)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Registered {args.worker_name} with {args.controller_address}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
