"""Turn a LLaVA MME answers file into the per-subtask files MME's ``eval_tool`` scores.

Replaces the ``convert_answer_to_mme.py`` that LLaVA ships in ``eval.zip`` (not in its git repo).
``mme.sh`` runs it from ``playground/data/eval/MME``::

    cd playground/data/eval/MME
    python -m llava.eval.convert_answer_to_mme --experiment llava-v1.5-13b
    cd eval_tool && python -m llava.eval.eval_mme --results_dir answers/llava-v1.5-13b

Layout, relative to the working directory (as LLaVA's eval.zip and MME's release lay it out):

* ``answers/<experiment>.jsonl``: answers from ``model_vqa_loader`` over ``llava_mme.jsonl``. Their
  ``question_id`` is the image path inside the MME release, ``<subtask>/<image file>`` (the same id
  lmms-lab/MME uses, e.g. ``code_reasoning/0020.png``; ``<subtask>/images/<image file>`` also
  works), and their ``prompt`` is the question followed by ``"\\nAnswer the question using a single
  word or phrase."``.
* ``MME_Benchmark_release_version/<subtask>/`` (``--data-path``): the ground truth, one ``.txt`` per
  image named like the image, two lines ``question<TAB>Yes|No``. Five subtasks (``artwork``,
  ``celebrity``, ``landmark``, ``posters``, ``scene``) keep images in ``images/`` and the txt files
  in ``questions_answers_YN/``; the others keep both side by side.
* writes ``eval_tool/answers/<experiment>/<subtask>.txt``: per answer, in answer order,
  ``<image name>.txt<TAB>question<TAB>Yes|No<TAB>prediction``, the question being MME's own wording
  (ending in ``Please answer yes or no.``). Tabs and newlines inside a prediction become spaces so
  that each answer stays one four-field line.

The question is recovered from the prompt as LLaVA's script does: the short-answer instruction is
removed, ``" Please answer yes or no."`` appended when absent (with two spaces if that is how the
ground-truth file spells it).
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from collections.abc import Sequence

from llava.eval.benchmark_io import BenchmarkInputError, exits_on_input_error, read_jsonl, refuse_overwriting_inputs
from vision_token_compression import atomic_write_text

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO_INSTRUCTION = "Please answer yes or no."
IMAGES_SUBDIR = "images"
QA_SUBDIR = "questions_answers_YN"
ANSWERS = ("Yes", "No")

GroundTruth = dict[tuple[str, str, str], str]  # (subtask, txt file name, question) -> "Yes" / "No"


def load_ground_truth(files: Sequence[tuple[str, str]]) -> GroundTruth:
    """Every (subtask, txt file, question) -> answer in the ``ground_truth_files`` of an MME release folder."""
    truth: GroundTruth = {}
    for subtask, path in files:
        truth.update(_read_qa_file(subtask, path))
    return truth


def ground_truth_files(data_path: str) -> list[tuple[str, str]]:
    """(subtask, path) of every ground-truth ``.txt`` file in an MME release folder."""
    if not os.path.isdir(data_path):
        raise BenchmarkInputError(
            f"MME data folder {data_path!r} does not exist. Put MME_Benchmark_release_version in the "
            "working directory (see docs/Evaluation.md, MME) or pass --data-path."
        )
    files = []
    for subtask in sorted(os.listdir(data_path)):
        subtask_dir = os.path.join(data_path, subtask)
        if not os.path.isdir(subtask_dir):
            continue
        has_images_dir = os.path.isdir(os.path.join(subtask_dir, IMAGES_SUBDIR))
        qa_dir = os.path.join(subtask_dir, QA_SUBDIR) if has_images_dir else subtask_dir
        if not os.path.isdir(qa_dir):
            raise BenchmarkInputError(f"MME subtask {subtask!r} has {IMAGES_SUBDIR}/ but no {QA_SUBDIR}/ folder.")
        for name in sorted(os.listdir(qa_dir)):
            if name.endswith(".txt"):
                files.append((subtask, os.path.join(qa_dir, name)))
    return files


def _read_qa_file(subtask: str, path: str) -> GroundTruth:
    entries = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.strip().split("\t")
            if len(fields) != 2:
                raise BenchmarkInputError(
                    f"MME ground-truth file {path!r} line {number} should be 'question<TAB>answer', "
                    f"got {len(fields)} tab-separated field(s)."
                )
            if fields[1] not in ANSWERS:
                raise BenchmarkInputError(
                    f"MME ground-truth file {path!r} line {number}: the answer is {fields[1]!r}, not Yes or No."
                )
            entries[(subtask, os.path.basename(path), fields[0])] = fields[1]
    return entries


def mme_question(prompt: str, subtask: str, txt_name: str, truth: GroundTruth) -> str:
    """MME's wording of the question asked in ``prompt``."""
    question = prompt
    if SHORT_ANSWER_INSTRUCTION in question:
        question = question.replace(SHORT_ANSWER_INSTRUCTION, "").strip()
    if YES_NO_INSTRUCTION not in question:
        question = f"{question} {YES_NO_INSTRUCTION}"
        if (subtask, txt_name, question) not in truth:
            question = question.replace(f" {YES_NO_INSTRUCTION}", f"  {YES_NO_INSTRUCTION}")
    return question


def one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").replace("\t", " ")


def convert(answers_file: str, truth: GroundTruth, data_path: str) -> dict[str, list[str]]:
    """``{subtask: [tab-separated line, ...]}`` in answer order."""
    answers, _ = read_jsonl(
        answers_file, "MME answers file", required=("question_id", "prompt", "text"),
        unique=("question_id", "prompt"),
        hint="Run model_vqa_loader on llava_mme.jsonl first (scripts/v1_5/eval/mme.sh).",
    )
    subtasks = {subtask for subtask, _, _ in truth}
    lines: dict[str, list[str]] = defaultdict(list)
    for number, answer in enumerate(answers, start=1):
        qid = str(answer["question_id"])
        subtask = qid.split("/")[0]
        if subtask not in subtasks:
            raise BenchmarkInputError(
                f"MME answers file {answers_file!r} line {number}: question_id {qid!r} names subtask "
                f"{subtask!r}, which {data_path!r} does not have ({sorted(subtasks)}). The question_id "
                "must be '<subtask>/<image file>' as in llava_mme.jsonl."
            )
        txt_name = os.path.splitext(qid.split("/")[-1])[0] + ".txt"
        question = mme_question(answer["prompt"], subtask, txt_name, truth)
        gold = truth.get((subtask, txt_name, question))
        if gold is None:
            raise BenchmarkInputError(
                f"MME answers file {answers_file!r} line {number}: no question {question!r} in "
                f"{subtask}/{txt_name} under {data_path!r}. Check that the answers come from "
                "llava_mme.jsonl and the data folder is MME's release."
            )
        lines[subtask].append("\t".join((txt_name, question, gold, one_line(answer["text"]))))
    return dict(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=str, required=True, help="reads answers/<experiment>.jsonl")
    parser.add_argument("--data-path", type=str, default="MME_Benchmark_release_version",
                        help="MME release folder holding the ground truth")
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> str:
    """Write the subtask files and return their folder."""
    args = build_parser().parse_args(argv)
    answers_file = os.path.join("answers", f"{args.experiment}.jsonl")
    truth_files = ground_truth_files(args.data_path)
    truth = load_ground_truth(truth_files)
    lines = convert(answers_file, truth, args.data_path)
    result_dir = os.path.join("eval_tool", "answers", args.experiment)
    outputs = {f"subtask file {subtask}.txt": os.path.join(result_dir, f"{subtask}.txt") for subtask in lines}
    refuse_overwriting_inputs(outputs, [("answers file", answers_file)]
                              + [("MME ground-truth file", path) for _, path in truth_files])
    for subtask, subtask_lines in lines.items():
        atomic_write_text(outputs[f"subtask file {subtask}.txt"], "".join(line + "\n" for line in subtask_lines))
    return result_dir


if __name__ == "__main__":
    main()
