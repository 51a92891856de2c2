"""A transformers Llama run layer by layer, so image tokens can be dropped between decoder layers.

FastV (arXiv:2403.06764) and PyramidDrop (arXiv:2410.17247) prune image tokens inside the LLM: the
first layers see all of them, later ones fewer. This runs ``LlamaForCausalLM``'s own decoder layers
in a loop with a ``DynamicCache`` kept per layer, so each layer's cache holds the tokens that layer
saw (decode then reads the larger early-layer caches, as these methods do), and kept tokens keep
their original positions (RoPE). Every method in the peer comparison runs through this same loop,
so the loop's overhead is shared alike.

How the ranking attention is obtained:
- ``"eager"`` (FastV as published): the layer before the drop runs with the eager kernel, which
  materialises the (B, heads, T, T) weights; the row of the last token is read from them.
- ``"last_query"`` (PyramidDrop's light-weight attention): the layer runs with its usual kernel
  (SDPA), then the last token's query is recomputed and multiplied with that layer's cached keys:
  one (heads × T) row, softmaxed per head.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Literal

import torch
from torch import nn

from benchmarks.attention_weights import causal_mask, eager_attention
from benchmarks.peer_reducers import top_tokens

Ranking = Literal["eager", "last_query"]


@dataclasses.dataclass(frozen=True)
class DropStage:
    """Before decoder layer ``layer`` (0-based), keep the ``keep`` image tokens the last token attended to most
    in layer ``layer - 1``, the attention obtained by ``ranking``."""

    layer: int
    keep: int
    ranking: Ranking


@dataclasses.dataclass
class DecodeState:
    """What decoding needs after the prefill: the per-layer cache and the next token's position."""

    cache: Any
    next_position: torch.Tensor  # (B, 1)


class LayerwiseLlama:
    """Prefill with image tokens dropped between layers, then greedy decoding, on a ``LlamaForCausalLM``."""

    def __init__(self, llm: nn.Module) -> None:
        self.llm, self.model = llm, llm.model
        self.layers = list(self.model.layers)
        params = inspect.signature(self.layers[0].forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

    def prefill(self, embeds: torch.Tensor, image_start: int, image_len: int,
                stages: tuple[DropStage, ...] = ()) -> tuple[torch.Tensor, DecodeState]:
        """Logits of the last position (B, 1, V) and the decode state, dropping image tokens per ``stages``."""
        from transformers import DynamicCache

        batch, length, _ = embeds.shape
        cache = DynamicCache()
        positions = torch.arange(length, device=embeds.device).expand(batch, length)
        by_layer = {s.layer: s for s in stages}
        hidden, scores = embeds, None
        for index, layer in enumerate(self.layers):
            stage = by_layer.get(index)
            if stage is not None:
                keep = top_tokens(scores, min(stage.keep, image_len)) + image_start  # (B, keep)
                hidden, positions = self._keep(hidden, positions, image_start, image_len, keep)
                image_len = keep.shape[1]
            following = by_layer.get(index + 1)
            hidden, scores = self._run_layer(index, layer, hidden, positions, cache, following, image_start, image_len)
        logits = self.llm.lm_head(self.model.norm(hidden[:, -1:]))
        return logits, DecodeState(cache, positions[:, -1:] + 1)

    def step(self, token: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Logits (B, 1, V) for one new token; the state's cache and position advance."""
        hidden = self.model.embed_tokens(token)
        position_embeddings = self.model.rotary_emb(hidden, state.next_position)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=state.next_position, use_cache=True,
                           position_embeddings=position_embeddings, **{self.cache_arg: state.cache})
        state.next_position = state.next_position + 1
        return self.llm.lm_head(self.model.norm(hidden))

    def _run_layer(self, index: int, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, cache: Any,
                   following: DropStage | None, image_start: int, image_len: int):
        """One decoder layer over ``hidden``; with a drop after it, the last token's attention to each image token."""
        position_embeddings = self.model.rotary_emb(hidden, positions)
        kwargs = {"position_ids": positions, "use_cache": True, "position_embeddings": position_embeddings,
                  self.cache_arg: cache}
        image = slice(image_start, image_start + image_len)
        if following is not None and following.ranking == "eager":
            mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
            with eager_attention(layer.self_attn) as captured:
                out = layer(hidden, attention_mask=mask, **kwargs)
            return out, captured.last[:, :, -1, image].float().mean(dim=1)  # (B, image_len)
        out = layer(hidden, attention_mask=None, **kwargs)
        if following is None:
            return out, None
        return out, self._last_query_scores(index, layer, hidden[:, -1:], position_embeddings, cache, image)

    def _last_query_scores(self, index: int, layer: nn.Module, last_input: torch.Tensor,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor], cache: Any, image: slice):
        """Softmaxed attention of the last token's recomputed query to this layer's cached keys, mean over heads."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        query = attn.q_proj(layer.input_layernorm(last_input))  # (B, 1, heads * head_dim)
        query = query.view(query.shape[0], 1, -1, attn.head_dim).transpose(1, 2)  # (B, heads, 1, hd)
        cos, sin = (t[:, -1:] for t in position_embeddings)
        query, _ = apply_rotary_pos_emb(query, query, cos, sin)
        keys = cache_keys(cache, index).repeat_interleave(attn.num_key_value_groups, dim=1)  # (B, heads, T, hd)
        weights = torch.softmax((query @ keys.transpose(2, 3)).float() * attn.scaling, dim=-1)  # (B, heads, 1, T)
        return weights[:, :, 0, image].mean(dim=1)

    @staticmethod
    def _keep(hidden: torch.Tensor, positions: torch.Tensor, image_start: int, image_len: int, keep: torch.Tensor):
        """The sequence with only the ``keep`` image tokens (indices into it), text around them, positions kept."""
        batch, length, _ = hidden.shape
        text = torch.arange(length, device=hidden.device)
        text = text[(text < image_start) | (text >= image_start + image_len)].expand(batch, -1)
        rows = torch.cat([text[:, :image_start], keep, text[:, image_start:]], dim=1)  # (B, T')
        kept = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return kept, positions.gather(1, rows)


def cache_keys(cache: Any, index: int) -> torch.Tensor:
    """Keys (B, kv_heads, T, head_dim) of one layer of a transformers ``DynamicCache`` (5.x layers or 4.x lists)."""
    if hasattr(cache, "layers"):
        return cache.layers[index].keys
    return cache.key_cache[index]


def check_stages(stages: tuple[DropStage, ...], num_layers: int, name: str) -> None:
    """Refuse, before any work, drops an LLM of ``num_layers`` cannot run: each needs a layer before and after it."""
    for s in stages:
        if not 1 <= s.layer < num_layers:
            raise SystemExit(
                f"{name}: a token drop before decoder layer {s.layer} needs 1 <= layer < {num_layers} (the "
                f"preset's LLM has {num_layers} layers): use a preset with a deeper LLM."
            )


def mean_image_tokens(image_tokens: int, num_layers: int, stages: tuple[DropStage, ...]) -> float:
    """Image tokens per decoder layer, averaged over the layers (a drop schedule's effective budget)."""
    counts, current = [], image_tokens
    by_layer = {s.layer: s.keep for s in stages}
    for index in range(num_layers):
        current = min(current, by_layer.get(index, current))
        counts.append(current)
    return sum(counts) / num_layers
