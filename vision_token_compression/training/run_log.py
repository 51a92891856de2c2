"""What a run reports: logging set-up, JSONL records with running means, and the loss curve drawn from them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vision_token_compression import atomic_write_text

from .plotting import plot_curves

logger = logging.getLogger(__name__)


def setup_logging(rank: int) -> None:
    """Configure the root logger once, for an entry point: INFO on rank 0, warnings only on the others."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


class RunLog:
    """JSONL records (rank 0 only), with a loss-curve PNG drawn from them."""

    def __init__(self, output_dir: Path, resume_step: int | None, enabled: bool) -> None:
        self.path = output_dir / "log.jsonl"
        self.plot_path = output_dir / "loss_curve.png"
        self.enabled = enabled
        self.records: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Keep what happened up to the checkpoint; later records were not saved with it.
            self.records = [r for r in self._read_records() if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _read_records(self) -> list[dict]:
        """The log's records; a run killed mid-append may leave a torn last line, which is dropped."""
        lines = [line for line in self.path.read_text().splitlines() if line]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number < len(lines):
                    raise ValueError(f"{self.path} line {number} is not JSON ({err}); fix or delete that line.") from err
                logger.warning("Dropping the torn last line of %s (a killed run's partial write): %r", self.path, line)
        return records

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """Redraw ``loss_curve.png``: the total loss and each compressor's window and distribution terms."""
        if not self.enabled:
            return
        steps = [r for r in self.records if r.get("event") == "train"]
        keys = [k for k in (steps[-1] if steps else {}) if k == "loss" or k.endswith(("/window", "/distribution"))]
        plot_curves({k: [(r["step"], r[k]) for r in steps if k in r] for k in keys}, self.plot_path,
                    title="compressor pretraining loss")


class Meter:
    """Running means of loss terms, plus images/s and the share of time spent waiting for data.

    Its sums go into checkpoints (``state_dict``), so a resumed run's means cover the steps before
    the interruption too.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.data_s = 0.0
        self.compute_s = 0.0

    def add(self, values: dict[str, float], images: int, data_s: float, compute_s: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.images += images
        self.data_s += data_s
        self.compute_s += compute_s

    def state_dict(self) -> dict:
        """The sums and counts (plain numbers: ``torch.load(..., weights_only=True)`` reads them back)."""
        return {"sums": dict(self.sums), "steps": self.steps, "images": self.images, "data_s": self.data_s,
                "compute_s": self.compute_s}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s sums."""
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.steps, self.images = int(state["steps"]), int(state["images"])
        self.data_s, self.compute_s = float(state["data_s"]), float(state["compute_s"])

    def summary(self) -> dict[str, float]:
        elapsed = self.data_s + self.compute_s
        return {
            **{k: v / max(self.steps, 1) for k, v in self.sums.items()},
            "images_per_s": self.images / elapsed if elapsed else 0.0,
            "data_wait_fraction": self.data_s / elapsed if elapsed else 0.0,
            "data_s": self.data_s, "compute_s": self.compute_s,
        }
