"""The peer comparison's report: ratios, JSON (one row per method × budget × batch), markdown tables and chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.markdown import _fmt, _mib, setting_lines
from benchmarks.memory import peak_memory_measure
from benchmarks.pipeline_measures import ttft_method
from benchmarks.report import add_run_notes, write_outputs
from benchmarks.timing import per_round_ratios

PEERS_SCHEMA = 2  # 2: drop stages name their ranking rows and recycling, "last_query" became "query"; methods_not_run
HEADER = (
    "| method | image tokens to LLM | mean per layer | vision tower ms | reduction ms | projector ms | prefill ms "
    "| TTFT ms | TTFT ÷ ToConv | TTFT ÷ bound | decode ms/token | KV cache MiB | peak MiB | attention kernels |"
)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's TTFT against ToConv's and the fixed-cost bound's at its budget, and against no compression.

    Ratios are medians of per-round ratios (methods are interleaved round by round, so load drift on a
    shared machine cancels within a round), with their quartiles.
    """
    rounds = {(r["method"], r["budget"]): r["ttft_ms_by_round"] for r in rows}
    none = next(r for r in rows if r["method"] == "none")
    for r in rows:
        if r["method"] == "none":
            continue
        own = r["ttft_ms_by_round"]
        r["ttft_over_toconv"] = per_round_ratios(own, rounds[("toconv", r["budget"])])
        r["ttft_over_bound"] = per_round_ratios(own, rounds[("bound", r["budget"])])
        r["speedup_vs_none"] = {
            "ttft": per_round_ratios(none["ttft_ms_by_round"], own)["median"],
            "sequence_length_bound": none["seq_len"] / r["mean_seq_len_per_layer"],
        }


def build_peers_report(command: str, environment: dict[str, Any], preset: dict[str, Any], models: dict[str, int],
                       rows: list[dict[str, Any]], device: torch.device,
                       not_run: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything the JSON holds; ``wall_seconds`` is filled in last. ``not_run``: peers left out, with why."""
    return {
        "peers_schema": PEERS_SCHEMA, "command": command, "environment": environment, "preset": preset,
        "models": models, "rows": rows, "methods_not_run": not_run or {},
        "peak_memory_measure": peak_memory_measure(device), "ttft_method": ttft_method(device),
        "notes": peers_notes(preset, device, not_run or {}), "wall_seconds": None,
    }


def peers_notes(preset: dict[str, Any], device: torch.device, not_run: dict[str, str]) -> list[str]:
    """What the numbers are and are not."""
    lines = [
        "Random weights at the stated shapes: timings only. Which tokens a method keeps means nothing here, "
        "and PruMerge's adaptive count comes from random CLS attention (the count chosen is in the table).",
        f"TTFT = vision tower + reduction + projector + prefill + greedy first token, timed as the {ttft_method(device)}.",
        "Every method runs the same tower, projector and the same layer-by-layer Llama loop (benchmarks/layerwise_llm.py).",
        "FastV, PyramidDrop and SparseVLM reduce inside the prefill: their reduction is timed in the prefill column "
        "('in prefill').",
        "Bound = the fixed-cost bound at the budget: the first `budget` tokens handed on at no cost (tower with SDPA, "
        "projector and prefill of the budget); TTFT ÷ bound is each method's distance to it.",
        "TTFT ÷ ToConv and TTFT ÷ bound are medians (quartiles) of per-round ratios: each round runs every method "
        "once, so load drift cancels within a round; the stage columns are medians ± half the IQR over rounds.",
        "PyramidDrop runs its default schedule whatever the budget (mean image tokens per layer in the table).",
        "SparseVLM runs the largest of its published settings within the budget (144 → its 128, 64 → its 64): "
        "fixed keep counts after decoder layers 2, 6 and 15 plus its recycled merged tokens; its settings count "
        "image tokens averaged over the layers, so it hands the LLM all of them (mean per layer in the table).",
        f"Peak memory: {peak_memory_measure(device)}.",
    ]
    if preset.get("anyres"):
        lines += [
            "LLaVA-1.6 (anyres): each image size's budgets are ToConv's counts there with the fork's spatial_unpad "
            "layout (base tile, crops cropped to the image's aspect ratio, a newline per row). No compression, FastV "
            "and PyramidDrop hand the LLM the uncompressed layout; ToConv and bilinear pooling reduce each tile and "
            "keep the layout (the projector column includes laying it out); VisionZip, PruMerge(+) and the bound "
            "reduce each tile to an equal share of the budget in one batched call and hand on the tiles' tokens "
            "joined, without newlines.",
        ]
    lines += [f"Not run: {name}: {why}." for name, why in not_run.items()]
    add_run_notes(lines, preset["clip_overrides"], preset["vision_tower"], device, "methods")
    return lines


def peers_markdown(report: dict[str, Any]) -> str:
    """A table per batch size and budget (medians ± half the IQR), then the notes."""
    lines = setting_lines(report)
    env, preset = report["environment"], report["preset"]
    lines += [f"Load average (1, 5, 15 min): {load_text(env.get('load_average_start'))} at the start, "
              f"{load_text(env.get('load_average_end'))} at the end (timings on a busy machine are noisy).", ""]
    for batch, image_size, rows in row_groups(report):
        none = next(r for r in rows if r["method"] == "none")
        image = "" if image_size is None else f"LLaVA-1.6 image {image_size[0]}×{image_size[1]} ({none['tiles']} tiles), "
        lines += [f"Batch {batch}, {image}{none['prompt_len']} text tokens, {preset['decode_tokens']} decoded tokens; "
                  f"medians ± half the IQR over {preset['repeats']} round(s) after {preset['warmup']} warm-up "
                  f"round(s). No compression ({none['image_tokens_to_llm']} image tokens): TTFT "
                  f"{_fmt(none['ttft_ms'])} ms, decode {_fmt(none['decode_ms_per_token'])} ms/token, KV cache "
                  f"{_mib(none['kv_cache_bytes'])} MiB.", ""]
        for budget in budgets(rows):
            lines += [f"Budget {budget} image tokens:", "", HEADER, "|---" + "|---:" * 12 + "|---|"]
            lines += [table_row(r) for r in rows if r["budget"] == budget and r["method"] != "none"]
            lines.append("")
    return "\n".join(lines + [f"- {note}" for note in report["notes"]]) + "\n"


def row_groups(report: dict[str, Any]) -> list[tuple[int, list[int] | None, list[dict[str, Any]]]]:
    """(batch size, anyres image size or None, rows) for each table, in run order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in report["rows"]:
        image_size = r.get("image_size")
        groups.setdefault((r["batch_size"], None if image_size is None else tuple(image_size)), []).append(r)
    return [(batch, None if size is None else list(size), rows) for (batch, size), rows in groups.items()]


def budgets(rows: list[dict[str, Any]]) -> list[int]:
    """The budgets of a table's methods, largest first."""
    return sorted({r["budget"] for r in rows if r["method"] != "none"}, reverse=True)


def _ratio(stats: dict[str, float]) -> str:
    """Median of per-round ratios with its quartiles: 1.08× (1.02–1.15)."""
    return f"{stats['median']:.2f}× ({stats['q1']:.2f}–{stats['q3']:.2f})"


def load_text(load: list[float] | None) -> str:
    return "unknown" if load is None else " / ".join(f"{x:.2f}" for x in load)


def table_row(r: dict[str, Any]) -> str:
    chosen = r["image_token_counts_chosen"]
    tokens = "/".join(str(c) for c in chosen) if chosen else str(r["image_tokens_to_llm"])
    reduction = "in prefill" if r["reduction_in_prefill"] else _fmt(r["reduction_ms"])
    return (
        f"| {r['method']} | {tokens} | {r['mean_image_tokens_per_layer']:.0f} | {_fmt(r['vision_tower_ms'])} | "
        f"{reduction} | {_fmt(r['projector_ms'])} | {_fmt(r['prefill_ms'])} | {_fmt(r['ttft_ms'])} | "
        f"{_ratio(r['ttft_over_toconv'])} | {_ratio(r['ttft_over_bound'])} | {_fmt(r['decode_ms_per_token'])} | "
        f"{_mib(r['kv_cache_bytes'])} | {_mib(r['peak_memory_bytes'])} | {r['attention_kernels']} |"
    )


def chart_report(report: dict[str, Any]) -> dict[str, Any]:
    """The rows grouped as ``chart.write_chart`` reads a report: a panel row per batch size and budget."""
    runs = []
    for batch, image_size, rows in row_groups(report):
        image = "" if image_size is None else f", image {image_size[0]}×{image_size[1]}"
        for budget in budgets(rows):
            variants = {
                r["method"]: {**r, "compressor_ms": r["reduction_ms"],
                              "speedup": {"ttft": r["speedup_vs_none"]["ttft"],
                                          "ideal_bound": r["speedup_vs_none"]["sequence_length_bound"]}}
                for r in rows if r["budget"] == budget and r["method"] != "none"
            }
            runs.append({"batch_size": batch, "title": f"TTFT by stage, budget {budget}{image}, batch {batch}",
                         "stage_labels": {"compressor": "reduction"}, "variants": variants})
    return {**report, "runs": runs}


def write_peers_outputs(report: dict[str, Any], json_path: Path | None, md_path: Path | None,
                        png_path: Path | None) -> None:
    """Print the markdown; write JSON, markdown and PNG where asked (next to the JSON by default)."""
    write_outputs(report, json_path, md_path, png_path, text=peers_markdown(report), chart_source=chart_report(report))
