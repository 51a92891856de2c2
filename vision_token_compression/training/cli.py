"""Pretrain ToConv compressors on frozen CLIP features, so an existing LLaVA can use fewer tokens.

One GPU or CPU::

    toconv-train-compressor --data IMAGES --output-dir runs/toconv
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

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import TrainConfig, build_parser, check_against_tower, config_from_args
from .data import ImageFileError
from .distributed import shutdown_distributed
from .run_log import setup_logging
from .trainer import Trainer


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run compressor pretraining; return the output folder."""
    trainer = Trainer(config, resume=resume)
    try:
        trainer.run()
    finally:
        shutdown_distributed()
    return trainer.output_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``toconv-train-compressor`` and ``python -m vision_token_compression.train``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        check_against_tower(config)
    except (ValueError, FileNotFoundError) as err:  # a bad value, or a --vision-tower not found
        parser.error(str(err))  # exits with status 2, before CLIP's weights load
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        train(config, resume=args.resume)
    except ImageFileError as err:  # the run stops at a file it cannot use, naming it (no traceback)
        sys.exit(f"{parser.prog}: error: {_original_message(err)}")


def _original_message(err: BaseException) -> str:
    """``err``'s message; for one a DataLoader worker raised, the original message at the end of its traceback."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return text
    return text.splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]


if __name__ == "__main__":
    main()
