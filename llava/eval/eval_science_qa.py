"""ScienceQA accuracy of a LLaVA answers file, as ``scripts/v1_5/eval/sqa.sh`` runs it.

``python llava/eval/eval_science_qa.py --base-dir scienceqa --result-file answers/m.jsonl
--output-file answers/m_output.jsonl --output-result answers/m_result.json``

Inputs: ``<base-dir>/pid_splits.json`` (``{split: [problem id, ...]}``), ``<base-dir>/problems.json``
(``{problem id: {"choices": [...], "answer": index, ...}}``) and the answers JSONL, whose
``question_id`` is the problem id. Problems of ``--split`` (default ``test``) without an answer
count as wrong (parsed as ``FAILED``).

Reading an answer, first rule that applies: the whole text is an option letter (``--options``,
default ``ABCDE``); the text starts with a letter followed by ``". "``; the text contains exactly one
``"The answer is X."``; otherwise ``FAILED``. A letter beyond the problem's number of choices is
wrong.

Prints ``Total: N, Correct: C, Accuracy: A%, IMG-Accuracy: I%`` (IMG: problems whose prompt holds
``<image>``) and writes

* ``--output-file``: ``{"correct": [...], "incorrect": [...]}``, each entry ``{"question_id",
  "parsed_ans", "ground_truth", "question", "pred", "is_multimodal"}``;
* ``--output-result``: ``{"acc": percent, "correct", "count", "results": {id: choice index or -1},
  "outputs": {id: answer text}}``.

Both are indented JSON, problems in split order.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence

from llava.eval.benchmark_io import (
    BenchmarkInputError,
    check_fields,
    exits_on_input_error,
    index_by_question_id,
    read_json,
    read_jsonl,
    refuse_overwriting_inputs,
    unknown_ids_error,
    write_json,
)

logger = logging.getLogger(__name__)

FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_DATA_HINT = "Download pid_splits.json and problems.json from the data/scienceqa folder of lupantech/ScienceQA."


def parse_answer(text: str, options: Sequence[str]) -> str:
    """The option letter a free-form answer names, or ``FAILED``."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def choice_index(letter: str, num_choices: int, options: Sequence[str]) -> int:
    """Index of ``letter`` among the problem's choices, -1 if it is not one of them."""
    allowed = list(options[:num_choices])
    return allowed.index(letter) if letter in allowed else -1


def check_problem(problem: object, pid: str, path: str, options: Sequence[str]) -> dict:
    """``problem`` if it has a list of string ``choices`` and an ``answer`` index among them and ``options``."""
    where = f"ScienceQA problems file {path!r}, problem {pid!r}"
    check_fields(problem, {"choices": list, "answer": int}, where, _DATA_HINT)
    if not all(isinstance(choice, str) for choice in problem["choices"]):
        raise BenchmarkInputError(f"{where}: 'choices' must be a list of strings, got {problem['choices']!r}.")
    answer = problem["answer"]
    if not 0 <= answer < len(problem["choices"]):
        raise BenchmarkInputError(
            f"{where}: 'answer' {answer} is not an index of its {len(problem['choices'])} choices."
        )
    if answer >= len(options):
        raise BenchmarkInputError(
            f"{where}: 'answer' {answer} has no letter among --options {''.join(options)!r}; pass more letters."
        )
    return problem


def load_split(base_dir: str, split: str) -> tuple[list[str], dict]:
    """(the problem ids of ``split``, problems.json), both checked for the shapes scoring reads."""
    splits_file = os.path.join(base_dir, "pid_splits.json")
    splits = read_json(splits_file, "ScienceQA split file", _DATA_HINT, expect=dict)
    problems = read_json(os.path.join(base_dir, "problems.json"), "ScienceQA problems file", _DATA_HINT, expect=dict)
    if split not in splits:
        raise BenchmarkInputError(f"--split {split!r} is not in {splits_file!r}; it has {sorted(splits)}.")
    pids = splits[split]
    if not isinstance(pids, list) or not all(isinstance(pid, str) for pid in pids):
        raise BenchmarkInputError(
            f"ScienceQA split file {splits_file!r}: {split!r} must be a list of problem ids (strings), got {pids!r:.80}."
        )
    if not pids:
        raise BenchmarkInputError(f"split {split!r} of {splits_file!r} is empty.")
    return pids, problems


def _letters(value: str) -> list[str]:
    """``--options ABCD`` means the letters A, B, C, D (upstream declares ``type=list``)."""
    return list(value)


def evaluate(
    base_dir: str, result_file: str, split: str = "test", options: Sequence[str] = "ABCDE"
) -> tuple[dict, dict]:
    """Return (the ``--output-file`` document, the ``--output-result`` document)."""
    options = list(options)
    pids, problems = load_split(base_dir, split)
    answers, _ = read_jsonl(result_file, "ScienceQA answers file", required=("question_id", "text"),
                            unique=("question_id",))
    predictions = index_by_question_id(answers, result_file, "ScienceQA answers file")
    split_ids = set(pids)
    unknown = [qid for qid in predictions if qid not in split_ids]
    if unknown:
        raise unknown_ids_error(
            unknown, result_file, "ScienceQA answers file", f"split {split!r} of pid_splits.json",
            "The question_id must be a ScienceQA problem id; pass the --split the answers were generated for.",
        )
    missing = [pid for pid in pids if pid not in predictions]
    if missing:
        logger.warning("%d of %d %s problems have no answer in %s; they count as wrong.",
                       len(missing), len(split_ids), split, result_file)

    outcome = {"correct": [], "incorrect": []}
    result = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    for pid in pids:
        if pid not in problems:
            raise BenchmarkInputError(f"problem {pid!r} of split {split!r} is not in problems.json.")
        problem = check_problem(problems[pid], pid, os.path.join(base_dir, "problems.json"), options)
        prediction = predictions.get(pid, {"text": FAILED, "prompt": "Unknown"})
        text = prediction["text"]
        letter = parse_answer(text, options)
        predicted = choice_index(letter, len(problem["choices"]), options)
        prompt = prediction.get("prompt", "")
        outcome["correct" if predicted == problem["answer"] else "incorrect"].append({
            "question_id": pid,
            "parsed_ans": letter,
            "ground_truth": options[problem["answer"]],
            "question": prompt,
            "pred": text,
            "is_multimodal": "<image>" in prompt,
        })
        result["results"][pid] = predicted
        result["outputs"][pid] = text

    correct = len(outcome["correct"])
    total = correct + len(outcome["incorrect"])
    result["acc"] = correct / total * 100
    result["correct"] = correct
    result["count"] = total
    return outcome, result


def img_accuracy(outcome: dict) -> float:
    """Accuracy (%) over problems whose prompt shows an image; 0 when there are none."""
    right = sum(entry["is_multimodal"] for entry in outcome["correct"])
    wrong = sum(entry["is_multimodal"] for entry in outcome["incorrect"])
    return right / (right + wrong) * 100 if right + wrong else 0.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", type=str, required=True)
    parser.add_argument("--result-file", type=str, required=True)
    parser.add_argument("--output-file", type=str, required=True)
    parser.add_argument("--output-result", type=str, required=True)
    parser.add_argument("--split", type=str, default="test")
    parser.add_argument("--options", type=_letters, default=["A", "B", "C", "D", "E"])
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Print the accuracies, write both output files, return the ``--output-result`` document."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    refuse_overwriting_inputs(
        {"--output-file": args.output_file, "--output-result": args.output_result},
        {"--result-file": args.result_file, "--base-dir pid_splits.json": os.path.join(args.base_dir, "pid_splits.json"),
         "--base-dir problems.json": os.path.join(args.base_dir, "problems.json")},
    )
    outcome, result = evaluate(args.base_dir, args.result_file, args.split, args.options)
    print(
        f"Total: {result['count']}, Correct: {result['correct']}, Accuracy: {result['acc']:.2f}%, "
        f"IMG-Accuracy: {img_accuracy(outcome):.2f}%"
    )
    write_json(args.output_file, outcome, indent=2)
    write_json(args.output_result, result, indent=2)
    return result


if __name__ == "__main__":
    main()
