"""Where the benchmark ran: device, versions, threads, load average."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        name = f"{name} ({os.cpu_count()} logical CPUs)"
    return {
        "device": str(device), "device_name": name, "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "load_average_end": load_average(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (timings on a shared CPU are noisy)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
