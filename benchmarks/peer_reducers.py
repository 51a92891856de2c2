"""Peer token reducers outside the LLM, written from their papers' descriptions (docs/benchmarks.md cites them).

Each takes the selected CLIP patch features (B, N, C) and, where the method needs it, the CLS token's
attention to each patch at the selected layer (B, N), averaged over heads, and returns (B, n, C).
They reproduce each method's cost structure (what it computes, on which tensors), not its released
code: VisionZip (arXiv:2412.04467), LLaVA-PruMerge and PruMerge+ (arXiv:2403.15388) and
LLaVA-NeXT-style bilinear pooling (arXiv:2408.03326).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vision_token_compression import grid_to_tokens, tokens_to_grid

VISIONZIP_DOMINANT_SHARE = 54 / 64  # VisionZip's 64-token setting: 54 dominant + 10 contextual tokens
PRUMERGE_NEIGHBOURS = 32  # tokens merged into each kept one (our choice; the paper's k is a parameter)


def visionzip_split(budget: int) -> tuple[int, int]:
    """(dominant, contextual) token counts of a VisionZip budget: 64 → 54 + 10, 144 → 122 + 22."""
    dominant = round(budget * VISIONZIP_DOMINANT_SHARE)
    return dominant, budget - dominant


def gather_tokens(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features[b, index[b]] for each sample: (B, N, C), (B, n) → (B, n, C)."""
    return features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def top_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (B, count) of the highest scores, in token order (so the kept tokens keep their layout)."""
    return scores.topk(count, dim=1).indices.sort(dim=1).values


def rest_indices(n: int, kept: torch.Tensor) -> torch.Tensor:
    """Indices (B, n - kept) of the tokens not in ``kept`` (B, k), in token order."""
    mask = torch.ones(kept.shape[0], n, dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept, False)
    return mask.nonzero()[:, 1].view(kept.shape[0], n - kept.shape[1])


def visionzip(features: torch.Tensor, cls_attention: torch.Tensor, budget: int) -> torch.Tensor:
    """Dominant tokens (most CLS attention) and contextual tokens (the rest merged into evenly spaced targets).

    The contextual targets are every ``step``-th remaining token; each remaining token joins the
    target it is most similar to (cosine similarity of the selected layer's features; the paper uses
    that layer's keys, a product of the same shape), and each target becomes the mean of its group.
    """
    dominant, contextual = visionzip_split(budget)
    kept = top_tokens(cls_attention, dominant)
    rest = gather_tokens(features, rest_indices(features.shape[1], kept))  # (B, R, C)
    step = rest.shape[1] // contextual
    targets = torch.arange(contextual, device=features.device) * step
    normed = F.normalize(rest, dim=-1)
    assign = (normed @ normed[:, targets].transpose(1, 2)).argmax(dim=-1)  # (B, R): each token's target
    sums = torch.zeros(rest.shape[0], contextual, rest.shape[-1], dtype=rest.dtype, device=rest.device)
    sums.scatter_add_(1, assign.unsqueeze(-1).expand_as(rest), rest)
    counts = torch.zeros(rest.shape[0], contextual, dtype=rest.dtype, device=rest.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=rest.dtype))
    merged = sums / counts.clamp(min=1).unsqueeze(-1)
    return torch.cat([gather_tokens(features, kept), merged], dim=1)


def iqr_outliers(cls_attention: torch.Tensor) -> torch.Tensor:
    """(B, N) mask of the tokens whose CLS attention is above Q3 + 1.5 IQR (PruMerge's adaptive selection)."""
    q1, q3 = torch.quantile(cls_attention.float(), torch.tensor([0.25, 0.75], device=cls_attention.device), dim=1)
    return cls_attention > (q3 + 1.5 * (q3 - q1)).unsqueeze(1).to(cls_attention.dtype)


def prumerge_count(cls_attention: torch.Tensor, budget: int) -> int:
    """PruMerge's adaptive count (the batch's largest, so a batch stays one tensor), at most ``budget``, at least 1."""
    return max(1, min(budget, int(iqr_outliers(cls_attention).sum(dim=1).max())))


def uniform_fill(kept: torch.Tensor, n: int, budget: int) -> torch.Tensor:
    """``kept`` (B, k) completed to ``budget`` indices with evenly spaced tokens from the rest (PruMerge+)."""
    rest = rest_indices(n, kept)
    extra = budget - kept.shape[1]
    if extra <= 0:
        return kept
    picks = torch.linspace(0, rest.shape[1] - 1, extra, device=kept.device).round().long()
    return torch.cat([kept, rest[:, picks]], dim=1).sort(dim=1).values


def merge_neighbours(features: torch.Tensor, cls_attention: torch.Tensor, kept: torch.Tensor,
                     neighbours: int = PRUMERGE_NEIGHBOURS) -> torch.Tensor:
    """Each kept token replaced by the CLS-attention-weighted mean of its ``neighbours`` most similar tokens.

    PruMerge's merge step: similarity of every kept token to every token (cosine, selected layer's
    features), top-k neighbours (the token itself among them), weights from the CLS attention.
    """
    normed = F.normalize(features, dim=-1)
    similarity = gather_tokens(normed, kept) @ normed.transpose(1, 2)  # (B, k, N)
    near = similarity.topk(min(neighbours, features.shape[1]), dim=-1).indices  # (B, k, m)
    weights = cls_attention.gather(1, near.flatten(1)).view(near.shape)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    batch, k, m = near.shape
    grouped = gather_tokens(features, near.flatten(1)).view(batch, k, m, -1)
    return (weights.unsqueeze(-1) * grouped).sum(dim=2)


def prumerge(features: torch.Tensor, cls_attention: torch.Tensor, budget: int, plus: bool = False) -> torch.Tensor:
    """LLaVA-PruMerge: the IQR outliers of CLS attention (adaptive count, at most ``budget``), each merged
    with its nearest tokens; PruMerge+ (``plus``) first tops them up to ``budget`` with evenly spaced tokens."""
    kept = top_tokens(cls_attention, prumerge_count(cls_attention, budget))
    if plus:
        kept = uniform_fill(kept, features.shape[1], budget)
    return merge_neighbours(features, cls_attention, kept)


def bilinear_pool(features: torch.Tensor, budget: int) -> torch.Tensor:
    """LLaVA-NeXT-style pooling: the token grid resized bilinearly to the budget's grid (24×24 → 12×12 or 8×8)."""
    out = math.isqrt(budget)
    if out * out != budget:
        raise ValueError(f"Bilinear pooling needs a square token budget (144 = 12², 64 = 8²), got {budget}.")
    grid = tokens_to_grid(features)  # (B, C, H, W)
    return grid_to_tokens(F.interpolate(grid, size=(out, out), mode="bilinear", align_corners=False))
