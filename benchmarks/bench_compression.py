"""What token compression buys in a LLaVA-1.5-shaped pipeline, measured side by side.

Builds the pipeline from the project's own pieces, with random weights at real shapes:
``CLIPVisionTower`` (a CLIP stand-in from ``build_clip_standin``, ``mm_vision_select_layer=-2``), a
token reducer, ``build_vision_projector`` (``mlp2x_gelu``) and transformers' ``LlamaForCausalLM``
fed ``inputs_embeds = [text prefix, image tokens, text suffix]``. For every variant (no
compression; ToConv 24→12 and 24→8, or 16→12 and 16→8 for the 224 tower; average pooling and a
plain ``nn.Conv2d`` at the same token counts) it measures the vision tower, the reducer, the
projector, the LLM prefill, time to first token (TTFT), decode ms/token, KV-cache bytes and peak
memory, as medians (with quartiles) after warm-up, the device synchronised around every timed
region. A microbenchmark times the compressor against a plain convolution of the same shape and
against the vision tower at the ViT-L/14-336 shape, and the tower's early stop at the selected
layer against the full 24-layer run.

    python benchmarks/bench_compression.py --preset tiny --json out.json         # CPU, < 2 min
    python benchmarks/bench_compression.py --preset llava-1.5-7b --json 7b.json  # one GPU

Writes JSON (every sample, the environment and the resolved settings), a markdown table and,
where matplotlib is installed (``pip install 'toconv-llava[bench]'``), a PNG chart.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from llava.model.multimodal_projector.builder import build_vision_projector
from vision_token_compression.models.geometry import ConvGeometry, choose_geometry
from vision_token_compression.models.token_compressor import TokenCompressor
from vision_token_compression.standins import CLIP_VISION_CONFIGS, build_clip_standin

logger = logging.getLogger("bench_compression")

SELECT_LAYER = -2
OUTPUT_GRIDS = (12, 8)
REDUCER_KINDS = ("toconv", "avgpool", "conv")

# Language-model shapes (LlamaConfig fields).
VICUNA_7B = dict(  # lmsys/vicuna-7b-v1.5, the LLM of LLaVA-1.5-7B
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
TINYLLAMA_1B = dict(  # TinyLlama/TinyLlama-1.1B (grouped-query attention, 4 KV heads)
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
TINY_LLM = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
MICRO_LLM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, vocab_size=1000, max_position_embeddings=2048, rms_norm_eps=1e-5,
)
# CLIP reductions (CLIPVisionConfig fields over the real config); image and patch size stay real,
# so the token grid (24×24 or 16×16) and every token count are the real ones.
TINY_CLIP = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4)
MICRO_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model shapes and measurement settings of one benchmark configuration.

    Args:
        description: One line for the report.
        llm: LlamaConfig fields of the language model.
        clip_overrides: CLIPVisionConfig fields replacing the real tower's (empty: the real shape).
        batch_sizes: Images (and prompts) per batch; one run per batch size.
        prompt_len: Text tokens around the image (half before it, half after).
        decode_tokens: Tokens generated after the first one, for decode ms/token.
        warmup: Rounds discarded before measuring.
        repeats: Measured rounds (medians and quartiles over these).
        micro_clip_overrides: CLIP reductions for the microbenchmark (empty: real ViT-L shape).
        micro_repeats: Rounds of the compressor-vs-convolution timing.
        micro_tower_repeats: Rounds of the vision-tower timing in the microbenchmark.
        threads: torch intra-op threads (None: torch's default). One thread keeps CPU timings stable on
            a shared machine, where a busy core stalls every multi-threaded op at its barrier.
    """

    description: str
    llm: dict
    clip_overrides: dict
    batch_sizes: tuple[int, ...]
    prompt_len: int
    decode_tokens: int
    warmup: int
    repeats: int
    micro_clip_overrides: dict
    micro_repeats: int
    micro_tower_repeats: int
    threads: int | None = None


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "test-sized: CLIP hidden 32 / 2 layers, Llama hidden 64 / 2 layers (plumbing only)",
        MICRO_LLM, MICRO_CLIP, (1,), 16, 2, 1, 2, MICRO_CLIP, 3, 2, threads=1,
    ),
    "tiny": Preset(
        "CPU-sized: CLIP at the real grid with hidden 256 (real 1024) and 4 layers (real 24); "
        "Llama hidden 512, 4 layers; microbenchmark at the real ViT-L/14-336 shape; one thread",
        TINY_LLM, TINY_CLIP, (1,), 64, 8, 1, 5, {}, 15, 3, threads=1,
    ),
    "small": Preset(
        "real CLIP ViT-L/14-336 with a TinyLlama-1.1B-shaped LLM: a workstation CPU (minutes) or a small GPU",
        TINYLLAMA_1B, {}, (1,), 64, 16, 1, 5, {}, 20, 3,
    ),
    "llava-1.5-7b": Preset(
        "LLaVA-1.5-7B shape: real CLIP ViT-L/14-336, mlp2x_gelu, Vicuna-7B-shaped Llama (for a GPU)",
        VICUNA_7B, {}, (8,), 64, 32, 3, 10, {}, 50, 10,
    ),
}


# ---------------------------------------------------------------- timing ---


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a clock read covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Median, quartiles and IQR (ms) of timed samples, with the samples themselves."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) == 1:
        q1 = med = q3 = ms[0]
    else:
        q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": ms[0], "n": len(ms), "samples": ms}


def zero_stats(n: int) -> dict[str, Any]:
    """Stats of a stage that does no work (the reducer of the uncompressed variant)."""
    return {"median": 0.0, "q1": 0.0, "q3": 0.0, "iqr": 0.0, "min": 0.0, "n": n, "samples": [0.0] * n}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved round by round (order rotated) so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)  # rotate, so no function always runs first (or after the same one)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


# ---------------------------------------------------------------- memory ---


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


# ---------------------------------------------------------------- models ---


class GridReducer(nn.Module):
    """Baseline token reducer: (B, in², C) → (B, out², C) by ``avg_pool2d`` or a plain ``nn.Conv2d``.

    Uses the compressor's own geometry (kernel, stride, padding), its token-to-grid layout (a
    channels-last view of the (B, N, C) tokens, no copy) and, for ``"conv"``, its weight layout
    (channels-last), so it differs from ``TokenCompressor`` only in the operation on the grid: the
    plain convolution is the best a user of an ``nn.Conv2d`` of that shape gets on these tokens,
    and ToConv / Conv2d measures the partial-convolution renormalisation alone.

    Args:
        kind: ``"avgpool"`` (``count_include_pad=False``) or ``"conv"`` (C→C, random init).
        geometry: Grid sizes, kernel, stride and padding.
        channels: Channels per token.
    """

    def __init__(self, kind: str, geometry: ConvGeometry, channels: int) -> None:
        super().__init__()
        if kind not in ("avgpool", "conv"):
            raise ValueError(f"GridReducer kind must be 'avgpool' or 'conv', got {kind!r}.")
        self.kind = kind
        self.geometry = geometry
        g = geometry
        self.conv = nn.Conv2d(channels, channels, g.kernel_size, g.stride, g.padding) if kind == "conv" else None
        if self.conv is not None:
            # Fair baseline: forward hands the conv a channels-last grid view, and TokenCompressor stores
            # its weight channels-last to match; a contiguous weight here would make oneDNN (CPU) convert
            # the whole (C, C, k, k) weight on every call, a cost of layout, not of the operation.
            self.conv.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.geometry.input_size
        grid = x.unflatten(1, (side, side)).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last view
        if self.conv is not None:
            out = self.conv(grid)  # (B, C, h, w)
        else:
            g = self.geometry
            out = F.avg_pool2d(grid, g.kernel_size, g.stride, g.padding, count_include_pad=False)  # (B, C, h, w)
        return out.flatten(2).transpose(1, 2)  # (B, h*w, C)


def build_reducer(kind: str, input_grid: int, output_grid: int, channels: int) -> nn.Module:
    """ToConv's ``TokenCompressor`` or a baseline of the same geometry."""
    if kind == "toconv":
        return TokenCompressor(input_grid, output_grid, channels)
    return GridReducer(kind, choose_geometry(input_grid, output_grid), channels)


@dataclasses.dataclass
class Variant:
    """One way of handing image tokens to the LLM."""

    name: str
    kind: str  # "none" or one of REDUCER_KINDS
    output_grid: int
    reducer: nn.Module | None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "output_grid": self.output_grid, "image_tokens": self.output_grid**2}
        if self.reducer is not None:
            g = self.reducer.geometry
            info.update(kernel=g.kernel_size, stride=g.stride, padding=g.padding)
        return info


def build_variants(input_grid: int, channels: int, device: torch.device, dtype: torch.dtype,
                   names: list[str] | None = None) -> list[Variant]:
    """No compression, then ToConv / average pooling / plain conv at 12×12 and 8×8."""
    variants = [Variant("none", "none", input_grid, None)]
    for out in OUTPUT_GRIDS:
        for kind in REDUCER_KINDS:
            variants.append(Variant(f"{kind}-{input_grid}to{out}", kind, out, None))
    if names:
        unknown = sorted(set(names) - {v.name for v in variants})
        if unknown:
            raise SystemExit(f"Unknown variants {unknown}; choose from {[v.name for v in variants]}.")
        variants = [v for v in variants if v.name in names or v.name == "none"]  # "none" is the reference
    for v in variants:
        if v.kind != "none":
            v.reducer = build_reducer(v.kind, input_grid, v.output_grid, channels).to(device=device, dtype=dtype).eval()
    return variants


def standin_dir(cache_dir: Path, tower: str, overrides: dict) -> Path:
    """Directory of the stand-in for ``tower`` with ``overrides`` (one per distinct shape)."""
    # e.g. hidden_size=256, num_hidden_layers=4 -> "-hs256-nhl4"
    tag = "".join(f"-{''.join(word[0] for word in k.split('_'))}{v}" for k, v in sorted(overrides.items()))
    return cache_dir / (tower.split("/")[-1] + tag)


def load_tower(
    cache_dir: Path, tower: str, overrides: dict, device: torch.device, dtype: torch.dtype,
) -> CLIPVisionTower:
    """A ``CLIPVisionTower`` (patch features of layer -2, no compression) on a random-weight stand-in."""
    path = build_clip_standin(tower, standin_dir(cache_dir, tower, overrides), **overrides)
    args = SimpleNamespace(mm_vision_select_layer=SELECT_LAYER, mm_vision_select_feature="patch")
    return CLIPVisionTower(str(path), args).to(device=device, dtype=dtype).eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llm(fields: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random-weight ``LlamaForCausalLM``, created directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**fields)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def count_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -------------------------------------------------------------- pipeline ---


class Pipeline:
    """Vision tower → reducer → projector → LLM, with the LLM's calling convention resolved once."""

    def __init__(self, tower: CLIPVisionTower, projector: nn.Module, llm: nn.Module, device: torch.device) -> None:
        import inspect

        self.tower, self.projector, self.llm, self.device = tower, projector, llm, device
        params = inspect.signature(llm.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.keep_arg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.embed = llm.get_input_embeddings()

    def prefill(self, prefix_ids: torch.Tensor, image_embeds: torch.Tensor, suffix_ids: torch.Tensor):
        """One LLM forward over [prefix, image, suffix] filling the KV cache; logits of the last position."""
        embeds = torch.cat([self.embed(prefix_ids), image_embeds, self.embed(suffix_ids)], dim=1)  # (B, T, D)
        kwargs = {self.keep_arg: 1} if self.keep_arg else {}
        return self.llm(inputs_embeds=embeds, use_cache=True, **kwargs)

    def step(self, token: torch.Tensor, cache: Any):
        return self.llm(input_ids=token, use_cache=True, **{self.cache_arg: cache})

    @staticmethod
    def cache_of(output: Any) -> Any:
        cache = getattr(output, "cache", None)
        return cache if cache is not None else output.past_key_values

    @staticmethod
    def sample(output: Any) -> torch.Tensor:
        """Greedy next token (B, 1)."""
        return output.logits[:, -1].argmax(dim=-1, keepdim=True)

    def reduce(self, variant: Variant, features: torch.Tensor) -> torch.Tensor:
        return features if variant.reducer is None else variant.reducer(features)

    def first_token(self, variant: Variant, images, prefix_ids, suffix_ids) -> tuple[torch.Tensor, Any]:
        """Images and prompt to the first generated token, no synchronisation in between (TTFT)."""
        features = self.tower(images)
        out = self.prefill(prefix_ids, self.projector(self.reduce(variant, features)), suffix_ids)
        return self.sample(out), self.cache_of(out)

    def decode(self, token: torch.Tensor, cache: Any, steps: int) -> torch.Tensor:
        for _ in range(steps):
            token = self.sample(self.step(token, cache))
        return token

    def generate(self, variant: Variant, images, prefix_ids, suffix_ids, steps: int) -> torch.Tensor:
        token, cache = self.first_token(variant, images, prefix_ids, suffix_ids)
        return self.decode(token, cache, steps)

    def staged(self, variant: Variant, images, prefix_ids, suffix_ids, steps: int) -> tuple[dict[str, float], int]:
        """One generation timed stage by stage (synchronised between stages): seconds per stage, KV-cache bytes."""
        times: dict[str, float] = {}
        clock = time.perf_counter

        def mark(name: str, start: float) -> float:
            synchronize(self.device)
            now = clock()
            times[name] = now - start
            return now

        synchronize(self.device)
        t = clock()
        features = self.tower(images)
        t = mark("vision_tower", t)
        tokens = self.reduce(variant, features)
        t = mark("compressor", t)
        image_embeds = self.projector(tokens)
        t = mark("projector", t)
        out = self.prefill(prefix_ids, image_embeds, suffix_ids)
        t = mark("prefill", t)
        token = self.sample(out)
        t = mark("first_token_sampling", t)
        cache = self.cache_of(out)
        kv_bytes = cache_bytes(cache)
        t = clock()
        self.decode(token, cache, steps)
        mark("decode", t)
        return times, kv_bytes


def separate_ttft_pass(device: torch.device) -> bool:
    """Time TTFT in a pass of its own where stage synchronisation would add idle gaps (GPUs).

    On a CPU every op has finished when it returns, so synchronising is a no-op and the staged
    pass's stages add up to an end-to-end TTFT of the same generation (saving a pass per round).
    """
    return device.type != "cpu"


def ttft_method(device: torch.device) -> str:
    if separate_ttft_pass(device):
        return "end-to-end pass without synchronisation between stages (separate from the staged pass)"
    return "sum of the stages of the staged pass (CPU: no device queue, so it is the end-to-end time)"


def measure_pipeline(
    pipe: Pipeline, variants: list[Variant], batch: int, prompt_len: int, decode_tokens: int,
    warmup: int, repeats: int, image_size: int, dtype: torch.dtype, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Every measure for every variant at one batch size; variants interleaved round by round."""
    device = pipe.device
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device=device, dtype=dtype)
    vocab = pipe.llm.config.vocab_size
    prefix_len = prompt_len // 2
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=generator).to(device)
    prefix_ids, suffix_ids = ids[:, :prefix_len], ids[:, prefix_len:]

    stages = ("vision_tower", "compressor", "projector", "prefill", "first_token_sampling", "decode")
    samples = {v.name: {name: [] for name in (*stages, "ttft")} for v in variants}
    kv: dict[str, int] = {}
    for round_index in range(warmup + repeats):
        for v in variants:
            times, kv[v.name] = pipe.staged(v, images, prefix_ids, suffix_ids, decode_tokens)
            if separate_ttft_pass(device):
                synchronize(device)
                start = time.perf_counter()
                pipe.first_token(v, images, prefix_ids, suffix_ids)
                synchronize(device)
                ttft = time.perf_counter() - start
            else:
                ttft = sum(times[name] for name in stages[:-1])
            if round_index >= warmup:
                for name, seconds in times.items():
                    samples[v.name][name].append(seconds)
                samples[v.name]["ttft"].append(ttft)
        logger.info("round %d/%d done", round_index + 1, warmup + repeats)

    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        s = samples[v.name]
        seq_len = prompt_len + v.output_grid**2
        peak = peak_bytes(lambda: pipe.generate(v, images, prefix_ids, suffix_ids, decode_tokens), device)
        results[v.name] = {
            **v.describe(),
            "seq_len": seq_len,
            "vision_tower_ms": summarize(s["vision_tower"]),
            "compressor_ms": summarize(s["compressor"]) if v.reducer is not None else zero_stats(repeats),
            "projector_ms": summarize(s["projector"]),
            "prefill_ms": summarize(s["prefill"]),
            "first_token_sampling_ms": summarize(s["first_token_sampling"]),
            "ttft_ms": summarize(s["ttft"]),
            "decode_ms_per_token": summarize([d / max(decode_tokens, 1) for d in s["decode"]]),
            "kv_cache_bytes": kv[v.name],
            "kv_cache_bytes_expected": expected_cache_bytes(pipe.llm.config, batch, seq_len, dtype),
            "peak_memory_bytes": peak,
        }
    add_speedups(results)
    return results


def add_speedups(results: dict[str, dict[str, Any]]) -> None:
    """Speed-ups against no compression, next to the ideal bound (ratio of sequence lengths)."""
    base = results["none"]
    for r in results.values():
        ideal = base["seq_len"] / r["seq_len"]
        ttft = base["ttft_ms"]["median"] / r["ttft_ms"]["median"]
        r["speedup"] = {
            "ttft": ttft,
            "prefill": base["prefill_ms"]["median"] / r["prefill_ms"]["median"],
            "decode": base["decode_ms_per_token"]["median"] / r["decode_ms_per_token"]["median"],
            "ideal_bound": ideal,
            "ttft_share_of_ideal": ttft / ideal,
            "kv_cache_saving": 1 - r["kv_cache_bytes"] / base["kv_cache_bytes"],
        }


# -------------------------------------------------------- microbenchmark ---


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of matmuls, convolutions and attention in ``fn`` (torch's FlopCounterMode; elementwise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def microbenchmark(
    tower: CLIPVisionTower, tower_name: str, overrides: dict, batch: int, device: torch.device,
    dtype: torch.dtype, repeats: int, tower_repeats: int,
) -> dict[str, Any]:
    """ToConv vs plain convolution (and average pooling), and vs the vision tower, at ``tower``'s shape.

    Also times the tower stopping at the selected layer (``CLIPVisionTower``) against the full run
    (``output_hidden_states`` over every layer, as upstream LLaVA does), checks they agree, and counts
    the FLOPs of each on the meta device (exact, immune to timing noise). Moves ``tower`` to the meta
    device at the end: it is not usable afterwards.
    """
    channels, grid, layers = tower.hidden_size, tower.tower_grid_size, tower.config.num_hidden_layers
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(batch, grid * grid, channels, generator=generator).to(device=device, dtype=dtype)
    size = tower.config.image_size
    images = torch.randn(batch, 3, size, size, generator=generator).to(device=device, dtype=dtype)

    def full_run(pixels: torch.Tensor) -> torch.Tensor:
        return tower.feature_select(tower.vision_tower(pixels, output_hidden_states=True))

    compressors: dict[str, Any] = {}
    with torch.inference_mode():
        identical = torch.equal(tower(images), full_run(images))  # also the warm-up of both
        tower_times = time_interleaved(
            {"selected": lambda: tower(images), "full": lambda: full_run(images)}, device, 0, tower_repeats,
        )
        tower_ms = {name: summarize(t) for name, t in tower_times.items()}
        for out in OUTPUT_GRIDS:
            # All three read the same (B, N, C) tokens through the same channels-last grid view, and ToConv
            # and the plain conv both hold channels-last weights (see GridReducer): the ratio is the
            # partial-convolution renormalisation alone.
            reducers = {kind: build_reducer(kind, grid, out, channels).to(device=device, dtype=dtype).eval()
                        for kind in REDUCER_KINDS}
            times = time_interleaved({k: (lambda r=r: r(features)) for k, r in reducers.items()},
                                     device, max(2, repeats // 5), repeats)
            ratios = [a / b for a, b in zip(times["toconv"], times["conv"])]
            toconv = statistics.median(times["toconv"])
            g = reducers["toconv"].geometry
            compressors[f"{grid}to{out}"] = {
                "kernel": g.kernel_size, "stride": g.stride, "padding": g.padding,
                **{f"{k}_ms": summarize(t) for k, t in times.items()},
                "toconv_over_conv": statistics.median(ratios),
                "toconv_over_conv_of_medians": toconv / statistics.median(times["conv"]),
                "toconv_pct_of_vision_tower": 100 * toconv * 1e3 / tower_ms["selected"]["median"],
            }

        # FLOPs on the meta device: shapes only, no compute, no memory.
        tower.to("meta")
        meta_images = torch.empty(batch, 3, size, size, device="meta", dtype=dtype)
        meta_features = torch.empty(batch, grid * grid, channels, device="meta", dtype=dtype)
        flops_selected = count_flops(lambda: tower(meta_images))
        flops_full = count_flops(lambda: full_run(meta_images))
        for name, c in compressors.items():
            meta_compressor = TokenCompressor(grid, int(name.split("to")[1]), channels).to(device="meta", dtype=dtype)
            c["toconv_flops"] = count_flops(lambda: meta_compressor(meta_features))
            c["toconv_flops_pct_of_vision_tower"] = 100 * c["toconv_flops"] / flops_selected

    return {
        "vision_tower": tower_name,
        "clip_overrides": overrides,
        "shape": {"batch": batch, "tokens": grid * grid, "channels": channels, "layers": layers},
        "timing_order": "rotated round by round; ratios are medians of per-round ratios",
        "compressors": compressors,
        "vision_tower_ms": tower_ms["selected"],
        "vision_tower_flops": flops_selected,
        "select_layer": {
            "mm_vision_select_layer": SELECT_LAYER,
            "layers_run": tower._layers_needed() or layers,
            "layers_total": layers,
            "full_run_ms": tower_ms["full"],
            "selected_run_ms": tower_ms["selected"],
            "saving": 1 - tower_ms["selected"]["median"] / tower_ms["full"]["median"],
            "full_run_flops": flops_full,
            "selected_run_flops": flops_selected,
            "flops_saving": 1 - flops_selected / flops_full,
            "features_identical": identical,
        },
    }


# ------------------------------------------------------------- reporting ---


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


def _fmt(stats: dict[str, Any]) -> str:
    med = stats["median"]
    if med == 0:
        return "–"
    digits = 2 if med < 10 else 1 if med < 100 else 0
    return f"{med:.{digits}f} ± {stats['iqr'] / 2:.{digits}f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (medians ± half the IQR)."""
    env, lines = report["environment"], []
    lines += [
        f"Device: **{env['device_name']}** ({env['device']}, {env['dtype']}, "
        f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}); "
        f"torch {env['torch']}, transformers {env['transformers']}.",
        f"Preset `{report['preset']['name']}`: {report['preset']['description']}.",
        f"Command: `{report['command']}`",
        "",
    ]
    for run in report["runs"]:
        lines += [
            f"Batch {run['batch_size']}, {run['prompt_len']} text tokens, {run['decode_tokens']} decoded tokens; "
            f"medians ± half the IQR over {report['preset']['repeats']} round(s) after "
            f"{report['preset']['warmup']} warm-up round(s).",
            "",
            "| variant | image tokens | seq len | vision tower ms | compressor ms | projector ms | prefill ms "
            "| TTFT ms | TTFT speed-up (ideal) | decode ms/token | KV cache MiB | peak MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in run["variants"].items():
            s = r["speedup"]
            lines.append(
                f"| {name} | {r['image_tokens']} | {r['seq_len']} | {_fmt(r['vision_tower_ms'])} | "
                f"{_fmt(r['compressor_ms'])} | {_fmt(r['projector_ms'])} | {_fmt(r['prefill_ms'])} | "
                f"{_fmt(r['ttft_ms'])} | {s['ttft']:.2f}× ({s['ideal_bound']:.2f}×) | "
                f"{_fmt(r['decode_ms_per_token'])} | {_mib(r['kv_cache_bytes'])} | {_mib(r['peak_memory_bytes'])} |"
            )
        lines.append("")
    micro = report.get("microbenchmark")
    if micro:
        shape = micro["shape"]
        lines += [
            f"Compressor microbenchmark at the {micro['vision_tower']} shape"
            f"{' (reduced: ' + str(micro['clip_overrides']) + ')' if micro['clip_overrides'] else ''}: "
            f"({shape['batch']}, {shape['tokens']}, {shape['channels']}) tokens; "
            f"vision tower {_fmt(micro['vision_tower_ms'])} ms, {micro['vision_tower_flops'] / 1e9:.1f} GFLOP.",
            "",
            "| compression | geometry | ToConv ms | plain Conv2d ms | avg pool ms | ToConv / Conv2d "
            "| ToConv % of tower time | ToConv % of tower FLOPs |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, c in micro["compressors"].items():
            lines.append(
                f"| {name} | k{c['kernel']} s{c['stride']} p{c['padding']} | {_fmt(c['toconv_ms'])} | "
                f"{_fmt(c['conv_ms'])} | {_fmt(c['avgpool_ms'])} | {c['toconv_over_conv']:.3f}× | "
                f"{c['toconv_pct_of_vision_tower']:.2f}% | {c['toconv_flops_pct_of_vision_tower']:.2f}% |"
            )
        sl = micro["select_layer"]
        lines += [
            "",
            f"Vision tower stopping at `mm_vision_select_layer={sl['mm_vision_select_layer']}`: runs "
            f"{sl['layers_run']} of {sl['layers_total']} layers, {_fmt(sl['selected_run_ms'])} ms against "
            f"{_fmt(sl['full_run_ms'])} ms for the full run: {100 * sl['saving']:.1f}% of the time and "
            f"{100 * sl['flops_saving']:.1f}% of the FLOPs saved; features identical: {sl['features_identical']}.",
            "",
        ]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """TTFT by stage and speed-up against its ideal bound, per variant; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 4.2 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        names = list(run["variants"])
        results = [run["variants"][n] for n in names]
        bottom = [0.0] * len(names)
        for stage in ("vision_tower", "compressor", "projector", "prefill"):
            heights = [r[f"{stage}_ms"]["median"] for r in results]
            row[0].bar(names, heights, bottom=bottom, label=stage.replace("_", " "))
            bottom = [b + h for b, h in zip(bottom, heights)]
        row[0].plot(names, [r["ttft_ms"]["median"] for r in results], "k_", markersize=22, label="TTFT (end to end)")
        row[0].set_ylabel("ms")
        row[0].set_title(f"Time to first token by stage, batch {run['batch_size']}")
        row[0].legend(fontsize=8)
        x = range(len(names))
        row[1].bar([i - 0.2 for i in x], [r["speedup"]["ttft"] for r in results], 0.4, label="TTFT speed-up")
        row[1].bar([i + 0.2 for i in x], [r["speedup"]["ideal_bound"] for r in results], 0.4,
                   label="ideal bound (sequence-length ratio)", alpha=0.5)
        row[1].set_xticks(list(x), names)
        row[1].set_ylabel("× vs no compression")
        row[1].set_title("Speed-up against its ideal bound")
        row[1].legend(fontsize=8)
        for ax in row:
            ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    fig.suptitle(f"{report['environment']['device_name']} · preset {report['preset']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------ main ---


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "toconv-llava" / "bench-standins"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--vision-tower", choices=sorted(CLIP_VISION_CONFIGS),
                        default="openai/clip-vit-large-patch14-336",
                        help="CLIP shape: the 336 tower (24×24 grid) or the 224 one (16×16)")
    parser.add_argument("--batch-size", type=int, nargs="+", help="one or more batch sizes (preset's by default)")
    parser.add_argument("--prompt-len", type=int, help="text tokens around the image")
    parser.add_argument("--decode-tokens", type=int, help="tokens decoded after the first")
    parser.add_argument("--warmup", type=int, help="discarded rounds")
    parser.add_argument("--repeats", type=int, help="measured rounds")
    parser.add_argument("--variants", nargs="+", help="subset of variants (no compression is always run)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                        help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: the preset's, else torch's)")
    parser.add_argument("--no-microbenchmark", action="store_true", help="skip the compressor/tower microbenchmark")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where CLIP stand-ins are saved and reused")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--markdown", type=Path, help="markdown table (default: next to --json)")
    parser.add_argument("--png", type=Path, help="chart (default: next to --json; needs matplotlib)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written as JSON/markdown/PNG."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    preset = PRESETS[args.preset]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    threads = args.threads or preset.threads
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run(args, raw_argv, preset, device, dtype)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace, raw_argv: list[str], preset: Preset, device: torch.device,
        dtype: torch.dtype) -> dict[str, Any]:
    """Build the models, measure every variant and the microbenchmark, write the outputs."""
    torch.manual_seed(0)
    cache_dir = args.cache_dir or default_cache_dir()
    batch_sizes = tuple(args.batch_size or preset.batch_sizes)
    prompt_len = args.prompt_len if args.prompt_len is not None else preset.prompt_len
    decode_tokens = args.decode_tokens if args.decode_tokens is not None else preset.decode_tokens
    warmup = args.warmup if args.warmup is not None else preset.warmup
    repeats = args.repeats if args.repeats is not None else preset.repeats
    if min(batch_sizes) < 1 or prompt_len < 2 or decode_tokens < 1 or warmup < 0 or repeats < 1:
        raise SystemExit(
            "Need batch sizes >= 1, --prompt-len >= 2, --decode-tokens >= 1, --warmup >= 0, --repeats >= 1."
        )

    started, load_start = time.perf_counter(), load_average()
    print(f"[bench] preset {args.preset} on {device} ({dtype}); CLIP stand-ins in {cache_dir}", file=sys.stderr)
    tower = load_tower(cache_dir, args.vision_tower, preset.clip_overrides, device, dtype)
    llm = build_llm(preset.llm, device, dtype)
    projector_config = SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=tower.hidden_size,
                                       hidden_size=llm.config.hidden_size)
    projector = build_vision_projector(projector_config).to(device=device, dtype=dtype).eval()
    variants = build_variants(tower.tower_grid_size, tower.hidden_size, device, dtype, args.variants)
    pipe = Pipeline(tower, projector, llm, device)

    runs = []
    with torch.inference_mode():
        for batch in batch_sizes:
            print(f"[bench] batch {batch}: {len(variants)} variants × {warmup} + {repeats} rounds", file=sys.stderr)
            variants_out = measure_pipeline(pipe, variants, batch, prompt_len, decode_tokens, warmup, repeats,
                                            tower.config.image_size, dtype)
            runs.append({"batch_size": batch, "prompt_len": prompt_len, "decode_tokens": decode_tokens,
                         "variants": variants_out})

    models = {"vision_tower_bytes": count_bytes(tower.vision_tower), "projector_bytes": count_bytes(projector),
              "llm_bytes": count_bytes(llm)}
    micro = None
    if not args.no_microbenchmark:
        micro_overrides = preset.micro_clip_overrides
        reduced_note = " (reduced)" if micro_overrides else ""
        print(f"[bench] microbenchmark at {args.vision_tower}{reduced_note}", file=sys.stderr)
        del pipe, llm, projector, variants
        if micro_overrides != preset.clip_overrides:
            del tower
            tower = load_tower(cache_dir, args.vision_tower, micro_overrides, device, dtype)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        micro = microbenchmark(tower, args.vision_tower, micro_overrides, batch_sizes[0], device, dtype,
                               preset.micro_repeats, preset.micro_tower_repeats)

    reduced = {k: (v, CLIP_VISION_CONFIGS[args.vision_tower][k]) for k, v in preset.clip_overrides.items()}
    notes = [
        "Random weights at the stated shapes; timings only (the outputs mean nothing).",
        "TTFT = vision tower + compressor + projector + text embedding + LLM prefill + greedy first token, "
        f"timed as the {ttft_method(device)}; stage columns come from a pass synchronised between stages.",
        "Ideal bound = sequence length without compression / with it (text + image tokens): the TTFT speed-up "
        "if all of TTFT were prefill and prefill scaled linearly with length.",
        f"Vision tower = CLIPVisionTower with mm_vision_select_layer={SELECT_LAYER}, which stops at that layer.",
        f"Peak memory: {peak_memory_measure(device)}.",
        "Baselines use the compressor's kernel/stride/padding and read the same tokens through the same "
        "channels-last grid view: avg pool with count_include_pad=False; plain nn.Conv2d (C→C) with a "
        "channels-last weight like ToConv's, without partial-conv renormalisation.",
    ]
    if reduced:
        notes.insert(1, "CLIP reduced from the real shape (value, real): " +
                     ", ".join(f"{k}={v} ({real})" for k, (v, real) in reduced.items()) +
                     "; image and patch size are real, so every token count is.")
    if device.type == "cpu":
        notes.append("CPU timings on a machine shared with other jobs are noisy; compare variants within one run "
                     "(they are interleaved round by round), not across runs.")
    report = {
        "schema": 1,
        "command": " ".join(["python", "benchmarks/bench_compression.py", *raw_argv]),
        "environment": {**environment(device, dtype), "load_average_start": load_start},
        "preset": {
            "name": args.preset, "description": preset.description, "vision_tower": args.vision_tower,
            "clip_overrides": preset.clip_overrides, "llm": preset.llm, "projector": "mlp2x_gelu",
            "mm_vision_select_layer": SELECT_LAYER, "batch_sizes": list(batch_sizes), "prompt_len": prompt_len,
            "decode_tokens": decode_tokens, "warmup": warmup, "repeats": repeats,
        },
        "models": models,
        "runs": runs,
        "microbenchmark": micro,
        "peak_memory_measure": peak_memory_measure(device),
        "ttft_method": ttft_method(device),
        "notes": notes,
        "wall_seconds": None,
    }
    report["wall_seconds"] = time.perf_counter() - started
    write_outputs(report, args)
    return report


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the markdown; write JSON, markdown and PNG where asked (or next to the JSON)."""
    text = markdown(report)
    print(text)
    md_path, png_path = args.markdown, args.png
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        md_path = md_path or args.json.with_suffix(".md")
        png_path = png_path or args.json.with_suffix(".png")
        print(f"[bench] wrote {args.json}", file=sys.stderr)
    if md_path:
        md_path.write_text(text)
        print(f"[bench] wrote {md_path}", file=sys.stderr)
    if png_path:
        if write_chart(report, png_path):
            print(f"[bench] wrote {png_path}", file=sys.stderr)
        else:
            print("[bench] no chart: matplotlib is not installed (pip install 'toconv-llava[bench]')", file=sys.stderr)


if __name__ == "__main__":
    main()
