"""Every measure of every variant at one batch size: stage times, TTFT, decode, KV cache, peak memory."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import torch

from benchmarks.memory import expected_cache_bytes, peak_bytes
from benchmarks.pipeline import Pipeline
from benchmarks.reducers import Variant
from benchmarks.timing import summarize, synchronize, zero_stats

logger = logging.getLogger(__name__)


STAGES = ("vision_tower", "compressor", "projector", "prefill", "first_token_sampling", "decode")


class PipelineInputs(NamedTuple):
    """Random images and a random prompt split around them, as ``Pipeline`` takes them."""

    images: torch.Tensor  # (B, 3, H, W)
    prefix_ids: torch.Tensor  # (B, prompt_len // 2)
    suffix_ids: torch.Tensor  # (B, prompt_len - prompt_len // 2)


def measure_pipeline(
    pipe: Pipeline, variants: list[Variant], batch: int, prompt_len: int, decode_tokens: int,
    warmup: int, repeats: int, image_size: int, dtype: torch.dtype, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Every measure for every variant at one batch size; variants interleaved round by round."""
    inputs = random_inputs(pipe, batch, prompt_len, image_size, dtype, seed)
    samples, kv_bytes = time_rounds(pipe, variants, inputs, decode_tokens, warmup, repeats)
    results = {
        v.name: variant_result(pipe, v, inputs, samples[v.name], kv_bytes[v.name], decode_tokens)
        for v in variants
    }
    add_speedups(results)
    return results


def random_inputs(
    pipe: Pipeline, batch: int, prompt_len: int, image_size: int, dtype: torch.dtype, seed: int,
) -> PipelineInputs:
    """Seeded random images and prompt token ids, on the pipeline's device."""
    device = pipe.device
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device=device, dtype=dtype)
    vocab = pipe.llm.config.vocab_size
    prefix_len = prompt_len // 2
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=generator).to(device)
    return PipelineInputs(images, ids[:, :prefix_len], ids[:, prefix_len:])


def time_rounds(
    pipe: Pipeline, variants: list[Variant], inputs: PipelineInputs, decode_tokens: int, warmup: int, repeats: int,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """Seconds per stage and TTFT of each variant over the measured rounds, and each one's KV-cache bytes."""
    samples = {v.name: {name: [] for name in (*STAGES, "ttft")} for v in variants}
    kv_bytes: dict[str, int] = {}
    for round_index in range(warmup + repeats):
        for v in variants:
            times, kv_bytes[v.name] = pipe.staged(v, *inputs, decode_tokens)
            ttft = time_ttft(pipe, v, inputs, times)
            if round_index >= warmup:
                for name, seconds in times.items():
                    samples[v.name][name].append(seconds)
                samples[v.name]["ttft"].append(ttft)
        logger.info("round %d/%d done", round_index + 1, warmup + repeats)
    return samples, kv_bytes


def time_ttft(pipe: Pipeline, variant: Variant, inputs: PipelineInputs, stage_times: dict[str, float]) -> float:
    """Seconds to the first token: a pass of its own (GPU), or the staged pass's stages up to it (CPU)."""
    if not separate_ttft_pass(pipe.device):
        return sum(stage_times[name] for name in STAGES[:-1])
    synchronize(pipe.device)
    start = time.perf_counter()
    pipe.first_token(variant, *inputs)
    synchronize(pipe.device)
    return time.perf_counter() - start


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


def variant_result(
    pipe: Pipeline, variant: Variant, inputs: PipelineInputs, samples: dict[str, list[float]], kv_bytes: int,
    decode_tokens: int,
) -> dict[str, Any]:
    """One variant's JSON record: its geometry, stage statistics, KV cache and peak memory."""
    batch, prompt_len = inputs.prefix_ids.shape[0], inputs.prefix_ids.shape[1] + inputs.suffix_ids.shape[1]
    seq_len = prompt_len + variant.output_grid**2
    dtype = inputs.images.dtype
    peak = peak_bytes(lambda: pipe.generate(variant, *inputs, decode_tokens), pipe.device)
    if variant.reducer is None:
        compressor_ms = zero_stats(len(samples["compressor"]))  # nothing to compress
    else:
        compressor_ms = summarize(samples["compressor"])
    return {
        **variant.describe(),
        "seq_len": seq_len,
        "vision_tower_ms": summarize(samples["vision_tower"]),
        "compressor_ms": compressor_ms,
        "projector_ms": summarize(samples["projector"]),
        "prefill_ms": summarize(samples["prefill"]),
        "first_token_sampling_ms": summarize(samples["first_token_sampling"]),
        "ttft_ms": summarize(samples["ttft"]),
        "decode_ms_per_token": summarize([d / max(decode_tokens, 1) for d in samples["decode"]]),
        "kv_cache_bytes": kv_bytes,
        "kv_cache_bytes_expected": expected_cache_bytes(pipe.llm.config, batch, seq_len, dtype),
        "peak_memory_bytes": peak,
    }


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
