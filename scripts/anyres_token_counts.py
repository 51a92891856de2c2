"""Image tokens the LLM receives per image size for LLaVA-1.6 (anyres, spatial_unpad), with and without ToConv.

    python scripts/anyres_token_counts.py [--sizes 400x300,300x700,1000x1000,20x20,2000x1500]

Builds tiny random-weight stand-ins (CLIP ViT-L/14-336 patch geometry, LLaVA-1.6's five grid
pinpoints) without compression, with 24→12 and with 24→8, runs each image through the model's
vision path and prints a markdown table of the counts that ``prepare_inputs_labels_for_multimodal``
splices into the prompt, measured (``image_embeddings``) and checked against
``image_token_count`` (the arithmetic the model worker uses before the tower runs). Weights are
random: only the geometry matters, which is that of the real checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from llava.mm_utils import process_images
from llava.standins import LLAVA_16_PINPOINTS, build_tokenizer, create_tiny_llava, make_images

logger = logging.getLogger("anyres_token_counts")

DEFAULT_SIZES = "400x300,300x700,1000x1000,20x20,2000x1500"
COMPRESSION = {"uncompressed": None, "24→12": 12, "24→8": 8}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"400x300,300x700"`` → [(400, 300), (300, 700)] (width × height)."""
    try:
        return [(int(w), int(h)) for w, h in (item.lower().split("x") for item in text.split(","))]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: write WIDTHxHEIGHT pairs separated by commas.") from err


def measure(model, sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Embeddings per image as the LLM gets them; each checked against ``image_token_count``."""
    images = make_images(len(sizes), size=list(sizes), seed=0)
    processor = model.get_vision_tower().image_processor
    counts = []
    with torch.inference_mode():
        for image in images:
            pixels = process_images([image], processor, model.config)
            measured = model.image_embeddings(pixels, [image.size])[0].shape[0]
            predicted = model.image_token_count(image.size)
            if measured != predicted:
                raise AssertionError(f"{image.size}: measured {measured} image tokens, arithmetic says {predicted}.")
            counts.append(measured)
    return counts


def main(argv: Sequence[str] | None = None) -> str:
    """Print (and return) the markdown table."""
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES))
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from vision_token_compression.testing import build_clip_standin

    with tempfile.TemporaryDirectory() as tmp:
        tower = build_clip_standin("openai/clip-vit-large-patch14-336", Path(tmp) / "clip", num_hidden_layers=1,
                                   hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=16)
        tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(Path(tmp) / "tok"))
        columns = {}
        for name, output_size in COMPRESSION.items():
            model = create_tiny_llava(tower, tokenizer, compression_output_size=output_size,
                                      image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                                      image_grid_pinpoints=LLAVA_16_PINPOINTS).eval()
            columns[name] = measure(model, args.sizes)
    lines = ["| image (w×h) | " + " | ".join(COMPRESSION) + " |", "|---" * (1 + len(COMPRESSION)) + "|"]
    for row, (width, height) in enumerate(args.sizes):
        lines.append(f"| {width}×{height} | " + " | ".join(str(columns[name][row]) for name in COMPRESSION) + " |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
