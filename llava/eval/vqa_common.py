"""What the model-running eval scripts share: flags, checks, chunking, loading, batched generation, answer lines.

``model_vqa``, ``model_vqa_loader``, ``model_vqa_science`` and ``model_vqa_mmbench`` differ only in
how they read a benchmark's question file and turn each question into a prompt. Each builds
``Prompt`` objects (the user's text, the answer line's own fields, and a loader for the image, if
any) and hands them to ``answer_prompts``, which tokenises them with the conversation template,
generates in left-padded batches and writes upstream's answer JSONL:
``{..fields, "text", "answer_id", "model_id", "metadata"}``.

Flags, defaults and answer keys follow upstream LLaVA 1.2.x; beyond upstream every script takes
``--batch-size``, ``--device``, ``--max_new_tokens``, ``--resume`` and the ToConv compression flags,
and writes beside the answers the image tokens the language model received for each answer
(``image_tokens``: ``answers.image_tokens.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import shortuuid
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    config_value,
)
from llava.conversation import conv_templates
from llava.eval import benchmark_io, image_tokens
from llava.mm_utils import (
    get_model_name_from_path,
    left_pad_input_ids,
    load_image_from_base64,
    process_images,
    tokenizer_image_token,
)
from llava.model.builder import load_pretrained_model
from llava.utils import (
    add_compression_args,
    check_compression_flags,
    check_generation_args,
    compression_kwargs,
    disable_torch_init,
    images_to,
    resolve_device,
)
from vision_token_compression import atomic_write_text

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)


# ---- Flags and their checks ---------------------------------------------------------------------


def build_parser(
    description: str | None,
    *,
    question_file: str = "tables/question.jsonl",
    conv_mode: str = "llava_v1",
    max_new_tokens: int = 1024,
) -> argparse.ArgumentParser:
    """A parser with the flags every model-running eval script takes; scripts add their own.

    Args:
        description: The script's help text (its module docstring).
        question_file: Default ``--question-file`` (upstream's differ per script).
        conv_mode: Default ``--conv-mode`` (``llava_v0`` for ScienceQA upstream, else ``llava_v1``).
        max_new_tokens: Default ``--max_new_tokens`` (upstream: 128 in the loader, a fixed 1024 elsewhere).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default=question_file)
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    parser.add_argument("--conv-mode", type=str, default=conv_mode)
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="Prompts per generate call, left-padded; greedy answers equal those of batch size 1.")
    parser.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--resume", action="store_true",
                        help="Keep the answers already in --answers-file that match the questions in order (each with "
                             "its image-token record) and answer only the rest; when all are there the model is not "
                             "loaded. Without it the answers file is rewritten, as upstream does.")
    add_compression_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that would fail (or overwrite the questions) only after the model has loaded.

    The answers file and its image-token sidecar may not be the question file by any path (symlink,
    hard link, another spelling).

    The generation and compression flags go through the checks ``run_llava`` and ``serve.cli`` share.
    """
    check_generation_args(args)
    check_compression_flags(args)
    if args.num_chunks < 1:
        raise ValueError(f"--num-chunks must be at least 1, got {args.num_chunks}.")
    if not 0 <= args.chunk_idx < args.num_chunks:
        raise ValueError(
            f"--chunk-idx {args.chunk_idx} is outside the {args.num_chunks} chunk(s) of --num-chunks "
            f"{args.num_chunks}: use 0..{args.num_chunks - 1}."
        )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    question_file = os.path.expanduser(args.question_file)
    if not os.path.isfile(question_file):
        raise ValueError(f"--question-file {args.question_file!r} does not exist (or is not a file).")
    answers_file = os.path.expanduser(args.answers_file)
    benchmark_io.refuse_overwriting_inputs(
        {"--answers-file": answers_file, "its image-token sidecar": image_tokens.sidecar_path(answers_file)},
        {"--question-file": question_file},
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               check: Callable[[argparse.Namespace], None] = check_args) -> argparse.Namespace:
    """Parse ``argv`` and ``check`` it; a bad value exits with the parser's usage and the reason."""
    args = parser.parse_args(argv)
    try:
        check(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def complete_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the parser's defaults for flags it lacks (upstream-style callers build their own namespace)."""
    full = parser.parse_args([])
    vars(full).update(vars(args))
    return full


def configure_logging() -> None:
    """Logging for an eval entry point (library modules only create loggers)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


# ---- Questions ----------------------------------------------------------------------------------


def split_list(lst: Sequence, n: int) -> list:
    """Split ``lst`` into ``n`` (roughly) equal consecutive chunks (fewer when ``lst`` is short)."""
    chunk_size = math.ceil(len(lst) / n)
    return [lst[i:i + chunk_size] for i in range(0, len(lst), chunk_size)]


def get_chunk(lst: Sequence, n: int, k: int) -> list:
    """The ``k``-th of ``n`` chunks of ``lst`` (empty if there are fewer)."""
    chunks = split_list(lst, n)
    return chunks[k] if k < len(chunks) else []


def read_jsonl(path: str, required: Sequence[str] = ()) -> list[dict]:
    """The question lines of ``path`` (blank lines skipped); each must hold the ``required`` keys."""
    records, _ = benchmark_io.read_jsonl(
        os.path.expanduser(path), "Question file", required=tuple(required),
        fix="write one such JSON object a line, as the question files in LLaVA's eval.zip are.",
    )
    return records


def open_rgb(path: str) -> Image.Image:
    """An image file as RGB."""
    return Image.open(path).convert("RGB")


def decode_rgb(data: str) -> Image.Image:
    """A base64-encoded image file as RGB."""
    return load_image_from_base64(data).convert("RGB")


@dataclass
class Prompt:
    """One generation: what the user says, the answer line's own fields, and the image, if any.

    Args:
        text: The user's turn without the image token (``answer_prompts`` puts it in front).
        fields: The answer line's keys before ``answer_id``, in order; a ``"text"`` key marks where
            the answer goes (without one it follows the fields).
        image: Loads the image (called in the data loader); None for a text-only question.
    """

    text: str
    fields: dict[str, Any]
    image: Callable[[], Image.Image] | None = None


# The keys of upstream's generic question lines (LLaVA-Bench, MM-Vet, and the model_vqa_loader benchmarks).
IMAGE_QUESTION_KEYS = ("question_id", "image", "text")


def image_question_prompts(questions: Sequence[dict], image_folder: str) -> list[Prompt]:
    """Prompts for upstream's generic question lines (``question_id``, ``image``, ``text``) about ``image_folder``.

    The answer line's ``prompt`` is the question text, as upstream writes it.
    """
    return [
        Prompt(text=line["text"], fields={"question_id": line["question_id"], "prompt": line["text"]},
               image=partial(open_rgb, os.path.join(image_folder, line["image"])))
        for line in questions
    ]


def with_image_token(text: str, mm_use_im_start_end: bool) -> str:
    """``text`` after the image token and a newline, as upstream's eval scripts write the first turn."""
    if mm_use_im_start_end:
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + text
    return DEFAULT_IMAGE_TOKEN + "\n" + text


def conversation_prompt(conv_mode: str, user_turn: str) -> str:
    """The full prompt: ``user_turn`` in the ``conv_mode`` template, ending where the assistant answers."""
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], user_turn)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def plain_model_conv_mode(model_name: str, conv_mode: str) -> str:
    """``conv_mode`` + ``_mmtag`` for a projector-pretrained checkpoint ("plain" in its name, no "finetune"), as upstream.

    Upstream's templates with such a variant are ``v0`` and ``v1``; other modes are kept, with a warning.
    """
    if "plain" not in model_name or "finetune" in model_name.lower() or "mmtag" in conv_mode:
        return conv_mode
    if conv_mode + "_mmtag" not in conv_templates:
        logger.warning("%s looks like a plain-pretrained model, but there is no %s_mmtag template; keeping %s.",
                       model_name, conv_mode, conv_mode)
        return conv_mode
    logger.warning("%s looks like a plain-pretrained model: switching to the %s_mmtag conversation mode.",
                   model_name, conv_mode)
    return conv_mode + "_mmtag"


# ---- Tokenising and batching --------------------------------------------------------------------


class PromptDataset(Dataset):
    """``Prompt``s as (input_ids, image tensor or None, image size or None), built with ``conv_mode``."""

    def __init__(self, prompts: Sequence[Prompt], tokenizer, image_processor, model_config, conv_mode: str) -> None:
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.mm_use_im_start_end = config_value(model_config, "mm_use_im_start_end")
        self.model_config = model_config
        self.conv_mode = conv_mode

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int):
        prompt = self.prompts[index]
        turn = prompt.text if prompt.image is None else with_image_token(prompt.text, self.mm_use_im_start_end)
        input_ids = tokenizer_image_token(conversation_prompt(self.conv_mode, turn), self.tokenizer,
                                          IMAGE_TOKEN_INDEX, return_tensors="pt")
        if prompt.image is None:
            return input_ids, None, None
        image = prompt.image()
        image_tensor = process_images([image], self.image_processor, self.model_config)[0]
        return input_ids, image_tensor, image.size


class LeftPadCollator:
    """Batch dataset items: left-padded ids and mask, the images of the rows that have one, their sizes.

    Images are stacked when their shapes agree (a list for anyres images of different crop counts);
    a batch without images gives ``images=None``. Rows without an image token consume no image.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch):
        input_ids, images, image_sizes = zip(*batch)
        ids, mask = left_pad_input_ids(input_ids, self.pad_token_id)
        images = [image for image in images if image is not None]
        if not images:
            return ids, mask, None, None
        same_shape = all(image.shape == images[0].shape for image in images)
        image_tensors = torch.stack(images) if same_shape else images
        return ids, mask, image_tensors, [size for size in image_sizes if size is not None]


def pad_token_id(tokenizer) -> int:
    """The id to left-pad prompts with: pad, else unk, else eos."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise ValueError("The tokenizer has no pad, unk or eos token to pad batched prompts with.")


def create_data_loader(prompts: Sequence[Prompt], tokenizer, image_processor, model_config, conv_mode: str,
                       batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """An ordered DataLoader over ``prompts`` yielding (input_ids, attention_mask, images, image_sizes)."""
    dataset = PromptDataset(prompts, tokenizer, image_processor, model_config, conv_mode)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      collate_fn=LeftPadCollator(pad_token_id(tokenizer)))


# ---- Model, generation, answers -----------------------------------------------------------------


@dataclass
class LoadedModel:
    tokenizer: Any
    model: Any
    image_processor: Any
    name: str


def load_model(args: argparse.Namespace) -> LoadedModel:
    """``load_pretrained_model`` with ``--model-path``, ``--model-base``, ``--device`` and the compression flags."""
    disable_torch_init()
    model_path = os.path.expanduser(args.model_path)
    name = get_model_name_from_path(model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, args.model_base, name, device=resolve_device(args.device), **compression_kwargs(args)
    )
    return LoadedModel(tokenizer, model, image_processor, name)


def generate(loaded: LoadedModel, input_ids, attention_mask, images, image_sizes, args, pad_id: int) -> list[str]:
    """Answers for one left-padded batch (greedy at ``--temperature 0``), decoded and stripped."""
    model = loaded.model
    sample = args.temperature > 0
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if sample else {}
    with torch.inference_mode():
        output_ids = model.generate(
            input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            images=None if images is None else images_to(images, model),
            image_sizes=image_sizes,
            do_sample=sample,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            use_cache=True,
            pad_token_id=pad_id,
            **sampling,
        )
    return [text.strip() for text in loaded.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]


class AnswerWriter:
    """Writes upstream's answer lines, one JSON object per line, flushed as they come, and their image-token sidecar.

    ``append`` keeps both files' lines (a resumed run); otherwise both are started afresh.
    """

    def __init__(self, path: str, model_name: str, append: bool = False) -> None:
        self.path = os.path.expanduser(path)
        self.sidecar = image_tokens.sidecar_path(self.path)
        self.model_name = model_name
        self.append = append
        self._file = None
        self._tokens = None

    def __enter__(self) -> Self:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        mode = "a" if self.append else "w"
        self._file = open(self.path, mode)
        self._tokens = open(self.sidecar, mode)
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._tokens.close()

    def write(self, fields: dict[str, Any], text: str, images: int, tokens: int, truncated: bool = False) -> None:
        # Updating an existing "text" key keeps its place, so each script's key order is upstream's.
        record = {**fields, "text": text, "answer_id": shortuuid.uuid(), "model_id": self.model_name, "metadata": {}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        # The sidecar line follows its answer: a run killed between the two leaves one answer without a
        # count, which --resume answers again.
        self._tokens.write(json.dumps(image_tokens.sidecar_line(fields, images, tokens, truncated)) + "\n")
        self._tokens.flush()


# ---- Resuming -----------------------------------------------------------------------------------


def _whole_lines(path: str) -> list[dict]:
    """The leading complete JSON lines of ``path`` (none if it is absent); stops at a torn or bad line."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.endswith("\n"):
                break  # the last line of a killed run
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(record, dict):
                break
            records.append(record)
    return records


def _same_question(record: dict, fields: dict[str, Any]) -> bool:
    """Whether an answer (or sidecar) line is for the prompt with these fields (its question and round)."""
    wanted = json.loads(json.dumps({key: fields[key] for key in ("question_id", "round_id") if key in fields}))
    return all(record.get(key, object()) == value for key, value in wanted.items())


def answered_prefix(answers_file: str, prompts: Sequence[Prompt], model_name: str) -> int:
    """How many leading prompts already have their answer, by ``model_name``, and its image-token line.

    The files are rewritten to hold exactly those lines when they hold more (a torn last line, answers
    of other questions, lines past the first mismatch), so a resumed run appends after them.
    """
    path = os.path.expanduser(answers_file)
    sidecar = image_tokens.sidecar_path(path)
    answers, counts = _whole_lines(path), _whole_lines(sidecar)
    kept = 0
    for prompt, answer, count in zip(prompts, answers, counts):
        if (answer.get("model_id") != model_name or not _same_question(answer, prompt.fields)
                or not _same_question(count, prompt.fields)):
            break
        kept += 1
    for file, records in ((path, answers), (sidecar, counts)):
        if os.path.isfile(file) and _line_count(file) != kept:
            atomic_write_text(file, "".join(json.dumps(record) + "\n" for record in records[:kept]))
    if answers and kept < len(answers):
        logger.warning("%s: kept the first %d of its %d answer lines (the rest did not follow the questions, "
                       "lacked an image-token line in %s, or came from another model); answering from there.",
                       path, kept, len(answers), sidecar)
    return kept


def _line_count(path: str) -> int:
    with open(path, "rb") as file:
        data = file.read()
    return data.count(b"\n") + (0 if not data or data.endswith(b"\n") else 1)


def answer_all(args: argparse.Namespace, prompts: Sequence[Prompt], *, num_workers: int = 0,
               plain_mode_switch: bool = False) -> str:
    """Answer ``prompts`` into ``--answers-file``: with ``--resume`` only those not answered yet; returns its path.

    The model is loaded only when something is left to answer. ``plain_mode_switch`` applies
    upstream's ``_mmtag`` template switch for plain-pretrained checkpoints (the loader and MMBench do).
    """
    name = get_model_name_from_path(os.path.expanduser(args.model_path))
    done = answered_prefix(args.answers_file, prompts, name) if args.resume else 0
    if args.resume and done == len(prompts):
        logger.info("All %d answers are in %s with their image tokens; nothing to answer.", done, args.answers_file)
        return os.path.expanduser(args.answers_file)
    if done:
        logger.info("Resuming %s: %d of %d answered; answering the other %d.", args.answers_file, done,
                    len(prompts), len(prompts) - done)
    loaded = load_model(args)
    conv_mode = plain_model_conv_mode(loaded.name, args.conv_mode) if plain_mode_switch else args.conv_mode
    return answer_prompts(args, loaded, prompts, conv_mode, num_workers=num_workers, start=done)


def answer_prompts(args: argparse.Namespace, loaded: LoadedModel, prompts: Sequence[Prompt], conv_mode: str,
                   num_workers: int = 0, start: int = 0) -> str:
    """Generate an answer for every prompt from ``start`` on, in order, into ``--answers-file``; returns its path.

    With ``start`` > 0 the answers file and its sidecar keep their first ``start`` lines and grow.
    """
    prompts = list(prompts)[start:]
    loader = create_data_loader(prompts, loaded.tokenizer, loaded.image_processor, loaded.model.config, conv_mode,
                                batch_size=args.batch_size, num_workers=num_workers)
    pad_id = loader.collate_fn.pad_token_id
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    max_length = getattr(loaded.model.config, "tokenizer_model_max_length", None)
    probe = image_tokens.ImageTokenProbe(loaded.model.get_model(), max_length)
    cut = 0
    try:
        with AnswerWriter(args.answers_file, loaded.name, append=start > 0) as writer:
            for (input_ids, attention_mask, images, image_sizes), batch in tqdm(zip(loader, batches),
                                                                                 total=len(batches)):
                probe.expect(input_ids, attention_mask)
                texts = generate(loaded, input_ids, attention_mask, images, image_sizes, args, pad_id)
                counts = image_tokens.image_counts(input_ids)
                for prompt, text, n, tokens, truncated in zip(batch, texts, counts, probe.take(), probe.truncated):
                    writer.write(prompt.fields, text, n, tokens, truncated)
                    cut += truncated
    finally:
        probe.close()
    if cut:
        logger.warning("%d prompt(s) reached the context limit of %s tokens and were cut (their end lost); their "
                       "image-token counts in %s are lower bounds.", cut, max_length, writer.sidecar)
    logger.info("Wrote %d answers to %s (image tokens in %s)", len(prompts), writer.path, writer.sidecar)
    return writer.path
