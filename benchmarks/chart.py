"""The report as a PNG chart: TTFT by stage, and the speed-up against its ideal bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
            label = run.get("stage_labels", {}).get(stage, stage.replace("_", " "))
            row[0].bar(names, heights, bottom=bottom, label=label)
            bottom = [b + h for b, h in zip(bottom, heights)]
        row[0].plot(names, [r["ttft_ms"]["median"] for r in results], "k_", markersize=22, label="TTFT (end to end)")
        row[0].set_ylabel("ms")
        row[0].set_title(run.get("title", f"Time to first token by stage, batch {run['batch_size']}"))
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
