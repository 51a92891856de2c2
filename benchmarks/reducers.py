"""The token reducers compared (ToConv and two baselines of its geometry) and the variants built from them."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from benchmarks.presets import OUTPUT_GRIDS
from vision_token_compression import (
    ConvGeometry,
    TokenCompressor,
    choose_geometry,
    grid_to_tokens,
    tokens_to_grid,
    window_mean,
)

ReducerKind = Literal["toconv", "window_mean", "conv"]
REDUCER_KINDS: tuple[ReducerKind, ...] = ("toconv", "window_mean", "conv")
# Variant names before the window mean was named for what it is (results of JSON schema 1).
RENAMED_VARIANT_KINDS = {"avgpool": "window_mean"}


class GridReducer(nn.Module):
    """Baseline token reducer: (B, in², C) → (B, out², C) by the library's ``window_mean`` or a plain ``nn.Conv2d``.

    Uses the compressor's own geometry (kernel, stride, padding), its token-to-grid layout (a
    channels-last view of the (B, N, C) tokens, no copy) and, for ``"conv"``, its weight layout
    (channels-last), so it differs from ``TokenCompressor`` only in the operation on the grid: the
    plain convolution is the best a user of an ``nn.Conv2d`` of that shape gets on these tokens,
    and ToConv / Conv2d measures the partial-convolution renormalisation alone.

    Args:
        kind: ``"window_mean"``: the mean of each of the compressor's windows (``avg_pool2d`` with its
            kernel, stride and padding, ``count_include_pad=False``: k3 s2 p1 for 24→12, k3 s3 p0 for
            24→8, k5 s1 p0 for 16→12), what an average-initialised ToConv computes; ``"conv"``: a plain
            C→C ``nn.Conv2d``, random init.
        geometry: Grid sizes, kernel, stride and padding.
        channels: Channels per token.
    """

    def __init__(self, kind: Literal["window_mean", "conv"], geometry: ConvGeometry, channels: int) -> None:
        super().__init__()
        if kind not in ("window_mean", "conv"):
            raise ValueError(f"GridReducer kind must be 'window_mean' or 'conv', got {kind!r}.")
        self.kind = kind
        self.geometry = geometry
        g = geometry
        self.conv = nn.Conv2d(channels, channels, g.kernel_size, g.stride, g.padding) if kind == "conv" else None
        if self.conv is not None:
            # Fair baseline: forward hands the conv a channels-last grid view, and TokenCompressor stores
            # its weight channels-last to match; a contiguous weight here would make oneDNN (CPU) convert
            # the whole (C, C, k, k) weight on every call, a cost of layout, not of the operation.
            self.conv.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return window_mean(x, self.geometry)  # (B, h*w, C)
        grid = tokens_to_grid(x, self.geometry.input_size)  # (B, C, H, W), channels-last view, as ToConv reads it
        return grid_to_tokens(self.conv(grid))  # (B, h*w, C)


def build_reducer(kind: ReducerKind, input_grid: int, output_grid: int, channels: int) -> nn.Module:
    """ToConv's ``TokenCompressor`` or a baseline of the same geometry."""
    if kind == "toconv":
        return TokenCompressor(input_grid, output_grid, channels)
    return GridReducer(kind, choose_geometry(input_grid, output_grid), channels)


@dataclasses.dataclass
class Variant:
    """One way of handing image tokens to the LLM."""

    name: str
    kind: str  # "none" or one of REDUCER_KINDS
    output_grid: int
    reducer: nn.Module | None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "output_grid": self.output_grid, "image_tokens": self.output_grid**2}
        if self.reducer is not None:
            g = self.reducer.geometry
            info.update(kernel=g.kernel_size, stride=g.stride, padding=g.padding)
        return info


def build_variants(input_grid: int, channels: int, device: torch.device, dtype: torch.dtype,
                   names: list[str] | None = None) -> list[Variant]:
    """No compression, then ToConv / window mean / plain conv at 12×12 and 8×8."""
    variants = [Variant("none", "none", input_grid, None)]
    for out in OUTPUT_GRIDS:
        for kind in REDUCER_KINDS:
            variants.append(Variant(f"{kind}-{input_grid}to{out}", kind, out, None))
    if names:
        unknown = sorted(set(names) - {v.name for v in variants})
        if unknown:
            raise SystemExit(f"Unknown variants {unknown}; choose from {[v.name for v in variants]}."
                             + renamed_hint(unknown))
        variants = [v for v in variants if v.name in names or v.name == "none"]  # "none" is the reference
    for v in variants:
        if v.kind != "none":
            v.reducer = build_reducer(v.kind, input_grid, v.output_grid, channels).to(device=device, dtype=dtype).eval()
    return variants


def renamed_hint(names: list[str]) -> str:
    """" (avgpool-24to12 is now window_mean-24to12)" for names of a renamed kind, else ""."""
    renamed = [
        f"{name} is now {RENAMED_VARIANT_KINDS[kind]}-{grids}"
        for name in names
        for kind, _, grids in [name.partition("-")]
        if kind in RENAMED_VARIANT_KINDS
    ]
    return f" ({'; '.join(renamed)})" if renamed else ""
