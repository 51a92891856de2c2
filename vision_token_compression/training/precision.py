"""Mixed precision: the autocast dtype a ``--precision`` means on a device, and the fp16 loss scaler."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp16", "fp32"]


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None: fp32, no autocast).

    ``auto`` is bf16 on GPUs that support it, else fp16, and fp32 on CPU. bf16 also runs on CPU
    (CPU autocast); fp16 needs a GPU, where its loss scaler works.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs a GPU; use --precision bf16 or fp32 on {device}.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op for None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(enabled: bool):
    """Loss scaler for fp16 autocast on a GPU (a no-op when disabled); torch.amp's from torch 2.3 on."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)
