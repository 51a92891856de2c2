"""The epochs of a run: batches through ``Trainer.train_step``, log records, checkpoints.

A resumed run starts mid-epoch where its checkpoint stopped: the sampler skips the batches that
epoch already trained on, and the running means of the epoch and of the log window continue from the
checkpoint (``trainer.meters``), so its records are those of the uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .run_log import Meter

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger(__name__)


def run(trainer: Trainer) -> dict:
    """Train until ``trainer.total_steps``; return the last log record."""
    if trainer.step >= trainer.total_steps:
        logger.info("Nothing to do: step %d of %d already reached.", trainer.step, trainer.total_steps)
        return {"step": trainer.step}
    trainer.bank.train()
    progress = tqdm(total=trainer.total_steps, initial=trainer.step, desc="train", disable=not trainer.dist.is_main,
                    dynamic_ncols=True)
    record: dict = {}
    while trainer.step < trainer.total_steps:
        record = _run_epoch(trainer, progress, record)
    progress.close()
    return record


def _epoch_loader(trainer: Trainer) -> DataLoader:
    """This epoch's batches on this process, from the step the run is at."""
    epoch, batch_in_epoch = divmod(trainer.step, trainer.steps_per_epoch)
    trainer.sampler.set_epoch(epoch, start=batch_in_epoch * trainer.config.batch_size)
    return DataLoader(
        trainer.dataset, batch_size=trainer.config.batch_size, sampler=trainer.sampler,
        num_workers=trainer.config.num_workers, pin_memory=trainer.dist.device.type == "cuda", persistent_workers=False,
    )


def _run_epoch(trainer: Trainer, progress: tqdm, record: dict) -> dict:
    """Train the rest of the current epoch (or up to ``total_steps``); return the last record."""
    meters = trainer.meters
    tick = time.perf_counter()
    for inputs, _ in _epoch_loader(trainer):
        data_time = time.perf_counter() - tick
        values = trainer.train_step(inputs)
        if trainer.dist.device.type == "cuda":
            torch.cuda.synchronize(trainer.dist.device)
        now = time.perf_counter()
        for meter in meters.values():
            meter.add(values, len(inputs) * trainer.dist.world_size, data_time, now - tick - data_time)
        progress.update(1)
        progress.set_postfix(loss=f"{values['loss']:.4f}")
        if trainer.step % trainer.config.log_every == 0 or trainer.step == trainer.total_steps:
            record = _train_record(trainer, meters["window"])
            trainer.log.write(record)
            meters["window"] = Meter()
        _checkpoint_if_due(trainer)
        if trainer.step >= trainer.total_steps:
            break
        tick = time.perf_counter()
    return record


def _train_record(trainer: Trainer, window: Meter) -> dict:
    """The log record of the steps since the last one: loss terms, learning rates, throughput."""
    lrs = {f"{name}/lr": lr for name, lr in zip(trainer.lrs, trainer.scheduler.get_last_lr())}
    return {"event": "train", "step": trainer.step, "epoch": trainer.step / trainer.steps_per_epoch, **lrs,
            **window.summary()}


def _checkpoint_if_due(trainer: Trainer) -> None:
    """At an epoch's end (also the run's) or every ``--save-every-steps``: log the epoch, save, wait for all.

    A run that ends mid-epoch (``--max-steps``) logs what it did of the epoch and keeps its means in
    the checkpoint, for a longer run resumed from it to complete.
    """
    step, config = trainer.step, trainer.config
    epoch_done = step % trainer.steps_per_epoch == 0
    end_of_epoch = epoch_done or step == trainer.total_steps
    if not (end_of_epoch or (config.save_every_steps and step % config.save_every_steps == 0)):
        return
    if end_of_epoch:
        trainer.log.write({"event": "epoch", "step": step, "epoch": step / trainer.steps_per_epoch,
                           **trainer.meters["epoch"].summary()})
    if epoch_done:
        trainer.meters["epoch"] = Meter()  # before saving: a run resumed here starts the next epoch afresh
    trainer.save_checkpoint()
    trainer.dist.barrier()
