"""Image tokens as the language model receives them, recorded per answer in a sidecar file beside the answers.

The answering modules (``model_vqa``, ``_loader``, ``_science``, ``_mmbench``) write, next to
``answers.jsonl``, ``answers.image_tokens.jsonl``: one line per answer line, in the same order,
``{"question_id": ..., "images": 1, "image_tokens": 144}`` (plus ``round_id`` for MMBench). The
count is measured, not computed from settings: a pre-hook on the decoder reads the first forward of
each ``generate`` call, whose ``attention_mask`` spans every row's text plus its spliced-in image
embeddings; the row's text tokens (its unpadded ids other than the image placeholder) are subtracted.
A LLaVA-1.6 (anyres) image gets its own count, which depends on its size.

A prompt the model cut at its context limit (``tokenizer_model_max_length``) lost its end, and the
count cannot tell lost text from lost image tokens: such a line says ``"truncated": true``, and its
count is a lower bound.

``summarise`` reads a sidecar back (the eval suite's "image tokens per image" column).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava.constants import IMAGE_TOKEN_INDEX

SUFFIX = ".image_tokens.jsonl"


def sidecar_path(answers_file: str | os.PathLike) -> str:
    """The image-token sidecar of an answers file: ``x.jsonl`` → ``x.image_tokens.jsonl``."""
    path = os.fspath(answers_file)
    stem = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
    return stem + SUFFIX


class ImageTokenProbe:
    """Measures, for each row of a ``generate`` batch, the image embeddings the decoder receives.

    Call ``expect(input_ids, attention_mask)`` with the batch before ``generate``; after it,
    ``take()`` gives each row's image tokens. Only the first decoder forward after ``expect`` is read
    (later ones are one-token decoding steps).
    """

    def __init__(self, decoder: torch.nn.Module, max_length: int | None = None) -> None:
        self.max_length = max_length
        self.truncated: list[bool] = []
        self._text_tokens: list[int] | None = None
        self._measured: list[int] | None = None
        self._handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def expect(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Arm the probe for the next ``generate`` on these left-padded ids."""
        real = attention_mask.bool()
        self._text_tokens = ((input_ids != IMAGE_TOKEN_INDEX) & real).sum(dim=1).tolist()
        self._measured = None

    def take(self) -> list[int]:
        """Image tokens per row of the batch passed to ``expect``, as the decoder received them."""
        if self._measured is None:
            raise RuntimeError("The decoder ran no forward since expect(): nothing was measured.")
        measured, self._measured = self._measured, None
        return measured

    def close(self) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs) -> None:
        if self._text_tokens is None:
            return
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if embeds is None or (mask is not None and mask.dim() != 2):
            raise RuntimeError(
                "The decoder's first forward came without inputs_embeds, or with a mask that is not (batch, "
                "length); the image tokens it received cannot be measured."
            )
        # No mask: no row is padded (the LLaVA model drops an all-ones mask), each spans the whole length.
        lengths = [embeds.shape[1]] * embeds.shape[0] if mask is None else mask.bool().sum(dim=1).tolist()
        self._measured = [length - text for length, text in zip(lengths, self._text_tokens)]
        self.truncated = [self.max_length is not None and length >= self.max_length for length in lengths]
        self._text_tokens = None


def image_counts(input_ids: torch.Tensor) -> list[int]:
    """Images (placeholder tokens) in each row of a batch of ids."""
    return (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1).tolist()


def sidecar_line(fields: dict[str, Any], images: int, image_tokens: int, truncated: bool = False) -> dict[str, Any]:
    """One sidecar record: the answer's ids (``question_id``, and ``round_id`` when it has one) and its counts."""
    ids = {key: fields[key] for key in ("question_id", "round_id") if key in fields}
    return {**ids, "images": images, "image_tokens": image_tokens, **({"truncated": True} if truncated else {})}


@dataclass
class ImageTokenSummary:
    """What a sidecar says: answers, images among them, image tokens per image (mean, min, max), cut prompts."""

    answers: int
    images: int
    total: int
    min: float | None
    max: float | None
    truncated: int = 0

    @property
    def mean(self) -> float | None:
        return self.total / self.images if self.images else None

    def as_dict(self) -> dict[str, Any]:
        return {"answers": self.answers, "images": self.images, "mean": self.mean, "min": self.min, "max": self.max,
                "truncated": self.truncated}


def summarise(records: Sequence[dict[str, Any]]) -> ImageTokenSummary:
    """Per-image statistics of sidecar records; a row with several images counts their mean for each.

    Text-only answers (no image) count as answers, not as images.
    """
    per_image: list[float] = []
    total = images = 0
    for record in records:
        n, tokens = int(record["images"]), int(record["image_tokens"])
        images += n
        total += tokens
        if n:
            per_image += [tokens / n] * n
    per_image = [int(value) if value.is_integer() else value for value in per_image]
    truncated = sum(bool(record.get("truncated")) for record in records)
    return ImageTokenSummary(len(records), images, total, min(per_image, default=None), max(per_image, default=None),
                             truncated)


def read_sidecar(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a complete sidecar file (every line whole JSON with ``images`` and ``image_tokens``)."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not JSON ({err}); answer again to rewrite it.") from err
            if not isinstance(record, dict) or not {"images", "image_tokens"} <= set(record):
                raise ValueError(f"{path} line {number} lacks 'images' / 'image_tokens': {line.strip()[:120]}")
            records.append(record)
    return records
