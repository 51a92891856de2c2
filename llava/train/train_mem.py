"""``train`` with FlashAttention-2, as upstream LLaVA's ``train_mem.py`` (needs the flash-attn package and a GPU)::

    deepspeed llava/train/train_mem.py --deepspeed scripts/zero3.json ARGS
"""

from __future__ import annotations

from collections.abc import Sequence

from llava.train.train import main


def run(argv: Sequence[str] | None = None) -> None:
    """``llava.train.train.main`` with ``attn_implementation="flash_attention_2"``."""
    main(argv, attn_implementation="flash_attention_2")


if __name__ == "__main__":
    run()
