"""What a run saves to continue later: checkpoint folders, their trainer state, and resuming from them.

``checkpoints/step-NNNNNNNN/`` holds one ``compressor_{in}to{out}.safetensors`` per compressor and
``trainer_state.pt`` (optimizer, scheduler, loss scaler, step, config, and the running means of the
epoch and log window so far, so that a resumed run's records are the uninterrupted run's). A folder
is filled under a hidden ``.step-N.partial`` name and renamed when complete (``publish_folder``), so
a run killed at any moment leaves the previous checkpoint intact; the top-level files are each
written atomically too, and the temporaries a killed run left beside them are removed when the
next run starts.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vision_token_compression import (
    TokenCompressor,
    load_compressor_into,
    publish_folder,
    remove_stale_temporaries,
    save_compressor,
)

from .distributed import Distributed

if TYPE_CHECKING:
    from .config import TrainConfig
    from .trainer import Trainer

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.pt"
# The files a run writes at the top of --output-dir (each through atomic_write), as fnmatch patterns.
OUTPUT_FILES = ("config.json", "log.jsonl", "loss_curve.png", "compressor_*.safetensors")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (partial ones are hidden ``.partial`` folders)."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def write_trainer_state(state: dict, path: Path) -> None:
    """torch.save of plain tensors and numbers (loadable with weights_only=True)."""
    torch.save(state, path)


def read_trainer_state(checkpoint: Path) -> dict:
    """The optimizer, scheduler, scaler and progress saved in a checkpoint folder."""
    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)


def plain(value):
    """dataclass dicts → JSON-like values (for weights_only loading and config.json)."""
    return json.loads(json.dumps(value))


def prepare_output_dir(output_dir: Path, resume: bool, dist: Distributed) -> Path | None:
    """Refuse to overwrite a run's checkpoints, clear what a killed run left; return the checkpoint to resume.

    None when starting from step 0 (also for ``--resume`` in a folder without a checkpoint yet).
    """
    existing = list_checkpoints(output_dir)
    if existing and not resume:  # every rank sees it and stops, none waits at the barrier
        raise FileExistsError(
            f"{output_dir} already holds checkpoints ({existing[-1].name}). "
            f"Pass --resume to continue that run, or choose another --output-dir."
        )
    if dist.is_main:
        (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir, OUTPUT_FILES)  # logged; a user's own hidden files stay
        for stale in (output_dir / "checkpoints").glob(".*.partial"):
            logger.warning("Removing an incomplete checkpoint left by a killed run: %s", stale)
            shutil.rmtree(stale)
    dist.barrier()
    if resume and not existing:
        logger.warning("--resume: no checkpoint in %s yet, starting from step 0.", output_dir / "checkpoints")
    return existing[-1] if resume and existing else None


def save_compressors(
    compressors: Mapping[str, TokenCompressor], folder: Path, config: TrainConfig, extra: dict[str, str],
) -> None:
    """``compressor_{name}.safetensors`` for each compressor in ``folder``, with the run's provenance."""
    for name, compressor in compressors.items():
        save_compressor(
            compressor, folder / f"compressor_{name}.safetensors", vision_tower=config.vision_tower,
            select_layer=config.select_layer, select_feature=config.select_feature, extra=extra,
        )


def save_checkpoint(trainer: Trainer) -> Path:
    """Write ``checkpoints/step-N`` (via a hidden partial folder), then the top-level compressors; rotate old ones.

    Called on the main process only, after the weights were checked to be finite.
    """
    config, output_dir = trainer.config, trainer.output_dir
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{trainer.step:08d}"
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    extra = {
        "step": str(trainer.step), "epoch": f"{trainer.step / trainer.steps_per_epoch:.3f}",
        "trainer": "vision_token_compression.train", "image_aspect_ratio": config.image_aspect_ratio,
    }
    save_compressors(trainer.bank.compressors, partial, config, extra)
    write_trainer_state({
        "step": trainer.step, "world_size": trainer.dist.world_size, "config": plain(asdict(config)),
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "meters": {name: meter.state_dict() for name, meter in trainer.meters.items()},
    }, partial / TRAINER_STATE)
    publish_folder(partial, final)  # the folder appears complete or not at all
    save_compressors(trainer.bank.compressors, output_dir, config, extra)  # each file is written atomically
    for old in list_checkpoints(output_dir)[:-config.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def check_resumable(state: dict, config: TrainConfig, world_size: int, folder: Path) -> None:
    """Refuse a checkpoint of other compressors; warn about settings that differ from the checkpoint's."""
    saved = state.get("config", {})
    if sorted(saved.get("output_sizes", [])) != sorted(config.output_sizes):
        raise ValueError(
            f"Cannot resume {folder}: it trained output_sizes={saved.get('output_sizes')} but this run asks "
            f"for {config.output_sizes}. Use the same --output-sizes or a new --output-dir."
        )
    for key in ("vision_tower", "select_layer", "batch_size", "seed"):
        if saved.get(key) != getattr(config, key):
            logger.warning("Resuming with %s=%r; the checkpoint used %r.", key, getattr(config, key), saved.get(key))
    if state.get("world_size") != world_size:
        logger.warning("Resuming on %d process(es); the checkpoint ran on %s: the data order changes.",
                       world_size, state.get("world_size"))


def load_checkpoint(trainer: Trainer, folder: Path) -> None:
    """Restore compressors, optimizer, scheduler, loss scaler and step from a checkpoint folder."""
    state = read_trainer_state(folder)
    config = trainer.config
    check_resumable(state, config, trainer.dist.world_size, folder)
    for name, compressor in trainer.bank.compressors.items():
        load_compressor_into(compressor, folder / f"compressor_{name}.safetensors", vision_tower=config.vision_tower,
                             select_layer=config.select_layer, select_feature=config.select_feature)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step = int(state["step"])
    for name, meter_state in state.get("meters", {}).items():  # absent in checkpoints of earlier versions
        if name in trainer.meters:
            trainer.meters[name].load_state_dict(meter_state)
    logger.info("Resumed from %s at step %d (epoch %d)", folder, trainer.step, trainer.step // trainer.steps_per_epoch)
