"""ToConv against a plain convolution and the vision tower, and the tower's early stop, at the tower's shape."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.presets import OUTPUT_GRIDS, SELECT_LAYER
from benchmarks.reducers import REDUCER_KINDS, build_reducer
from benchmarks.timing import summarize, time_interleaved
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from vision_token_compression import TokenCompressor


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of matmuls, convolutions and attention in ``fn`` (torch's FlopCounterMode; elementwise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def microbenchmark(
    tower: CLIPVisionTower, tower_name: str, overrides: dict, batch: int, device: torch.device,
    dtype: torch.dtype, repeats: int, tower_repeats: int,
) -> dict[str, Any]:
    """ToConv vs plain convolution (and the window mean), and vs the vision tower, at ``tower``'s shape.

    Also times the tower stopping at the selected layer (``CLIPVisionTower``) against the full run
    (``output_hidden_states`` over every layer, as upstream LLaVA does), checks they agree, and counts
    the FLOPs of each on the meta device (exact, immune to timing noise). Moves ``tower`` to the meta
    device at the end: it is not usable afterwards.
    """
    channels, grid, layers = tower.hidden_size, tower.tower_grid_size, tower.config.num_hidden_layers
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(batch, grid * grid, channels, generator=generator).to(device=device, dtype=dtype)
    size = tower.config.image_size
    images = torch.randn(batch, 3, size, size, generator=generator).to(device=device, dtype=dtype)
    with torch.inference_mode():
        identical, tower_ms = time_selected_and_full_runs(tower, images, device, tower_repeats)
        compressors = {
            f"{grid}to{out}": time_reducers(features, grid, out, device, dtype, repeats, tower_ms["selected"])
            for out in OUTPUT_GRIDS
        }
        flops_selected, flops_full = count_tower_flops_on_meta(tower, images)
        add_compressor_flops(compressors, features, flops_selected)
    return {
        "vision_tower": tower_name,
        "clip_overrides": overrides,
        "shape": {"batch": batch, "tokens": grid * grid, "channels": channels, "layers": layers},
        "timing_order": "rotated round by round; ratios are medians of per-round ratios",
        "compressors": compressors,
        "vision_tower_ms": tower_ms["selected"],
        "vision_tower_flops": flops_selected,
        "select_layer": {
            "mm_vision_select_layer": SELECT_LAYER,
            "layers_run": tower.early_stop.layers_needed(tower.select_layer, layers) or layers,
            "layers_total": layers,
            "full_run_ms": tower_ms["full"],
            "selected_run_ms": tower_ms["selected"],
            "saving": 1 - tower_ms["selected"]["median"] / tower_ms["full"]["median"],
            "full_run_flops": flops_full,
            "selected_run_flops": flops_selected,
            "flops_saving": 1 - flops_selected / flops_full,
            "features_identical": identical,
        },
    }


def full_run(tower: CLIPVisionTower, images: torch.Tensor) -> torch.Tensor:
    """The selected features the upstream way: every layer run (``output_hidden_states``), one kept."""
    return tower.feature_select(tower.vision_tower(images, output_hidden_states=True))


def time_selected_and_full_runs(
    tower: CLIPVisionTower, images: torch.Tensor, device: torch.device, repeats: int,
) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Whether the early stop gives the full run's features, and the time of each (``selected``, ``full``)."""
    identical = torch.equal(tower(images), full_run(tower, images))  # also the warm-up of both
    times = time_interleaved(
        {"selected": lambda: tower(images), "full": lambda: full_run(tower, images)}, device, 0, repeats,
    )
    return identical, {name: summarize(t) for name, t in times.items()}


def time_reducers(
    features: torch.Tensor, grid: int, out: int, device: torch.device, dtype: torch.dtype, repeats: int,
    tower_ms: dict[str, Any],
) -> dict[str, Any]:
    """ToConv, the plain convolution and the window mean at ``grid``→``out``, timed on the same tokens."""
    channels = features.shape[-1]
    # All three read the same (B, N, C) tokens through the same channels-last grid view, and ToConv
    # and the plain conv both hold channels-last weights (see GridReducer): the ratio is the
    # partial-convolution renormalisation alone.
    reducers = {kind: build_reducer(kind, grid, out, channels).to(device=device, dtype=dtype).eval()
                for kind in REDUCER_KINDS}
    times = time_interleaved({k: (lambda r=r: r(features)) for k, r in reducers.items()},
                             device, max(2, repeats // 5), repeats)
    ratios = [a / b for a, b in zip(times["toconv"], times["conv"])]
    toconv = statistics.median(times["toconv"])
    g = reducers["toconv"].geometry
    return {
        "kernel": g.kernel_size, "stride": g.stride, "padding": g.padding,
        **{f"{k}_ms": summarize(t) for k, t in times.items()},
        "toconv_over_conv": statistics.median(ratios),
        "toconv_over_conv_of_medians": toconv / statistics.median(times["conv"]),
        "toconv_pct_of_vision_tower": 100 * toconv * 1e3 / tower_ms["median"],
    }


def count_tower_flops_on_meta(tower: CLIPVisionTower, images: torch.Tensor) -> tuple[int, int]:
    """FLOPs of the early-stopping run and of the full run; moves ``tower`` to the meta device (shapes only)."""
    tower.to("meta")
    meta_images = torch.empty(images.shape, device="meta", dtype=images.dtype)
    return count_flops(lambda: tower(meta_images)), count_flops(lambda: full_run(tower, meta_images))


def add_compressor_flops(compressors: dict[str, dict[str, Any]], features: torch.Tensor, tower_flops: int) -> None:
    """Each compressor's FLOPs, alone and as a share of the tower's, counted on the meta device."""
    batch, tokens, channels = features.shape
    meta_features = torch.empty(batch, tokens, channels, device="meta", dtype=features.dtype)
    for name, c in compressors.items():
        grid, out = (int(side) for side in name.split("to"))
        compressor = TokenCompressor(grid, out, channels).to(device="meta", dtype=features.dtype)
        c["toconv_flops"] = count_flops(lambda compressor=compressor: compressor(meta_features))
        c["toconv_flops_pct_of_vision_tower"] = 100 * c["toconv_flops"] / tower_flops
