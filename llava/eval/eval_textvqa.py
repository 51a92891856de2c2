"""TextVQA accuracy of a LLaVA answers file, as ``scripts/v1_5/eval/textvqa.sh`` runs it.

``python -m llava.eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json --result-file
answers/llava-v1.5-13b.jsonl`` (or ``--result-dir DIR`` for every ``*.jsonl`` in DIR, sorted)
prints, per answers file::

    llava-v1.5-13b
    Samples: 5000
    Accuracy: 58.21%

Matching: an answer line is paired with the annotation whose ``image_id`` equals the line's
``question_id`` and whose ``question`` (lower-cased) equals the question read back from the
line's ``prompt``. The prompt is one of LLaVA's three layouts:

* ``"OCR tokens: ... Question: <q> Short answer:"``
* ``"<q>\\nReference OCR token: ...\\n<instruction>"`` (or the OCR line first, then ``<q>``)
* ``"<q>\\n<instruction>"``

Scoring: VQA accuracy against the annotation's 10 ``answers`` (see ``llava.eval.m4c_evaluator``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence

from llava.eval.benchmark_io import (
    QUESTION_ID,
    BenchmarkInputError,
    check_fields,
    check_optional_fields,
    exits_on_input_error,
    read_json,
    read_jsonl,
)
from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator

_OCR_PREFIX = "OCR tokens: "
_OCR_REFERENCE = "Reference OCR token: "
_QUESTION_BETWEEN = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt, lower-cased; ``ValueError`` for other layouts."""
    lines = prompt.split("\n")
    if prompt.startswith(_OCR_PREFIX):
        match = _QUESTION_BETWEEN.search(prompt)
        if match is None:
            raise ValueError("prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:'")
        question = match.group(1)
    elif _OCR_REFERENCE in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(_OCR_REFERENCE.rstrip()) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(
            "prompt is none of LLaVA's TextVQA layouts ('OCR tokens: ... Question: q Short answer:', "
            "'q\\nReference OCR token: ...\\ninstruction', 'q\\ninstruction')"
        )
    return question.lower()


def load_annotations(annotation_file: str) -> dict[tuple, list[dict]]:
    """TextVQA annotations keyed by ``(image_id, lower-cased question)``.

    A key holds every annotation that has it (the same question may be asked twice about one image);
    upstream scores all its answers against the last of them, and so does ``score_result_file``.
    """
    fix = "Pass TextVQA_0.5.1_val.json from https://dl.fbaipublicfiles.com/textvqa/data/."
    data = read_json(annotation_file, "TextVQA annotation file", fix, expect=dict)
    what = f"TextVQA annotation file {annotation_file!r}"
    check_fields(data, {"data": list}, what, fix)
    if not data["data"]:
        raise BenchmarkInputError(f"{what} is empty: its 'data' list has no questions. {fix}")
    annotations: dict[tuple, list[dict]] = {}
    for number, item in enumerate(data["data"], start=1):
        where = f"{what}, entry {number} of 'data'"
        check_fields(item, {"image_id": QUESTION_ID, "question": str}, where, fix)
        check_optional_fields(item, {"answers": list}, where, fix)
        if "answers" in item and not all(isinstance(a, str) for a in item["answers"]):
            raise BenchmarkInputError(f"{where}: 'answers' must be a list of strings, got {item['answers']!r}.")
        annotations.setdefault((item["image_id"], item["question"].lower()), []).append(item)
    return annotations


def score_result_file(annotations: dict[tuple, list[dict]], result_file: str) -> tuple[int, float]:
    """(number of answers, accuracy in [0, 1]) of one answers file.

    A question may be answered as often as the annotation file asks it; a further answer repeats one.
    """
    results, _ = read_jsonl(result_file, "TextVQA answers file", required=("question_id", "prompt", "text"))
    lines_of: dict[tuple, list[int]] = {}
    pred_list = []
    for number, result in enumerate(results, start=1):
        try:
            question = question_from_prompt(result["prompt"])
        except ValueError as err:
            raise BenchmarkInputError(
                f"TextVQA answers file {result_file!r}, answer {number} (question_id "
                f"{result['question_id']!r}): {err}. Use the answers written from "
                "llava_textvqa_val_v051_ocr.jsonl."
            ) from None
        key = (result["question_id"], question)
        asked = annotations.get(key)
        if asked is None:
            raise BenchmarkInputError(
                f"TextVQA answers file {result_file!r}, answer {number}: no annotation with image_id "
                f"{result['question_id']!r} and question {question!r}. The question_id must be the "
                "TextVQA image_id; check that the answers and the annotation file are the same split."
            )
        lines_of.setdefault(key, []).append(number)
        if len(lines_of[key]) > len(asked):
            raise BenchmarkInputError(
                f"TextVQA answers file {result_file!r} line {number} answers the question of line "
                f"{lines_of[key][0]} again (question_id {result['question_id']!r}, {question!r}), which the "
                f"annotation file asks {len(asked)} time(s). When merging chunk files, concatenate each chunk once."
            )
        annotation = asked[-1]
        if "answers" not in annotation:
            raise BenchmarkInputError(
                f"TextVQA annotation for image_id {result['question_id']!r} has no 'answers' (a test "
                "split?); only the val split can be scored locally."
            )
        pred_list.append({"pred_answer": result["text"], "gt_answers": annotation["answers"]})
    return len(pred_list), TextVQAAccuracyEvaluator().eval_pred_list(pred_list)


def report(annotations: dict[tuple, dict], result_file: str) -> float:
    experiment = os.path.splitext(os.path.basename(result_file))[0]
    print(experiment)
    samples, accuracy = score_result_file(annotations, result_file)
    print(f"Samples: {samples}\nAccuracy: {100.0 * accuracy:.2f}%\n")
    return accuracy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", type=str, required=True)
    parser.add_argument("--result-file", type=str)
    parser.add_argument("--result-dir", type=str)
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Print and return ``{answers file: accuracy in [0, 1]}``."""
    args = build_parser().parse_args(argv)
    if args.result_file is None and args.result_dir is None:
        raise BenchmarkInputError("nothing to score: pass --result-file FILE or --result-dir DIR.")
    annotations = load_annotations(args.annotation_file)
    accuracies = {}
    if args.result_file is not None:
        accuracies[args.result_file] = report(annotations, args.result_file)
    if args.result_dir is not None:
        if not os.path.isdir(args.result_dir):
            raise BenchmarkInputError(f"--result-dir {args.result_dir!r} is not a directory.")
        names = sorted(os.listdir(args.result_dir))
        if not any(name.endswith(".jsonl") for name in names):
            raise BenchmarkInputError(
                f"--result-dir {args.result_dir!r} holds no answers (*.jsonl) files; run the model first "
                "(scripts/v1_5/eval/textvqa.sh) or pass the folder it wrote."
            )
        for name in names:
            if not name.endswith(".jsonl"):
                print(f"Skipping {name}")
                continue
            path = os.path.join(args.result_dir, name)
            accuracies[path] = report(annotations, path)
    return accuracies


if __name__ == "__main__":
    main()
