"""SEED-Bench accuracy of LLaVA answers, and the leaderboard upload file, as ``seed.sh`` runs it.

``python scripts/convert_seed_for_submission.py --annotation-file SEED-Bench.json --result-file
answers/merge.jsonl --result-upload-file answers_upload/m.jsonl`` (also
``python -m llava.eval.convert_seed_for_submission``).

``SEED-Bench.json`` is ``{"question_type": {name: type id}, "questions": [{"question_id",
"question_type_id", "data_type": "image" | "video", "answer": "A".."D", ...}]}``. An answer is right
when its ``text`` equals the question's ``answer`` exactly (LLaVA is prompted to reply with the
letter); a question without an answer counts as wrong. Question ids match whether the answers file
holds them as numbers or strings.

Prints accuracy per question type (by type id), ``Total accuracy``, then ``image accuracy`` and
``video accuracy`` (the latter two skipped when no question has that data type)::

    Scene Understanding: 74.93%
    ...
    Total accuracy: 61.58%
    image accuracy: 68.20%
    video accuracy: 42.68%

and writes the upload file: one ``{"question_id": id as in SEED-Bench.json, "prediction": text}``
line per question, in annotation order (so every question needs an answer).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from llava.eval.benchmark_io import (
    QUESTION_ID,
    BenchmarkInputError,
    check_fields,
    exits_on_input_error,
    first_repeat,
    read_json,
    read_jsonl,
    refuse_overwriting_inputs,
    unknown_ids_error,
)
from vision_token_compression import atomic_write_text

DATA_TYPES = ("image", "video")
QUESTION_FIELDS = {"question_id": QUESTION_ID, "question_type_id": int, "data_type": str, "answer": str}


@dataclass
class Tally:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total * 100


@dataclass
class SeedScores:
    per_type: dict[int, Tally] = field(default_factory=dict)  # by question_type_id
    per_data_type: dict[str, Tally] = field(default_factory=dict)
    overall: Tally = field(default_factory=Tally)


def load_annotation(path: str) -> dict:
    """SEED-Bench.json, each question checked for the fields scoring reads, ids unique."""
    what = f"SEED-Bench annotation file {path!r}"
    fix = "Pass SEED-Bench.json from AILab-CVC/SEED-Bench."
    data = read_json(path, "SEED-Bench annotation file", fix, expect=dict)
    check_fields(data, {"question_type": dict, "questions": list}, what, fix)
    if not data["questions"]:
        raise BenchmarkInputError(f"{what} is empty: its 'questions' list has no questions. {fix}")
    for number, question in enumerate(data["questions"], start=1):
        check_fields(question, QUESTION_FIELDS, f"{what}, question {number} of 'questions'", fix)
    repeat = first_repeat(str(q["question_id"]) for q in data["questions"])
    if repeat:
        qid = data["questions"][repeat[1] - 1]["question_id"]
        raise BenchmarkInputError(f"{what}: questions {repeat[0]} and {repeat[1]} share the 'question_id' {qid!r}.")
    return data


def load_texts(result_file: str) -> dict[str, str]:
    """Answer text by question id as a string (ids are strings in SEED-Bench.json, ints in some answers)."""
    answers, _ = read_jsonl(result_file, "SEED-Bench answers file", required=("question_id", "text"),
                            unique=("question_id",))
    return {str(a["question_id"]): a["text"] for a in answers}


def score(questions: Sequence[dict], texts: dict[str, str]) -> SeedScores:
    scores = SeedScores()
    for question in questions:
        right = texts.get(str(question["question_id"])) == question["answer"]
        for tally in (
            scores.per_type.setdefault(question["question_type_id"], Tally()),
            scores.per_data_type.setdefault(question["data_type"], Tally()),
            scores.overall,
        ):
            tally.total += 1
            tally.correct += right
    return scores


def print_scores(scores: SeedScores, type_names: dict[int, str]) -> None:
    for type_id in sorted(scores.per_type):
        print(f"{type_names.get(type_id, type_id)}: {scores.per_type[type_id].accuracy:.2f}%")
    print(f"Total accuracy: {scores.overall.accuracy:.2f}%")
    for data_type in DATA_TYPES:
        if data_type in scores.per_data_type:
            print(f"{data_type} accuracy: {scores.per_data_type[data_type].accuracy:.2f}%")


def write_upload(path: str, questions: Sequence[dict], texts: dict[str, str], result_file: str) -> None:
    missing = [q["question_id"] for q in questions if str(q["question_id"]) not in texts]
    if missing:
        raise BenchmarkInputError(
            f"SEED-Bench answers file {result_file!r} has no answer for {len(missing)} of {len(questions)} "
            f"questions (first: {missing[:5]}); the upload needs them all. Re-run inference for them "
            "(when merging chunks, include every chunk)."
        )
    atomic_write_text(path, "".join(
        json.dumps({"question_id": q["question_id"], "prediction": texts[str(q["question_id"])]}) + "\n"
        for q in questions
    ))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", type=str, required=True)
    parser.add_argument("--result-file", type=str, required=True)
    parser.add_argument("--result-upload-file", type=str, required=True)
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> SeedScores:
    args = build_parser().parse_args(argv)
    refuse_overwriting_inputs({"--result-upload-file": args.result_upload_file},
                              {"--annotation-file": args.annotation_file, "--result-file": args.result_file})
    data = load_annotation(args.annotation_file)
    texts = load_texts(args.result_file)
    known = {str(q["question_id"]) for q in data["questions"]}
    unknown = [qid for qid in texts if qid not in known]
    if unknown:
        raise unknown_ids_error(
            unknown, args.result_file, "SEED-Bench answers file", f"{args.annotation_file!r}",
            "Score the answers against the SEED-Bench.json their question file was built from.",
        )
    scores = score(data["questions"], texts)
    print_scores(scores, {type_id: name for name, type_id in data["question_type"].items()})
    write_upload(args.result_upload_file, data["questions"], texts, args.result_file)
    return scores


if __name__ == "__main__":
    main()
