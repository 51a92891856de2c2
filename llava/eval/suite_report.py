"""The eval suite's summary: relative scores, the average row, ``summary.json``, ``summary.md`` and the chart.

A row is one benchmark at one compression level. Its relative score divides its score by the same
benchmark's score at level ``none`` in the same summary (the same checkpoint, uncompressed), so a
row's relative score is computed from the scores printed beside it, never from a published baseline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vision_token_compression import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

NONE = "none"


def add_relative_scores(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``relative`` (%) against its benchmark's ``none`` row; None without both scores."""
    baseline = {row["benchmark"]: row.get("score") for row in rows if row["level"] == NONE}
    for row in rows:
        base, score = baseline.get(row["benchmark"]), row.get("score")
        row["relative"] = 100 * score / base if score is not None and base else None


def average_row(rows: Sequence[dict[str, Any]], levels: Sequence[str]) -> dict[str, Any]:
    """Per level, the mean relative score over the benchmarks scored both there and at ``none``."""
    averages = {}
    for level in levels:
        relative = [row["relative"] for row in rows if row["level"] == level and row.get("relative") is not None]
        averages[level] = {"relative": sum(relative) / len(relative) if relative else None,
                           "benchmarks": len(relative)}
    return averages


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _tokens(row: dict[str, Any]) -> str:
    tokens = row.get("image_tokens")
    if not tokens or tokens.get("mean") is None:
        return "—"
    text = _count(tokens["mean"])
    if tokens["min"] != tokens["max"]:
        text += f" ({tokens['min']:g}–{tokens['max']:g})"
    if tokens.get("truncated"):
        text += f", {tokens['truncated']} answer(s) cut at the context limit"
    return text


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _result(row: dict[str, Any]) -> str:
    if row["status"] == "failed":
        return f"**failed**: {row['error']} (log: `{row['log']}`)"
    if row.get("submission"):
        return f"submit `{row['submission']}`"
    return ""


def markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the settings, one table row per benchmark × level, the average row, the skipped benchmarks."""
    lines = [
        f"# Accuracy by compression level: {summary['ckpt']}",
        "",
        f"- checkpoint: `{summary['model_path']}`" + (f" (base `{summary['model_base']}`)" if summary["model_base"] else ""),
        f"- compressor: {summary['compressor']}",
        f"- commit: `{summary['commit']}`",
        f"- levels: {', '.join(summary['levels'])} (`none`: the checkpoint as it is; N: compressed to N×N)",
        f"- data: `{summary['eval_dir']}`",
        "",
        "Image tokens per image are measured at the language model's input (the embeddings spliced in "
        "for each image, read from the answers' `.image_tokens.jsonl`); where images differ (LLaVA-1.6 "
        "anyres), the mean per image, then (min–max). Relative scores divide by the same checkpoint's "
        "`none` row.",
        "",
        "| benchmark | level | image tokens / image | metric | score | relative (%) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        lines.append(f"| {row['title']} | {row['level']} | {_tokens(row)} | {row.get('metric') or '—'} | "
                     f"{_number(row.get('score'))} | {_number(row.get('relative'), 1)} | {_result(row)} |")
    for level, average in summary["average"].items():
        lines.append(f"| **average of relative scores** | {level} | | over {average['benchmarks']} benchmark(s) | "
                     f"| {_number(average['relative'], 1)} | |")
    if summary["skipped"]:
        lines += ["", "Skipped (data not found):", ""]
        lines += [f"- {item['benchmark']}: no `{item['missing'][0]}`" for item in summary["skipped"]]
    return "\n".join(lines) + "\n"


def _level_tokens(rows: Sequence[dict[str, Any]], level: str) -> str:
    """`` (N image tokens)`` when every row of ``level`` measured the same N per image, else nothing."""
    means = {row["image_tokens"]["mean"] for row in rows
             if row["level"] == level and row.get("image_tokens") and row["image_tokens"].get("mean") is not None}
    return f" ({_count(means.pop())} image tokens)" if len(means) == 1 else ""


def write_chart(summary: dict[str, Any], path: Path) -> bool:
    """Relative score per benchmark (groups) per level (bars), plus the average; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = summary["levels"]
    scored = list(dict.fromkeys(row["title"] for row in summary["rows"] if row.get("relative") is not None))
    relative = {(row["title"], row["level"]): row["relative"] for row in summary["rows"]}
    groups = scored + ["average"]
    width = 0.8 / max(len(levels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.2))
    for i, level in enumerate(levels):
        heights = [relative.get((title, level)) for title in scored] + [summary["average"][level]["relative"]]
        xs = [g + (i - (len(levels) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [h if h is not None else float("nan") for h in heights], width,
                      label=f"level {level}{_level_tokens(summary['rows'], level)}")
        ax.bar_label(bars, labels=["" if h is None else f"{h:.1f}" for h in heights], fontsize=6)
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of the uncompressed score")
    ax.set_title(f"{summary['ckpt']}: score relative to level none", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def write_summary(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``summary.json``, ``summary.md`` and (with matplotlib) ``summary.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "summary.json", out_dir / "summary.md"]
    atomic_write_text(written[0], json.dumps(summary, indent=1) + "\n")
    atomic_write_text(written[1], markdown(summary))
    if write_chart(summary, out_dir / "summary.png"):
        written.append(out_dir / "summary.png")
    else:
        logger.warning("No chart: matplotlib is not installed (pip install 'toconv-llava[bench]').")
    return written
