"""GQA accuracy of a predictions file, with the metrics and printout of GQA's official ``eval.py``.

``gqa.sh`` runs GQA's own ``eval/eval.py --tier testdev_balanced`` (not redistributable); this module
computes the same accuracies: ``python -m llava.eval.eval_gqa --tier testdev_balanced`` in the
folder holding ``testdev_balanced_predictions.json`` (from ``convert_gqa_for_eval``) and GQA's
``testdev_balanced_questions.json``. ``--predictions`` and ``--questions`` are file-name formats
filled with ``{tier}``, as in the official script (LLaVA's patched copy, which reads
``{tier}_questions.json``); ``--tier`` defaults to ``val`` as there.

Semantics (official ``eval.py``): only questions with ``"isBalanced": true`` are scored, and each of
them needs a prediction; a prediction is right when it equals ``answer`` exactly. A question is
*open* when ``types.structural`` is ``"query"``, otherwise *binary* (``verify``, ``logical``,
``choose``, ``compare``). Distribution is the chi-square distance between gold and predicted answer
counts within each ``groups.global`` group, weighted by group size, divided by 100.

Prints, as the official script::

    Binary: 79.13%
    Open: 47.92%
    Accuracy: 62.00%
    Distribution: 1.23 (lower is better)

    Accuracy / structural type:
      choose: 80.00% (1129 questions)
      ...

then accuracy per semantic type, per reasoning-step count and per question word count. Validity,
plausibility, consistency and grounding need GQA's choices, scene graphs or attention maps and are
not computed (the official script prints 0.00% for the first two on testdev).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llava.eval.benchmark_io import (
    QUESTION_ID,
    BenchmarkInputError,
    check_fields,
    check_optional_fields,
    exits_on_input_error,
    first_repeat,
    read_json,
    unknown_ids_error,
)

OPEN_STRUCTURAL_TYPE = "query"
# A semantic step whose "operation: argument" holds one of these does not count as reasoning.
_NON_REASONING_STEPS = ("exist", "query: name", "choose name")


@dataclass
class GQAScores:
    binary: float
    open: float
    accuracy: float
    distribution: float
    per_structural_type: dict[str, tuple[float, int]] = field(default_factory=dict)
    per_semantic_type: dict[str, tuple[float, int]] = field(default_factory=dict)
    per_steps: dict[int, tuple[float, int]] = field(default_factory=dict)
    per_words: dict[int, tuple[float, int]] = field(default_factory=dict)


def _percent(hits: Sequence[float]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


def _breakdown(groups: Mapping) -> dict:
    return {key: (_percent(hits), len(hits)) for key, hits in groups.items()}


def reasoning_steps(question: Mapping) -> int:
    return sum(
        1 for step in question.get("semantic", [])
        if not any(word in f"{step['operation']}: {step['argument']}" for word in _NON_REASONING_STEPS)
    )


def chi_square(gold: Mapping[str, Mapping[str, int]], predicted: Mapping[str, Mapping[str, int]]) -> float:
    """Chi-square of predicted vs gold answer counts per group, averaged with group sizes as weights."""
    weighted, weights = 0.0, 0
    for group, gold_counts in gold.items():
        statistic = sum(
            float(predicted[group].get(answer, 0) - expected) ** 2 / expected
            for answer, expected in gold_counts.items()
        )
        size = sum(gold_counts.values())
        weighted += statistic * size
        weights += size
    return weighted / weights if weights else 0.0


def score(questions: Mapping[str, Mapping], predictions: Mapping[str, str]) -> GQAScores:
    hits: dict[str, list[float]] = {"binary": [], "open": [], "accuracy": []}
    structural, semantic = defaultdict(list), defaultdict(list)
    steps, words = defaultdict(list), defaultdict(list)
    gold_counts = defaultdict(lambda: defaultdict(int))
    predicted_counts = defaultdict(lambda: defaultdict(int))
    for qid, question in questions.items():
        if not question.get("isBalanced", True):
            continue
        gold, predicted = question["answer"], predictions[qid]
        hit = float(predicted == gold)
        types = question["types"]
        hits["accuracy"].append(hit)
        hits["open" if types["structural"] == OPEN_STRUCTURAL_TYPE else "binary"].append(hit)
        structural[types["structural"]].append(hit)
        semantic[types["semantic"]].append(hit)
        steps[reasoning_steps(question)].append(hit)
        words[len(question.get("question", "").split())].append(hit)
        group = question.get("groups", {}).get("global")
        if group is not None:
            gold_counts[group][gold] += 1
            predicted_counts[group][predicted] += 1
    return GQAScores(
        binary=_percent(hits["binary"]),
        open=_percent(hits["open"]),
        accuracy=_percent(hits["accuracy"]),
        distribution=chi_square(gold_counts, predicted_counts) / 100,
        per_structural_type=_breakdown(structural),
        per_semantic_type=_breakdown(semantic),
        per_steps=_breakdown(steps),
        per_words=_breakdown(words),
    )


def check_question(question: object, qid: str, questions_file: str) -> None:
    """Refuse a GQA question without the fields scoring reads, or with one of another type."""
    where = f"GQA questions file {questions_file!r}, question {qid!r}"
    fix = "Pass GQA's own questions file of a split with answers (testdev_balanced_questions.json)."
    check_fields(question, {"answer": str, "types": dict}, where, fix)
    check_fields(question["types"], {"structural": str, "semantic": str}, f"{where}, 'types'", fix)
    check_optional_fields(question, {"isBalanced": bool, "question": str, "semantic": list, "groups": dict}, where, fix)
    for step in question.get("semantic", []):
        check_fields(step, {"operation": str, "argument": str}, f"{where}, a step of 'semantic'", fix)


def load_predictions(predictions_file: str) -> dict[str, str]:
    """``{question id: prediction}`` from a predictions file, each entry checked, ids unique."""
    fix = "Write it with: python scripts/convert_gqa_for_eval.py --src merge.jsonl --dst <this file>."
    raw = read_json(predictions_file, "GQA predictions file", fix, expect=list)
    for number, entry in enumerate(raw, start=1):
        check_fields(entry, {"questionId": QUESTION_ID, "prediction": str},
                     f"GQA predictions file {predictions_file!r}, entry {number}", fix)
    repeat = first_repeat(str(entry["questionId"]) for entry in raw)
    if repeat:
        raise BenchmarkInputError(
            f"GQA predictions file {predictions_file!r}, entry {repeat[1]} repeats entry {repeat[0]}'s questionId "
            f"{raw[repeat[1] - 1]['questionId']!r}: each question needs one prediction. When merging chunk files, "
            "concatenate each chunk once."
        )
    return {str(entry["questionId"]): entry["prediction"] for entry in raw}


def load(questions_file: str, predictions_file: str) -> tuple[dict, dict]:
    questions = read_json(questions_file, "GQA questions file",
                          "Download the balanced question files from https://cs.stanford.edu/people/dorarad/gqa/download.html.",
                          expect=dict)
    for qid, question in questions.items():
        check_question(question, qid, questions_file)
    predictions = load_predictions(predictions_file)
    unknown = [qid for qid in predictions if qid not in questions]
    if unknown:
        raise unknown_ids_error(
            unknown, predictions_file, "GQA predictions file", f"{questions_file!r}",
            "Pass the questions file of the split the answers were generated for (--tier / --questions).",
        )
    missing = [qid for qid, q in questions.items() if q.get("isBalanced", True) and qid not in predictions]
    if missing:
        raise BenchmarkInputError(
            f"GQA predictions file {predictions_file!r} has no prediction for {len(missing)} balanced "
            f"question(s) of {questions_file!r} (first: {missing[:5]}). Every balanced question needs one; "
            "re-run inference for them (when merging chunks, include every chunk)."
        )
    return questions, predictions


def print_scores(scores: GQAScores) -> None:
    print("")
    print(f"Binary: {scores.binary:.2f}%")
    print(f"Open: {scores.open:.2f}%")
    print(f"Accuracy: {scores.accuracy:.2f}%")
    print(f"Distribution: {scores.distribution:.2f} (lower is better)")
    for title, table in (
        ("Accuracy / structural type", scores.per_structural_type),
        ("Accuracy / semantic type", scores.per_semantic_type),
        ("Accuracy / steps number", scores.per_steps),
        ("Accuracy / words number", scores.per_words),
    ):
        print("")
        print(f"{title}:")
        for key in sorted(table):
            value, count = table[key]
            print(f"  {key}: {value:.2f}% ({count} questions)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", type=str, default="val", help="Tier, e.g. testdev_balanced, val.")
    parser.add_argument("--questions", type=str, default="{tier}_questions.json", help="Questions file name format.")
    parser.add_argument("--predictions", type=str, default="{tier}_predictions.json",
                        help="Predictions file name format.")
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> GQAScores:
    args = build_parser().parse_args(argv)
    questions, predictions = load(args.questions.format(tier=args.tier), args.predictions.format(tier=args.tier))
    scores = score(questions, predictions)
    print_scores(scores)
    return scores


if __name__ == "__main__":
    main()
