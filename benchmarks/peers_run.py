"""``--compare-peers``: ToConv and its peers at each budget, measured in one run, interleaved round by round."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from typing import Any

import torch

from benchmarks.anyres import check_args
from benchmarks.environment import environment, load_average
from benchmarks.memory import count_bytes, peak_bytes
from benchmarks.models import build_llm, build_projector, default_cache_dir, load_tower
from benchmarks.peers import PEER_METHODS, PeerMethod, PeerPipeline, build_methods, check_methods, unavailable
from benchmarks.peers_anyres import AnyresImage, anyres_image, anyres_inputs, image_tiling
from benchmarks.peers_report import add_ratios, build_peers_report, write_peers_outputs
from benchmarks.pipeline_measures import PipelineInputs, random_inputs, time_rounds
from benchmarks.presets import Preset, RunSettings
from benchmarks.report import preset_record
from benchmarks.timing import summarize, zero_stats
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

COMMAND = "python benchmarks/bench_compression.py"
logger = logging.getLogger(__name__)


def run_peers(args: argparse.Namespace, raw_argv: list[str], preset: Preset, settings: RunSettings,
              device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build the models once, measure every method at every budget, batch size (and image size), write the outputs."""
    torch.manual_seed(0)
    num_layers = preset.llm["num_hidden_layers"]
    started, load_start = time.perf_counter(), load_average()
    if preset.anyres is not None:
        check_args(args)
    tower = load_tower(args.cache_dir or default_cache_dir(), args.vision_tower, preset.clip_overrides, device, dtype)
    cases = method_cases(tower, preset, device, dtype)
    not_run = methods_not_run(cases, num_layers, preset.anyres is not None)
    for _image, methods in cases:
        check_methods(methods, num_layers)
    llm = build_llm(preset.llm, device, dtype)
    projector = build_projector(tower.hidden_size, llm.config.hidden_size, device, dtype)
    pipe = PeerPipeline(tower, projector, llm, device)
    rows = []
    with torch.inference_mode():
        for batch in settings.batch_sizes:
            for image, methods in cases:
                rows += measure_methods(pipe, methods, settings, batch, image)
    models = {"vision_tower_bytes": count_bytes(tower.vision_tower), "projector_bytes": count_bytes(projector),
              "llm_bytes": count_bytes(llm)}
    report = build_peers_report(
        " ".join([COMMAND, *raw_argv]), {**environment(device, dtype), "load_average_start": load_start},
        {**preset_record(args.preset, preset, args.vision_tower, settings),
         "anyres": None if preset.anyres is None else dataclasses.asdict(preset.anyres)}, models, rows, device,
        not_run,
    )
    report["wall_seconds"] = time.perf_counter() - started
    write_peers_outputs(report, args.json, args.markdown, args.png)
    return report


def method_cases(tower: CLIPVisionTower, preset: Preset, device: torch.device,
                 dtype: torch.dtype) -> list[tuple[AnyresImage | None, list[PeerMethod]]]:
    """Every method at ToConv's 24→12 and 24→8 counts: once for LLaVA-1.5's single image, or per anyres image."""
    grid, channels, num_layers = tower.tower_grid_size, tower.hidden_size, preset.llm["num_hidden_layers"]
    if preset.anyres is None:
        return [(None, build_methods(grid, channels, num_layers, device, dtype))]
    hidden, pinpoints = preset.llm["hidden_size"], preset.anyres.grid_pinpoints
    newline = torch.randn(hidden, device=device, dtype=dtype) / hidden**0.5  # the scale the fork initialises it at
    cases = []
    for seed, size in enumerate(preset.anyres.image_sizes):
        image = anyres_image(tower, size, pinpoints, seed)
        tiling = image_tiling(image, pinpoints, tower.config.image_size, newline)
        cases.append((image, build_methods(grid, channels, num_layers, device, dtype, tiling=tiling)))
    return cases


def methods_not_run(cases: list[tuple[AnyresImage | None, list[PeerMethod]]], num_layers: int,
                    anyres: bool) -> dict[str, str]:
    """Each peer left out at some budget, with why (logged as a warning): the report says so too."""
    budgets = sorted({m.budget for _image, methods in cases for m in methods if m.method != "none"}, reverse=True)
    not_run = {}
    for name in PEER_METHODS:
        reasons = [why for budget in budgets if (why := unavailable(name, budget, num_layers, anyres)) is not None]
        if reasons:
            not_run[name] = reasons[0]
            logger.warning("%s is not run: %s.", name, reasons[0])
    return not_run


def measure_methods(pipe: PeerPipeline, methods: list[PeerMethod], s: RunSettings, batch: int,
                    image: AnyresImage | None) -> list[dict[str, Any]]:
    """One row per method at one batch size (and anyres image), the methods interleaved round by round."""
    where = "" if image is None else f", image {image.size[0]}×{image.size[1]} ({image.pixels.shape[0]} tiles)"
    print(f"[bench] peers, batch {batch}{where}: {len(methods)} methods × {s.warmup} + {s.repeats} rounds",
          file=sys.stderr)
    dtype = next(pipe.projector.parameters()).dtype
    if image is None:
        inputs = random_inputs(pipe, batch, s.prompt_len, pipe.tower.config.image_size, dtype, seed=0)
    else:
        inputs = anyres_inputs(pipe, image, batch, s.prompt_len, seed=0)
    samples, kv_bytes = time_rounds(pipe, methods, inputs, s.decode_tokens, s.warmup, s.repeats)
    rows = [method_row(pipe, m, inputs, samples[m.name], kv_bytes[m.name], s.decode_tokens, batch) for m in methods]
    for row in rows:
        row["image_size"] = None if image is None else list(image.size)
        row["tiles"] = 1 if image is None else image.pixels.shape[0]
    add_ratios(rows)
    return rows


def method_row(pipe: PeerPipeline, method: PeerMethod, inputs: PipelineInputs, samples: dict[str, list[float]],
               kv_bytes: int, decode_tokens: int, batch: int) -> dict[str, Any]:
    """One method at one budget and batch size: what it handed the LLM, its stage statistics and memory."""
    num_layers = pipe.llm.config.num_hidden_layers
    prompt_len = inputs.prefix_ids.shape[1] + inputs.suffix_ids.shape[1]
    peak = peak_bytes(lambda: pipe.generate(method, *inputs, decode_tokens), pipe.device)
    described = method.describe(num_layers)
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
