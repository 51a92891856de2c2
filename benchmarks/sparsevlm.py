"""SparseVLM (arXiv:2410.04417) as its first released version runs it on LLaVA-1.5, written from its description.

Before the LLM, the text tokens after the image that relate most to it are chosen as "raters". After
decoder layers 2, 6 and 15 the image tokens the raters attend to least are dropped down to fixed
counts per setting, and of the dropped ones the best-rated 30% are "recycled": clustered by density
peaks (DPC-kNN) and each cluster's mean kept as one more image token. The counts, the layers and
the 30% / one-cluster-per-ten rules are the released version's (Gumpest/SparseVLMs, v1.0); the code
here is this project's. Its settings (192 / 128 / 96 / 64) count image tokens averaged over the
decoder's layers, not at its input; ``budget_setting`` maps a ToConv budget to one of them.
"""

from __future__ import annotations

import torch

from benchmarks.peer_reducers import gather_tokens

DROP_AFTER_LAYERS = (2, 6, 15)  # 0-based: the drop happens on these layers' outputs
KEEP_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
RECYCLE_SHARE = 0.3  # of the dropped tokens, the best-rated share is recycled ...
TOKENS_PER_CLUSTER = 10  # ... into one merged token per ten of them (plus one)
MIN_LAYERS = DROP_AFTER_LAYERS[-1] + 2  # the last drop needs a layer after it


def budget_setting(budget: int) -> int | None:
    """The largest published setting at or under ``budget`` (144 → 128, 64 → 64); None if there is none."""
    fitting = [s for s in KEEP_COUNTS if s <= budget]
    return max(fitting) if fitting else None


def recycled_count(dropped: int) -> int:
    """How many of ``dropped`` tokens are recycled (the released code's ``int(0.3 n) + 1``; none of none)."""
    return int(dropped * RECYCLE_SHARE) + 1 if dropped > 0 else 0


def cluster_count(recycled: int) -> int:
    """How many merged tokens ``recycled`` tokens become: one per ten, plus one (none of none)."""
    return recycled // TOKENS_PER_CLUSTER + 1 if recycled > 0 else 0


def select_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, S) mask of the rater text tokens: those whose image-relevance is above the mean.

    Relevance of text token j: softmax over the text of each image token's dot products with it,
    averaged over the image tokens (on the LLM's input embeddings). The most relevant token always
    rates, so the mask is never empty (a one-token text has no token above its own mean).
    """
    relevance = torch.softmax((image @ text.transpose(1, 2)).float(), dim=2).mean(dim=1)  # (B, S)
    top = relevance == relevance.max(dim=1, keepdim=True).values
    return (relevance > relevance.mean(dim=1, keepdim=True)) | top


def rater_scores(weights: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """Each image token's attention from the raters: (B, S, N) head-averaged rows of the text after the
    image, (B, S) rater mask → (B, N), the mean over the rater rows."""
    mask = raters.to(weights.dtype).unsqueeze(-1)
    return (weights * mask).sum(dim=1) / mask.sum(dim=1)


def density_peak_merge(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster (B, n, D) tokens by density peaks with k-nearest-neighbour density (DPC-kNN), k = ``clusters``.

    Density: exp(−mean squared distance to the k nearest tokens); each token's separation: its distance
    to the nearest denser token (the densest gets the largest distance); the ``clusters`` tokens with
    the largest density × separation are the centres, every token joins its nearest centre, and each
    cluster becomes its members' mean. Returns the means (B, clusters, D) and the centres (B, clusters).
    """
    batch, n, dim = tokens.shape
    distance = torch.cdist(tokens.float(), tokens.float()) / dim**0.5  # (B, n, n)
    nearest = distance.topk(min(clusters, n), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))  # (B, n)
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # [b, i, j]: j is denser than i
    far = distance.flatten(1).max(dim=1).values.view(batch, 1, 1)
    separation = torch.where(denser, distance, far).min(dim=-1).values
    centres = (density * separation).topk(clusters, dim=1).indices  # (B, clusters)
    assign = distance.gather(2, centres.unsqueeze(1).expand(-1, n, -1)).argmin(dim=-1)  # (B, n)
    assign.scatter_(1, centres, torch.arange(clusters, device=tokens.device).expand(batch, -1))
    sums = torch.zeros(batch, clusters, dim, dtype=tokens.dtype, device=tokens.device)
    sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, dim), tokens)
    counts = torch.zeros(batch, clusters, dtype=tokens.dtype, device=tokens.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=tokens.dtype))
    return sums / counts.unsqueeze(-1), centres


def recycle(image: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged tokens made of the best-rated dropped ones: (B, N, D) image tokens, (B, N) scores,
    (B, d) dropped indices → (B, c, D) merged tokens and (B, c) indices of their centres among the image tokens."""
    count = recycled_count(dropped.shape[1])
    best = scores.gather(1, dropped).topk(count, dim=1).indices
    chosen = dropped.gather(1, best)  # (B, r) image-token indices
    merged, centres = density_peak_merge(gather_tokens(image, chosen), cluster_count(count))
    return merged, chosen.gather(1, centres)
