"""POPE (object hallucination) scores of a LLaVA answers file, as ``scripts/v1_5/eval/pope.sh`` runs it.

``python llava/eval/eval_pope.py --annotation-dir pope/coco --question-file llava_pope_test.jsonl
--result-file answers/llava-v1.5-13b.jsonl``

Inputs:

* ``--annotation-dir``: POPE's ``coco_pope_<category>.json`` files (``adversarial``, ``popular``,
  ``random``), JSON lines each carrying ``"label": "yes" | "no"``. Any other file there is an error.
* ``--question-file``: LLaVA's question JSONL, each line with ``question_id`` and ``category``.
* ``--result-file``: the answers JSONL (``question_id``, ``text``).

A category's answers, taken in question-file order, are paired with its annotation lines in file
order (POPE's own question ids restart in each file, so position is the link); the counts must
agree.

Reading an answer: keep the text before its first ``.``, delete commas, split on spaces; the answer
is "no" when a word is exactly ``No``, ``no`` or ``not``, else "yes". "yes" is the positive class.

Printed per category (categories in file-name order)::

    Category: adversarial, # samples: 3000
    TP	FP	TN	FN
    1400	120	1380	100
    Accuracy: 0.9266666666666666
    Precision: 0.9210526315789473
    Recall: 0.9333333333333333
    F1 score: 0.9271523178807948
    Yes ratio: 0.5066666666666667
    0.927, 0.927, 0.921, 0.933, 0.507
    ====================================

the last number line being F1, accuracy, precision, recall, yes-ratio. A precision or recall
with a zero denominator is reported as 0.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from llava.eval.benchmark_io import (
    BenchmarkInputError,
    exits_on_input_error,
    index_by_question_id,
    read_jsonl,
    unknown_ids_error,
)

ANNOTATION_PREFIX = "coco_pope_"
ANNOTATION_SUFFIX = ".json"
_NO_WORDS = ("No", "not", "no")
LABELS = ("yes", "no")


def answer_is_yes(text: str) -> bool:
    """POPE's reading of a free-form answer: "no" iff its first sentence has the word No/no/not."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return not any(word in _NO_WORDS for word in words)


@dataclass(frozen=True)
class PopeScores:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.total

    @property
    def precision(self) -> float:
        return float(self.tp) / float(self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return float(self.tp) / float(self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def yes_ratio(self) -> float:
        return (self.tp + self.fp) / self.total


def score(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> PopeScores:
    """Confusion counts, "yes" being positive."""
    pairs = list(zip(predicted_yes, label_yes, strict=True))
    return PopeScores(
        tp=sum(p and t for p, t in pairs),
        fp=sum(p and not t for p, t in pairs),
        tn=sum(not p and not t for p, t in pairs),
        fn=sum(not p and t for p, t in pairs),
    )


def print_scores(scores: PopeScores) -> None:
    print("TP\tFP\tTN\tFN\t")
    print(f"{scores.tp}\t{scores.fp}\t{scores.tn}\t{scores.fn}")
    print(f"Accuracy: {scores.accuracy}")
    print(f"Precision: {scores.precision}")
    print(f"Recall: {scores.recall}")
    print(f"F1 score: {scores.f1}")
    print(f"Yes ratio: {scores.yes_ratio}")
    print(
        f"{scores.f1:.3f}, {scores.accuracy:.3f}, {scores.precision:.3f}, "
        f"{scores.recall:.3f}, {scores.yes_ratio:.3f}"
    )


def annotation_files(annotation_dir: str) -> dict[str, str]:
    """``{category: path}`` for POPE's ``coco_pope_<category>.json`` files, sorted by category."""
    if not os.path.isdir(annotation_dir):
        raise BenchmarkInputError(
            f"--annotation-dir {annotation_dir!r} is not a directory. Download POPE's output/coco "
            "folder (coco_pope_adversarial.json, ...) and pass its path."
        )
    files = {}
    for name in sorted(os.listdir(annotation_dir)):
        if not (name.startswith(ANNOTATION_PREFIX) and name.endswith(ANNOTATION_SUFFIX)):
            raise BenchmarkInputError(
                f"--annotation-dir {annotation_dir!r} holds {name!r}; it may only hold POPE's "
                f"{ANNOTATION_PREFIX}<category>{ANNOTATION_SUFFIX} files. Move other files out."
            )
        files[name[len(ANNOTATION_PREFIX):-len(ANNOTATION_SUFFIX)]] = os.path.join(annotation_dir, name)
    if not files:
        raise BenchmarkInputError(f"--annotation-dir {annotation_dir!r} has no {ANNOTATION_PREFIX}*.json files.")
    return files


def load_labels(path: str) -> list[bool]:
    records, _ = read_jsonl(path, "POPE annotation file", required=("label",), choices={"label": LABELS})
    return [record["label"] == "yes" for record in records]


def evaluate(annotation_dir: str, question_file: str, result_file: str) -> dict[str, PopeScores]:
    """Print and return the scores of each POPE category."""
    questions, _ = read_jsonl(question_file, "POPE question file", required=("question_id", "category"),
                              unique=("question_id",), hint="LLaVA's eval.zip has it as pope/llava_pope_test.jsonl.")
    questions = index_by_question_id(questions, question_file, "POPE question file")
    position = {qid: i for i, qid in enumerate(questions)}
    answers, _ = read_jsonl(result_file, "POPE answers file", required=("question_id", "text"),
                            unique=("question_id",))
    unknown = [a["question_id"] for a in answers if a["question_id"] not in questions]
    if unknown:
        raise unknown_ids_error(
            unknown, result_file, "POPE answers file", f"the question file {question_file!r}",
            "Score the answers against the question file they were generated from.",
        )
    answers.sort(key=lambda a: position[a["question_id"]])

    results = {}
    for category, label_file in annotation_files(annotation_dir).items():
        category_answers = [a for a in answers if questions[a["question_id"]]["category"] == category]
        print(f"Category: {category}, # samples: {len(category_answers)}")
        labels = load_labels(label_file)
        if len(category_answers) != len(labels):
            raise BenchmarkInputError(
                f"POPE category {category!r}: {len(category_answers)} answers in {result_file!r} but "
                f"{len(labels)} labels in {label_file!r}. Answers are matched to labels by position, so "
                "every question of the category needs an answer; re-run inference on the full question file."
            )
        results[category] = score([answer_is_yes(a["text"]) for a in category_answers], labels)
        print_scores(results[category])
        print("====================================")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-dir", type=str, required=True)
    parser.add_argument("--question-file", type=str, required=True)
    parser.add_argument("--result-file", type=str, required=True)
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> dict[str, PopeScores]:
    args = build_parser().parse_args(argv)
    return evaluate(args.annotation_dir, args.question_file, args.result_file)


if __name__ == "__main__":
    main()
