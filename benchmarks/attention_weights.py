"""The attention weights of one attention module, computed by the eager kernel for that module alone.

SDPA and flash kernels never materialise the (B, heads, T, T) attention matrix, so a method that
ranks tokens by attention weights (VisionZip and PruMerge in CLIP, FastV in the LLM) must run the
layer it reads with the eager kernel (``softmax(QKᵀ)V`` in full). Here only that one module is
switched: it gets its own copy of the config with ``_attn_implementation = "eager"``, every other
layer keeps its kernel, and a forward hook keeps the weights the module returns.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class CapturedAttention:
    """The weights (B, heads, queries, keys) of the last call of the captured module."""

    weights: list[torch.Tensor] = field(default_factory=list)

    @property
    def last(self) -> torch.Tensor:
        if not self.weights:
            raise RuntimeError("The captured attention module was not called.")
        return self.weights[-1]


@contextlib.contextmanager
def eager_attention(module: nn.Module) -> Iterator[CapturedAttention]:
    """Run ``module`` (a transformers attention module with a ``config``) eagerly and keep its weights."""
    captured = CapturedAttention()
    shared_config = module.config
    eager_config = copy.copy(shared_config)  # the layers share one config: switch this module alone
    eager_config._attn_implementation = "eager"

    def keep(_module: nn.Module, _args: tuple, output: tuple) -> None:
        captured.weights.append(output[1])

    module.config = eager_config
    hook = module.register_forward_hook(keep)
    try:
        yield captured
    finally:
        hook.remove()
        module.config = shared_config


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, T, T) causal mask: the eager kernel, unlike SDPA, applies no causality of its own."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]
