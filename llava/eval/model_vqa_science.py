"""Answer ScienceQA (``llava_test_CQM-A.json``), writing upstream's answer JSONL.

``python -m llava.eval.model_vqa_science --model-path ... --question-file llava_test_CQM-A.json
--image-folder scienceqa/images/test --answers-file answers.jsonl --single-pred-prompt --temperature 0
--conv-mode vicuna_v1``. The question file is a JSON list of ``{"id", "image" (optional),
"conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``; the first turn is the question.
Questions without an image are asked as text only. Each answer line has ``question_id`` (the item's
``id``), ``prompt`` (``<image>\\n`` for image questions, the question, and with ``--single-pred-prompt``
the instruction to answer with the option's letter), ``text``, ``answer_id``, ``model_id``, ``metadata``.

Beyond upstream: ``--batch-size`` (left-padded batches mixing image and text-only questions; greedy
answers equal batch size 1), ``--top_p``, ``--num_beams``, ``--max_new_tokens`` (upstream: a fixed
1024), ``--device``, and the compression flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval import vqa_common
from llava.eval.benchmark_io import (
    QUESTION_ID,
    BenchmarkInputError,
    check_fields,
    check_optional_fields,
    exits_on_input_error,
    read_json,
)
from llava.eval.vqa_common import Prompt

logger = logging.getLogger("llava.eval.model_vqa_science")

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def read_questions(path: str) -> list[dict]:
    """The question list, each item checked for ``id``, an optional ``image`` and a first turn in ``conversations``."""
    fix = "Pass LLaVA's llava_test_CQM-A.json."
    questions = read_json(os.path.expanduser(path), "ScienceQA question file", fix, expect=list)
    for number, item in enumerate(questions):
        where = f"ScienceQA question file {path!r} item {number}"
        check_fields(item, {"id": QUESTION_ID, "conversations": list}, where, fix)
        if item.get("image") is not None:
            check_fields(item, {"image": str}, where, fix)
        if not item["conversations"]:
            raise BenchmarkInputError(f"{where}: 'conversations' is empty; the first turn is the question.")
        check_fields(item["conversations"][0], {"value": str}, f"{where}, first turn of 'conversations'", fix)
        check_optional_fields(item["conversations"][0], {"from": str}, where, fix)
    return questions


def build_prompt(item: dict, image_folder: str, single_pred_prompt: bool) -> Prompt:
    """The prompt for one question: the first turn without its ``<image>`` token, plus the letter instruction."""
    question = item["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    has_image = item.get("image") is not None
    shown = DEFAULT_IMAGE_TOKEN + "\n" + question if has_image else question
    if single_pred_prompt:
        question = question + "\n" + SINGLE_PRED_PROMPT
        shown = shown + "\n" + SINGLE_PRED_PROMPT
    image = partial(vqa_common.open_rgb, os.path.join(image_folder, item["image"])) if has_image else None
    return Prompt(text=question, fields={"question_id": item["id"], "prompt": shown}, image=image)


def build_parser() -> argparse.ArgumentParser:
    parser = vqa_common.build_parser(__doc__, question_file="tables/question.json", conv_mode="llava_v0")
    parser.add_argument("--answer-prompter", action="store_true", help="Accepted as upstream; it has no effect.")
    parser.add_argument("--single-pred-prompt", action="store_true",
                        help=f"End each question with {SINGLE_PRED_PROMPT!r}")
    return parser


def eval_model(args) -> str:
    """Answer every question of this chunk; returns the answers file path."""
    args = vqa_common.complete_args(build_parser(), args)
    vqa_common.check_args(args)
    questions = vqa_common.get_chunk(read_questions(args.question_file), args.num_chunks, args.chunk_idx)

    prompts = [build_prompt(item, args.image_folder, args.single_pred_prompt) for item in questions]
    return vqa_common.answer_all(args, prompts)


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> str:
    vqa_common.configure_logging()
    return eval_model(vqa_common.parse_args(build_parser(), argv))


if __name__ == "__main__":
    main(sys.argv[1:])
