"""LLaVA's vision-to-language projector, with upstream's types and parameter names."""

from __future__ import annotations

import re

from torch import nn

from ...constants import config_value


class IdentityMap(nn.Module):
    """Pass features through unchanged (``mm_projector_type='identity'``)."""

    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self) -> dict:
        return {"mm_projector_type": "identity"}


def build_vision_projector(config, delay_load: bool = False, **kwargs) -> nn.Module:
    """Projector from ``config.mm_hidden_size`` to ``config.hidden_size``.

    ``linear``; ``mlp{N}x_gelu`` (N linears with GELUs between them, as ``nn.Sequential`` so that
    the linears sit at indices 0, 2, 4, ... and upstream ``mm_projector.bin`` files load);
    ``identity``.
    """
    projector_type = config_value(config, "mm_projector_type")
    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"mm_projector_type {projector_type!r} needs at least one layer.")
        layers: list[nn.Module] = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
        return nn.Sequential(*layers)
    if projector_type == "identity":
        return IdentityMap()
    raise ValueError(
        f"Unknown mm_projector_type {projector_type!r}; use 'linear', 'mlp2x_gelu' (any mlpNx_gelu) or 'identity'."
    )
