"""Chat about one image in the terminal: ``python -m llava.serve.cli --model-path ... --image-file ...``.

Reads user turns from stdin until an empty line or end of input, streaming each answer. Flags
follow upstream LLaVA, plus the compression flags that switch ToConv on at load time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch
from transformers import TextStreamer

from llava.constants import IMAGE_TOKEN_INDEX, config_value
from llava.conversation import SeparatorStyle, conv_templates
from llava.eval.vqa_common import parse_args
from llava.mm_utils import KeywordsStoppingCriteria, get_model_name_from_path, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.utils import (
    add_compression_args,
    check_compression_flags,
    check_generation_args,
    check_image_files,
    choose_conv_mode,
    compression_kwargs,
    disable_torch_init,
    image_prompt,
    images_to,
    load_image,
    resolve_device,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-file", type=str, required=True)
    parser.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--conv-mode", type=str, default=None, help="Default: inferred from the model name.")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--debug", action="store_true")
    add_compression_args(parser)
    return parser


def check_args(args) -> None:
    """Refuse flag values that would fail only after the model has loaded (the eval scripts' checks)."""
    check_generation_args(args, flags={"max_new_tokens": "--max-new-tokens"})
    check_compression_flags(args)
    check_image_files([args.image_file])


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run the chat loop; returns the model's answers, one per turn."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(build_parser(), argv, check_args)
    disable_torch_init()
    model_name = get_model_name_from_path(args.model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, model_name, args.load_8bit, args.load_4bit,
        device=resolve_device(args.device), **compression_kwargs(args),
    )
    conv = conv_templates[choose_conv_mode(model_name, args.conv_mode)].copy()
    roles = ("user", "assistant") if "mpt" in model_name.lower() else conv.roles

    image = load_image(args.image_file)
    image_tensor = images_to(process_images([image], image_processor, model.config), model)
    answers = []
    while True:
        inp = read_turn(roles[0])
        if not inp:
            print("exit...")
            break
        print(f"{roles[1]}: ", end="", flush=True)
        if not answers:  # the first turn carries the image
            inp = image_prompt(inp, config_value(model.config, "mm_use_im_start_end"))
        conv.append_message(conv.roles[0], inp)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        outputs = answer(model, tokenizer, conv, prompt, image_tensor, image.size, args)
        conv.messages[-1][-1] = outputs
        answers.append(outputs)
        if args.debug:
            print("\n", {"prompt": prompt, "outputs": outputs}, "\n")
    return answers


def read_turn(role: str) -> str:
    """The user's next message; empty at the end of input."""
    try:
        return input(f"{role}: ")
    except EOFError:
        return ""


def answer(model, tokenizer, conv, prompt: str, image_tensor, image_size, args) -> str:
    """Generate the reply to ``prompt``, streaming it to stdout; returns it without the stop string."""
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    input_ids = input_ids.to(model.device)
    stop_str = conv.sep2 if conv.sep_style == SeparatorStyle.TWO else conv.sep
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sample = args.temperature > 0
    with torch.inference_mode():
        output_ids = model.generate(
            input_ids,
            images=image_tensor,
            image_sizes=[image_size],
            do_sample=sample,
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=[KeywordsStoppingCriteria([stop_str], tokenizer, input_ids)],
            **({"temperature": args.temperature} if sample else {}),
        )
    outputs = tokenizer.decode(output_ids[0], skip_special_tokens=True).strip()
    if stop_str and outputs.endswith(stop_str):
        outputs = outputs[: -len(stop_str)].strip()
    return outputs


if __name__ == "__main__":
    main(sys.argv[1:])
