"""What a LLaVA training data file and sample are, and a clear error for everything else.

A data file is UTF-8 JSON holding a list of samples (upstream LLaVA's ``llava_v1_5_mix665k.json``),
or JSON lines (``.jsonl``): one sample per line, blank lines ignored. A problem with the file itself
(not UTF-8, not JSON, a bad line, a top level that is not a list) is a ``DataFileError`` naming the
file and the line or byte; training cannot start.

A sample is an object::

    {"id": any (optional, used in messages),
     "image": "relative/path.jpg" (optional; one path string, relative to --image_folder),
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}

``check_sample`` accepts exactly that: ``conversations`` is a non-empty list of turns, each an
object with ``from`` in {human, gpt} and a non-empty string ``value`` that UTF-8 can encode (no lone
surrogate); a leading ``gpt`` turn is dropped (as upstream does), after which turns alternate
human/gpt and hold at least one answer; a sample with an image mentions ``<image>`` exactly once,
one without never. Everything else is a ``SampleError`` saying what is wrong and how to fix it; the
dataset adds the file, index and ``id`` and applies ``--data_error_policy``. The check is a single
pass over the sample's strings, done when the sample is fetched, before any image or tokenizer work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN

HUMAN, GPT = "human", "gpt"
ROLES = (HUMAN, GPT)


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about arbitrary data."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_kind(value: Any) -> str:
    """What ``value`` is, in JSON's words, with a short repr: "null", "a number (3)", "a list ([...])"."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "a list"),
             (dict, "an object"))
    kind = next((name for cls, name in kinds if isinstance(value, cls)), f"a {type(value).__name__}")
    return f"{kind} ({brief(value)})"


class SampleError(ValueError):
    """A training sample that cannot be used; the message names it and says what is wrong."""

    def __init__(self, reason: str, index: int | None = None, sample_id: Any = None, source: str | None = None) -> None:
        self.reason = reason
        self.index = index
        self.sample_id = sample_id
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.index is not None:
            where.append(f"index {self.index}")
        if self.sample_id is not None:
            where.append(f"id {brief(self.sample_id)}")
        if self.source:
            where.append(f"in {self.source}")
        return f"Sample {' '.join(where)}: {self.reason}" if where else self.reason

    def located(self, index: int, sample_id: Any, source: str | None) -> SampleError:
        """The same error, naming the sample it came from."""
        return SampleError(self.reason, index, sample_id, source)


class DataFileError(ValueError):
    """A training data file that cannot be read as LLaVA samples; names the file and where in it."""

    def __init__(self, path: str | os.PathLike, reason: str, *, line: int | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.line = line
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"Training data {where}: {reason}")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _decode_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataFileError(
            path,
            f"not UTF-8: byte {err.start} (column {column} of the line) is {data[err.start:err.start + 1]!r} "
            f"({err.reason}). Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`.",
            line=line,
        ) from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data":
            hint = " If the file holds one sample per line, name it .jsonl."
        raise DataFileError(path, f"not valid JSON: {err.msg} at column {err.colno}.{hint}", line=err.lineno) from None


def _parse_json_lines(path: Path, text: str) -> list[Any]:
    # Only "\n" ends a line (the JSON Lines rule): str.splitlines would also split at U+2028, U+0085
    # and other characters a JSON string may hold raw.
    samples = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataFileError(
                path, f"not a valid JSON line: {err.msg} at column {err.colno}; each line must hold one sample object.",
                line=number,
            ) from None
    return samples


def load_samples(data_path: str | os.PathLike) -> list[Any]:
    """Samples of a LLaVA JSON file (a list) or a JSON-lines file (``.jsonl``, one sample per line).

    Raises ``FileNotFoundError`` for a missing file and ``DataFileError`` (naming the file and the
    line) for one that is not UTF-8 JSON holding a non-empty list. Samples are returned unchecked;
    ``check_sample`` checks each when it is used.
    """
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"Training data not found: {path} (set --data_path to a LLaVA-format JSON file).")
    text = _decode_utf8(path, path.read_bytes())
    if not text.strip():
        raise DataFileError(path, "the file is empty; it must hold a JSON list of samples.")
    if path.suffix == ".jsonl":
        samples = _parse_json_lines(path, text)
    else:
        samples = _parse_json(path, text)
        if isinstance(samples, dict):
            raise DataFileError(
                path,
                f"the top level is an object (keys {brief(list(samples)[:5])}), but LLaVA data is a JSON list of "
                f"samples; wrap a single sample in [...], or write one sample per line to a .jsonl file.",
            )
        if not isinstance(samples, list):
            kind = type(samples).__name__
            raise DataFileError(path, f"the top level is {kind}, but LLaVA data is a JSON list of samples.")
    if not samples:
        raise DataFileError(path, "holds no samples.")
    return samples


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedSample:
    """A sample ``check_sample`` accepted: turns start with ``human`` and alternate with ``gpt``.

    Args:
        id: The sample's ``id`` (None when it has none).
        image: Image path relative to ``--image_folder``; None for a text-only sample.
        turns: ``{"from", "value"}`` dicts (the sample's own), a leading ``gpt`` turn left out.
    """

    id: Any
    image: str | None
    turns: list[dict]


def sample_id(sample: Any) -> Any:
    """The ``id`` of a raw sample, or None when it is not an object or has none."""
    return sample.get("id") if isinstance(sample, dict) else None


def check_text(text: str, what: str) -> None:
    """Refuse a string UTF-8 cannot encode (a lone surrogate from an unpaired ``\\uD8xx`` JSON escape)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        context = text[max(0, err.start - 20): err.start + 20]
        raise SampleError(
            f"{what} holds a lone surrogate {bad!r} at character {err.start} (in {context!r}), which no tokenizer "
            f"can encode. The data file has an unpaired \\u{ord(bad):04x} escape (often half of an emoji cut off); "
            f"fix or drop that text."
        ) from None


def _check_turn(i: int, turn: Any) -> None:
    shape = "an object {'from': 'human' | 'gpt', 'value': str}"
    if not isinstance(turn, dict):
        raise SampleError(f"turn {i} is {json_kind(turn)}, not {shape}.")
    if "from" not in turn or "value" not in turn:
        hint = ""
        if "role" in turn or "content" in turn:
            hint = " Rename OpenAI-style 'role'/'content' to 'from'/'value' (roles 'human'/'gpt')."
        missing = " and ".join(repr(k) for k in ("from", "value") if k not in turn)
        raise SampleError(f"turn {i} has no {missing} (keys {brief(list(turn))}); each turn is {shape}.{hint}")
    role, value = turn["from"], turn["value"]
    if role not in ROLES:
        hint = " Rename 'user' to 'human' and 'assistant' to 'gpt'." if role in ("user", "assistant") else ""
        raise SampleError(f"turn {i} is from {brief(role)}; only 'human' and 'gpt' are known.{hint}")
    if not isinstance(value, str):
        raise SampleError(f"turn {i} ({role}) has a 'value' that is {json_kind(value)}; values are strings.")
    if not value.strip():
        if role == GPT:
            raise SampleError(
                f"turn {i} is an empty answer: a 'gpt' turn with value {brief(value)} teaches nothing. Write the "
                f"answer, or drop the turn and the question before it."
            )
        raise SampleError(f"turn {i} (human) has an empty value {brief(value)}; write the question or drop the turn.")
    check_text(value, f"turn {i} ({role})")


def check_conversation(conversation: Any) -> list[dict]:
    """The turns of ``conversation`` that training uses, after checking every turn.

    A leading ``gpt`` turn is dropped (as upstream LLaVA does); the rest must alternate human/gpt
    and hold at least one ``gpt`` answer. Raises ``SampleError`` saying what is wrong.
    """
    if not isinstance(conversation, list):
        raise SampleError(
            f"'conversations' is {json_kind(conversation)}, not a list of turns "
            f"[{{'from': 'human', 'value': ...}}, {{'from': 'gpt', 'value': ...}}, ...]."
        )
    if not conversation:
        raise SampleError("the conversation is empty.")
    for i, turn in enumerate(conversation):
        _check_turn(i, turn)
    turns = conversation
    if turns[0]["from"] != HUMAN:
        if DEFAULT_IMAGE_TOKEN in turns[0]["value"]:
            raise SampleError(
                f"turn 0 is a leading 'gpt' turn, which training drops (as upstream LLaVA does), but it holds the "
                f"{DEFAULT_IMAGE_TOKEN!r} placeholder; move the placeholder into the first 'human' turn."
            )
        turns = turns[1:]
    for i, turn in enumerate(turns):
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] != expected:
            raise SampleError(f"turns must alternate human/gpt, but turn {i} is from {turn['from']!r}.")
    if not any(turn["from"] == GPT for turn in turns):
        raise SampleError("the conversation has no 'gpt' turn, so there is nothing to learn.")
    return list(turns)


def count_image_tokens(conversation: Sequence[dict]) -> int:
    """Number of ``<image>`` placeholders across all turns."""
    return sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in conversation)


def check_image_tokens(conversation: Sequence[dict], has_image: bool) -> None:
    """A sample with an image mentions ``<image>`` exactly once; a text-only sample never."""
    count = count_image_tokens(conversation)
    expected = 1 if has_image else 0
    if count != expected:
        what = "has an image" if has_image else "has no image"
        raise SampleError(
            f"image token mismatch: the sample {what} but its conversation contains {count} "
            f"{DEFAULT_IMAGE_TOKEN!r} placeholder(s); expected {expected}."
        )


def check_image_field(image: Any) -> str:
    """The ``image`` of a sample that has the key: one non-empty path string."""
    if isinstance(image, str):
        if not image.strip():
            raise SampleError("'image' is an empty string; give the image's path relative to --image_folder.")
        if "\x00" in image:
            raise SampleError(f"'image' path {brief(image)} contains a NUL character.")
        check_text(image, "'image' path")
        return image
    if image is None:
        raise SampleError(
            "'image' is null; leave the key out for a text-only sample, or give the image's path relative to "
            "--image_folder."
        )
    if isinstance(image, list):
        raise SampleError(
            f"'image' is a list of {len(image)} path(s) ({brief(image)}); this trainer takes one image per "
            f"sample, as a path string (LLaVA-1.5 format). Give one path, or split the sample."
        )
    raise SampleError(
        f"'image' is {json_kind(image)}; it must be the image's path (a string) relative to "
        f"--image_folder."
    )


def check_sample(sample: Any) -> CheckedSample:
    """``sample`` checked against the LLaVA format (see the module docstring); raises ``SampleError``."""
    if not isinstance(sample, dict):
        raise SampleError(
            f"a sample must be a JSON object with 'conversations', got {json_kind(sample)}."
        )
    if "conversations" not in sample:
        raise SampleError(f"the sample has no 'conversations' (keys {brief(list(sample))}).")
    image = check_image_field(sample["image"]) if "image" in sample else None
    turns = check_conversation(sample["conversations"])
    check_image_tokens(turns, has_image=image is not None)
    return CheckedSample(sample.get("id"), image, turns)


def rough_length(sample: Any, image_tokens: int) -> int:
    """Words across the turns, plus ``image_tokens`` for a sample with an image; at least 1.

    Takes any sample, well-formed or not (a broken one fails when it is fetched, not here).
    """
    if not isinstance(sample, dict):
        return 1
    turns = sample.get("conversations")
    words = 0
    if isinstance(turns, list):
        words = sum(len(t["value"].split()) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
    return max(1, words + (image_tokens if "image" in sample else 0))


def has_image_key(sample: Any) -> bool:
    """Whether a raw sample claims an image (for grouping by modality; not a check)."""
    return isinstance(sample, dict) and "image" in sample
