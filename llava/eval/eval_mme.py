"""MME scores from the per-subtask answer files, computed as MME's ``eval_tool/calculation.py`` does.

``python -m llava.eval.eval_mme --results_dir answers/llava-v1.5-13b`` (run in ``eval_tool``, after
``convert_answer_to_mme``). ``--results_dir`` holds one ``<subtask>.txt`` per subtask, each line
``image<TAB>question<TAB>Yes|No<TAB>prediction``, two questions per image.

Metric (MME, Fu et al. 2023):

* a prediction is lower-cased and read as ``yes`` or ``no`` when it is exactly that, else as ``yes``
  when its first four characters contain "yes", else ``no`` when they contain "no", else ``other``
  (always wrong);
* accuracy = right answers / questions; accuracy+ = images with both questions right / images;
* subtask score = 100 * accuracy + 100 * accuracy+ (at most 200);
* Perception = sum over its 10 subtasks (at most 2000), Cognition over its 4 (at most 800).

Prints MME's report, then accuracy and accuracy+ per subtask::

    =========== Perception ===========
    total score: 1531.3

    <TAB> existence  score: 195.0
    ...

Questions are paired by image name (MME pairs consecutive lines; the converter writes an image's
two questions together, so both agree). Every subtask file must be present.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from llava.eval.benchmark_io import BenchmarkInputError, exits_on_input_error

SUBTASKS: dict[str, tuple[str, ...]] = {
    "Perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                   "landmark", "artwork", "OCR"),
    "Cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
QUESTIONS_PER_IMAGE = 2


def parse_prediction(text: str) -> str:
    """``yes``, ``no`` or ``other``, as MME reads a free-form answer."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass(frozen=True)
class SubtaskScore:
    questions: int
    correct: int
    images: int
    images_all_correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions

    @property
    def accuracy_plus(self) -> float:
        return self.images_all_correct / self.images

    @property
    def score(self) -> float:
        return self.accuracy * 100 + self.accuracy_plus * 100


def score_subtask(path: str) -> SubtaskScore:
    """Score one ``<subtask>.txt`` file."""
    by_image: dict[str, list[bool]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 4:
                raise BenchmarkInputError(
                    f"MME result file {path!r} line {number} has {len(fields)} tab-separated fields, "
                    "needs 4 (image, question, ground truth, prediction). Write it with "
                    "llava.eval.convert_answer_to_mme."
                )
            image, _, truth, prediction = fields
            truth = truth.lower()
            if truth not in ("yes", "no"):
                raise BenchmarkInputError(
                    f"MME result file {path!r} line {number}: ground truth {fields[2]!r} is not Yes or No."
                )
            by_image.setdefault(image, []).append(parse_prediction(prediction) == truth)
    if not by_image:
        raise BenchmarkInputError(f"MME result file {path!r} has no answers.")
    unpaired = {image: len(r) for image, r in by_image.items() if len(r) != QUESTIONS_PER_IMAGE}
    if unpaired:
        shown = dict(list(unpaired.items())[:5])
        raise BenchmarkInputError(
            f"MME result file {path!r}: every image needs exactly {QUESTIONS_PER_IMAGE} questions, but "
            f"{len(unpaired)} image(s) have another count ({shown}). Answer every question of llava_mme.jsonl once."
        )
    results = [right for image_results in by_image.values() for right in image_results]
    return SubtaskScore(
        questions=len(results),
        correct=sum(results),
        images=len(by_image),
        images_all_correct=sum(all(r) for r in by_image.values()),
    )


def evaluate(results_dir: str) -> dict[str, dict[str, SubtaskScore]]:
    """``{"Perception": {subtask: score}, "Cognition": {...}}``."""
    if not os.path.isdir(results_dir):
        raise BenchmarkInputError(
            f"--results_dir {results_dir!r} is not a directory; run llava.eval.convert_answer_to_mme first."
        )
    missing = [f"{s}.txt" for group in SUBTASKS.values() for s in group
               if not os.path.isfile(os.path.join(results_dir, f"{s}.txt"))]
    if missing:
        raise BenchmarkInputError(
            f"--results_dir {results_dir!r} lacks {missing}. MME's totals need all 14 subtasks: answer "
            "the whole llava_mme.jsonl, then run llava.eval.convert_answer_to_mme."
        )
    return {
        group: {s: score_subtask(os.path.join(results_dir, f"{s}.txt")) for s in subtasks}
        for group, subtasks in SUBTASKS.items()
    }


def total(scores: dict[str, SubtaskScore]) -> float:
    result = 0
    for subtask_score in scores.values():
        result += subtask_score.score
    return result


def print_report(results: dict[str, dict[str, SubtaskScore]]) -> None:
    for group, scores in results.items():
        print("===========", group, "===========")
        print("total score:", total(scores), "\n")
        for subtask, subtask_score in scores.items():
            print("\t", subtask, " score:", subtask_score.score)
        print("\n")
    print("Accuracy / accuracy+ per subtask (%):")
    for scores in results.values():
        for subtask, s in scores.items():
            print(f"\t {subtask}  acc: {100 * s.accuracy:.2f}  acc+: {100 * s.accuracy_plus:.2f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", type=str, required=True, help="folder of <subtask>.txt files")
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, SubtaskScore]]:
    args = build_parser().parse_args(argv)
    results = evaluate(args.results_dir)
    print_report(results)
    return results


if __name__ == "__main__":
    main()
