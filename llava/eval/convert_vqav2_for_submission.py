"""Turn LLaVA VQAv2 answers into the upload file of the VQAv2 EvalAI server.

``python scripts/convert_vqav2_for_submission.py --split llava_vqav2_mscoco_test-dev2015 --ckpt
llava-v1.5-13b`` (also ``python -m llava.eval.convert_vqav2_for_submission``), with fixed paths
under ``--dir`` (default ``./playground/data/eval/vqav2``):

* reads ``<dir>/answers/<split>/<ckpt>/merge.jsonl`` (the merged answers) and
  ``<dir>/llava_vqav2_mscoco_test2015.jsonl`` (every test2015 question: the server wants them all);
* writes ``<dir>/answers_upload/<split>/<ckpt>.json``: ``[{"question_id", "answer"}, ...]`` in
  the test2015 question order, answers EvalAI-normalised (``llava.eval.m4c_evaluator``), ``""``
  for a question without an answer (test-dev answers cover only part of test2015).

Answer lines that are not JSON (a worker killed mid-line) are skipped and counted, as upstream
does; prints ``total results: R, total split: S, error_line: E``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from llava.eval.benchmark_io import (
    exits_on_input_error,
    read_jsonl,
    refuse_overwriting_inputs,
    unknown_ids_error,
    write_json,
)
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor

logger = logging.getLogger(__name__)

TEST_QUESTIONS = "llava_vqav2_mscoco_test2015.jsonl"


def paths(root: str, split: str, ckpt: str) -> tuple[str, str, str]:
    """(answers, test2015 questions, upload file) under the VQAv2 eval folder."""
    return (
        os.path.join(root, "answers", split, ckpt, "merge.jsonl"),
        os.path.join(root, TEST_QUESTIONS),
        os.path.join(root, "answers_upload", split, f"{ckpt}.json"),
    )


def convert(src: str, test_questions: str) -> list[dict]:
    answers, bad_lines = read_jsonl(
        src, "VQAv2 answers file", required=("question_id", "text"), skip_invalid=True, unique=("question_id",),
        hint="Run scripts/v1_5/eval/vqav2.sh first; it merges the chunk answers into merge.jsonl.",
    )
    if bad_lines:
        logger.warning("%s: skipped %d line(s) that are not JSON: %s", src, len(bad_lines), bad_lines[:10])
    texts = {a["question_id"]: a["text"] for a in answers}
    questions, _ = read_jsonl(
        test_questions, "VQAv2 test2015 question file", required=("question_id",), unique=("question_id",),
        hint=f"It comes with LLaVA's eval.zip as {TEST_QUESTIONS}.",
    )
    known = {q["question_id"] for q in questions}
    unknown = [qid for qid in texts if qid not in known]
    if unknown:
        raise unknown_ids_error(
            unknown, src, "VQAv2 answers file", f"{test_questions!r}",
            "Answers must come from a question file that is part of test2015 (e.g. test-dev2015).",
        )
    print(f"total results: {len(texts)}, total split: {len(questions)}, error_line: {len(bad_lines)}")
    normalize = EvalAIAnswerProcessor()
    upload = []
    for question in questions:
        qid = question["question_id"]
        upload.append({"question_id": qid, "answer": normalize(texts[qid]) if qid in texts else ""})
    return upload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=str, default="./playground/data/eval/vqav2")
    parser.add_argument("--ckpt", type=str, required=True)
    parser.add_argument("--split", type=str, required=True)
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> str:
    """Write the upload file and return its path."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    src, test_questions, dst = paths(args.dir, args.split, args.ckpt)
    refuse_overwriting_inputs({"upload file": dst}, {"answers file": src, "test2015 question file": test_questions})
    write_json(dst, convert(src, test_questions))
    return dst


if __name__ == "__main__":
    main()
