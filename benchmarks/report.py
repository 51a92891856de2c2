"""The report: one JSON-ready dict with the settings, environment, measures and notes, and where it is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.chart import write_chart
from benchmarks.markdown import markdown
from benchmarks.memory import peak_memory_measure
from benchmarks.models import real_clip_config
from benchmarks.pipeline_measures import ttft_method
from benchmarks.presets import SELECT_LAYER, Preset, RunSettings

# 2: the window-mean baseline is named window_mean (variants window_mean-*, key window_mean_ms); 1 called it avgpool.
SCHEMA = 2


def build_report(
    command: str, environment: dict[str, Any], preset_record: dict[str, Any], models: dict[str, int],
    runs: list[dict[str, Any]], micro: dict[str, Any] | None, device: torch.device,
) -> dict[str, Any]:
    """Everything the JSON holds, in its order; ``wall_seconds`` is filled in last."""
    return {
        "schema": SCHEMA,
        "command": command,
        "environment": environment,
        "preset": preset_record,
        "models": models,
        "runs": runs,
        "microbenchmark": micro,
        "peak_memory_measure": peak_memory_measure(device),
        "ttft_method": ttft_method(device),
        "notes": notes(preset_record["clip_overrides"], preset_record["vision_tower"], device),
        "wall_seconds": None,
    }


def preset_record(name: str, preset: Preset, vision_tower: str, settings: RunSettings) -> dict[str, Any]:
    """The resolved settings: the preset's shapes with the measurement settings actually used."""
    return {
        "name": name, "description": preset.description, "vision_tower": vision_tower,
        "clip_overrides": preset.clip_overrides, "llm": preset.llm, "projector": "mlp2x_gelu",
        "mm_vision_select_layer": SELECT_LAYER, "batch_sizes": list(settings.batch_sizes),
        "prompt_len": settings.prompt_len, "decode_tokens": settings.decode_tokens, "warmup": settings.warmup,
        "repeats": settings.repeats,
    }


def notes(clip_overrides: dict, vision_tower: str, device: torch.device) -> list[str]:
    """What the numbers are and are not: shapes, TTFT and memory methods, baselines, noise."""
    lines = [
        "Random weights at the stated shapes; timings only (the outputs mean nothing).",
        (
            "TTFT = vision tower + compressor + projector + text embedding + LLM prefill + greedy first token, "
            f"timed as the {ttft_method(device)}; stage columns come from a pass synchronised between stages."
        ),
        (
            "Ideal bound = sequence length without compression / with it (text + image tokens): the TTFT speed-up "
            "if all of TTFT were prefill and prefill scaled linearly with length."
        ),
        f"Vision tower = CLIPVisionTower with mm_vision_select_layer={SELECT_LAYER}, which stops at that layer.",
        f"Peak memory: {peak_memory_measure(device)}.",
        (
            "Baselines use the compressor's kernel/stride/padding and read the same tokens through the same "
            "channels-last grid view: window mean = the mean of each window (avg_pool2d, count_include_pad=False); "
            "plain nn.Conv2d (C→C) with a channels-last weight like ToConv's, without partial-conv renormalisation."
        ),
    ]
    add_run_notes(lines, clip_overrides, vision_tower, device, "variants")
    return lines


def add_run_notes(lines: list[str], clip_overrides: dict, vision_tower: str, device: torch.device, compared: str) -> None:
    """The notes every report's table carries: CLIP's reduced shape (second line) and, on a CPU, the noise caveat."""
    if clip_overrides:
        real = real_clip_config(vision_tower)
        reduced = ", ".join(f"{k}={v} ({real[k]})" for k, v in clip_overrides.items())
        lines.insert(1, f"CLIP reduced from the real shape (value, real): {reduced}; "
                        "image and patch size are real, so every token count is.")
    if device.type == "cpu":
        lines.append(f"CPU timings on a machine shared with other jobs are noisy; compare {compared} within one run "
                     "(they are interleaved round by round), not across runs.")


def write_text_outputs(text: str, report: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    """Print the markdown ``text``; write the JSON and the markdown (next to the JSON by default)."""
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        md_path = md_path or json_path.with_suffix(".md")
        print(f"[bench] wrote {json_path}", file=sys.stderr)
    if md_path:
        md_path.write_text(text)
        print(f"[bench] wrote {md_path}", file=sys.stderr)


def write_outputs(report: dict[str, Any], json_path: Path | None, md_path: Path | None,
                  png_path: Path | None, text: str | None = None, chart_source: dict[str, Any] | None = None) -> None:
    """Print the markdown; write JSON, markdown and PNG where asked (markdown and PNG next to the JSON by default).

    ``text`` and ``chart_source`` replace the main benchmark's markdown and the report the chart reads.
    """
    write_text_outputs(markdown(report) if text is None else text, report, json_path, md_path)
    png_path = png_path or (json_path.with_suffix(".png") if json_path else None)
    if png_path:
        if write_chart(report if chart_source is None else chart_source, png_path):
            print(f"[bench] wrote {png_path}", file=sys.stderr)
        else:
            print("[bench] no chart: matplotlib is not installed (pip install 'toconv-llava[bench]')", file=sys.stderr)
