"""One benchmark run, step by step: the pipeline at each batch size, the microbenchmark, the report."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

import torch

from benchmarks.environment import environment, load_average
from benchmarks.memory import count_bytes
from benchmarks.microbenchmark import microbenchmark
from benchmarks.models import build_llm, build_projector, default_cache_dir, load_tower
from benchmarks.pipeline import Pipeline
from benchmarks.pipeline_measures import measure_pipeline
from benchmarks.presets import Preset, RunSettings
from benchmarks.reducers import build_variants
from benchmarks.report import build_report, preset_record, write_outputs
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

COMMAND = "python benchmarks/bench_compression.py"  # how the JSON's "command" names the benchmark


def run(args: argparse.Namespace, raw_argv: list[str], preset: Preset, settings: RunSettings,
        device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build the models, measure every variant and the microbenchmark, write the outputs."""
    if getattr(args, "compare_peers", False):  # ToConv against FastV, VisionZip, PyramidDrop, PruMerge, bilinear
        from benchmarks.peers_run import run_peers

        return run_peers(args, raw_argv, preset, settings, device, dtype)
    if preset.anyres is not None:  # LLaVA-1.6: image sizes × compression levels through the fork's merging
        from benchmarks.anyres import run_anyres

        return run_anyres(args, raw_argv, preset, settings, device, dtype)
    torch.manual_seed(0)
    cache_dir = args.cache_dir or default_cache_dir()
    started, load_start = time.perf_counter(), load_average()
    print(f"[bench] preset {args.preset} on {device} ({dtype}); CLIP stand-ins in {cache_dir}", file=sys.stderr)
    tower = load_tower(cache_dir, args.vision_tower, preset.clip_overrides, device, dtype)
    runs, models = measure_every_batch_size(tower, preset.llm, settings, args.variants, device, dtype)
    micro = None
    if not args.no_microbenchmark:
        reduced_note = " (reduced)" if preset.micro_clip_overrides else ""
        print(f"[bench] microbenchmark at {args.vision_tower}{reduced_note}", file=sys.stderr)
        if preset.micro_clip_overrides != preset.clip_overrides:
            del tower  # free the pipeline's tower before loading one of the microbenchmark's shape
            tower = load_tower(cache_dir, args.vision_tower, preset.micro_clip_overrides, device, dtype)
        release_memory(device)
        micro = microbenchmark(tower, args.vision_tower, preset.micro_clip_overrides, settings.batch_sizes[0],
                               device, dtype, preset.micro_repeats, preset.micro_tower_repeats)
    report = build_report(
        " ".join([COMMAND, *raw_argv]),
        {**environment(device, dtype), "load_average_start": load_start},
        preset_record(args.preset, preset, args.vision_tower, settings), models, runs, micro, device,
    )
    report["wall_seconds"] = time.perf_counter() - started
    write_outputs(report, args.json, args.markdown, args.png)
    return report


def measure_every_batch_size(
    tower: CLIPVisionTower, llm_fields: dict, settings: RunSettings, variant_names: list[str] | None,
    device: torch.device, dtype: torch.dtype,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The pipeline's runs (one per batch size) and its weight bytes; the LLM and projector are freed on return."""
    llm = build_llm(llm_fields, device, dtype)
    projector = build_projector(tower.hidden_size, llm.config.hidden_size, device, dtype)
    variants = build_variants(tower.tower_grid_size, tower.hidden_size, device, dtype, variant_names)
    pipe = Pipeline(tower, projector, llm, device)
    s = settings
    runs = []
    with torch.inference_mode():
        for batch in s.batch_sizes:
            print(f"[bench] batch {batch}: {len(variants)} variants × {s.warmup} + {s.repeats} rounds", file=sys.stderr)
            variants_out = measure_pipeline(pipe, variants, batch, s.prompt_len, s.decode_tokens, s.warmup,
                                            s.repeats, tower.config.image_size, dtype)
            runs.append({"batch_size": batch, "prompt_len": s.prompt_len, "decode_tokens": s.decode_tokens,
                         "variants": variants_out})
    models = {"vision_tower_bytes": count_bytes(tower.vision_tower), "projector_bytes": count_bytes(projector),
              "llm_bytes": count_bytes(llm)}
    return runs, models


def release_memory(device: torch.device) -> None:
    """Collect freed models now, so the next measurement starts from what is really held."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
