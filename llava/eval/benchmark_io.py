"""Reading benchmark files with errors that say which file, which line, and what to do.

Every scorer and converter in ``llava/eval`` reads the same few shapes: answer JSONL written by
``model_vqa*.py`` (``question_id``, ``prompt``, ``text``, ...), question JSONL, and a benchmark's
own JSON annotations. A malformed line or a missing key must stop the run with a sentence a person
can act on, not a ``KeyError`` from three frames down. The helpers here raise
:class:`BenchmarkInputError`; each CLI's ``main`` turns it into a one-line exit message.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar


class BenchmarkInputError(ValueError):
    """A benchmark input file is missing or malformed; the message names the file and the fix."""


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> str:
    """Return ``path`` as a string, or raise if it is not an existing file.

    Args:
        path: the file to check.
        what: what the file is, for the message ("answers file", "POPE annotation").
        hint: how to get the file, appended to the message.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        where = "is a directory" if os.path.isdir(path) else "does not exist"
        if not hint and "answers" in what:
            hint = "Run the model over the benchmark first (scripts/v1_5/eval/*.sh), or fix the path."
        if not os.path.isabs(path):
            hint = f"{hint} (Relative paths start at {os.getcwd()!r}.)".lstrip()
        raise BenchmarkInputError(f"{what} {path!r} {where}. {hint}".rstrip())
    return path


def read_json(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """Load one JSON document, naming the file when it is missing or not JSON."""
    path = require_file(path, what, hint)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise BenchmarkInputError(
                f"{what} {path!r} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
            ) from None


def read_jsonl(
    path: str | os.PathLike,
    what: str,
    required: Sequence[str] = ("question_id",),
    hint: str = "",
    skip_invalid: bool = False,
    fix: str = "pass the file written by llava.eval.model_vqa* for this benchmark.",
) -> tuple[list[dict], list[int]]:
    """Load a JSON-lines file, one object a line, checking that each has the ``required`` keys.

    Blank lines are ignored. With ``skip_invalid`` a line that is not JSON is left out and its
    1-based number returned (upstream's VQAv2/VizWiz converters tolerate lines cut short by a
    killed worker); otherwise it is an error. ``fix`` ends the message for a line missing a key.

    Returns:
        (records, numbers of the lines left out).
    """
    path = require_file(path, what, hint)
    records, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if skip_invalid:
                    skipped.append(number)
                    continue
                raise BenchmarkInputError(
                    f"{what} {path!r} line {number} is not valid JSON ({err.msg}). "
                    "Each line must be one JSON object; re-run the step that wrote this file."
                ) from None
            if not isinstance(record, dict):
                raise BenchmarkInputError(
                    f"{what} {path!r} line {number} is a JSON {type(record).__name__}, not an object."
                )
            missing = [key for key in required if key not in record]
            if missing:
                raise BenchmarkInputError(
                    f"{what} {path!r} line {number} has no {', '.join(map(repr, missing))} "
                    f"(keys present: {sorted(record)}). Each line needs {list(required)}; {fix}"
                )
            records.append(record)
    return records, skipped


def index_by_question_id(records: Iterable[dict], path: str, what: str) -> dict:
    """Map ``question_id`` to its record, refusing a question that appears twice."""
    by_id: dict = {}
    for record in records:
        qid = record["question_id"]
        if qid in by_id:
            raise BenchmarkInputError(
                f"{what} {path!r} has question_id {qid!r} twice. When merging chunk files, "
                "concatenate each chunk once."
            )
        by_id[qid] = record
    return by_id


def unknown_ids_error(unknown: Sequence, source: str, what: str, reference: str, fix: str) -> BenchmarkInputError:
    """The error for predictions whose question ids are not in the benchmark's question set."""
    shown = ", ".join(repr(q) for q in list(unknown)[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    return BenchmarkInputError(
        f"{what} {source!r} has {len(unknown)} prediction(s) for questions not in {reference}: "
        f"{shown}{more}. {fix}"
    )


def write_json(path: str | os.PathLike, data: Any, indent: int | None = None) -> None:
    """Write ``data`` as JSON, creating the parent folder."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)


Main = TypeVar("Main", bound=Callable[..., Any])


def exits_on_input_error(main: Main) -> Main:
    """Make a CLI ``main`` exit with ``error: <message>`` (status 1) on a :class:`BenchmarkInputError`."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None):
        try:
            return main(argv)
        except BenchmarkInputError as err:
            raise SystemExit(f"error: {err}") from None

    return wrapper  # type: ignore[return-value]
