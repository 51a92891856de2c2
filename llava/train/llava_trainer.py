"""``LLaVATrainer``: the Hugging Face Trainer with LLaVA's batching, learning rates and checkpoints.

On top of ``transformers.Trainer`` it

- batches image and text-only samples separately, grouped by length (``group_by_modality_length``);
- gives the projector and the token compressor their own learning rate (``mm_projector_lr``), and
  CLIP its own when it is unfrozen (``mm_vision_tower_lr``);
- in projector-only pretraining (``tune_mm_mlp_adapter``) saves only ``mm_projector.bin``
  (projector + token compressor) in every checkpoint and at the end, gathered under ZeRO-3;
- in LoRA fine-tuning also writes ``non_lora_trainables.bin`` into each checkpoint, so any
  ``checkpoint-N`` loads with ``load_pretrained_model``, and reads it back when training resumes
  from one (projector, compressor and the other non-LoRA weights continue with the optimizer);
  both files carry the compressor's grid-size record, checked by every loader;
- writes every ``checkpoint-N`` under a hidden temporary name (``.checkpoint-N.partial``) and
  renames it when complete, so a run killed while saving leaves the previous checkpoints intact
  and resumable; checkpoints beyond ``save_total_limit`` are deleted the same way (renamed, then
  removed), once more at the end of training for what a kill left;
- resumed from a run's last checkpoint (killed while writing the final outputs), trains no further
  and only writes them;
- stops with ``NonFiniteLossError`` at the first NaN/inf loss (or, without fp16 loss scaling, NaN/inf
  gradient norm), before the optimizer step, so no weights or checkpoint ever hold NaN;
- counts samples the dataset skipped (``data_error_policy=skip``) and logs the count.

Everything else (DDP via torchrun, DeepSpeed, mixed precision, gradient accumulation) is the
Trainer's own, so scaling out needs no code here.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer import PREFIX_CHECKPOINT_DIR, TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from ..constants import NON_LORA_FILE, config_value
from . import atomic
from .checkpointing import (
    COMPRESSOR_KEYS,
    PROJECTOR_KEYS,
    load_non_lora_trainables,
    matches,
    non_lora_trainables_state,
    save_mm_adapter,
)

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN or infinite loss (or gradient norm); the message names the step and the value."""


# ----------------------------------------------------------------------------------------------
# Length-grouped sampling
# ----------------------------------------------------------------------------------------------


def _split_balanced(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal ``indices`` into ``num_chunks`` equal-sized chunks with similar total length (longest first)."""
    size = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for i in sorted(indices, key=lambda i: abs(lengths[i]), reverse=True):
        open_chunks = [c for c in range(num_chunks) if len(chunks[c]) < size]
        c = min(open_chunks, key=lambda c: totals[c])
        chunks[c].append(i)
        totals[c] += abs(lengths[i])
    return chunks


def _megabatches(indices: list[int], lengths: Sequence[int], megabatch_size: int, num_chunks: int) -> list[list[int]]:
    """Shuffled ``indices`` cut into megabatches, each dealt into ``num_chunks`` balanced batches."""
    out = []
    for start in range(0, len(indices), megabatch_size):
        mega = indices[start : start + megabatch_size]
        if len(mega) == megabatch_size:
            out.append([i for chunk in _split_balanced(mega, lengths, num_chunks) for i in chunk])
        else:
            out.append(sorted(mega, key=lambda i: abs(lengths[i]), reverse=True))
    return out


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """An epoch's order in which every per-device batch holds one modality and similar lengths.

    ``lengths`` is positive for samples with an image and negative for text-only ones.
    ``world_size`` is the number of per-device batches that make one optimizer step across all
    devices (devices × gradient accumulation). Full megabatches of both modalities are shuffled
    together; the two incomplete remainders go last, together.
    """
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}.")
    if any(n == 0 for n in lengths):
        raise ValueError("modality lengths must be non-zero (positive: with image, negative: text only).")
    megabatch_size = batch_size * world_size
    groups = [[i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n < 0]]
    full, rest = [], []
    for group in groups:
        if not group:
            continue
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        for mega in _megabatches(order, lengths, megabatch_size, world_size):
            (full if len(mega) == megabatch_size else rest).append(mega)
    full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    tail = [i for mega in rest for i in mega]
    return [i for mega in full for i in mega] + tail


class LengthGroupedSampler(Sampler[int]):
    """Samples an epoch from ``modality_length_grouped_indices`` (a new shuffle each epoch).

    Args:
        batch_size: Per-device batch size.
        world_size: Per-device batches in one optimizer step (devices × gradient accumulation).
        lengths: Sample lengths, signed by modality (see ``LazySupervisedDataset.modality_lengths``).
        generator: Random generator; the Trainer seeds the global one.
    """

    def __init__(
        self, batch_size: int, world_size: int, lengths: Sequence[int], generator: torch.Generator | None = None
    ) -> None:
        if lengths is None:
            raise ValueError("LengthGroupedSampler needs the dataset's modality lengths.")
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, self.generator))


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


class LLaVATrainer(Trainer):
    """``transformers.Trainer`` for LLaVA (see the module docstring).

    Args:
        tune_mm_mlp_adapter: Projector-only pretraining: checkpoints hold ``mm_projector.bin`` only.
            Defaults to ``args.tune_mm_mlp_adapter`` if the arguments carry it.
        use_im_start_end: Also save the input embeddings (new ``<im_start>``/``<im_end>`` rows) in
            ``mm_projector.bin``. Defaults to ``args.use_im_start_end``.
        *args, **kwargs: As ``transformers.Trainer``.
    """

    def __init__(
        self, *args: Any, tune_mm_mlp_adapter: bool | None = None, use_im_start_end: bool | None = None, **kwargs: Any
    ) -> None:
        self._staging_run_dir: str | None = None  # set while a checkpoint is written (see _save_checkpoint)
        super().__init__(*args, **kwargs)
        if tune_mm_mlp_adapter is None:
            tune_mm_mlp_adapter = bool(config_value(self.args, "tune_mm_mlp_adapter"))
        if use_im_start_end is None:
            use_im_start_end = bool(config_value(self.args, "use_im_start_end"))
        self.tune_mm_mlp_adapter = tune_mm_mlp_adapter
        self.use_im_start_end = use_im_start_end
        self.data_skipped = 0

    # Batching ------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not config_value(self.args, "group_by_modality_length"):
            return super()._get_train_sampler(train_dataset)
        lengths = getattr(dataset, "modality_lengths", None)
        if lengths is None:
            raise ValueError(
                f"group_by_modality_length needs a dataset with modality_lengths; {type(dataset).__name__} has none."
            )
        return LengthGroupedSampler(
            self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            lengths=lengths,
        )

    # Training loop --------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs: Any):
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self.args.should_save:
            # A run killed between writing a checkpoint and deleting the oldest leaves one too many.
            self._delete_old_checkpoints(super()._get_output_dir(trial))
        return output

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        if 0 < self.state.max_steps <= self.state.global_step:
            # Resumed from the run's last checkpoint (a kill during the final save): nothing is left to
            # train. The Trainer itself would run one step more when that checkpoint ends mid-epoch.
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    # Optimizer -----------------------------------------------------------------------------------

    def _lr_group(self, name: str) -> str:
        if matches(name, PROJECTOR_KEYS + COMPRESSOR_KEYS):
            return "projector"
        if "vision_tower" in name:
            return "vision_tower"
        return "default"

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Like the Trainer's, with separate learning rates for the projector + compressor and for CLIP."""
        lrs = {
            "projector": getattr(self.args, "mm_projector_lr", None),
            "vision_tower": getattr(self.args, "mm_vision_tower_lr", None),
        }
        if self.optimizer is not None or all(v is None for v in lrs.values()):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                buckets.setdefault((self._lr_group(name), name in decay), []).append(param)
        groups = []
        for (group, decays), params in sorted(buckets.items()):
            entry: dict[str, Any] = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if lrs.get(group) is not None:
                entry["lr"] = lrs[group]
            groups.append(entry)
            logger.info(
                "Optimizer group %s (%s): %d tensors, lr %s, weight decay %s", group,
                "decayed" if decays else "not decayed", len(params), entry.get("lr", self.args.learning_rate),
                entry["weight_decay"],
            )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # Loss and logging ----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped_samples", None)
        if skipped:
            self.data_skipped += len(skipped)
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            self._check_finite("loss", (result[0] if return_outputs else result).detach())
        return result

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # With fp16 the loss scaler expects inf/NaN gradients now and then: it skips that step.
        if grad_norm is not None and not self.args.fp16:
            self._check_finite("gradient norm", grad_norm)
        return grad_norm

    def _check_finite(self, what: str, value: torch.Tensor | float) -> None:
        """Stop at a NaN/inf ``value``, before the optimizer step can write it into the weights.

        Costs one device synchronisation per micro-batch (reading one number back).
        """
        if isinstance(value, torch.Tensor):
            if bool(torch.isfinite(value).all()):
                return
            value = value.float().item() if value.numel() == 1 else value.float().tolist()
        elif math.isfinite(value):
            return
        step = self.state.global_step + 1
        raise NonFiniteLossError(
            f"The training {what} is {value} at step {step} (of {self.state.max_steps}). Training stopped before "
            f"that step's update, so no weights or checkpoint hold it; checkpoints up to step {step - 1} are intact. "
            f"Look for a broken sample in that step's batch, lower --learning_rate / --mm_projector_lr, or train "
            f"in bf16 rather than fp16, then resume."
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.data_skipped:
            logs["data_skipped"] = self.data_skipped
        super().log(logs, start_time)

    # Saving --------------------------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is written, the Trainer's own saving code writes into the staging folder.
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` whole: into ``.checkpoint-N.partial/checkpoint-N``, then rename it.

        Every rank writes its part (RNG state, DeepSpeed shards) into the same staging folder; once
        all are done, the saving rank renames it and deletes checkpoints beyond ``save_total_limit``.
        """
        run_dir = super()._get_output_dir(trial)
        final = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = atomic.staging_folder(final)
        staged = staging_root / final.name
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging_root)
        try:
            self._write_checkpoint(model, trial, staged)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        atomic.publish_folder(staged, final)
        shutil.rmtree(staging_root, ignore_errors=True)
        self._delete_old_checkpoints(run_dir)

    def _write_checkpoint(self, model, trial, output_dir: Path) -> None:
        if not self.tune_mm_mlp_adapter:
            super()._save_checkpoint(model, trial)  # into output_dir, through _get_output_dir
            if _is_peft(self.model):
                self._save_non_lora(output_dir)
            return
        # Stage 1: the LLM and CLIP are frozen, so the adapter weights are the whole checkpoint.
        save_mm_adapter(
            self.model, output_dir, use_im_start_end=self.use_im_start_end, should_save=self.args.should_save
        )
        if self.args.should_save:
            self.state.save_to_json(str(output_dir / TRAINER_STATE_NAME))

    def _delete_old_checkpoints(self, run_dir: str) -> None:
        """The Trainer's ``rotate_checkpoints``, deleting each folder by renaming it away first."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        checkpoints = sort_checkpoints(run_dir, use_mtime=True)
        protected = {checkpoints[-1]}  # the newest, to resume from
        if self.state.best_model_checkpoint is not None:
            protected.add(str(Path(self.state.best_model_checkpoint)))
        excess = len(checkpoints) - max(limit, len(protected))
        for checkpoint in [c for c in checkpoints if c not in protected][:max(excess, 0)]:
            logger.info("Deleting older checkpoint %s (save_total_limit=%d)", checkpoint, limit)
            atomic.remove_tree(checkpoint)

    def _save_non_lora(self, output_dir: str | os.PathLike) -> None:
        state = non_lora_trainables_state(self.model)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.model.config.save_pretrained(output_dir)
            torch.save(state, os.path.join(output_dir, NON_LORA_FILE))  # inside the staged checkpoint folder

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's loading (LoRA adapter or full model), plus ``non_lora_trainables.bin`` for LoRA.

        Under DeepSpeed the Trainer restores the engine's own checkpoint instead (every trainable
        parameter included) and does not call this.
        """
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if _is_peft(self.model):
            load_non_lora_trainables(self.model, resume_from_checkpoint)

    def save_state(self) -> None:
        """``trainer_state.json`` in the output folder, atomically."""
        if self.is_world_process_zero():
            with atomic.atomic_file(os.path.join(self.args.output_dir, TRAINER_STATE_NAME)) as tmp:
                self.state.save_to_json(str(tmp))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """In projector-only pretraining write ``mm_projector.bin`` instead of the whole model."""
        if not self.tune_mm_mlp_adapter:
            return super().save_model(output_dir, _internal_call)
        save_mm_adapter(
            self.model, output_dir or self.args.output_dir,
            use_im_start_end=self.use_im_start_end, should_save=self.args.should_save,
        )


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
