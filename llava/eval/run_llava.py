"""Answer one query about one or more images: ``python -m llava.eval.run_llava --model-path ... --image-file ... --query ...``.

Flags follow upstream LLaVA; ``--use-token-compression`` (with ``--compression-output-size``,
``--token-compressor-path``) switches ToConv on for a checkpoint trained without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from llava.constants import IMAGE_TOKEN_INDEX, config_value
from llava.conversation import conv_templates
from llava.eval.vqa_common import parse_args
from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
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

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-file", type=str, required=True, help="One image, or several joined by --sep.")
    parser.add_argument("--query", type=str, required=True)
    parser.add_argument("--conv-mode", type=str, default=None, help="Default: inferred from the model name.")
    parser.add_argument("--sep", type=str, default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    add_compression_args(parser)
    return parser


def check_args(args) -> None:
    """Refuse flag values that would fail only after the model has loaded (the eval scripts' checks)."""
    check_generation_args(args)
    check_compression_flags(args)
    check_image_files(args.image_file.split(args.sep))


def eval_model(args) -> str:
    """Load the model, answer ``args.query`` about ``args.image_file``, print and return the answer.

    ``args`` may be upstream's hand-built object (no ``device`` or compression attributes); its
    values are checked before the model loads.
    """
    check_args(args)
    disable_torch_init()
    model_name = get_model_name_from_path(args.model_path)
    device = resolve_device(getattr(args, "device", None))
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, model_name, device=device, **compression_kwargs(args)
    )

    query = image_prompt(args.query, config_value(model.config, "mm_use_im_start_end"))
    conv = conv_templates[choose_conv_mode(model_name, args.conv_mode)].copy()
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()

    images = [load_image(path) for path in args.image_file.split(args.sep)]
    image_sizes = [image.size for image in images]
    counts = [model.image_token_count(size) for size in image_sizes]
    logger.info("Image tokens for the language model: %s (%s)", " + ".join(map(str, counts)),
                "compressed" if model.get_vision_tower().token_compressor is not None else "no compression")
    images_tensor = images_to(process_images(images, image_processor, model.config), model)
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)

    sample = args.temperature > 0
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if sample else {}
    with torch.inference_mode():
        output_ids = model.generate(
            input_ids.to(model.device),
            images=images_tensor,
            image_sizes=image_sizes,
            do_sample=sample,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    outputs = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
    print(outputs)
    return outputs


def main(argv: Sequence[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return eval_model(parse_args(build_parser(), argv, check_args))


if __name__ == "__main__":
    main(sys.argv[1:])
