"""What one pretraining run holds (tower, compressors, data, optimizer, progress) and one optimizer step.

Images → frozen vision tower (CLIP or SigLIP, at LLaVA's select layer and feature) → one ``TokenCompressor`` per
output grid, all fed by the same forward pass. The loss keeps each compressed token close to the
tokens of its window (cosine) and the compressed set in the distribution of the original tokens
(sliced Wasserstein or entropic OT). Only the compressors train. The epochs are ``loop.run``'s.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vision_token_compression import TokenCompressor, atomic_write_text, non_finite_tensors

from . import loop, run_state
from .config import TrainConfig, check_against_tower
from .data import ImageFolderDataset, ShardedShuffleSampler
from .distributed import setup_distributed
from .feature_cache import build_feature_cache, files_digest
from .features import FrozenTowerFeatures, ImagePreprocessor, load_image_processor
from .losses import compression_loss
from .optim import build_optimizer
from .precision import autocast, grad_scaler, resolve_precision
from .run_log import Meter, RunLog

logger = logging.getLogger(__name__)


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


class Trainer:
    """Holds the models, data and optimizer of one run; ``run()`` trains to the end."""

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.dist = setup_distributed(config.device)
        self.output_dir = Path(config.output_dir)
        self.autocast_dtype = resolve_precision(config.precision, self.dist.device)
        check_against_tower(config)
        resume_from = run_state.prepare_output_dir(self.output_dir, resume, self.dist)
        torch.manual_seed(config.seed)
        self._build_models()
        self._build_data()
        self.lrs, self.optimizer, self.scheduler = build_optimizer(
            self.bank.compressors, config.lr, config.weight_decay, self.total_steps, config.warmup_ratio,
            config.min_lr_ratio,
        )
        self.scaler = grad_scaler(self.autocast_dtype == torch.float16)
        self.step = 0
        # Running means of the current epoch and of the steps since the last log record (saved with checkpoints).
        self.meters: dict[str, Meter] = {"epoch": Meter(), "window": Meter()}
        if resume_from is not None:
            run_state.load_checkpoint(self, resume_from)
        self.log = RunLog(self.output_dir, self.step if resume_from else None, self.dist.is_main)
        self._write_resolved_config()

    # -- set-up ---------------------------------------------------------------------------------

    def _build_models(self) -> None:
        """The frozen vision tower and one compressor per output size (wrapped in DDP across processes)."""
        config = self.config
        logger.info("Loading vision tower %s (select_layer=%d)", config.vision_tower, config.select_layer)
        self.extractor = FrozenTowerFeatures(
            config.vision_tower, config.select_layer, config.select_feature, dtype=self.autocast_dtype or torch.float32,
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

    def _build_data(self) -> None:
        """Images (or their cached features), the resumable sampler, and the run's length in steps."""
        config = self.config
        self.images = ImageFolderDataset(
            config.data, ImagePreprocessor(load_image_processor(config.vision_tower), config.image_aspect_ratio),
        )
        self.dataset = self.images if config.feature_cache is None else self._feature_cache()
        self.sampler = ShardedShuffleSampler(
            len(self.dataset), self.dist.world_size, self.dist.rank, shuffle=True, seed=config.seed,
        )
        self.steps_per_epoch = math.ceil(self.sampler.per_rank / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

    def _feature_cache(self):
        """The on-disk feature cache of these images under this tower and preprocessing, filled if needed."""
        config, cfg = self.config, self.extractor.config
        tower = Path(config.vision_tower)
        fingerprint = {
            "files_sha256": files_digest(self.images.files), "num_files": len(self.images),
            "vision_tower": str(tower.resolve()) if tower.exists() else config.vision_tower,
            "tower_config": json.loads(cfg.to_json_string()), "select_layer": config.select_layer,
            "tower_dtype": str(self.extractor.dtype),  # a bf16 tower's features are not an fp32 tower's
            "image_aspect_ratio": config.image_aspect_ratio,
            "image_processor": json.loads(self.images.transform.image_processor.to_json_string()),
        }
        return build_feature_cache(
            config.feature_cache, fingerprint, self.images, self.encode, (self.grid**2, self.extractor.hidden_size),
            batch_size=config.batch_size, num_workers=config.num_workers, rank=self.dist.rank,
            world_size=self.dist.world_size, barrier=self.dist.barrier,
        )

    def _write_resolved_config(self) -> None:
        """``config.json``: the settings, plus what the run resolved (processes, steps, learning rates, dtype)."""
        if self.dist.is_main:
            dtype = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "float32"
            resolved = {
                **asdict(self.config), "world_size": self.dist.world_size, "num_images": len(self.images),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "resolved_lr": self.lrs,
                "autocast_dtype": dtype,
            }
            atomic_write_text(self.output_dir / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        logger.info(
            "%d images, %d process(es) × batch %d: %d steps per epoch, %d steps in all; compressors: %s",
            len(self.images), self.dist.world_size, self.config.batch_size, self.steps_per_epoch, self.total_steps,
            ", ".join(self.bank.compressors),
        )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels → (B, grid², C) frozen tower patch tokens."""
        return self.extractor.patch_tokens(self.extractor(pixels.to(self.dist.device, non_blocking=True)))

    # -- one step -------------------------------------------------------------------------------

    def train_step(self, inputs: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a batch of pixels (or cached features); returns the loss terms (mean over processes)."""
        with torch.no_grad():
            cached = self.config.feature_cache is not None
            tokens = inputs.to(self.dist.device, non_blocking=True) if cached else self.encode(inputs)
        tokens = tokens.float()  # (B, N, C)
        total, terms = self._loss(tokens)
        self._stop_on_non_finite_loss(total, terms)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        grad_clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.bank.parameters(), grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        values = self.dist.mean(torch.stack([total.detach(), grad_norm.detach().float(), *terms.values()]))
        return dict(zip(["loss", "grad_norm", *terms], values.tolist()))

    def _loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed loss of every compressor on ``tokens``, and each one's terms (detached, named ``name/term``)."""
        generator = torch.Generator(self.dist.device).manual_seed(
            self.config.seed * 1_000_003 + self.step * self.dist.world_size + self.dist.rank
        )
        with autocast(self.dist.device, self.autocast_dtype):
            outputs = self.model(tokens)
        total = tokens.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for name, compressed in outputs.items():
            geometry = self.bank.compressors[name].geometry
            losses = compression_loss(tokens, compressed, geometry, self.config.loss, generator)
            total = total + losses["loss"]
            terms.update({f"{name}/{k}": v.detach() for k, v in losses.items() if k != "loss"})
        return total, terms

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
        raise FloatingPointError(
            f"Training stopped at step {self.step + 1}: the loss is {loss} (this process: {local}). The weights "
            f"were not updated and nothing was saved; the last finite weights are in {self._last_checkpoint()}. "
            f"Lower --lr (now {self._lrs_text()}), train in fp32 (--precision fp32), or look for broken images in "
            f"this step's batch."
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` and the top-level compressors (main process); redraw the loss curve.

        Non-finite weights are never written (every process checks, so all stop together).
        """
        self._check_finite_weights()
        if not self.dist.is_main:
            return None
        final = run_state.save_checkpoint(self)
        self.log.plot()
        logger.info("Saved checkpoint %s", final)
        return final

    def _check_finite_weights(self) -> None:
        """Raise ``FloatingPointError`` if any compressor weight is NaN or ±inf (checked before every save)."""
        bad = non_finite_tensors({
            f"compressor_{name}.{key}": value
            for name, compressor in self.bank.compressors.items() for key, value in compressor.state_dict().items()
        })
        if bad:
            raise FloatingPointError(
                f"Training stopped at step {self.step}: the weights are no longer finite after the update "
                f"({'; '.join(f'{k}: {v}' for k, v in bad.items())}), so they were not saved; the last finite "
                f"weights are in {self._last_checkpoint()}. Lower --lr (now {self._lrs_text()})."
            )

    def _last_checkpoint(self) -> Path | str:
        saved = run_state.list_checkpoints(self.output_dir)
        return saved[-1] if saved else "no checkpoint yet"

    def _lrs_text(self) -> str:
        return ", ".join(f"{lr:.3g} for {name}" for name, lr in self.lrs.items())

    def run(self) -> dict:
        """Train until ``total_steps``; return the last log record."""
        return loop.run(self)
