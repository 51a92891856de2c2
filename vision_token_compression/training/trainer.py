"""Pretrain ToConv compressors on frozen CLIP features, so an existing LLaVA can use fewer tokens.

Images → frozen CLIP tower (LLaVA's select layer and feature) → one ``TokenCompressor`` per
output grid, all fed by the same forward pass. The loss keeps each compressed token close to the
tokens of its window (cosine) and the compressed set in the distribution of the original tokens
(sliced Wasserstein or entropic OT). Only the compressors train.

One GPU or CPU::

    python -m vision_token_compression.train --data IMAGES --output-dir runs/toconv

Several GPUs (DDP through torchrun; gloo is used on CPU)::

    torchrun --nproc_per_node 4 -m vision_token_compression.train --data IMAGES --output-dir runs/toconv

Outputs in ``--output-dir``: ``config.json`` (resolved), ``log.jsonl``, ``loss_curve.png``,
``compressor_{in}to{out}.safetensors`` (the latest weights, loadable with
``pretrain_token_compressor``) and ``checkpoints/step-NNNNNNNN/`` (weights + trainer state, for
``--resume``). Every file and checkpoint folder appears atomically. All randomness is derived
from ``--seed``, the epoch and the step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vision_token_compression import (
    TokenCompressor,
    atomic_write_text,
    load_compressor_into,
    non_finite_tensors,
    publish_folder,
    save_compressor,
)

from .data import ImageFolderDataset, ShardedShuffleSampler
from .feature_cache import build_feature_cache, files_digest
from .features import FrozenCLIPFeatures, ImagePreprocessor, load_image_processor
from .losses import LossConfig, compression_loss
from .plotting import plot_curves
from .validation import check_choice, check_int, check_number, check_text, flag

logger = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.pt"
# Largest --seed: per-step generator seeds (seed · 1_000_003 + step · world_size + rank) must fit in 64 bits.
MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig:
    """Everything a compressor pretraining run depends on; saved as ``config.json``.

    Every field is checked on construction (``validate``): a nonsense value is a ``ValueError`` that
    names its flag, the value and what is allowed, before anything loads.

    Args:
        data: Image folders (searched recursively for jpg/jpeg/png/webp).
        output_dir: Where checkpoints, logs and the final compressors go.
        vision_tower: Hub name or local path of the CLIP vision model LLaVA uses.
        select_layer: LLaVA's ``mm_vision_select_layer``.
        select_feature: LLaVA's ``mm_vision_select_feature`` (recorded; only patch tokens are compressed).
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5) or ``"crop"`` preprocessing.
        output_sizes: Output grid sides; one compressor each (12 → 144 tokens, 8 → 64).
        init: Initial compressor weights, ``"average"`` or ``"random"``.
        epochs: Passes over the images.
        max_steps: Stop after this many optimizer steps (sizes the schedule), if set.
        batch_size: Images per process per step.
        lr: Peak learning rate of every compressor; None picks ``AUTO_LR_TIMES_FAN_IN / (kernel² · C)``
            per compressor (1.1e-5 for ViT-L with a 3×3 kernel), see ``auto_lr``.
        weight_decay: AdamW decay; it pulls the kernel toward zero, not toward the average init.
        warmup_ratio: Share of the steps with linear warm-up.
        min_lr_ratio: Final learning rate of the cosine schedule, as a share of ``lr``.
        grad_clip: Gradient norm clip (0: off).
        precision: ``auto`` is bf16 (or fp16) autocast on a GPU and fp32 on CPU; ``bf16`` works on CPU too.
        seed: Seed of the random init, the shuffling and the loss's random projections.
        num_workers: DataLoader workers per process.
        feature_cache: Folder for an on-disk feature cache (None: encode images every epoch).
        log_every: Steps between log records.
        save_every_steps: Also checkpoint every this many steps (0: at epoch ends only).
        keep_checkpoints: Complete checkpoints to keep (the newest).
        device: ``cuda``, ``cpu`` or None for the local GPU if there is one.
        loss: Loss weights and settings.
    """

    data: list[str]
    output_dir: str
    vision_tower: str = "openai/clip-vit-large-patch14-336"
    select_layer: int = -2
    select_feature: Literal["patch", "cls_patch"] = "patch"
    image_aspect_ratio: Literal["pad", "crop"] = "pad"
    output_sizes: list[int] = field(default_factory=lambda: [12])
    init: Literal["average", "random"] = "average"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: Precision = "auto"
    seed: int = 0
    num_workers: int = 4
    feature_cache: str | None = None
    log_every: int = 10
    save_every_steps: int = 0
    keep_checkpoints: int = 2
    device: str | None = None
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        self.validate()

    def validate(self) -> None:
        """Check every field (types, ranges, finiteness) before a run starts; errors name the flag.

        Runs on construction, before CLIP loads. What needs the tower (output sizes below its grid,
        the select layer in range) is checked by ``check_against_tower`` from the tower's config alone.
        """
        if isinstance(self.data, (str, os.PathLike)) or not isinstance(self.data, (list, tuple)) or not self.data:
            raise ValueError(f"No image folders given: pass {flag('data')} FOLDER [FOLDER ...], got {self.data!r}.")
        for folder in self.data:
            check_text("data", folder)
        check_text("output_dir", self.output_dir)
        check_text("vision_tower", self.vision_tower)
        check_int("select_layer", self.select_layer)
        check_choice("select_feature", self.select_feature, ("patch", "cls_patch"))
        check_choice("image_aspect_ratio", self.image_aspect_ratio, ("pad", "crop"))
        check_choice("init", self.init, ("average", "random"))
        check_choice("precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        if not isinstance(self.output_sizes, (list, tuple)) or not self.output_sizes:
            raise ValueError(
                f"{flag('output_sizes')} must list output grid sides such as 12 8, got {self.output_sizes!r}."
            )
        for size in self.output_sizes:
            check_int("output_sizes", size, 1, hint="Each is an output grid side: 12 → 144 tokens, 8 → 64.")
        if len(set(self.output_sizes)) != len(self.output_sizes):
            raise ValueError(
                f"{flag('output_sizes')} must be distinct grid sides such as 12 8, got {self.output_sizes}."
            )
        check_int("epochs", self.epochs, 1)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, 1, hint="Leave it out to train for --epochs.")
        check_int("batch_size", self.batch_size, 1)
        if self.lr is not None:
            check_number("lr", self.lr, 0, low_open=True, hint="Leave --lr out for the automatic learning rate.")
        check_number("weight_decay", self.weight_decay, 0)
        check_number("warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1,
                     hint="The cosine schedule ends at this share of --lr.")
        check_number("grad_clip", self.grad_clip, 0, hint="0 turns clipping off.")
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("num_workers", self.num_workers, 0)
        check_text("feature_cache", self.feature_cache, optional=True)
        check_int("log_every", self.log_every, 1)
        check_int("save_every_steps", self.save_every_steps, 0, hint="0 saves at epoch ends only.")
        check_int("keep_checkpoints", self.keep_checkpoints, 1)
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"{flag('device')} must be cpu, cuda or cuda:N, got {self.device!r}.") from err
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"{flag('device')} is {self.device!r}, but CUDA is not available here; use --device cpu."
                )
        if not isinstance(self.loss, LossConfig):
            raise ValueError(f"loss must be a LossConfig, got {type(self.loss).__name__}.")


# ---------------------------------------------------------------------------------------------
# Pieces of the run
# ---------------------------------------------------------------------------------------------


class CompressorBank(nn.Module):
    """One ``TokenCompressor`` per output grid, all applied to the same tokens (one DDP module)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], hidden_dim: int, init: str) -> None:
        super().__init__()
        self.compressors = nn.ModuleDict({
            f"{input_size}to{out}": TokenCompressor(input_size, out, hidden_dim, init=init) for out in output_sizes
        })

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, N, C) → {name: (B, M, C)}."""
        return {name: compressor(tokens) for name, compressor in self.compressors.items()}


@dataclass
class Distributed:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average a tensor over processes."""
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values


def setup_distributed(device: str | None) -> Distributed:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run alone."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        device=torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"),
    )


def check_against_tower(config: TrainConfig) -> None:
    """Check the settings that depend on the tower (output sizes, select layer) from its config alone.

    Reads only the tower's config.json, so bad values stop the run before the weights load.
    """
    from transformers import CLIPVisionConfig

    tower = CLIPVisionConfig.from_pretrained(config.vision_tower)
    grid = tower.image_size // tower.patch_size
    for size in config.output_sizes:
        if not 1 <= size < grid:
            raise ValueError(
                f"{flag('output_sizes')} must be grid sides in [1, {grid - 1}]: {config.vision_tower} has a "
                f"{grid}×{grid} patch grid, which the compressor only reduces; got {size} in {config.output_sizes}."
            )
    layers = tower.num_hidden_layers
    if not -(layers + 1) <= config.select_layer <= layers:
        raise ValueError(
            f"{flag('select_layer')} must be in [{-(layers + 1)}, {layers}] for {config.vision_tower} "
            f"(embeddings + {layers} layers), got {config.select_layer}; LLaVA-1.5 uses -2."
        )


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None: fp32, no autocast).

    ``auto`` is bf16 on GPUs that support it, else fp16, and fp32 on CPU. bf16 also runs on CPU
    (CPU autocast); fp16 needs a GPU, where its loss scaler works.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs a GPU; use --precision bf16 or fp32 on {device}.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


# Adam moves every weight by about lr per step, and an output channel sums kernel² · C weighted
# inputs whose gradients share signs: the change of a token grows with that fan-in. lr · fan-in
# ≈ 0.1 trained stably on both the tiny test tower (C=32) and a ViT-L stand-in (C=1024), where a
# fixed 1e-4 diverged at C=1024.
AUTO_LR_TIMES_FAN_IN = 0.1


def auto_lr(compressor: TokenCompressor) -> float:
    """Default peak learning rate: ``AUTO_LR_TIMES_FAN_IN / (kernel² · hidden_dim)``."""
    return AUTO_LR_TIMES_FAN_IN / (compressor.kernel_size**2 * compressor.hidden_dim)


def _grad_scaler(enabled: bool):
    """Loss scaler for fp16 autocast on a GPU (a no-op when disabled); torch.amp's from torch 2.3 on."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (partial ones are hidden ``.partial`` folders)."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _write_trainer_state(state: dict, path: Path) -> None:
    """torch.save of plain tensors and numbers (loadable with weights_only=True)."""
    torch.save(state, path)


def read_trainer_state(checkpoint: Path) -> dict:
    """The optimizer, scheduler, scaler and progress saved in a checkpoint folder."""
    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)


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
        if not self.enabled:
            return
        steps = [r for r in self.records if r.get("event") == "train"]
        keys = [k for k in (steps[-1] if steps else {}) if k == "loss" or k.endswith(("/window", "/distribution"))]
        plot_curves({k: [(r["step"], r[k]) for r in steps if k in r] for k in keys}, self.plot_path,
                    title="compressor pretraining loss")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Holds the models, data and optimizer of one run; ``run()`` trains to the end."""

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.dist = setup_distributed(config.device)
        self.output_dir = Path(config.output_dir)
        self.autocast_dtype = resolve_precision(config.precision, self.dist.device)
        check_against_tower(config)
        self._prepare_output_dir(resume)
        torch.manual_seed(config.seed)

        tower_dtype = self.autocast_dtype or torch.float32
        logger.info("Loading CLIP tower %s (select_layer=%d)", config.vision_tower, config.select_layer)
        self.extractor = FrozenCLIPFeatures(
            config.vision_tower, config.select_layer, config.select_feature, dtype=tower_dtype,
        ).to(self.dist.device)
        standin_of = getattr(self.extractor.config, "standin_of", None)
        if standin_of:
            logger.warning(
                "%s is a random-weight stand-in of %s: its features, and a compressor fitted to them, mean "
                "nothing. Use real weights for a compressor you will deploy.", config.vision_tower, standin_of,
            )
        self.grid = self.extractor.grid_size
        self.bank = CompressorBank(self.grid, config.output_sizes, self.extractor.hidden_size, config.init)
        self.bank.to(self.dist.device)
        self.model: nn.Module = self.bank
        if self.dist.world_size > 1:
            self.model = DistributedDataParallel(
                self.bank, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
            )

        self.images = ImageFolderDataset(
            config.data, ImagePreprocessor(load_image_processor(config.vision_tower), config.image_aspect_ratio),
        )
        self.dataset = self._build_dataset()
        self.sampler = ShardedShuffleSampler(
            len(self.dataset), self.dist.world_size, self.dist.rank, shuffle=True, seed=config.seed,
        )
        self.steps_per_epoch = math.ceil(self.sampler.per_rank / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

        self.lrs = {name: auto_lr(c) if config.lr is None else config.lr for name, c in self.bank.compressors.items()}
        self.optimizer = torch.optim.AdamW(
            [{"params": c.parameters(), "lr": self.lrs[name]} for name, c in self.bank.compressors.items()],
            weight_decay=config.weight_decay,
        )
        warmup = round(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, warmup, config.min_lr_ratio),
        )
        self.scaler = _grad_scaler(self.autocast_dtype == torch.float16)
        self.step = 0
        complete = list_checkpoints(self.output_dir) if resume else []
        resume_from = complete[-1] if complete else None
        if resume and resume_from is None:
            logger.warning("--resume: no checkpoint in %s yet, starting from step 0.", self.output_dir / "checkpoints")
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        self.log = RunLog(self.output_dir, self.step if resume_from else None, self.dist.is_main)
        if self.dist.is_main:
            _write_json(self.output_dir / "config.json", {
                **asdict(config), "world_size": self.dist.world_size, "num_images": len(self.images),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "resolved_lr": self.lrs,
                "autocast_dtype": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "float32",
            })
        logger.info(
            "%d images, %d process(es) × batch %d: %d steps per epoch, %d steps in all; compressors: %s",
            len(self.images), self.dist.world_size, config.batch_size, self.steps_per_epoch, self.total_steps,
            ", ".join(self.bank.compressors),
        )

    # -- setup ---------------------------------------------------------------------------------

    def _prepare_output_dir(self, resume: bool) -> None:
        existing = list_checkpoints(self.output_dir)
        if existing and not resume:  # every rank sees it and stops, none waits at the barrier
            raise FileExistsError(
                f"{self.output_dir} already holds checkpoints ({existing[-1].name}). "
                f"Pass --resume to continue that run, or choose another --output-dir."
            )
        if self.dist.is_main:
            (self.output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            for stale in (self.output_dir / "checkpoints").glob(".*.partial"):
                logger.warning("Removing an incomplete checkpoint left by a killed run: %s", stale)
                shutil.rmtree(stale)
        self.dist.barrier()

    def _build_dataset(self):
        if self.config.feature_cache is None:
            return self.images
        cfg = self.extractor.config
        fingerprint = {
            "files_sha256": files_digest(self.images.files), "num_files": len(self.images),
            "vision_tower": str(Path(self.config.vision_tower).resolve()) if Path(self.config.vision_tower).exists()
            else self.config.vision_tower,
            "tower_config": json.loads(cfg.to_json_string()), "select_layer": self.config.select_layer,
            "tower_dtype": str(self.extractor.dtype),  # a bf16 tower's features are not an fp32 tower's
            "image_aspect_ratio": self.config.image_aspect_ratio,
            "image_processor": json.loads(self.images.transform.image_processor.to_json_string()),
        }
        return build_feature_cache(
            self.config.feature_cache, fingerprint, self.images, self._encode,
            (self.grid**2, self.extractor.hidden_size), batch_size=self.config.batch_size,
            num_workers=self.config.num_workers, rank=self.dist.rank, world_size=self.dist.world_size,
            barrier=self.dist.barrier,
        )

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.extractor.patch_tokens(self.extractor(pixels.to(self.dist.device, non_blocking=True)))

    # -- checkpoints ---------------------------------------------------------------------------

    def _load_checkpoint(self, folder: Path) -> None:
        state = read_trainer_state(folder)
        saved = state.get("config", {})
        if sorted(saved.get("output_sizes", [])) != sorted(self.config.output_sizes):
            raise ValueError(
                f"Cannot resume {folder}: it trained output_sizes={saved.get('output_sizes')} but this run asks "
                f"for {self.config.output_sizes}. Use the same --output-sizes or a new --output-dir."
            )
        for key in ("vision_tower", "select_layer", "batch_size", "seed"):
            if saved.get(key) != getattr(self.config, key):
                logger.warning("Resuming with %s=%r; the checkpoint used %r.", key, getattr(self.config, key), saved.get(key))
        if state.get("world_size") != self.dist.world_size:
            logger.warning("Resuming on %d process(es); the checkpoint ran on %s: the data order changes.",
                           self.dist.world_size, state.get("world_size"))
        for name, compressor in self.bank.compressors.items():
            load_compressor_into(compressor, folder / f"compressor_{name}.safetensors",
                                 vision_tower=self.config.vision_tower, select_layer=self.config.select_layer,
                                 select_feature=self.config.select_feature)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        logger.info("Resumed from %s at step %d (epoch %d)", folder, self.step, self.step // self.steps_per_epoch)

    def _save_compressors(self, folder: Path, extra: dict[str, str]) -> None:
        for name, compressor in self.bank.compressors.items():
            save_compressor(
                compressor, folder / f"compressor_{name}.safetensors", vision_tower=self.config.vision_tower,
                select_layer=self.config.select_layer, select_feature=self.config.select_feature, extra=extra,
            )

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` (via a hidden partial folder) and the top-level compressors.

        Non-finite weights are never written (every process checks, so all stop together).
        """
        self._check_finite_weights()
        if not self.dist.is_main:
            return None
        final = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        partial = final.with_name(f".{final.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        extra = {
            "step": str(self.step), "epoch": f"{self.step / self.steps_per_epoch:.3f}",
            "trainer": "vision_token_compression.train", "image_aspect_ratio": self.config.image_aspect_ratio,
        }
        self._save_compressors(partial, extra)
        _write_trainer_state({
            "step": self.step, "world_size": self.dist.world_size, "config": _plain(asdict(self.config)),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }, partial / TRAINER_STATE)
        publish_folder(partial, final)  # the folder appears complete or not at all
        self._save_compressors(self.output_dir, extra)  # each file is written atomically
        for old in list_checkpoints(self.output_dir)[:-self.config.keep_checkpoints]:
            shutil.rmtree(old)
        self.log.plot()
        logger.info("Saved checkpoint %s", final)
        return final

    # -- training ------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def train_step(self, inputs: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a batch of pixels (or cached features); returns the loss terms."""
        with torch.no_grad():
            if self.config.feature_cache is None:
                tokens = self._encode(inputs)
            else:
                tokens = inputs.to(self.dist.device, non_blocking=True)
        tokens = tokens.float()  # (B, N, C)
        generator = torch.Generator(self.dist.device).manual_seed(
            self.config.seed * 1_000_003 + self.step * self.dist.world_size + self.dist.rank
        )
        with self._autocast():
            outputs = self.model(tokens)
        total = tokens.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for name, compressed in outputs.items():
            losses = compression_loss(tokens, compressed, self.bank.compressors[name].geometry, self.config.loss, generator)
            total = total + losses["loss"]
            terms.update({f"{name}/{k}": v.detach() for k, v in losses.items() if k != "loss"})
        self._stop_on_non_finite_loss(total, terms)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(
            self.bank.parameters(), self.config.grad_clip if self.config.grad_clip > 0 else float("inf"),
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        names = ["loss", "grad_norm", *terms]
        values = self.dist.mean(torch.stack([total.detach(), grad_norm.detach().float(), *terms.values()]))
        return dict(zip(names, values.tolist()))

    def _stop_on_non_finite_loss(self, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Raise ``FloatingPointError`` before the update if the loss (mean over processes) is NaN or ±inf.

        Every process sees the same mean, so all stop together; the weights are still those of the
        previous step and nothing is saved. Costs one small all-reduce and a device sync per step,
        which the step's logging values need anyway.
        """
        loss = self.dist.mean(total.detach().float().reshape(1)).item()
        if math.isfinite(loss):
            return
        local = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        saved = list_checkpoints(self.output_dir)
        raise FloatingPointError(
            f"Training stopped at step {self.step + 1}: the loss is {loss} (this process: {local}). The weights "
            f"were not updated and nothing was saved; the last finite weights are in "
            f"{saved[-1] if saved else 'no checkpoint yet'}. Lower --lr (now {self._lrs_text()}), train in fp32 "
            f"(--precision fp32), or look for broken images in this step's batch."
        )

    def _check_finite_weights(self) -> None:
        """Raise ``FloatingPointError`` if any compressor weight is NaN or ±inf (checked before every save)."""
        bad = non_finite_tensors({
            f"compressor_{name}.{key}": value
            for name, compressor in self.bank.compressors.items() for key, value in compressor.state_dict().items()
        })
        if bad:
            saved = list_checkpoints(self.output_dir)
            raise FloatingPointError(
                f"Training stopped at step {self.step}: the weights are no longer finite after the update "
                f"({'; '.join(f'{k}: {v}' for k, v in bad.items())}), so they were not saved; the last finite "
                f"weights are in {saved[-1] if saved else 'no checkpoint yet'}. Lower --lr (now {self._lrs_text()})."
            )

    def _lrs_text(self) -> str:
        return ", ".join(f"{lr:.3g} for {name}" for name, lr in self.lrs.items())

    def run(self) -> dict:
        """Train until ``total_steps``; return the last log record."""
        config = self.config
        if self.step >= self.total_steps:
            logger.info("Nothing to do: step %d of %d already reached.", self.step, self.total_steps)
            return {"step": self.step}
        self.bank.train()
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.dist.is_main,
                        dynamic_ncols=True)
        window = _Meter()
        record: dict = {}
        while self.step < self.total_steps:
            epoch, batch_in_epoch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start=batch_in_epoch * config.batch_size)
            loader = DataLoader(
                self.dataset, batch_size=config.batch_size, sampler=self.sampler, num_workers=config.num_workers,
                pin_memory=self.dist.device.type == "cuda", persistent_workers=False,
            )
            epoch_meter = _Meter()
            tick = time.perf_counter()
            for inputs, _ in loader:
                data_time = time.perf_counter() - tick
                values = self.train_step(inputs)
                if self.dist.device.type == "cuda":
                    torch.cuda.synchronize(self.dist.device)
                now = time.perf_counter()
                for meter in (window, epoch_meter):
                    meter.add(values, len(inputs) * self.dist.world_size, data_time, now - tick - data_time)
                progress.update(1)
                progress.set_postfix(loss=f"{values['loss']:.4f}")
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    record = {"event": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                              **{f"{name}/lr": lr for name, lr in zip(self.lrs, self.scheduler.get_last_lr())},
                              **window.summary()}
                    self.log.write(record)
                    window = _Meter()
                end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if end_of_epoch or (config.save_every_steps and self.step % config.save_every_steps == 0):
                    if end_of_epoch:
                        self.log.write({"event": "epoch", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                                        **epoch_meter.summary()})
                    self.save_checkpoint()
                    self.dist.barrier()
                if self.step >= self.total_steps:
                    break
                tick = time.perf_counter()
        progress.close()
        return record


class _Meter:
    """Running means of loss terms, plus images/s and the share of time spent waiting for data."""

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

    def summary(self) -> dict[str, float]:
        elapsed = self.data_s + self.compute_s
        return {
            **{k: v / max(self.steps, 1) for k, v in self.sums.items()},
            "images_per_s": self.images / elapsed if elapsed else 0.0,
            "data_wait_fraction": self.data_s / elapsed if elapsed else 0.0,
            "data_s": self.data_s, "compute_s": self.compute_s,
        }


def _plain(value):
    """dataclass dicts → JSON-like values (for weights_only loading and config.json)."""
    return json.loads(json.dumps(value))


def _write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run compressor pretraining; return the output folder."""
    trainer = Trainer(config, resume=resume)
    try:
        trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return trainer.output_dir


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option maps onto a ``TrainConfig`` or ``LossConfig`` field."""
    defaults, loss = TrainConfig(data=["."], output_dir="."), LossConfig()
    p = argparse.ArgumentParser(
        prog="toconv-train-compressor", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", nargs="+", required=True, help="image folders (recursive; jpg/png/webp)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--vision-tower", default=defaults.vision_tower, help="hub name or local path")
    p.add_argument("--select-layer", type=int, default=defaults.select_layer)
    p.add_argument("--select-feature", choices=["patch", "cls_patch"], default=defaults.select_feature)
    p.add_argument("--image-aspect-ratio", choices=["pad", "crop"], default=defaults.image_aspect_ratio)
    p.add_argument("--output-sizes", type=int, nargs="+", default=defaults.output_sizes,
                   help="output grid sides, one compressor each (12: 144 tokens, 8: 64)")
    p.add_argument("--init", choices=["average", "random"], default=defaults.init)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"peak learning rate (default: {AUTO_LR_TIMES_FAN_IN:g} / (kernel² · hidden) per compressor)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    p.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio)
    p.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=defaults.precision)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--num-workers", type=int, default=defaults.num_workers)
    p.add_argument("--feature-cache", default=None, help="folder for cached CLIP features (float16)")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--save-every-steps", type=int, default=defaults.save_every_steps)
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    g = p.add_argument_group("loss")
    g.add_argument("--window-weight", type=float, default=loss.window_weight)
    g.add_argument("--distribution", choices=["sliced_wasserstein", "sinkhorn", "none"], default=loss.distribution)
    g.add_argument("--distribution-weight", type=float, default=loss.distribution_weight)
    g.add_argument("--num-projections", type=int, default=loss.num_projections)
    g.add_argument("--sinkhorn-epsilon", type=float, default=loss.sinkhorn_epsilon)
    g.add_argument("--sinkhorn-iterations", type=int, default=loss.sinkhorn_iterations)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the run's config from parsed arguments."""
    values = vars(args)
    loss = LossConfig(**{f.name: values[f.name] for f in dataclasses.fields(LossConfig)})
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss"}
    return TrainConfig(**{k: values[k] for k in fields}, loss=loss)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m vision_token_compression.train`` and ``toconv-train-compressor``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        check_against_tower(config)
    except ValueError as err:
        parser.error(str(err))  # exits with status 2, before CLIP's weights load
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    train(config, resume=args.resume)


if __name__ == "__main__":
    main()
