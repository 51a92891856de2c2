"""``--compare-peers``: ToConv and its peers at each budget, measured in one run, interleaved round by round."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from benchmarks.environment import environment, load_average
from benchmarks.memory import count_bytes, peak_bytes
from benchmarks.models import build_llm, build_projector, default_cache_dir, load_tower
from benchmarks.peers import PeerMethod, PeerPipeline, build_methods, check_methods
from benchmarks.peers_report import add_ratios, build_peers_report, write_peers_outputs
from benchmarks.pipeline_measures import PipelineInputs, random_inputs, time_rounds
from benchmarks.presets import Preset, RunSettings
from benchmarks.report import preset_record
from benchmarks.timing import summarize, zero_stats

COMMAND = "python benchmarks/bench_compression.py"


def run_peers(args: argparse.Namespace, raw_argv: list[str], preset: Preset, settings: RunSettings,
              device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build the models once, measure every method at every budget and batch size, write the outputs."""
    torch.manual_seed(0)
    num_layers = preset.llm["num_hidden_layers"]
    started, load_start = time.perf_counter(), load_average()
    tower = load_tower(args.cache_dir or default_cache_dir(), args.vision_tower, preset.clip_overrides, device, dtype)
    grid = tower.tower_grid_size
    methods = build_methods(grid, tower.hidden_size, num_layers, device, dtype)
    check_methods(methods, num_layers)
    llm = build_llm(preset.llm, device, dtype)
    projector = build_projector(tower.hidden_size, llm.config.hidden_size, device, dtype)
    pipe = PeerPipeline(tower, projector, llm, device)
    s = settings
    rows = []
    with torch.inference_mode():
        for batch in s.batch_sizes:
            print(f"[bench] peers, batch {batch}: {len(methods)} methods × {s.warmup} + {s.repeats} rounds",
                  file=sys.stderr)
            inputs = random_inputs(pipe, batch, s.prompt_len, tower.config.image_size, dtype, seed=0)
            samples, kv_bytes = time_rounds(pipe, methods, inputs, s.decode_tokens, s.warmup, s.repeats)
            batch_rows = [method_row(pipe, m, inputs, samples[m.name], kv_bytes[m.name], s.decode_tokens, batch)
                          for m in methods]
            add_ratios(batch_rows)
            rows += batch_rows
    models = {"vision_tower_bytes": count_bytes(tower.vision_tower), "projector_bytes": count_bytes(projector),
              "llm_bytes": count_bytes(llm)}
    report = build_peers_report(
        " ".join([COMMAND, *raw_argv]), {**environment(device, dtype), "load_average_start": load_start},
        preset_record(args.preset, preset, args.vision_tower, settings), models, rows, device,
    )
    report["wall_seconds"] = time.perf_counter() - started
    write_peers_outputs(report, args.json, args.markdown, args.png)
    return report


def method_row(pipe: PeerPipeline, method: PeerMethod, inputs: PipelineInputs, samples: dict[str, list[float]],
               kv_bytes: int, decode_tokens: int, batch: int) -> dict[str, Any]:
    """One method at one budget and batch size: what it handed the LLM, its stage statistics and memory."""
    num_layers = pipe.llm.config.num_hidden_layers
    prompt_len = inputs.prefix_ids.shape[1] + inputs.suffix_ids.shape[1]
    peak = peak_bytes(lambda: pipe.generate(method, *inputs, decode_tokens), pipe.device)
    described = method.describe(num_layers, pipe.tower.tower_grid_size**2)
    reduction = summarize(samples["compressor"]) if method.reduce is not None else zero_stats(len(samples["ttft"]))
    return {
        "name": method.name, **described, "batch_size": batch, "prompt_len": prompt_len,
        "seq_len": prompt_len + described["image_tokens_to_llm"],
        "mean_seq_len_per_layer": prompt_len + described["mean_image_tokens_per_layer"],
        "vision_tower_ms": summarize(samples["vision_tower"]),
        "reduction_ms": reduction,
        "reduction_in_prefill": bool(method.stages),
        "projector_ms": summarize(samples["projector"]),
        "prefill_ms": summarize(samples["prefill"]),
        "first_token_sampling_ms": summarize(samples["first_token_sampling"]),
        "ttft_ms": summarize(samples["ttft"]),
        "ttft_ms_by_round": [seconds * 1e3 for seconds in samples["ttft"]],  # in round order, for per-round ratios
        "decode_ms_per_token": summarize([d / max(decode_tokens, 1) for d in samples["decode"]]),
        "kv_cache_bytes": kv_bytes,
        "peak_memory_bytes": peak,
    }
