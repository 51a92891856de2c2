"""The anyres (LLaVA-1.6) report: JSON-ready dict, one row per image size × compression level, and its markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.markdown import _fmt, _mib, setting_lines
from benchmarks.pipeline_measures import ttft_method
from benchmarks.presets import SELECT_LAYER, Preset, RunSettings
from benchmarks.report import SCHEMA, add_run_notes, write_text_outputs

HEADER = (
    "| image (W×H) | tiles | level | image tokens | seq len | vision tower ms | compressor ms | projector ms "
    "| merge ms | prefill ms | TTFT ms | TTFT speed-up (bound) | KV cache MiB |"
)


def build_report(command: str, environment: dict[str, Any], name: str, preset: Preset, settings: RunSettings,
                 models: dict[str, int], rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    anyres = preset.anyres
    return {
        "schema": SCHEMA,
        "command": command,
        "environment": environment,
        "preset": {
            "name": name, "description": preset.description, "vision_tower": "openai/clip-vit-large-patch14-336",
            "clip_overrides": preset.clip_overrides, "llm": preset.llm, "projector": "mlp2x_gelu",
            "mm_vision_select_layer": SELECT_LAYER, "image_aspect_ratio": "anyres",
            "mm_patch_merge_type": anyres.merge_type, "image_grid_pinpoints": [list(p) for p in anyres.grid_pinpoints],
            "image_sizes": [list(s) for s in anyres.image_sizes], "batch_sizes": list(settings.batch_sizes),
            "prompt_len": settings.prompt_len, "warmup": settings.warmup, "repeats": settings.repeats,
        },
        "models": models,
        "rows": rows,
        "ttft_method": ttft_method(device),
        "notes": notes(preset.clip_overrides, device),
        "wall_seconds": None,
    }


def notes(clip_overrides: dict, device: torch.device) -> list[str]:
    lines = [
        "Random weights at the stated shapes; timings only (the outputs mean nothing).",
        "Image tokens are what the fork's prepare_inputs_labels_for_multimodal splices in: the base image's tile, "
        "then the crops' grid unpadded to the image's aspect ratio with an image_newline token ending each row; "
        "ToConv compresses each tile (24×24 → 12×12 or 8×8) before the merge.",
        f"TTFT = process-ready tiles → vision tower (every tile, mm_vision_select_layer={SELECT_LAYER}) + compressor + "
        f"projector + merge (text embeddings, unpad, newlines, splice) + LLM prefill + greedy first token, timed as the "
        f"{ttft_method(device)}. Image decoding and process_images (resize, crop, normalise) are not timed.",
        "Bound = sequence length without compression / with it (text + image tokens), for the same image: the TTFT "
        "speed-up if all of TTFT were prefill and prefill scaled linearly with length.",
    ]
    add_run_notes(lines, clip_overrides, "openai/clip-vit-large-patch14-336", device, "levels")
    return lines


def markdown(report: dict[str, Any]) -> str:
    preset = report["preset"]
    lines = setting_lines(report)
    for batch in preset["batch_sizes"]:
        lines += [
            f"Batch {batch}, {preset['prompt_len']} text tokens around one image; LLaVA-1.6 pinpoints "
            f"{preset['image_grid_pinpoints']}, {preset['mm_patch_merge_type']}; medians ± half the IQR over "
            f"{preset['repeats']} round(s) after {preset['warmup']} warm-up round(s).",
            "", HEADER, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in report["rows"] if r["batch_size"] == batch):
            s = r["speedup"]
            width, height = r["image_size"]
            lines.append(
                f"| {width}×{height} | {r['tiles']} | {r['level']} | {r['image_tokens']:,} | {r['seq_len']:,} | "
                f"{_fmt(r['vision_tower_ms'])} | {_fmt(r['compressor_ms'])} | {_fmt(r['projector_ms'])} | "
                f"{_fmt(r['merge_ms'])} | {_fmt(r['prefill_ms'])} | {_fmt(r['ttft_ms'])} | "
                f"{s['ttft']:.2f}× ({s['ideal_bound']:.2f}×) | {_mib(r['kv_cache_bytes'])} |"
            )
        lines.append("")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    """Print the markdown; write the JSON and the markdown (next to the JSON by default). No chart for anyres."""
    write_text_outputs(markdown(report), report, json_path, md_path)
