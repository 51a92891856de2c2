"""A pretraining run's settings: ``TrainConfig``, the command line that fills it, and the checks against the tower.

Every field is checked when the config is built, and the settings that depend on the tower (output
sizes, select layer) against the tower's ``config.json`` alone, so a bad value stops the run before
CLIP's weights load.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from .losses import LossConfig
from .optim import AUTO_LR_TIMES_FAN_IN
from .precision import Precision
from .validation import check_choice, check_int, check_number, check_text, flag

# Largest --seed: per-step generator seeds (seed · 1_000_003 + step · world_size + rank) must fit in 64 bits.
MAX_SEED = 2**32 - 1
DESCRIPTION = "Pretrain ToConv compressors on frozen CLIP features, so an existing LLaVA can use fewer tokens."


@dataclass
class TrainConfig:
    """Everything a compressor pretraining run depends on; saved as ``config.json``.

    Every field is checked on construction (``validate``): a nonsense value is a ``ValueError`` that
    names its flag, the value and what is allowed, before anything loads.

    Args:
        data: Image folders (searched recursively for jpg/jpeg/png/webp).
        output_dir: Where checkpoints, logs and the final compressors go.
        vision_tower: Hub name or local path of the vision model LLaVA uses (CLIP, or SigLIP
            when its name or config says so).
        select_layer: LLaVA's ``mm_vision_select_layer``.
        select_feature: LLaVA's ``mm_vision_select_feature`` (recorded; only patch tokens are compressed).
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5) or ``"crop"`` preprocessing.
        output_sizes: Output grid sides; one compressor each (12 → 144 tokens, 8 → 64).
        init: Initial compressor weights, ``"average"`` or ``"random"``.
        epochs: Passes over the images.
        max_steps: Stop after this many optimizer steps (sizes the schedule), if set.
        batch_size: Images per process per step.
        lr: Peak learning rate of every compressor; None picks ``AUTO_LR_TIMES_FAN_IN / (kernel² · C)``
            per compressor (1.1e-5 for ViT-L with a 3×3 kernel), see ``optim.auto_lr``.
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
        self._check_sources()
        self._check_output_sizes()
        self._check_run_settings()
        self._check_device()
        if not isinstance(self.loss, LossConfig):  # a ValueError like every other bad setting
            raise ValueError(f"loss must be a LossConfig, got {type(self.loss).__name__}.")  # noqa: TRY004

    def _check_sources(self) -> None:
        """Paths, names and choices."""
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

    def _check_output_sizes(self) -> None:
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

    def _check_run_settings(self) -> None:
        """Counts, rates, the seed and the cache and checkpoint settings."""
        check_int("epochs", self.epochs, 1)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, 1, hint="Leave it out to train for --epochs.")
        check_int("batch_size", self.batch_size, 1)
        if self.lr is not None:
            check_number("lr", self.lr, 0, low_open=True, hint="Leave --lr out for the automatic learning rate.")
        check_number("weight_decay", self.weight_decay, 0)
        check_number("warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1, hint="The cosine schedule ends at this share of --lr.")
        check_number("grad_clip", self.grad_clip, 0, hint="0 turns clipping off.")
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("num_workers", self.num_workers, 0)
        check_text("feature_cache", self.feature_cache, optional=True)
        check_int("log_every", self.log_every, 1)
        check_int("save_every_steps", self.save_every_steps, 0, hint="0 saves at epoch ends only.")
        check_int("keep_checkpoints", self.keep_checkpoints, 1)

    def _check_device(self) -> None:
        if self.device is None:
            return
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{flag('device')} must be cpu, cuda or cuda:N, got {self.device!r}.") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{flag('device')} is {self.device!r}, but CUDA is not available here; use --device cpu.")


def check_against_tower(config: TrainConfig) -> None:
    """Check the settings that depend on the tower (output sizes, select layer and feature) from its config alone.

    Reads only the tower's config.json, so bad values stop the run before the weights load. A tower that
    exists neither locally nor on the Hub is a ``FileNotFoundError`` saying "not found".
    """
    from vision_token_compression import load_pretrained_config
    from vision_token_compression.towers import check_select_feature, check_select_layer, grid_side, tower_family

    family = tower_family(config.vision_tower)
    check_select_feature(config.select_feature, family, config.vision_tower, flag("select_feature"))
    tower = load_pretrained_config(
        family.config_type(), config.vision_tower, f"{flag('vision_tower')}",
        f"Pass a local folder of a {family.name} vision model (with config.json) or a Hub name such as "
        f"{family.example}.",
    )
    grid = grid_side(tower)
    for size in config.output_sizes:
        if not 1 <= size < grid:
            raise ValueError(
                f"{flag('output_sizes')} must be grid sides in [1, {grid - 1}]: {config.vision_tower} has a "
                f"{grid}×{grid} patch grid, which the compressor only reduces; got {size} in {config.output_sizes}."
            )
    check_select_layer(config.select_layer, tower.num_hidden_layers, config.vision_tower, flag("select_layer"))


# ---- the command line: every option maps onto a TrainConfig or LossConfig field ----------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``toconv-train-compressor``; defaults are ``TrainConfig``'s and ``LossConfig``'s."""
    defaults = TrainConfig(data=["."], output_dir=".")
    p = argparse.ArgumentParser(
        prog="toconv-train-compressor", description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    _add_loss_arguments(p.add_argument_group("loss"), defaults.loss)
    return p


def _add_loss_arguments(group: argparse._ArgumentGroup, loss: LossConfig) -> None:
    group.add_argument("--window-weight", type=float, default=loss.window_weight)
    group.add_argument("--distribution", choices=["sliced_wasserstein", "sinkhorn", "none"], default=loss.distribution)
    group.add_argument("--distribution-weight", type=float, default=loss.distribution_weight)
    group.add_argument("--num-projections", type=int, default=loss.num_projections)
    group.add_argument("--sinkhorn-epsilon", type=float, default=loss.sinkhorn_epsilon)
    group.add_argument("--sinkhorn-iterations", type=int, default=loss.sinkhorn_iterations)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the run's config from parsed arguments."""
    values = vars(args)
    loss = LossConfig(**{f.name: values[f.name] for f in dataclasses.fields(LossConfig)})
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss"}
    return TrainConfig(**{k: values[k] for k in fields}, loss=loss)
