"""Answer a JSONL question file about an image folder, writing upstream's answer JSONL.

``python -m llava.eval.model_vqa_loader --model-path ... --image-folder ... --question-file q.jsonl
--answers-file a.jsonl``. Each question line has ``question_id``, ``image``, ``text``; each answer
line has ``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``.

Beyond upstream: ``--batch-size`` batches questions with left padding (answers match batch size 1),
``--num-workers`` sets the data loader workers, and the compression flags switch ToConv on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence

import shortuuid
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import get_model_name_from_path, left_pad_input_ids, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.utils import add_compression_args, compression_kwargs, disable_torch_init, image_prompt, images_to, resolve_device

logger = logging.getLogger("llava.eval.model_vqa_loader")


def split_list(lst: list, n: int) -> list[list]:
    """Split ``lst`` into ``n`` (roughly) equal consecutive chunks."""
    chunk_size = math.ceil(len(lst) / n)
    return [lst[i:i + chunk_size] for i in range(0, len(lst), chunk_size)]


def get_chunk(lst: list, n: int, k: int) -> list:
    """The ``k``-th of ``n`` chunks of ``lst`` (empty if there are fewer)."""
    chunks = split_list(lst, n)
    return chunks[k] if k < len(chunks) else []


class CustomDataset(Dataset):
    """Questions as (input_ids, image tensor, image size), prompts built with ``conv_mode``."""

    def __init__(self, questions, image_folder, tokenizer, image_processor, model_config, conv_mode: str) -> None:
        self.questions = questions
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.conv_mode = conv_mode

    def __getitem__(self, index):
        line = self.questions[index]
        conv = conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], image_prompt(line["text"], getattr(self.model_config, "mm_use_im_start_end", False)))
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        image = Image.open(os.path.join(self.image_folder, line["image"])).convert("RGB")
        image_tensor = process_images([image], self.image_processor, self.model_config)[0]
        input_ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        return input_ids, image_tensor, image.size

    def __len__(self) -> int:
        return len(self.questions)


class LeftPadCollator:
    """Batch dataset items: left-padded ids and mask, images stacked (a list when crop counts differ), sizes."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch):
        input_ids, images, image_sizes = zip(*batch)
        ids, mask = left_pad_input_ids(input_ids, self.pad_token_id)
        same_shape = all(image.shape == images[0].shape for image in images)
        image_tensors = torch.stack(images) if same_shape else list(images)
        return ids, mask, image_tensors, list(image_sizes)


def create_data_loader(questions, image_folder, tokenizer, image_processor, model_config, conv_mode,
                       batch_size: int = 1, num_workers: int = 4) -> DataLoader:
    """An ordered DataLoader over ``questions`` yielding (input_ids, attention_mask, images, image_sizes)."""
    dataset = CustomDataset(questions, image_folder, tokenizer, image_processor, model_config, conv_mode)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      collate_fn=LeftPadCollator(pad))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.jsonl")
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    parser.add_argument("--conv-mode", type=str, default="llava_v1")
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1, help="Questions per generate call (left padding).")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    add_compression_args(parser)
    return parser


def eval_model(args) -> str:
    """Answer every question of this chunk; returns the answers file path."""
    disable_torch_init()
    model_path = os.path.expanduser(args.model_path)
    model_name = get_model_name_from_path(model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, args.model_base, model_name, device=resolve_device(args.device), **compression_kwargs(args)
    )

    with open(os.path.expanduser(args.question_file)) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    questions = get_chunk(questions, args.num_chunks, args.chunk_idx)
    answers_file = os.path.expanduser(args.answers_file)
    os.makedirs(os.path.dirname(answers_file) or ".", exist_ok=True)

    conv_mode = args.conv_mode
    plain_pretrained = "plain" in model_name and "finetune" not in model_name.lower()
    if plain_pretrained and "mmtag" not in conv_mode and conv_mode + "_mmtag" in conv_templates:
        conv_mode = conv_mode + "_mmtag"
        logger.warning("A plain-pretrained model: switching to %s conversation mode.", conv_mode)
    loader = create_data_loader(questions, args.image_folder, tokenizer, image_processor, model.config, conv_mode,
                                batch_size=args.batch_size, num_workers=args.num_workers)

    sample = args.temperature > 0
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if sample else {}
    batches = [questions[i:i + args.batch_size] for i in range(0, len(questions), args.batch_size)]
    with open(answers_file, "w") as ans_file:
        for (input_ids, attention_mask, images, image_sizes), lines in tqdm(zip(loader, batches), total=len(batches)):
            with torch.inference_mode():
                output_ids = model.generate(
                    input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    images=images_to(images, model),
                    image_sizes=image_sizes,
                    do_sample=sample,
                    num_beams=args.num_beams,
                    max_new_tokens=args.max_new_tokens,
                    use_cache=True,
                    pad_token_id=loader.collate_fn.pad_token_id,
                    **sampling,
                )
            outputs = tokenizer.batch_decode(output_ids, skip_special_tokens=True)
            for line, text in zip(lines, outputs):
                record = {
                    "question_id": line["question_id"],
                    "prompt": line["text"],
                    "text": text.strip(),
                    "answer_id": shortuuid.uuid(),
                    "model_id": model_name,
                    "metadata": {},
                }
                ans_file.write(json.dumps(record) + "\n")
            ans_file.flush()
    return answers_file


def main(argv: Sequence[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return eval_model(build_parser().parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
