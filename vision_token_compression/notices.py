"""Third-party notices that say nothing to our users, dropped at their source logger.

DeepSpeed, when installed, is imported by accelerate inside transformers' ``save_pretrained``
(``extract_model_from_parallel`` checks for a ``DeepSpeedEngine``), not by this project. On a machine
without a GPU its import prints "Setting accelerator to CPU ..." to *stdout*, on nearly every command
that saves a model, mixed into command output. Only that record is dropped; DeepSpeed's other warnings
stay.
"""

from __future__ import annotations

import logging

_DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logging's logger (it keeps the filters added here)
_CPU_NOTICE = "Setting accelerator to CPU."


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_deepspeed_cpu_notice() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" notice (idempotent)."""
    logger = logging.getLogger(_DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DropMessage) and f.prefix == _CPU_NOTICE for f in logger.filters):
        logger.addFilter(_DropMessage(_CPU_NOTICE))
