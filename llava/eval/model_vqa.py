"""Answer a JSONL question file about an image folder (LLaVA-Bench, MM-Vet), writing upstream's answer JSONL.

``python -m llava.eval.model_vqa --model-path ... --question-file questions.jsonl --image-folder images
--answers-file answers.jsonl --temperature 0 --conv-mode vicuna_v1``. Each question line has
``question_id``, ``image``, ``text``; each answer line has ``question_id``, ``prompt`` (the question
text), ``text``, ``answer_id``, ``model_id``, ``metadata``.

Beyond upstream: ``--batch-size`` (left-padded batches; greedy answers equal batch size 1),
``--max_new_tokens`` (upstream: a fixed 1024), ``--device``, and the compression flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llava.eval import vqa_common
from llava.eval.benchmark_io import exits_on_input_error

logger = logging.getLogger("llava.eval.model_vqa")


def build_parser() -> argparse.ArgumentParser:
    return vqa_common.build_parser(__doc__)


def eval_model(args) -> str:
    """Answer every question of this chunk; returns the answers file path."""
    args = vqa_common.complete_args(build_parser(), args)
    vqa_common.check_args(args)
    questions = vqa_common.read_jsonl(args.question_file, required=vqa_common.IMAGE_QUESTION_KEYS)
    questions = vqa_common.get_chunk(questions, args.num_chunks, args.chunk_idx)

    prompts = vqa_common.image_question_prompts(questions, args.image_folder)
    return vqa_common.answer_all(args, prompts)


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> str:
    vqa_common.configure_logging()
    return eval_model(vqa_common.parse_args(build_parser(), argv))


if __name__ == "__main__":
    main(sys.argv[1:])
