"""Reading benchmark files with errors that say which file, which line, and what to do.

Every scorer and converter in ``llava/eval`` reads the same few shapes: answer JSONL written by
``model_vqa*.py`` (``question_id``, ``prompt``, ``text``, ...), question JSONL, and a benchmark's
own JSON annotations. A malformed line or a missing key must stop the run with a sentence a person
can act on, not a ``KeyError`` from three frames down. The helpers here raise
:class:`BenchmarkInputError`; each CLI's ``main`` turns it into a one-line exit message.

Three checks every tool shares: a field has the type upstream's files give it (``FIELD_TYPES``; a
null or numeric ``text`` is an error, not a score), a question is answered once, and an input is
not empty. :func:`refuse_overwriting_inputs` keeps every tool that writes from writing onto a file
it reads, however the path is spelled (symlinks and hard links compare as the file they are).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from vision_token_compression import atomic_write_text

Types = type | tuple[type, ...]

# The type of each field as upstream LLaVA's question and answer files hold it. A question id is a
# number (VQAv2, POPE, MMBench, SEED in LLaVA's files) or a string (GQA, ScienceQA, TextVQA, MME).
QUESTION_ID: Types = (int, str)
FIELD_TYPES: dict[str, Types] = {
    "question_id": QUESTION_ID,
    "text": str,
    "prompt": str,
    "image": str,
    "category": str,
    "label": str,
    "round_id": int,
    "options": list,
    "option_char": list,
}
_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "a JSON object", float: "a number"}


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


def type_name(types: Types) -> str:
    """``(int, str)`` -> "an integer or a string", for messages."""
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def has_type(value: Any, types: Types) -> bool:
    """``isinstance`` that does not take ``True`` for an integer (JSON's booleans are not ids or indices)."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in (
        types if isinstance(types, tuple) else (types,)))


def check_fields(record: Any, fields: Mapping[str, Types] | Sequence[str], where: str, fix: str = "") -> dict:
    """Return ``record`` if it is an object holding each of ``fields`` with its type, else raise.

    ``fields`` maps a key to its type(s), or lists keys whose types ``FIELD_TYPES`` gives (any type
    for a key it does not list). ``where`` says which file and line or entry, for the message.
    """
    if not isinstance(record, dict):
        raise BenchmarkInputError(f"{where} is a JSON {_json_type(record)}, not an object. {fix}".rstrip())
    if not isinstance(fields, Mapping):
        fields = {key: FIELD_TYPES.get(key, object) for key in fields}
    missing = [key for key in fields if key not in record]
    if missing:
        raise BenchmarkInputError(
            f"{where} has no {', '.join(map(repr, missing))} (keys present: {sorted(record)}). {fix}".rstrip()
        )
    for key, types in fields.items():
        if not has_type(record[key], types):
            raise BenchmarkInputError(
                f"{where}: {key!r} is {record[key]!r} ({_json_type(record[key])}), not {type_name(types)}. "
                f"{fix}".rstrip()
            )
    return record


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def check_optional_fields(record: dict, fields: Mapping[str, Types], where: str, fix: str = "") -> None:
    """Like :func:`check_fields` for keys a record may lack: each one present must have its type."""
    check_fields(record, {key: types for key, types in fields.items() if key in record}, where, fix)


def read_json(path: str | os.PathLike, what: str, hint: str = "", expect: type | None = None) -> Any:
    """Load one JSON document, naming the file when it is missing, not JSON, or (with ``expect``) of
    another type or empty."""
    path = require_file(path, what, hint)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise BenchmarkInputError(
                f"{what} {path!r} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
            ) from None
    if expect is not None:
        if not isinstance(data, expect):
            raise BenchmarkInputError(
                f"{what} {path!r} holds a JSON {_json_type(data)}, not {type_name(expect)}. {hint}".rstrip()
            )
        if not data:
            raise BenchmarkInputError(f"{what} {path!r} is empty (an empty {type_name(expect)[3:]}). {hint}".rstrip())
    return data


def read_jsonl(
    path: str | os.PathLike,
    what: str,
    required: Sequence[str] | Mapping[str, Types] = ("question_id",),
    hint: str = "",
    skip_invalid: bool = False,
    fix: str = "pass the file written by llava.eval.model_vqa* for this benchmark.",
    unique: Sequence[str] = (),
    choices: Mapping[str, Collection] | None = None,
    allow_empty: bool = False,
) -> tuple[list[dict], list[int]]:
    """Load a JSON-lines file, one object a line, checking each line's fields.

    Blank lines are ignored. With ``skip_invalid`` a line that is not JSON is left out and its
    1-based number returned (upstream's VQAv2/VizWiz converters tolerate lines cut short by a
    killed worker); otherwise it is an error. Every line needs the ``required`` keys with their types
    (see :func:`check_fields`); the optional keys of ``FIELD_TYPES`` must have their type when present.

    Args:
        unique: keys whose values together identify a line (``("question_id",)``): a second line
            with the same values is an error naming both lines.
        choices: allowed values of some keys (``{"label": ("yes", "no")}``).
        allow_empty: without it a file with no lines is an error.

    Returns:
        (records, numbers of the lines left out).
    """
    path = require_file(path, what, hint)
    records, skipped, seen = [], [], {}
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
            where = f"{what} {path!r} line {number}"
            check_fields(record, required, where, f"Each line needs {list(required)}; {fix}")
            check_optional_fields(record, FIELD_TYPES, where, fix)
            for key, allowed in (choices or {}).items():
                if record[key] not in allowed:
                    raise BenchmarkInputError(f"{where}: {key!r} is {record[key]!r}, not one of {list(allowed)}.")
            if unique:
                _check_unique(record, unique, number, seen, where)
            records.append(record)
    if not records and not allow_empty:
        raise BenchmarkInputError(f"{what} {path!r} is empty: it has no JSON lines. {hint or fix}".rstrip())
    return records, skipped


def _check_unique(record: dict, keys: Sequence[str], number: int, seen: dict, where: str) -> None:
    """Remember ``record``'s ``keys`` values in ``seen`` (value -> first line), refusing a repeat."""
    value = json.dumps([record.get(key) for key in keys])
    if value in seen:
        shown = ", ".join(f"{key} {record.get(key)!r}" for key in keys)
        raise BenchmarkInputError(
            f"{where} repeats line {seen[value]} ({shown}): each question must be answered once. "
            "When merging chunk files, concatenate each chunk once."
        )
    seen[value] = number


def first_repeat(values: Iterable[Any]) -> tuple[int, int] | None:
    """The 1-based positions (first, second) of the first value that occurs twice, or None."""
    seen: dict = {}
    for position, value in enumerate(values, start=1):
        if value in seen:
            return seen[value], position
        seen[value] = position
    return None


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
    """Write ``data`` as JSON, atomically, creating the parent folder."""
    atomic_write_text(path, json.dumps(data, indent=indent))


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` names, following symlinks; None if there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def refuse_overwriting_inputs(outputs: Mapping[str, str | os.PathLike],
                              inputs: Mapping[str, str | os.PathLike] | Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Raise unless every output is a file other than every input and every other output.

    Files are compared as files (device and inode, through symlinks), so another spelling of the
    path, a symlink or a hard link to an input is caught; outputs that do not exist yet are compared
    by their resolved paths. Call it before any work, with the flags (or roles) naming each path.
    """
    inputs = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
    input_ids = [(label, os.fspath(path), _file_id(os.fspath(path))) for label, path in inputs]
    resolved: dict[str, str] = {}
    for label, path in outputs.items():
        path = os.fspath(path)
        output_id = _file_id(path)
        for input_label, input_path, input_id in input_ids:
            if output_id is not None and output_id == input_id:
                raise BenchmarkInputError(
                    f"{label} {path!r} is the same file as {input_label} {input_path!r} (the same path, another "
                    f"spelling of it, a symlink or a hard link): writing it would destroy that input. Choose "
                    f"another {label}."
                )
        real = os.path.realpath(path)
        if real in resolved:
            raise BenchmarkInputError(
                f"{label} {path!r} and {resolved[real]} name the same file: one output would overwrite the "
                f"other. Choose two different paths."
            )
        resolved[real] = f"{label} {path!r}"


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
