"""Vision tower → reducer → projector → LLM, run end to end or timed stage by stage."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from benchmarks.memory import cache_bytes
from benchmarks.reducers import Variant
from benchmarks.timing import StageClock
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower


class Pipeline:
    """Vision tower → reducer → projector → LLM, with the LLM's calling convention resolved once."""

    def __init__(self, tower: CLIPVisionTower, projector: nn.Module, llm: nn.Module, device: torch.device) -> None:
        self.tower, self.projector, self.llm, self.device = tower, projector, llm, device
        params = inspect.signature(llm.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.keep_arg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.embed = llm.get_input_embeddings()

    def prefill(self, prefix_ids: torch.Tensor, image_embeds: torch.Tensor, suffix_ids: torch.Tensor):
        """One LLM forward over [prefix, image, suffix] filling the KV cache; logits of the last position."""
        embeds = torch.cat([self.embed(prefix_ids), image_embeds, self.embed(suffix_ids)], dim=1)  # (B, T, D)
        kwargs = {self.keep_arg: 1} if self.keep_arg else {}
        return self.llm(inputs_embeds=embeds, use_cache=True, **kwargs)

    def step(self, token: torch.Tensor, cache: Any):
        return self.llm(input_ids=token, use_cache=True, **{self.cache_arg: cache})

    @staticmethod
    def cache_of(output: Any) -> Any:
        cache = getattr(output, "cache", None)
        return cache if cache is not None else output.past_key_values

    @staticmethod
    def sample(output: Any) -> torch.Tensor:
        """Greedy next token (B, 1)."""
        return output.logits[:, -1].argmax(dim=-1, keepdim=True)

    def reduce(self, variant: Variant, features: torch.Tensor) -> torch.Tensor:
        return features if variant.reducer is None else variant.reducer(features)

    def first_token(self, variant: Variant, images, prefix_ids, suffix_ids) -> tuple[torch.Tensor, Any]:
        """Images and prompt to the first generated token, no synchronisation in between (TTFT)."""
        features = self.tower(images)
        out = self.prefill(prefix_ids, self.projector(self.reduce(variant, features)), suffix_ids)
        return self.sample(out), self.cache_of(out)

    def decode(self, token: torch.Tensor, cache: Any, steps: int) -> torch.Tensor:
        for _ in range(steps):
            token = self.sample(self.step(token, cache))
        return token

    def generate(self, variant: Variant, images, prefix_ids, suffix_ids, steps: int) -> torch.Tensor:
        token, cache = self.first_token(variant, images, prefix_ids, suffix_ids)
        return self.decode(token, cache, steps)

    def staged(self, variant: Variant, images, prefix_ids, suffix_ids, steps: int) -> tuple[dict[str, float], int]:
        """One generation timed stage by stage (synchronised between stages): seconds per stage, KV-cache bytes."""
        clock = StageClock(self.device)
        features = self.tower(images)
        clock.mark("vision_tower")
        tokens = self.reduce(variant, features)
        clock.mark("compressor")
        image_embeds = self.projector(tokens)
        clock.mark("projector")
        out = self.prefill(prefix_ids, image_embeds, suffix_ids)
        clock.mark("prefill")
        token = self.sample(out)
        clock.mark("first_token_sampling")
        cache = self.cache_of(out)
        kv_bytes = cache_bytes(cache)
        clock.restart()
        self.decode(token, cache, steps)
        clock.mark("decode")
        return clock.times, kv_bytes
