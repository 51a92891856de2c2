"""Answer a JSONL question file about an image folder, writing upstream's answer JSONL.

``python -m llava.eval.model_vqa_loader --model-path ... --image-folder ... --question-file q.jsonl
--answers-file a.jsonl``. Each question line has ``question_id``, ``image``, ``text``; each answer
line has ``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``.

Beyond upstream: ``--batch-size`` batches questions with left padding (answers match batch size 1),
``--num-workers`` sets the data loader workers, ``--device``, and the compression flags switch ToConv on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from torch.utils.data import DataLoader

from llava.eval import vqa_common
from llava.eval.benchmark_io import exits_on_input_error
from llava.eval.vqa_common import get_chunk, split_list  # noqa: F401  (upstream's names)

logger = logging.getLogger("llava.eval.model_vqa_loader")


def create_data_loader(questions, image_folder, tokenizer, image_processor, model_config, conv_mode,
                       batch_size: int = 1, num_workers: int = 4) -> DataLoader:
    """An ordered DataLoader over question lines yielding (input_ids, attention_mask, images, image_sizes)."""
    prompts = vqa_common.image_question_prompts(questions, image_folder)
    return vqa_common.create_data_loader(prompts, tokenizer, image_processor, model_config, conv_mode,
                                         batch_size=batch_size, num_workers=num_workers)


def build_parser() -> argparse.ArgumentParser:
    parser = vqa_common.build_parser(__doc__, max_new_tokens=128)
    parser.add_argument("--num-workers", type=int, default=4)
    return parser


def check_args(args) -> None:
    vqa_common.check_args(args)
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0 (0 loads in the main process), got {args.num_workers}.")


def eval_model(args) -> str:
    """Answer every question of this chunk; returns the answers file path."""
    args = vqa_common.complete_args(build_parser(), args)
    check_args(args)
    questions = vqa_common.read_jsonl(args.question_file, required=vqa_common.IMAGE_QUESTION_KEYS)
    questions = get_chunk(questions, args.num_chunks, args.chunk_idx)

    prompts = vqa_common.image_question_prompts(questions, args.image_folder)
    return vqa_common.answer_all(args, prompts, num_workers=args.num_workers, plain_mode_switch=True)


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> str:
    vqa_common.configure_logging()
    parser = build_parser()
    return eval_model(vqa_common.parse_args(parser, argv, check_args))


if __name__ == "__main__":
    main(sys.argv[1:])
