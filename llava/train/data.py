"""LLaVA training data: conversations → token ids with masked labels, images → tensors, batches.

A sample of the LLaVA JSON format is ``{"id": ..., "image": "relative/path.jpg", "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``; text-only
samples have no ``image``. Only the assistant's answers (and the separator that ends each answer)
are learned; the system prompt, user turns, role names and image positions get ``IGNORE_INDEX``.

Labels are found by character spans, not by re-tokenising each round: the prompt is tokenised once
with offsets, and a token is learned when it overlaps an answer. A token that covers both prompt
text and answer text (the tokenizer merged across the boundary) is a tokenisation mismatch, as is
a tokenisation that differs from ``tokenizer_image_token`` (what evaluation feeds the model).

What a valid data file and sample are is ``data_schema``'s job: each sample is checked there when
it is fetched, before any image or tokenizer work. Broken samples (malformed fields or turns, see
``data_schema.check_sample``; an image that is missing, outside ``image_folder``, unreadable or
over Pillow's decompression-bomb limit; a tokenisation mismatch; nothing left to learn after
truncation) raise ``SampleError`` naming the file, index and ``id``; with
``data_error_policy="skip"`` the dataset logs it, counts it, and serves the next sample instead
(see ``LazySupervisedDataset``). A data file that cannot be read at all is a ``DataFileError``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    config_value,
)
from llava.conversation import Conversation, SeparatorStyle
from llava.mm_utils import IMAGE_DECODE_ERRORS, process_images, tokenizer_image_token

from .arguments import DataArguments
from .data_schema import (  # noqa: F401  (re-exported: DataFileError, HUMAN, count_image_tokens, load_samples)
    GPT,
    HUMAN,
    DataFileError,
    SampleError,
    check_conversation,
    check_image_tokens,
    check_sample,
    count_image_tokens,
    has_image_key,
    load_samples,
    rough_length,
    sample_id,
)

logger = logging.getLogger(__name__)


@dataclass
class TokenizedSample:
    """Token ids of one conversation and the labels the loss sees (``IGNORE_INDEX`` where masked)."""

    input_ids: torch.Tensor  # (T,) long; IMAGE_TOKEN_INDEX where the image goes
    labels: torch.Tensor  # (T,) long

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------
# Conversation text
# ----------------------------------------------------------------------------------------------


def preprocess_multimodal(
    conversation: Sequence[dict],
    *,
    has_image: bool,
    mm_use_im_start_end: bool = False,
    mmtag: bool = False,
) -> list[dict]:
    """Check the ``<image>`` placeholder and move it to the front of its turn (a copy is returned).

    The turns are checked first (``data_schema.check_conversation``, which drops a leading ``gpt``
    turn). A sample with an image must mention ``<image>`` exactly once; a text-only sample never.
    With ``mm_use_im_start_end`` the placeholder is wrapped in ``<im_start>``/``<im_end>``.
    """
    turns = check_conversation(conversation)
    check_image_tokens(turns, has_image)
    return _place_image_token(turns, has_image=has_image, mm_use_im_start_end=mm_use_im_start_end, mmtag=mmtag)


def _place_image_token(turns: Sequence[dict], *, has_image: bool, mm_use_im_start_end: bool, mmtag: bool) -> list[dict]:
    """A copy of checked ``turns`` with ``<image>`` moved to the front of its turn (and wrapped)."""
    out = copy.deepcopy(list(turns))
    if not has_image:
        return out
    for turn in out:
        if DEFAULT_IMAGE_TOKEN not in turn["value"]:
            continue
        text = turn["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        image = DEFAULT_IMAGE_TOKEN
        if mmtag:
            image = f"<Image>{image}</Image>"
        if mm_use_im_start_end:
            image = DEFAULT_IM_START_TOKEN + image + DEFAULT_IM_END_TOKEN
        turn["value"] = f"{image}\n{text}".strip()
    return out


def _render_plain(turns: Sequence[dict], template: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """``<image>`` + caption + sep, with the caption (and sep) as the one answer span."""
    if len(turns) != 2 or DEFAULT_IMAGE_TOKEN not in turns[0]["value"]:
        raise SampleError(
            "the 'plain' template (projector pretraining) needs exactly one human turn holding the image "
            f"and one gpt turn; got {len(turns)} turn(s)."
        )
    prompt = DEFAULT_IMAGE_TOKEN
    start = len(prompt)
    prompt += turns[1]["value"] + template.sep
    return prompt, [(start, len(prompt))]


def _render_two(turns: Sequence[dict], template: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Vicuna-style prompt (``SeparatorStyle.TWO``) and the character spans of the answers + ``sep2``."""
    conv = template.copy()
    conv.messages = []
    seps = (conv.sep, conv.sep2)
    prompt = conv.system + conv.sep
    spans = []
    for i, turn in enumerate(turns):
        role = conv.roles[i % 2]
        conv.append_message(role, turn["value"])
        prompt += f"{role}: "
        start = len(prompt)
        prompt += turn["value"] + seps[i % 2]
        if turn["from"] == GPT:
            spans.append((start, len(prompt)))
    rendered = conv.get_prompt()
    if rendered != prompt:
        raise RuntimeError(
            f"Conversation template {conv.version!r} renders turns differently from llava.train.data's "
            f"SeparatorStyle.TWO layout; training and evaluation prompts would disagree.\n"
            f"template: {rendered!r}\ntraining: {prompt!r}"
        )
    return prompt, spans


_RENDERERS = {SeparatorStyle.PLAIN: _render_plain, SeparatorStyle.TWO: _render_two}


# ----------------------------------------------------------------------------------------------
# Tokenisation and label masking
# ----------------------------------------------------------------------------------------------


def tokenize_with_offsets(prompt: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``prompt`` as ``tokenizer_image_token`` makes them, with each token's character span.

    Each ``<image>`` becomes ``IMAGE_TOKEN_INDEX``; text chunks are tokenised separately and only
    the first keeps the tokenizer's BOS. Special tokens the tokenizer adds get an empty span.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} gives no character offsets; LLaVA training needs a fast "
            f"(tokenizers-backed) tokenizer, e.g. AutoTokenizer.from_pretrained(path)."
        )
    bos = tokenizer.bos_token_id
    specials = set(tokenizer.all_special_ids)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            spans.append((pos - len(DEFAULT_IMAGE_TOKEN), pos))
        enc = tokenizer(chunk, return_offsets_mapping=True)
        chunk_ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if i > 0 and bos is not None and chunk_ids[:1] == [bos]:
            chunk_ids, offsets = chunk_ids[1:], offsets[1:]
        for tok, (s, e) in zip(chunk_ids, offsets):
            ids.append(tok)
            # Tokens the tokenizer inserted (BOS/EOS) have no text; give them an empty span.
            spans.append((pos + s, pos + e) if (e > s or tok not in specials) else (pos + s, pos + s))
        pos += len(chunk) + len(DEFAULT_IMAGE_TOKEN)
    return ids, spans


def mask_labels(
    prompt: str,
    ids: Sequence[int],
    spans: Sequence[tuple[int, int]],
    answers: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Labels for ``ids``: a token is learned iff its character span overlaps an answer span.

    Raises ``SampleError`` (tokenisation mismatch) when a learned token also covers prompt text
    other than whitespace, since then no label masking can separate the two.
    """
    labels = torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long)
    for t, ((s, e), tok) in enumerate(zip(spans, ids)):
        if tok == IMAGE_TOKEN_INDEX or e <= s:
            continue
        overlap = [(a, b) for a, b in answers if s < b and a < e]
        if not overlap:
            continue
        a, b = overlap[0]
        outside = prompt[s:max(s, a)] + prompt[min(e, b):e] if len(overlap) == 1 else prompt[s:e]
        if outside.strip():
            raise SampleError(
                f"tokenization mismatch: token {t} (id {tok}) covers {prompt[s:e]!r}, which runs across the "
                f"boundary of an answer (prompt text {outside.strip()!r}); its label cannot be set. Check the "
                f"conversation template and the tokenizer."
            )
        labels[t] = tok
    return labels


def preprocess(
    conversation: Sequence[dict],
    tokenizer,
    template: Conversation,
    *,
    max_length: int | None = None,
) -> TokenizedSample:
    """Token ids and labels of one conversation under ``template`` (``plain`` or ``v1`` style).

    The turns are checked first (``data_schema.check_conversation``). ``max_length`` truncates on
    the right; a sample left without any learned token is an error.
    """
    return _tokenize_turns(check_conversation(conversation), tokenizer, template, max_length=max_length)


def _tokenize_turns(
    turns: Sequence[dict], tokenizer, template: Conversation, *, max_length: int | None = None
) -> TokenizedSample:
    """``preprocess`` of turns that ``check_conversation`` already accepted."""
    render = _RENDERERS.get(template.sep_style)
    if render is None:
        supported = ", ".join(s.name for s in _RENDERERS)
        raise NotImplementedError(
            f"Training with conversation template {template.version!r} ({template.sep_style.name}) is not "
            f"supported; use --version plain (stage 1) or v1 (stage 2), i.e. separator styles {supported}."
        )
    prompt, answers = render(turns, template)
    ids, spans = tokenize_with_offsets(prompt, tokenizer)
    reference = tokenizer_image_token(prompt, tokenizer)
    if list(reference) != ids:
        raise SampleError(
            f"tokenization mismatch: {len(ids)} tokens by offsets vs {len(reference)} by tokenizer_image_token "
            f"for prompt {prompt[:200]!r}..."
        )
    labels = mask_labels(prompt, ids, spans, answers)
    sample = TokenizedSample(torch.tensor(ids, dtype=torch.long), labels)
    if sample.num_supervised == 0:
        raise SampleError("tokenization left no answer token to learn; the answers are empty.")
    if max_length is not None and len(ids) > max_length:
        sample = TokenizedSample(sample.input_ids[:max_length], sample.labels[:max_length])
        if sample.num_supervised == 0:
            raise SampleError(
                f"after truncation to {max_length} tokens no answer token is left to learn "
                f"({len(ids)} tokens before truncation); raise model_max_length or shorten the sample."
            )
    return sample


def preprocess_plain(conversation: Sequence[dict], tokenizer, template: Conversation, **kwargs) -> TokenizedSample:
    """``preprocess`` for the ``plain`` (projector pretraining) template."""
    if template.sep_style != SeparatorStyle.PLAIN:
        raise ValueError(f"preprocess_plain needs a PLAIN template, got {template.sep_style.name}.")
    return preprocess(conversation, tokenizer, template, **kwargs)


def preprocess_v1(conversation: Sequence[dict], tokenizer, template: Conversation, **kwargs) -> TokenizedSample:
    """``preprocess`` for the Vicuna ``v1`` template (``SeparatorStyle.TWO``)."""
    if template.sep_style != SeparatorStyle.TWO:
        raise ValueError(f"preprocess_v1 needs a TWO template, got {template.sep_style.name}.")
    return preprocess(conversation, tokenizer, template, **kwargs)


# ----------------------------------------------------------------------------------------------
# Dataset and collator
# ----------------------------------------------------------------------------------------------


def _crop_size(image_processor) -> tuple[int, int]:
    """(height, width) a processor outputs: CLIP's centre crop, or SigLIP's resize (it has no crop)."""
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    if isinstance(crop, dict):
        return crop["height"], crop["width"]
    return crop.height, crop.width


class LazySupervisedDataset(Dataset):
    """LLaVA conversations, tokenised and with images loaded when a sample is fetched.

    Args:
        data_path: LLaVA-format JSON (or JSON-lines) file.
        tokenizer: Fast tokenizer with the LLM's vocabulary (and LLaVA's added tokens).
        data_args: ``image_folder``, ``image_aspect_ratio``, ``image_grid_pinpoints``,
            ``mm_use_im_start_end``, ``data_error_policy``, ``max_skipped_fraction``.
        template: Conversation template of ``--version``.
        image_processor: The vision tower's processor; None for a text-only model.
        image_token_count: Embeddings one image becomes in the LLM (the tower's ``num_patches``,
            144 for 24→12 compression); used for length grouping and the truncation check.
        max_length: ``model_max_length``; sequences are truncated to it after the image expands.

    With ``data_error_policy="skip"`` a broken sample is logged with its index, id and reason,
    counted in ``num_skipped``, and replaced by the next usable sample. The item that replaces
    it carries the skipped sample's description under ``"skipped"`` so that the trainer can count
    skips across dataloader workers. More than ``max_skipped_fraction`` of the dataset skipped in
    one process is an error. Counts are per process (and per dataloader worker).
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        tokenizer,
        data_args: DataArguments,
        template: Conversation,
        image_processor=None,
        image_token_count: int | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.data_path = str(data_path)
        self.samples = load_samples(data_path)
        self.tokenizer = tokenizer
        self.data_args = data_args
        self.template = template
        self.image_processor = image_processor
        self.is_multimodal = image_processor is not None
        self.image_token_count = image_token_count
        self.max_length = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
        self.policy = data_args.data_error_policy
        self.num_skipped = 0
        self.max_skipped = max(1, math.ceil(data_args.max_skipped_fraction * len(self.samples)))
        self._lengths: list[int] | None = None
        logger.info("Loaded %d training samples from %s", len(self.samples), self.data_path)

    def __len__(self) -> int:
        return len(self.samples)

    # Lengths for batching ------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """Rough length of each sample (words, plus the image's embeddings) for length grouping.

        Broken samples get a length too (at least 1); they fail when fetched, under the error policy.
        """
        if self._lengths is None:
            self._lengths = [rough_length(s, self.image_token_count or 0) for s in self.samples]
        return self._lengths

    @property
    def modality_lengths(self) -> list[int]:
        """Like ``lengths``, positive for samples with an image and negative for text-only ones."""
        return [n if has_image_key(s) else -n for n, s in zip(self.lengths, self.samples)]

    # Fetching ----------------------------------------------------------------------------------

    def _image_path(self, image: str) -> Path:
        """``image`` under ``image_folder``; a path that leads out of the folder is refused."""
        folder = self.data_args.image_folder
        if not folder:
            return Path(image)
        norm = os.path.normpath(image)
        if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise SampleError(
                f"'image' path {image!r} leads outside image_folder {folder!r}; image paths are relative to "
                f"--image_folder. Make the path relative to it, or set --image_folder to a folder that holds it."
            )
        return Path(folder) / image

    def _load_image(self, image_path: str) -> tuple[torch.Tensor, tuple[int, int]]:
        path = self._image_path(image_path)
        if not path.is_file():
            raise SampleError(f"image file not found: {path} (image_folder={self.data_args.image_folder!r}).")
        try:
            with warnings.catch_warnings():
                # Pillow only warns between MAX_IMAGE_PIXELS and twice that; decoding such an image in a
                # dataloader worker is as much of a memory hazard as the ones it refuses.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    image = img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise SampleError(
                f"image {path} is over Pillow's decompression-bomb limit ({err}). Downscale it, or raise "
                f"PIL.Image.MAX_IMAGE_PIXELS if the data is trusted."
            ) from err
        except IMAGE_DECODE_ERRORS as err:
            raise SampleError(f"cannot read image {path} (truncated or corrupt?): {type(err).__name__}: {err}") from err
        cfg = SimpleNamespace(
            image_aspect_ratio=self.data_args.image_aspect_ratio,
            image_grid_pinpoints=self.data_args.image_grid_pinpoints,
        )
        pixels = process_images([image], self.image_processor, cfg)
        return pixels[0], image.size

    def _blank_image(self) -> torch.Tensor:
        height, width = _crop_size(self.image_processor)
        blank = torch.zeros(3, height, width)
        return blank.unsqueeze(0) if self.data_args.image_aspect_ratio == "anyres" else blank

    def _text_limit(self, has_image: bool) -> int | None:
        """Token budget of the text so that the sequence fits ``max_length`` once the image expands."""
        if self.max_length is None:
            return None
        if has_image and self.image_token_count:
            return max(1, self.max_length - self.image_token_count + 1)
        return self.max_length

    def build(self, index: int) -> dict[str, Any]:
        """Item ``index`` as tensors; raises ``SampleError`` if the sample is broken."""
        sample = self.samples[index]
        try:
            checked = check_sample(sample)
            has_image = checked.image is not None
            if has_image and not self.is_multimodal:
                raise ValueError(
                    f"Sample {index} of {self.data_path} has an image but the model has no vision tower; "
                    f"pass --vision_tower."
                )
            turns = checked.turns
            if self.is_multimodal:
                turns = _place_image_token(
                    turns, has_image=has_image,
                    mm_use_im_start_end=config_value(self.data_args, "mm_use_im_start_end"),
                    mmtag="mmtag" in (self.template.version or ""),
                )
            item: dict[str, Any] = {}
            if has_image:
                item["image"], item["image_size"] = self._load_image(checked.image)
            elif self.is_multimodal:
                # Keeps one image per sample in a mixed batch; the model uses none of it.
                item["image"] = self._blank_image()
            tokens = _tokenize_turns(turns, self.tokenizer, self.template, max_length=self._text_limit(has_image))
        except SampleError as err:
            raise err.located(index, sample_id(sample), self.data_path) from err
        item["input_ids"] = tokens.input_ids
        item["labels"] = tokens.labels
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.policy == "raise":
            return self.build(index)
        skipped: list[str] = []
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                item = self.build(i)
            except SampleError as err:
                self.num_skipped += 1
                skipped.append(str(err))
                logger.warning("Skipping broken sample (%d skipped so far in this process): %s", self.num_skipped, err)
                if self.num_skipped > self.max_skipped:
                    raise RuntimeError(
                        f"{self.num_skipped} broken samples skipped in this process, more than "
                        f"max_skipped_fraction={self.data_args.max_skipped_fraction} of {len(self.samples)} "
                        f"samples allows; the last: {err}. Fix the data or raise --max_skipped_fraction."
                    ) from err
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(f"No usable sample in {self.data_path}: every sample is broken.")


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads a list of items into a batch for ``LlavaLlamaForCausalLM.forward``.

    Returns ``input_ids``, ``labels`` (padding is ``IGNORE_INDEX``), ``attention_mask`` (from the
    true lengths, so a pad id that is also a real token is still attended), ``images`` (stacked
    when the shapes agree, else a list), ``image_sizes`` when any are known (one per image, None
    for a text-only sample's blank), and ``skipped_samples`` (descriptions of samples skipped to
    fill this batch) when any were.
    """

    tokenizer: Any
    max_length: int | None = field(default=None)

    def __call__(self, instances: Sequence[dict[str, Any]]) -> dict[str, Any]:
        limit = self.max_length or getattr(self.tokenizer, "model_max_length", None)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (training uses unk_token).")
        ids = [x["input_ids"][:limit] for x in instances]
        labels = [x["labels"][:limit] for x in instances]
        longest = max(len(x) for x in ids)
        batch_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.bool)
        for row, (x, y) in enumerate(zip(ids, labels)):
            batch_ids[row, : len(x)] = x
            batch_labels[row, : len(y)] = y
            attention_mask[row, : len(x)] = True
        batch: dict[str, Any] = {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention_mask}
        if any("image" in x for x in instances):
            images = [x["image"] for x in instances if "image" in x]
            same = all(img.shape == images[0].shape for img in images)
            batch["images"] = torch.stack(images) if same else images
            if any("image_size" in x for x in instances):
                # One entry per image; a text-only sample's blank image has no size (anyres needs none
                # for a single crop), so a mixed batch still passes the sizes of its real images.
                batch["image_sizes"] = [x.get("image_size") for x in instances if "image" in x]
        skipped = [s for x in instances for s in x.get("skipped", [])]
        if skipped:
            batch["skipped_samples"] = skipped
        return batch


def make_supervised_data_module(
    tokenizer,
    data_args: DataArguments,
    template: Conversation,
    image_processor=None,
    image_token_count: int | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """``train_dataset``, ``eval_dataset`` (None) and ``data_collator`` for ``LLaVATrainer``."""
    if not data_args.data_path:
        raise ValueError("No training data: pass --data_path (a LLaVA-format JSON file).")
    image_processor = image_processor if image_processor is not None else getattr(data_args, "image_processor", None)
    dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, data_args, template,
        image_processor=image_processor, image_token_count=image_token_count, max_length=max_length,
    )
    return {
        "train_dataset": dataset,
        "eval_dataset": None,
        "data_collator": DataCollatorForSupervisedDataset(tokenizer=tokenizer, max_length=max_length),
    }
