"""The report as markdown: the setting, a table per batch size, the microbenchmark, the notes."""

from __future__ import annotations

from typing import Any

PIPELINE_HEADER = (
    "| variant | image tokens | seq len | vision tower ms | compressor ms | projector ms | prefill ms "
    "| TTFT ms | TTFT speed-up (ideal) | decode ms/token | KV cache MiB | peak MiB |"
)
MICRO_HEADER = (
    "| compression | geometry | ToConv ms | plain Conv2d ms | window mean ms | ToConv / Conv2d "
    "| ToConv % of tower time | ToConv % of tower FLOPs |"
)


def _fmt(stats: dict[str, Any]) -> str:
    """Median ± half the IQR, with fewer decimals for larger values; "–" for a stage that did nothing."""
    med = stats["median"]
    if med == 0:
        return "–"
    digits = 2 if med < 10 else 1 if med < 100 else 0
    return f"{med:.{digits}f} ± {stats['iqr'] / 2:.{digits}f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (medians ± half the IQR)."""
    lines = setting_lines(report)
    for run in report["runs"]:
        lines += pipeline_table(run, report["preset"])
    if report.get("microbenchmark"):
        lines += microbenchmark_lines(report["microbenchmark"])
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def setting_lines(report: dict[str, Any]) -> list[str]:
    """Device, versions, preset and command line."""
    env = report["environment"]
    device = (
        f"Device: **{env['device_name']}** ({env['device']}, {env['dtype']}, "
        f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}); "
        f"torch {env['torch']}, transformers {env['transformers']}."
    )
    return [
        device,
        f"Preset `{report['preset']['name']}`: {report['preset']['description']}.",
        f"Command: `{report['command']}`",
        "",
    ]


def pipeline_table(run: dict[str, Any], preset: dict[str, Any]) -> list[str]:
    """One batch size: a row per variant, stage times to TTFT, decode, KV cache and peak memory."""
    caption = (
        f"Batch {run['batch_size']}, {run['prompt_len']} text tokens, {run['decode_tokens']} decoded tokens; "
        f"medians ± half the IQR over {preset['repeats']} round(s) after {preset['warmup']} warm-up round(s)."
    )
    lines = [caption, "", PIPELINE_HEADER, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in run["variants"].items():
        s = r["speedup"]
        lines.append(
            f"| {name} | {r['image_tokens']} | {r['seq_len']} | {_fmt(r['vision_tower_ms'])} | "
            f"{_fmt(r['compressor_ms'])} | {_fmt(r['projector_ms'])} | {_fmt(r['prefill_ms'])} | "
            f"{_fmt(r['ttft_ms'])} | {s['ttft']:.2f}× ({s['ideal_bound']:.2f}×) | "
            f"{_fmt(r['decode_ms_per_token'])} | {_mib(r['kv_cache_bytes'])} | {_mib(r['peak_memory_bytes'])} |"
        )
    return [*lines, ""]


def microbenchmark_lines(micro: dict[str, Any]) -> list[str]:
    """The compressor against a plain convolution and the tower, then the tower's early stop."""
    shape = micro["shape"]
    reduced = f" (reduced: {micro['clip_overrides']})" if micro["clip_overrides"] else ""
    caption = (
        f"Compressor microbenchmark at the {micro['vision_tower']} shape{reduced}: "
        f"({shape['batch']}, {shape['tokens']}, {shape['channels']}) tokens; "
        f"vision tower {_fmt(micro['vision_tower_ms'])} ms, {micro['vision_tower_flops'] / 1e9:.1f} GFLOP."
    )
    lines = [caption, "", MICRO_HEADER, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in micro["compressors"].items():
        lines.append(
            f"| {name} | k{c['kernel']} s{c['stride']} p{c['padding']} | {_fmt(c['toconv_ms'])} | "
            f"{_fmt(c['conv_ms'])} | {_fmt(c['window_mean_ms'])} | {c['toconv_over_conv']:.3f}× | "
            f"{c['toconv_pct_of_vision_tower']:.2f}% | {c['toconv_flops_pct_of_vision_tower']:.2f}% |"
        )
    sl = micro["select_layer"]
    early_stop = (
        f"Vision tower stopping at `mm_vision_select_layer={sl['mm_vision_select_layer']}`: runs "
        f"{sl['layers_run']} of {sl['layers_total']} layers, {_fmt(sl['selected_run_ms'])} ms against "
        f"{_fmt(sl['full_run_ms'])} ms for the full run: {100 * sl['saving']:.1f}% of the time and "
        f"{100 * sl['flops_saving']:.1f}% of the FLOPs saved; features identical: {sl['features_identical']}."
    )
    return [*lines, "", early_stop, ""]
