"""Memory: peak bytes during a call (CUDA or torch's CPU allocator), KV-cache and weight bytes."""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.timing import synchronize


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, above what it held before.

    Read from torch's profiler (``profile_memory=True``): its allocation events carry the allocator's
    running total. Tensors allocated before ``fn`` (weights, inputs) are not counted; Python objects
    and library buffers outside torch's allocator (oneDNN scratch space, for instance) are not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # keep the profiler's start/stop lines out of the output
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [
        e["args"].get("Total Allocated", 0) for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    return max([0, *totals])


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before (weights excluded)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_peak_bytes(fn)


def peak_memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one generation, minus the bytes allocated before it (weights)"
    return (
        "torch CPU allocator peak during one generation above its level before (torch.profiler profile_memory); "
        "weights and inputs excluded, memory outside torch's allocator not seen"
    )


def cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """Key and value tensors of a transformers KV cache (5.x layers, 4.x key_cache lists, legacy tuples)."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            yield from (t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
    elif hasattr(cache, "key_cache"):
        yield from (t for t in (*cache.key_cache, *cache.value_cache) if isinstance(t, torch.Tensor))
    else:
        for layer in cache:
            yield from (t for t in layer if isinstance(t, torch.Tensor))


def cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


def expected_cache_bytes(config: Any, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """2 (K and V) × layers × batch × KV heads × tokens × head dim × bytes per element."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * batch * kv_heads * seq_len * head_dim * itemsize


def count_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
