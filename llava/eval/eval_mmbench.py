"""MMBench dev accuracy of LLaVA answers, scored locally against the TSV's ``answer`` column.

``python -m llava.eval.eval_mmbench --annotation-file mmbench_dev_20230712.tsv --result-file
answers/mmbench_dev_20230712/llava-v1.5-13b.jsonl`` (or ``--result-dir DIR --experiment NAME``,
the converter's flags, for ``DIR/NAME.jsonl``). Only splits whose TSV has answers (dev) can be
scored here; the test split goes through the server (``convert_mmbench_for_submission``).

Reading an answer: the option letter the text starts with (``"B"``, ``"B."``, ``"B) red"``), else the
letter of ``"answer is X"``, else the option whose text equals the answer text; anything else is
wrong. This is the exact-match stage of MMBench's official extraction, without its ChatGPT fallback.

Circular evaluation: answers from ``model_vqa_mmbench --all-rounds`` hold one line per rotation of
the options (``round_id``; ``option_char`` maps the letters shown to the TSV's letters). A question
then counts as right only when every round is right, as in MMBench's CircularEval. Without
``--all-rounds`` (one round) this is plain accuracy.

Prints ``Samples: N``, ``Accuracy: A%`` (round 0 only), ``Circular accuracy: C%`` when answers have
more than one round, and the round-0 accuracy per ``category``. Reads the TSV with the standard
library (no pandas needed).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from llava.eval.benchmark_io import (
    BenchmarkInputError,
    exits_on_input_error,
    read_jsonl,
    require_file,
    unknown_ids_error,
)

LETTERS = ("A", "B", "C", "D")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-D])(?:$|[\s.):,])")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-D])\b", re.IGNORECASE)
_EMPTY = {"", "nan", "none"}


@dataclass
class Question:
    answer: str
    category: str
    options: dict[str, str]  # letter -> option text, letters the TSV fills in


@dataclass
class MMBenchScores:
    samples: int
    accuracy: float
    circular_accuracy: float | None
    per_category: dict[str, float] = field(default_factory=dict)


def load_questions(tsv: str) -> dict[str, Question]:
    """Questions by ``index`` (as a string) from an MMBench TSV with an ``answer`` column."""
    require_file(tsv, "MMBench TSV", "Download it from https://download.openmmlab.com/mmclassification/datasets/mmbench/.")
    csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        for needed in ("index", "answer"):
            if needed not in columns:
                raise BenchmarkInputError(
                    f"MMBench TSV {tsv!r} has no {needed!r} column (columns: {columns}). Only splits with "
                    "answers (dev) can be scored locally; submit test answers to the MMBench server."
                )
        questions = {}
        for row in reader:
            options = {
                letter: row[letter] for letter in LETTERS
                if letter in row and row[letter] is not None and row[letter].strip().lower() not in _EMPTY
            }
            answer = (row["answer"] or "").strip()  # a short row leaves its trailing cells None
            if answer not in options:
                raise BenchmarkInputError(
                    f"MMBench TSV {tsv!r} row {reader.line_num} (index {row['index']!r}): its 'answer' {answer!r} "
                    f"is not one of its options' letters {sorted(options)}. Pass MMBench's own dev TSV."
                )
            questions[row["index"].strip()] = Question(answer, row.get("category") or "", options)
    if not questions:
        raise BenchmarkInputError(f"MMBench TSV {tsv!r} is empty: it has no rows under its header.")
    return questions


def check_rotation(answer: dict, question: Question, result_file: str, number: int) -> dict[str, str]:
    """The options as this answer's round showed them, checked against the round's ``option_char``."""
    shown = question.options
    if answer.get("options"):  # the texts as shown in this round; fewer than four when the TSV has blanks
        shown = dict(zip(LETTERS, answer["options"], strict=False))
    where = f"MMBench answers file {result_file!r} line {number}"
    if not all(isinstance(text, str) for text in shown.values()) or len(shown) > len(LETTERS):
        raise BenchmarkInputError(f"{where}: 'options' must be at most {len(LETTERS)} strings, got {answer['options']!r}.")
    letters = answer.get("option_char")
    if letters and (len(letters) < len(shown) or any(not isinstance(letter, str) or letter not in question.options for letter in letters)):
        raise BenchmarkInputError(
            f"{where}: 'option_char' {letters!r} must give each of the {len(shown)} options shown its letter in "
            f"the TSV ({sorted(question.options)}). Use the answers model_vqa_mmbench wrote."
        )
    return shown


def parse_letter(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, or None."""
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
        match = pattern.search(text)
        if match and match.group(1) in options:
            return match.group(1)
    for letter, option in options.items():
        if text.strip().rstrip(".").lower() == option.strip().rstrip(".").lower():
            return letter
    return None


def original_letter(shown: str, option_char: Sequence[str] | None) -> str:
    """Map the letter shown in a rotated round back to the TSV's letter."""
    if not option_char:
        return shown
    position = LETTERS.index(shown)
    return option_char[position] if position < len(option_char) else shown


def evaluate(tsv: str, result_file: str) -> MMBenchScores:
    questions = load_questions(tsv)
    answers, _ = read_jsonl(result_file, "MMBench answers file", required=("question_id", "text"),
                            unique=("question_id", "round_id"))
    unknown = sorted({str(a["question_id"]) for a in answers} - set(questions))
    if unknown:
        raise unknown_ids_error(
            unknown, result_file, "MMBench answers file", f"the 'index' column of {tsv!r}",
            "Pass the TSV the answers were generated from.",
        )
    rounds: dict[str, dict[int, bool]] = defaultdict(dict)
    for number, answer in enumerate(answers, start=1):
        qid = str(answer["question_id"])
        question = questions[qid]
        shown_options = check_rotation(answer, question, result_file, number)
        shown = parse_letter(answer["text"], shown_options)
        right = shown is not None and original_letter(shown, answer.get("option_char")) == question.answer
        rounds[qid][int(answer.get("round_id", 0))] = right
    missing_round0 = [qid for qid, r in rounds.items() if 0 not in r]
    if missing_round0:
        raise BenchmarkInputError(
            f"MMBench answers file {result_file!r}: questions {missing_round0[:5]} have no round_id 0 answer."
        )
    first = {qid: r[0] for qid, r in rounds.items()}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for qid, right in first.items():
        by_category[questions[qid].category].append(right)
    circular = None
    if any(len(r) > 1 for r in rounds.values()):
        circular = 100 * sum(all(r.values()) for r in rounds.values()) / len(rounds)
    return MMBenchScores(
        samples=len(first),
        accuracy=100 * sum(first.values()) / len(first),
        circular_accuracy=circular,
        per_category={c: 100 * sum(v) / len(v) for c, v in sorted(by_category.items())},
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", type=str, required=True, help="MMBench TSV with an 'answer' column")
    parser.add_argument("--result-file", type=str, help="answers JSONL")
    parser.add_argument("--result-dir", type=str, help="with --experiment: scores RESULT_DIR/EXPERIMENT.jsonl")
    parser.add_argument("--experiment", type=str)
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> MMBenchScores:
    args = build_parser().parse_args(argv)
    result_file = args.result_file
    if result_file is None:
        if args.result_dir is None or args.experiment is None:
            raise BenchmarkInputError("pass --result-file FILE, or --result-dir DIR with --experiment NAME.")
        result_file = os.path.join(args.result_dir, f"{args.experiment}.jsonl")
    scores = evaluate(args.annotation_file, result_file)
    print(f"Samples: {scores.samples}")
    print(f"Accuracy: {scores.accuracy:.2f}%")
    if scores.circular_accuracy is not None:
        print(f"Circular accuracy: {scores.circular_accuracy:.2f}%")
    for category, accuracy in scores.per_category.items():
        print(f"  {category}: {accuracy:.2f}%")
    return scores


if __name__ == "__main__":
    main()
