"""What token compression buys in a LLaVA-1.5-shaped pipeline, measured side by side.

Builds the pipeline from the project's own pieces, with random weights at real shapes:
``CLIPVisionTower`` (a CLIP stand-in from ``build_clip_standin``, ``mm_vision_select_layer=-2``), a
token reducer, ``build_vision_projector`` (``mlp2x_gelu``) and transformers' ``LlamaForCausalLM``
fed ``inputs_embeds = [text prefix, image tokens, text suffix]``. For every variant (no
compression; ToConv 24→12 and 24→8, or 16→12 and 16→8 for the 224 tower; the window mean, i.e.
average pooling over the compressor's own windows, and a plain ``nn.Conv2d`` at the same token
counts) it measures the vision tower, the reducer, the projector, the LLM prefill, time to first
token (TTFT), decode ms/token, KV-cache bytes and peak memory, as medians (with quartiles) after
warm-up, the device synchronised around every timed region. A microbenchmark times the compressor
against a plain convolution of the same shape and against the vision tower at the ViT-L/14-336
shape, and the tower's early stop at the selected layer against the full 24-layer run.

    python benchmarks/bench_compression.py --preset tiny --json out.json         # CPU, < 2 min
    python benchmarks/bench_compression.py --preset llava-1.5-7b --json 7b.json  # one GPU
    python -m benchmarks.bench_compression --preset micro                        # the same, as a module
    python benchmarks/bench_compression.py --preset anyres-tiny --json any.json  # LLaVA-1.6 anyres, CPU
    python benchmarks/bench_compression.py --compare-peers --preset tiny --json peers.json  # vs FastV, VisionZip, ...
    python benchmarks/bench_compression.py --compare-peers --preset anyres-tiny --json peers-any.json  # ... on LLaVA-1.6

The anyres presets (``anyres-micro``, ``anyres-tiny``, ``llava-v1.6-vicuna-7b``) run LLaVA-1.6's
image sizes × compression levels through the fork's model instead (``benchmarks/anyres.py``).

Writes JSON (every sample, the environment and the resolved settings), a markdown table and,
where matplotlib is installed (``pip install 'toconv-llava[bench]'``), a PNG chart. This file is
the command line; the steps live beside it in ``benchmarks/`` (``run.py`` runs them in order).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.arguments import image_size
from benchmarks.models import CLIP_TOWERS
from benchmarks.presets import PRESETS, Preset, RunSettings
from benchmarks.run import run

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written as JSON/markdown/PNG."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    preset = resolve_preset(args)
    settings = resolve_settings(args, preset)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    threads = args.threads or preset.threads
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run(args, raw_argv, preset, settings, device, dtype)
    finally:
        torch.set_num_threads(previous_threads)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--vision-tower", choices=CLIP_TOWERS,
                        default="openai/clip-vit-large-patch14-336",
                        help="CLIP shape: the 336 tower (24×24 grid) or the 224 one (16×16)")
    parser.add_argument("--batch-size", type=int, nargs="+", help="one or more batch sizes (preset's by default)")
    parser.add_argument("--prompt-len", type=int, help="text tokens around the image")
    parser.add_argument("--decode-tokens", type=int, help="tokens decoded after the first")
    parser.add_argument("--warmup", type=int, help="discarded rounds")
    parser.add_argument("--repeats", type=int, help="measured rounds")
    parser.add_argument("--variants", nargs="+", help="subset of variants (no compression is always run)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                        help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: the preset's, else torch's)")
    parser.add_argument("--compare-peers", action="store_true",
                        help="ToConv against FastV, VisionZip, PyramidDrop, PruMerge(+) and bilinear pooling at "
                             "ToConv's token counts: 144 and 64 image tokens, or with an anyres preset each image "
                             "size's 24→12 and 24→8 counts (docs/benchmarks.md); --variants and the microbenchmark "
                             "do not apply")
    parser.add_argument("--image-sizes", type=image_size, nargs="+", metavar="WxH",
                        help="anyres presets: the LLaVA-1.6 image sizes to measure (default: the preset's "
                             "400x300 300x700 1000x1000 1008x336)")
    parser.add_argument("--no-microbenchmark", action="store_true", help="skip the compressor/tower microbenchmark")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where CLIP stand-ins are saved and reused")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--markdown", type=Path, help="markdown table (default: next to --json)")
    parser.add_argument("--png", type=Path, help="chart (default: next to --json; needs matplotlib)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def resolve_preset(args: argparse.Namespace) -> Preset:
    """The named preset, with ``--image-sizes`` in place of an anyres preset's image sizes."""
    preset = PRESETS[args.preset]
    if not args.image_sizes:
        return preset
    if preset.anyres is None:
        logger.warning("--image-sizes applies to the anyres presets; preset %r runs LLaVA-1.5's single %s image, "
                       "so it is ignored.", args.preset, "336×336" if "336" in args.vision_tower else "224×224")
        return preset
    return dataclasses.replace(preset, anyres=dataclasses.replace(preset.anyres, image_sizes=tuple(args.image_sizes)))


def resolve_settings(args: argparse.Namespace, preset: Preset) -> RunSettings:
    """The preset's measurement settings with those given on the command line in their place."""
    s = RunSettings(
        batch_sizes=tuple(args.batch_size or preset.batch_sizes),
        prompt_len=preset.prompt_len if args.prompt_len is None else args.prompt_len,
        decode_tokens=preset.decode_tokens if args.decode_tokens is None else args.decode_tokens,
        warmup=preset.warmup if args.warmup is None else args.warmup,
        repeats=preset.repeats if args.repeats is None else args.repeats,
    )
    if min(s.batch_sizes) < 1 or s.prompt_len < 2 or s.decode_tokens < 1 or s.warmup < 0 or s.repeats < 1:
        raise SystemExit(
            "Need batch sizes >= 1, --prompt-len >= 2, --decode-tokens >= 1, --warmup >= 0, --repeats >= 1."
        )
    return s


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


if __name__ == "__main__":
    main()
