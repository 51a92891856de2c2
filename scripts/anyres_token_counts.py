"""Image tokens per image size for LLaVA-1.6 (anyres) with and without ToConv, measured on tiny stand-ins.

::

    python scripts/anyres_token_counts.py [--sizes 400x300 300x700 ...]

Builds a tiny fork LLaVA-1.6 (LLaVA-1.6's five pinpoints, CLIP with ViT-L/14-336's geometry, random
weights), converts it with ``toconv-convert-to-hf`` at 24→12 and 24→8, and for each image size counts
the image embeddings the fork feeds its LLM (``image_embeddings``, uncompressed and with compression
switched on), the fork's own arithmetic (``image_token_count``, what the model worker sizes its
context check with before the tower runs), the HF-native processor's placeholders and the HF-native
model's image features. It stops if any two disagree, and prints a markdown table (columns:
uncompressed, 24→12, 24→8). Weights are random: only the geometry matters, which is the real one.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

SIZES = ["400x300", "300x700", "1000x1000", "336x336", "672x672", "20x20", "2000x1500", "1200x200", "792x352"]


def fork_count(model, image_processor, image) -> int:
    """Image embeddings the fork's model makes for ``image`` (what ``prepare_inputs_labels_for_multimodal`` splices)."""
    from llava.mm_utils import process_images

    with torch.no_grad():
        count = model.image_embeddings(process_images([image], image_processor, model.config), [image.size])[0].shape[0]
    if count != model.image_token_count(image.size):
        raise AssertionError(f"{image.size}: {count} image embeddings, the fork's arithmetic says "
                             f"{model.image_token_count(image.size)}")
    return count


def hf_count(folder: Path, image) -> int:
    """Placeholders the converted processor inserts for ``image``, checked against the model's image features."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = AutoProcessor.from_pretrained(folder)(images=image, text="<image>", return_tensors="pt")
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    if features.pooler_output[0].shape[0] != placeholders:
        raise AssertionError(f"{folder}: {placeholders} placeholders but {features.pooler_output[0].shape[0]} features")
    return placeholders


def measure(sizes: list[tuple[int, int]], work: Path) -> dict[tuple[int, int], list[int]]:
    """(width, height) → [uncompressed, 24→12, 24→8] image tokens, each agreed by the fork and the HF model."""
    import llava.hf  # noqa: F401
    from llava.hf.convert import convert
    from llava.model.builder import load_pretrained_model
    from llava.standins import LLAVA_16_PINPOINTS, build_tiny_clip, build_tiny_llava, make_images

    source = build_tiny_llava(work / "llava-v1.6-tiny", build_tiny_clip(work / "clip"), image_aspect_ratio="anyres",
                              mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=LLAVA_16_PINPOINTS)
    forks = {side: load_pretrained_model(str(source), None, "llava-v1.6-tiny", device="cpu", **(
        {"use_token_compression": True, "compression_output_size": side} if side else {})) for side in (None, 12, 8)}
    converted = {side: convert(source, work / f"hf-{side}", compression_output_size=side) for side in (12, 8)}
    table = {}
    for size in sizes:
        image = make_images(1, size=size, seed=0)[0]
        counts = [fork_count(forks[side][1], forks[side][2], image) for side in (None, 12, 8)]
        for side, count in zip((12, 8), counts[1:]):
            if hf_count(converted[side], image) != count:
                raise AssertionError(f"{size}: the fork makes {count} tokens at 24→{side}, the HF-native model not")
        table[size] = counts
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="image sizes as WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fork's load report lists the compressor it adds: expected here
    hf_logging.disable_progress_bar()
    sizes = [tuple(int(x) for x in size.lower().split("x")) for size in args.sizes]
    with tempfile.TemporaryDirectory() as work:
        table = measure(sizes, Path(work))
    print("| image (w×h) | uncompressed | 24→12 | 24→8 |\n|---|---|---|---|")
    for (width, height), counts in table.items():
        print(f"| {width}×{height} | " + " | ".join(f"{count:,}" for count in counts) + " |")


if __name__ == "__main__":
    main()
