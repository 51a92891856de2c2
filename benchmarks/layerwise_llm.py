"""A transformers Llama run layer by layer, so image tokens can be dropped between decoder layers.

FastV (arXiv:2403.06764) and PyramidDrop (arXiv:2410.17247) prune image tokens inside the LLM: the
first layers see all of them, later ones fewer. This runs ``LlamaForCausalLM``'s own decoder layers
in a loop with a ``DynamicCache`` kept per layer, so each layer's cache holds the tokens that layer
saw (decode then reads the larger early-layer caches, as these methods do), and kept tokens keep
their original positions (RoPE). Every method in the peer comparison runs through this same loop,
so the loop's overhead is shared alike.

SparseVLM (arXiv:2410.04417) drops the same way, ranking by the attention of its "rater" text tokens
instead of the last token's, and recycles part of what it drops as merged tokens
(``benchmarks/sparsevlm.py``).

How the ranking attention is obtained (``DropStage.ranking``), for the ranking rows (``DropStage.rows``:
the last token, or every text token after the image, the raters among them averaged):
- ``"eager"`` (FastV and SparseVLM as published): the layer before the drop runs with the eager
  kernel, which materialises the (B, heads, T, T) weights; the ranking rows are read from them.
- ``"query"`` (PyramidDrop's light-weight attention): the layer runs with its usual kernel (SDPA),
  then the ranking rows' queries are recomputed and multiplied with that layer's cached keys:
  (heads × rows × T) weights, softmaxed per row.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Literal

import torch
from torch import nn

from benchmarks.attention_weights import causal_mask, eager_attention
from benchmarks.peer_reducers import rest_indices, top_tokens
from benchmarks.sparsevlm import cluster_count, rater_scores, recycle, recycled_count, select_raters

Ranking = Literal["eager", "query"]
Rows = Literal["last", "raters"]


@dataclasses.dataclass(frozen=True)
class DropStage:
    """Before decoder layer ``layer`` (0-based), keep the ``keep`` image tokens the ranking ``rows`` attended to
    most in layer ``layer - 1``, the attention obtained by ``ranking``; with ``recycle``, SparseVLM's merged
    tokens of the best-rated dropped ones follow the kept ones."""

    layer: int
    keep: int
    ranking: Ranking
    rows: Rows = "last"
    recycle: bool = False

    def image_tokens_after(self, image_tokens: int) -> int:
        """How many image tokens the stage hands on from ``image_tokens``."""
        kept = min(self.keep, image_tokens)
        return kept + (cluster_count(recycled_count(image_tokens - kept)) if self.recycle else 0)


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
        text_len = length - image_start - image_len  # the text after the image: never dropped
        raters = None
        if any(s.rows == "raters" for s in stages):
            image_end = image_start + image_len
            raters = select_raters(embeds[:, image_start:image_end], embeds[:, image_end:])
        by_layer = {s.layer: s for s in stages}
        hidden, scores = embeds, None
        for index, layer in enumerate(self.layers):
            stage = by_layer.get(index)
            if stage is not None:
                hidden, positions, image_len = self._drop(hidden, positions, image_start, image_len, stage, scores)
            following = by_layer.get(index + 1)
            by_raters = following is not None and following.rows == "raters"
            hidden, weights = self._run_layer(index, layer, hidden, positions, cache, following,
                                              slice(image_start, image_start + image_len), text_len if by_raters else 1)
            if weights is not None:  # read by the drop before the next layer
                scores = rater_scores(weights, raters) if by_raters else weights[:, 0]
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
                   following: DropStage | None, image: slice, rows: int):
        """One decoder layer over ``hidden``; with a drop after it, the head-averaged attention of the last
        ``rows`` tokens to each image token (B, rows, image tokens)."""
        position_embeddings = self.model.rotary_emb(hidden, positions)
        kwargs = {"position_ids": positions, "use_cache": True, "position_embeddings": position_embeddings,
                  self.cache_arg: cache}
        if following is not None and following.ranking == "eager":
            mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
            with eager_attention(layer.self_attn) as captured:
                out = layer(hidden, attention_mask=mask, **kwargs)
            return out, captured.last[:, :, -rows:, image].float().mean(dim=1)
        out = layer(hidden, attention_mask=None, **kwargs)
        if following is None:
            return out, None
        return out, self._query_weights(index, layer, hidden[:, -rows:], position_embeddings, cache, image)

    def _query_weights(self, index: int, layer: nn.Module, row_inputs: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor], cache: Any, image: slice):
        """Softmaxed attention of the last rows' recomputed queries to this layer's cached keys (causal among
        those rows), head-averaged: (B, rows, image tokens)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn, rows = layer.self_attn, row_inputs.shape[1]
        query = attn.q_proj(layer.input_layernorm(row_inputs))  # (B, rows, heads * head_dim)
        query = query.view(query.shape[0], rows, -1, attn.head_dim).transpose(1, 2)  # (B, heads, rows, hd)
        cos, sin = (t[:, -rows:] for t in position_embeddings)
        query, _ = apply_rotary_pos_emb(query, query, cos, sin)
        keys = cache_keys(cache, index).repeat_interleave(attn.num_key_value_groups, dim=1)  # (B, heads, T, hd)
        logits = (query @ keys.transpose(2, 3)).float() * attn.scaling  # (B, heads, rows, T)
        length = keys.shape[2]
        future = torch.ones(rows, length, dtype=torch.bool, device=logits.device).triu(length - rows + 1)
        weights = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        return weights[..., image].mean(dim=1)

    @staticmethod
    def _drop(hidden: torch.Tensor, positions: torch.Tensor, image_start: int, image_len: int, stage: DropStage,
              scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The sequence after ``stage``'s drop (ranked by ``scores``, B × image tokens), its positions and image length."""
        keep = top_tokens(scores, min(stage.keep, image_len))  # indices among the image tokens
        extra = None
        if stage.recycle and keep.shape[1] < image_len:
            image = slice(image_start, image_start + image_len)
            merged, centres = recycle(hidden[:, image], scores, rest_indices(image_len, keep))
            extra = merged, positions[:, image].gather(1, centres)  # a merged token sits at its centre's position
        kept, kept_positions = LayerwiseLlama._keep(hidden, positions, image_start, image_len, keep + image_start, extra)
        return kept, kept_positions, kept.shape[1] - (hidden.shape[1] - image_len)

    @staticmethod
    def _keep(hidden: torch.Tensor, positions: torch.Tensor, image_start: int, image_len: int, keep: torch.Tensor,
              extra: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The sequence with only the ``keep`` image tokens (indices into it), text around them, positions kept;
        ``extra`` (tokens, positions) follow the kept image tokens."""
        batch, length, _ = hidden.shape
        text = torch.arange(length, device=hidden.device)
        text = text[(text < image_start) | (text >= image_start + image_len)].expand(batch, -1)
        rows = torch.cat([text[:, :image_start], keep, text[:, image_start:]], dim=1)  # (B, T')
        kept = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        kept_positions = positions.gather(1, rows)
        if extra is None:
            return kept, kept_positions
        cut = image_start + keep.shape[1]
        tokens, extra_positions = extra
        return (torch.cat([kept[:, :cut], tokens, kept[:, cut:]], dim=1),
                torch.cat([kept_positions[:, :cut], extra_positions, kept_positions[:, cut:]], dim=1))


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
    by_layer = {s.layer: s for s in stages}
    for index in range(num_layers):
        if index in by_layer:
            current = by_layer[index].image_tokens_after(current)
        counts.append(current)
    return sum(counts) / num_layers
