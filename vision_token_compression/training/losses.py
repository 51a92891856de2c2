"""Losses that fit a compressor to frozen CLIP tokens: a window term and a distribution term.

All functions take the original patch tokens ``(B, N, C)`` (N = in²) and the compressed tokens
``(B, M, C)`` (M = out²) and work on whole batches at once; nothing loops over token positions.

- ``window_cosine``: each compressed token's mean cosine similarity to every valid token of its
  convolution window (ToConv's receptive-field term). The mean of cosines to unit vectors is the
  cosine-weighted dot product with their mean, so one ``avg_pool2d`` of the normalised grid gives
  every window at once.
- ``sliced_wasserstein``: squared sliced 2-Wasserstein distance between each image's compressed
  and original token sets, exact for unequal set sizes (quantile functions compared on the
  merged grid of quantile levels).
- ``entropic_ot``: transport cost of the entropic optimal plan (Sinkhorn, log domain) between the
  same two sets; an alternative to the sliced distance.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from vision_token_compression import ConvGeometry, window_mean

from .validation import check_choice, check_int, check_number, flag

DistributionLoss = Literal["sliced_wasserstein", "sinkhorn", "none"]


def window_cosine(original: torch.Tensor, compressed: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Mean cosine similarity of each compressed token to the tokens of its window, shape (B, M).

    mean_j cos(c, x_j) = ĉ · mean_j x̂_j, so the windows' means of unit tokens are all that is needed.
    """
    if original.shape[1] != geometry.input_size**2 or compressed.shape[1] != geometry.output_size**2:
        raise ValueError(
            f"window_cosine for {geometry.input_size}→{geometry.output_size} needs {geometry.input_size**2} "
            f"original and {geometry.output_size**2} compressed tokens, got {original.shape[1]} and "
            f"{compressed.shape[1]}."
        )
    unit_means = window_mean(F.normalize(original, dim=-1), geometry)  # (B, M, C)
    return (F.normalize(compressed, dim=-1) * unit_means).sum(-1)


@functools.lru_cache(maxsize=32)
def _quantile_pairing(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index pairs and weights comparing two empirical quantile functions with n and m atoms, on ``device``.

    The quantile functions are step functions with steps at i/n and j/m; on each interval of the
    merged grid both are constant, so W2² = Σ length · (x_sorted[ix] − y_sorted[iy])². Integer
    arithmetic over the common denominator n·m keeps the grid exact.
    """
    edges = torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]).unique()  # sorted, /(n·m)
    starts = torch.cat([edges.new_zeros(1), edges[:-1]])
    lengths = (edges - starts).double() / (n * m)
    ix = starts // m  # atom of x covering [start, edge)
    iy = starts // n
    return ix.to(device), iy.to(device), lengths.to(device)  # cached there: no copy per training step


def random_directions(
    channels: int, num: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``num`` random unit vectors in R^channels, as columns of a (channels, num) matrix."""
    directions = torch.randn(channels, num, generator=generator, device=generator.device if generator else device)
    return F.normalize(directions, dim=0).to(device)


def sliced_wasserstein(
    original: torch.Tensor, compressed: torch.Tensor, directions: torch.Tensor, normalize: bool = True,
) -> torch.Tensor:
    """Squared sliced 2-Wasserstein distance per image between two token sets, shape (B,).

    Args:
        original: (B, N, C) tokens.
        compressed: (B, M, C) tokens.
        directions: (C, P) unit projection directions.
        normalize: Divide by the variance of the original tokens along the same directions
            (detached), so the value is scale-free: 0 is a perfect match, ~2 is as far as an
            independent set with the same spread.
    """
    x = torch.sort(original @ directions, dim=1).values  # (B, N, P)
    y = torch.sort(compressed @ directions, dim=1).values  # (B, M, P)
    ix, iy, lengths = _quantile_pairing(x.shape[1], y.shape[1], original.device)
    squared = (x[:, ix] - y[:, iy]).pow(2)  # (B, K, P)
    distance = (squared * lengths.to(squared.dtype)[None, :, None]).sum(1).mean(-1)  # (B,)
    if normalize:
        distance = distance / x.var(dim=1).mean(-1).detach().clamp(min=1e-12)
    return distance


def entropic_ot(
    original: torch.Tensor, compressed: torch.Tensor, epsilon: float = 0.05, iterations: int = 50,
) -> torch.Tensor:
    """Cost of the entropic optimal transport plan between each image's two token sets, shape (B,).

    Squared Euclidean costs are divided by their mean (detached), so ``epsilon`` is relative to
    the typical cost. The plan comes from log-domain Sinkhorn without a graph; the gradient flows
    through the cost, which is the gradient of the transport cost at the optimal plan.
    """
    cost = torch.cdist(compressed, original).pow(2)  # (B, M, N)
    cost = cost / cost.mean(dim=(1, 2), keepdim=True).detach().clamp(min=1e-12)
    batch, m, n = cost.shape
    with torch.no_grad():
        scaled = cost.detach() / epsilon
        f = cost.new_zeros(batch, m, 1)
        g = cost.new_zeros(batch, 1, n)
        for _ in range(iterations):  # a loop over iterations, not positions
            f = -math.log(m) - torch.logsumexp(g - scaled, dim=2, keepdim=True)
            g = -math.log(n) - torch.logsumexp(f - scaled, dim=1, keepdim=True)
        plan = torch.exp(f + g - scaled)  # (B, M, N), marginals 1/M and 1/N
    return (plan * cost).sum(dim=(1, 2))


@dataclass
class LossConfig:
    """Weights and settings of the compressor's training loss; values are checked on construction.

    Args:
        window_weight: Weight of ``1 - window_cosine`` (≥ 0; this or the distribution term must be on).
        distribution: ``"sliced_wasserstein"`` (default), ``"sinkhorn"`` (entropic OT) or ``"none"``.
        distribution_weight: Weight of the distribution term (≥ 0).
        num_projections: Directions per step for the sliced distance (≥ 1).
        sinkhorn_epsilon: Entropic regularisation, relative to the mean squared distance (> 0).
        sinkhorn_iterations: Sinkhorn iterations (≥ 1).
    """

    window_weight: float = 1.0
    distribution: DistributionLoss = "sliced_wasserstein"
    distribution_weight: float = 1.0
    num_projections: int = 128
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 50

    def __post_init__(self) -> None:
        check_choice("distribution", self.distribution, ("sliced_wasserstein", "sinkhorn", "none"))
        check_number("window_weight", self.window_weight, 0)
        check_number("distribution_weight", self.distribution_weight, 0)
        check_int("num_projections", self.num_projections, 1, hint="The sliced distance needs directions.")
        check_number("sinkhorn_epsilon", self.sinkhorn_epsilon, 0, low_open=True,
                     hint="Entropic OT divides the costs by it; 0.05 is the default.")
        check_int("sinkhorn_iterations", self.sinkhorn_iterations, 1)
        distribution_on = self.distribution != "none" and self.distribution_weight > 0
        if not self.window_weight > 0 and not distribution_on:
            raise ValueError(
                f"No loss term is on ({flag('window_weight')}={self.window_weight!r}, {flag('distribution')}="
                f"{self.distribution!r}, {flag('distribution_weight')}={self.distribution_weight!r}): the "
                f"compressor would not train. Give --window-weight or --distribution-weight a value > 0 (with "
                f"--distribution sliced_wasserstein or sinkhorn)."
            )


def compression_loss(
    original: torch.Tensor,
    compressed: torch.Tensor,
    geometry: ConvGeometry,
    config: LossConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted loss and its terms (batch means, computed in float32).

    Returns ``loss``, ``window`` (1 - mean window cosine) and, unless the distribution term is
    off, ``distribution``.
    """
    original, compressed = original.float(), compressed.float()
    terms = {"window": 1.0 - window_cosine(original, compressed, geometry).mean()}
    if config.distribution == "sliced_wasserstein":
        directions = random_directions(original.shape[-1], config.num_projections, generator, original.device)
        terms["distribution"] = sliced_wasserstein(original, compressed, directions).mean()
    elif config.distribution == "sinkhorn":
        terms["distribution"] = entropic_ot(
            original, compressed, config.sinkhorn_epsilon, config.sinkhorn_iterations,
        ).mean()
    loss = config.window_weight * terms["window"]
    if "distribution" in terms:
        loss = loss + config.distribution_weight * terms["distribution"]
    return {"loss": loss, **terms}
