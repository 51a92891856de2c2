"""Trainer callbacks the training tests hand to ``llava.train.train.train``."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class Snapshot(TrainerCallback):
    """Copies every parameter when training begins."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
