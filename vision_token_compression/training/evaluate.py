"""Evaluate pretrained compressors on held-out images against the untrained alternatives.

For each checkpoint, at its token count, four ways to compress the frozen CLIP tokens:

- ``trained``: the checkpoint;
- ``average_init``: the same convolution with the average init (each token = mean of its window);
- ``random_init``: the same convolution with PyTorch's random init (seeded);
- ``adaptive_avg_pool``: ``adaptive_avg_pool2d`` of the token grid to the output grid (2×2 blocks
  at 24→12, unlike the compressor's 3×3 windows; 3×3 blocks at 24→8).

Metrics, per image then averaged:

- ``window_cos`` (higher is better): mean cosine similarity of each compressed token to the
  tokens of its convolution window (the same windows for every method);
- ``sliced_w2`` (lower is better): sliced 2-Wasserstein distance between the compressed and
  the original tokens, with fixed random directions;
- with ``--projector`` (a LLaVA ``mm_projector``): ``proj_rel_l2``, how far a compressed token's
  projection lies from the mean projection of the tokens of its window, relative to that mean's
  norm, and ``proj_sliced_w2``, the sliced distance between projected compressed and projected
  original tokens (what the LLM would see).

Prints a table and writes JSON::

    python -m vision_token_compression.evaluate --checkpoint runs/toconv/compressor_24to12.safetensors \\
        --data HELD_OUT_IMAGES --projector llava-v1.5-7b/mm_projector.bin --output eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from vision_token_compression import (
    CompressorMetadata,
    ConvGeometry,
    TokenCompressor,
    grid_to_tokens,
    load_compressor,
    read_metadata,
    tokens_to_grid,
    window_mean,
)

from .data import ImageFolderDataset
from .features import FrozenTowerFeatures, ImagePreprocessor, load_image_processor
from .losses import random_directions, sliced_wasserstein, window_cosine
from .projector import load_projector

logger = logging.getLogger(__name__)

METHODS = ("trained", "average_init", "random_init", "adaptive_avg_pool")
# A way to compress (B, N, C) tokens to (B, M, C).
Compress = Callable[[torch.Tensor], torch.Tensor]
# name, higher is better
_NAME_WIDTH = max(len(m) for m in METHODS) + 1  # the table's method column
METRICS = (("window_cos", True), ("sliced_w2", False), ("proj_rel_l2", False), ("proj_sliced_w2", False))


def adaptive_avg_pool(output_size: int) -> Compress:
    """(B, N, C) → (B, out², C) by ``adaptive_avg_pool2d`` of the token grid to ``output_size``.

    Not the compressor's windows: at 24→12 each output token is the mean of a 2×2 block (windows
    that tile the grid without overlap), where the compressor's average init takes the mean of a 3×3
    window; at 24→8 both are the 3×3 blocks.
    """

    def pool(tokens: torch.Tensor) -> torch.Tensor:
        return grid_to_tokens(F.adaptive_avg_pool2d(tokens_to_grid(tokens), output_size))  # (B, out², C)

    return pool


def compression_metrics(
    original: torch.Tensor,
    compressed: torch.Tensor,
    geometry: ConvGeometry,
    directions: torch.Tensor,
    projector: nn.Module | None = None,
    projected_directions: torch.Tensor | None = None,
    projected_original: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image metrics (each shape (B,)) of ``compressed`` against ``original`` tokens."""
    original, compressed = original.float(), compressed.float()
    out = {
        "window_cos": window_cosine(original, compressed, geometry).mean(1),
        "sliced_w2": sliced_wasserstein(original, compressed, directions, normalize=False).sqrt(),
    }
    if projector is not None:
        if projected_original is None:
            projected_original = projector(original)
        projected = projector(compressed)  # (B, M, D)
        target = window_mean(projected_original, geometry)  # (B, M, D)
        out["proj_rel_l2"] = ((projected - target).norm(dim=-1) / target.norm(dim=-1).clamp(min=1e-12)).mean(1)
        out["proj_sliced_w2"] = sliced_wasserstein(
            projected_original, projected, projected_directions, normalize=False,
        ).sqrt()
    return out


def _check_same_source(metas: list[CompressorMetadata], paths: Sequence[Path]) -> None:
    first = metas[0]
    for meta, path in zip(metas[1:], paths[1:]):
        for key in ("vision_tower", "select_layer", "input_grid_size", "hidden_dim"):
            if getattr(meta, key) != getattr(first, key):
                raise ValueError(
                    f"Checkpoints disagree on {key}: {paths[0]} has {getattr(first, key)!r}, {path} has "
                    f"{getattr(meta, key)!r}. Evaluate checkpoints of different towers in separate runs."
                )


@dataclass(frozen=True)
class _Source:
    """What the checkpoints were fitted to, as given or as their metadata records it."""

    tower: str
    select_layer: int
    image_aspect_ratio: str


def _resolve_source(
    paths: Sequence[Path], metas: Sequence[CompressorMetadata], vision_tower: str | None, select_layer: int | None,
    image_aspect_ratio: str | None,
) -> _Source:
    """Tower, select layer and preprocessing: the given ones, else the first checkpoint's, else LLaVA-1.5's (warned)."""
    tower = vision_tower or metas[0].vision_tower
    if tower is None:
        raise ValueError(f"{paths[0]} does not record its vision tower; pass --vision-tower.")
    layer = select_layer if select_layer is not None else metas[0].select_layer
    if layer is None:
        layer = -2  # LLaVA-1.5's
        logger.warning("%s does not record its select layer; assuming %d (pass --select-layer).", paths[0], layer)
    aspect = image_aspect_ratio or metas[0].extra.get("image_aspect_ratio")
    if aspect is None:
        aspect = "pad"  # LLaVA-1.5's
        logger.warning("%s does not record its preprocessing; assuming %r (pass --image-aspect-ratio).",
                       paths[0], aspect)
    return _Source(tower, layer, aspect)


def _load_extractor(source: _Source, device: torch.device) -> FrozenTowerFeatures:
    """The frozen tower (float16 on a GPU); a random-weight stand-in is named in a warning."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    extractor = FrozenTowerFeatures(source.tower, source.select_layer, "patch", dtype=dtype).to(device)
    if getattr(extractor.config, "standin_of", None):
        logger.warning("%s is a random-weight stand-in of %s: these numbers test the pipeline, not a model.",
                       source.tower, extractor.config.standin_of)
    return extractor


def _build_methods(
    paths: Sequence[Path], metas: Sequence[CompressorMetadata], seed: int, device: torch.device,
) -> tuple[dict[str, dict[str, Compress]], dict[str, ConvGeometry]]:
    """For each checkpoint (by compressor name): the four methods of ``METHODS``, and its geometry."""
    methods: dict[str, dict[str, Compress]] = {}
    geometries: dict[str, ConvGeometry] = {}
    for path, meta in zip(paths, metas):
        trained = load_compressor(path, device)
        name = trained.name if trained.name not in methods else f"{trained.name}:{path.name}"
        sizes = (meta.input_grid_size, meta.output_grid_size, meta.hidden_dim)
        torch.manual_seed(seed)
        random_init = TokenCompressor(*sizes, init="random")
        average_init = TokenCompressor(*sizes)
        methods[name] = {
            "trained": trained.eval(), "average_init": average_init.to(device).eval(),
            "random_init": random_init.to(device).eval(), "adaptive_avg_pool": adaptive_avg_pool(meta.output_grid_size),
        }
        geometries[name] = trained.geometry
    return methods, geometries


def _directions(
    hidden: int, projector: nn.Module | None, num_projections: int, seed: int, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fixed random directions of the sliced distance, in CLIP's space and (with a projector) in the LLM's."""
    generator = torch.Generator().manual_seed(seed)
    directions = random_directions(hidden, num_projections, generator).to(device)
    if projector is None:
        return directions, None
    out_dim = projector(torch.zeros(1, 1, hidden, device=device)).shape[-1]
    return directions, random_directions(out_dim, num_projections, generator).to(device)


def _metric_sums(
    loader: DataLoader, extractor: FrozenTowerFeatures, methods: dict[str, dict[str, Compress]],
    geometries: dict[str, ConvGeometry], directions: tuple[torch.Tensor, torch.Tensor | None],
    projector: nn.Module | None,
) -> tuple[dict[str, dict[str, dict[str, float]]], int]:
    """Per-image metrics summed over the images, by checkpoint, method and metric; and the number of images."""
    sums: dict[str, dict[str, dict[str, float]]] = {name: {method: {} for method in METHODS} for name in methods}
    count = 0
    for pixels, _ in tqdm(loader, desc="evaluate"):
        tokens = extractor(pixels).float()  # (B, N, C)
        projected_original = projector(tokens) if projector is not None else None
        count += len(tokens)
        for name, compressors in methods.items():
            for method, compress in compressors.items():
                values = compression_metrics(
                    tokens, compress(tokens), geometries[name], directions[0], projector, directions[1],
                    projected_original,
                )
                for key, value in values.items():
                    sums[name][method][key] = sums[name][method].get(key, 0.0) + value.sum().item()
    return sums, count


@torch.no_grad()
def evaluate(
    checkpoints: Sequence[str | os.PathLike],
    data: Sequence[str | os.PathLike],
    *,
    vision_tower: str | None = None,
    select_layer: int | None = None,
    image_aspect_ratio: str | None = None,
    projector: str | os.PathLike | None = None,
    max_images: int | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    num_projections: int = 256,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Compare each checkpoint with the average init, random init and adaptive average pooling; return results.

    Tower, select layer and preprocessing default to what the checkpoints' metadata records.
    """
    paths = [Path(p) for p in checkpoints]
    metas = [read_metadata(p) for p in paths]
    _check_same_source(metas, paths)
    source = _resolve_source(paths, metas, vision_tower, select_layer, image_aspect_ratio)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor = _load_extractor(source, device)
    images = ImageFolderDataset(data, ImagePreprocessor(load_image_processor(source.tower), source.image_aspect_ratio))
    if max_images is not None and max_images < len(images):
        images = Subset(images, range(max_images))
    proj = load_projector(projector).to(device) if projector else None
    directions = _directions(extractor.hidden_size, proj, num_projections, seed, device)
    methods, geometries = _build_methods(paths, metas, seed, device)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    sums, count = _metric_sums(loader, extractor, methods, geometries, directions, proj)
    results = {
        name: {
            "checkpoint": str(path), "tokens": geometries[name].output_size**2,
            "methods": {method: {k: v / count for k, v in metric_sums.items()} for method, metric_sums in by_method.items()},
        }
        for (name, by_method), path in zip(sums.items(), paths)
    }
    return {
        "num_images": count, "vision_tower": source.tower, "select_layer": source.select_layer,
        "image_aspect_ratio": source.image_aspect_ratio, "projector": str(projector) if projector else None,
        "num_projections": num_projections, "seed": seed, "results": results,
    }


def format_table(report: dict) -> str:
    """The results as one text table per checkpoint."""
    lines = []
    for name, result in report["results"].items():
        metrics = [(m, up) for m, up in METRICS if m in result["methods"]["trained"]]
        lines.append(f"{name} ({result['tokens']} tokens, {report['num_images']} images): {result['checkpoint']}")
        header = f"  {'method':<{_NAME_WIDTH}}" + "".join(f"{m + (' ↑' if up else ' ↓'):>17}" for m, up in metrics)
        lines += [header, "  " + "-" * (len(header) - 2)]
        for method, values in result["methods"].items():
            lines.append(f"  {method:<{_NAME_WIDTH}}" + "".join(f"{values[m]:>17.4f}" for m, _ in metrics))
        lines.append("")
    if report["projector"] is None:
        lines.append("(no --projector given: projector metrics skipped)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``toconv-eval-compressor``."""
    p = argparse.ArgumentParser(
        prog="toconv-eval-compressor", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", nargs="+", required=True, help="compressor .safetensors file(s)")
    p.add_argument("--data", nargs="+", required=True, help="held-out image folders")
    p.add_argument("--vision-tower", default=None, help="default: the tower recorded in the checkpoint")
    p.add_argument("--select-layer", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--image-aspect-ratio", choices=["pad", "crop"], default=None, help="default: the checkpoint's")
    p.add_argument("--projector", default=None, help="LLaVA mm_projector.bin, checkpoint folder or safetensors")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--num-projections", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m vision_token_compression.evaluate`` and ``toconv-eval-compressor``.

    Returns None: a console script exits with whatever ``main`` returns. ``evaluate`` returns the results.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = evaluate(
        args.checkpoint, args.data, vision_tower=args.vision_tower, select_layer=args.select_layer,
        image_aspect_ratio=args.image_aspect_ratio, projector=args.projector, max_images=args.max_images,
        batch_size=args.batch_size, num_workers=args.num_workers, num_projections=args.num_projections,
        seed=args.seed, device=args.device,
    )
    print(format_table(report))  # the command's output
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("Wrote %s", args.output)


if __name__ == "__main__":
    main()
