"""Turn LLaVA VizWiz answers into the upload file of the VizWiz EvalAI server.

``python scripts/convert_vizwiz_for_submission.py --annotation-file vizwiz/llava_test.jsonl
--result-file answers/m.jsonl --result-upload-file answers_upload/m.json`` (also
``python -m llava.eval.convert_vizwiz_for_submission``).

``--annotation-file`` is LLaVA's VizWiz question JSONL (``question_id``, ``image``); every question
needs an answer. Writes ``[{"image": image file name, "answer": EvalAI-normalised text}, ...]`` in
question order as compact JSON, creating the upload folder. Answer lines that are not JSON are
skipped and counted, as upstream does; prints ``total results: R, total split: S, error_line: E``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from llava.eval.benchmark_io import (
    BenchmarkInputError,
    exits_on_input_error,
    read_jsonl,
    refuse_overwriting_inputs,
    unknown_ids_error,
    write_json,
)
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor

logger = logging.getLogger(__name__)


def convert(annotation_file: str, result_file: str) -> list[dict]:
    answers, bad_lines = read_jsonl(
        result_file, "VizWiz answers file", required=("question_id", "text"), skip_invalid=True,
        unique=("question_id",),
    )
    if bad_lines:
        logger.warning("%s: skipped %d line(s) that are not JSON: %s", result_file, len(bad_lines), bad_lines[:10])
    texts = {a["question_id"]: a["text"] for a in answers}
    questions, _ = read_jsonl(annotation_file, "VizWiz question file", required=("question_id", "image"), unique=("question_id",),
                              hint="LLaVA's eval.zip has it as vizwiz/llava_test.jsonl.")
    print(f"total results: {len(texts)}, total split: {len(questions)}, error_line: {len(bad_lines)}")
    known = {q["question_id"] for q in questions}
    unknown = [qid for qid in texts if qid not in known]
    if unknown:
        raise unknown_ids_error(
            unknown, result_file, "VizWiz answers file", f"{annotation_file!r}",
            "Pass the question file the answers were generated from.",
        )
    missing = [q["question_id"] for q in questions if q["question_id"] not in texts]
    if missing:
        raise BenchmarkInputError(
            f"VizWiz answers file {result_file!r} has no answer for {len(missing)} of {len(questions)} "
            f"questions (first: {missing[:5]}). The server needs every question; re-run inference "
            "for the missing ones."
        )
    normalize = EvalAIAnswerProcessor()
    return [{"image": q["image"], "answer": normalize(texts[q["question_id"]])} for q in questions]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", type=str, required=True)
    parser.add_argument("--result-file", type=str, required=True)
    parser.add_argument("--result-upload-file", type=str, required=True)
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    refuse_overwriting_inputs({"--result-upload-file": args.result_upload_file},
                              {"--annotation-file": args.annotation_file, "--result-file": args.result_file})
    upload = convert(args.annotation_file, args.result_file)
    write_json(args.result_upload_file, upload)
    return upload


if __name__ == "__main__":
    main()
