"""ToConv and its peers at equal image-token budgets: the methods, and one pipeline that runs any of them.

Every method runs the same CLIP tower, ``mlp2x_gelu`` projector and Llama (through ``LayerwiseLlama``),
with the same stages as the main benchmark (``pipeline_measures.STAGES``) so its interleaved timing
(``time_rounds``) is reused; "compressor" is the reduction stage here. Methods outside the LLM reduce
between tower and projector; FastV and PyramidDrop reduce inside the prefill, so their reduction is
timed as part of the prefill. With LLaVA-1.6 (anyres) images each method gets a ``Tiling``: the tiles
go through the tower as one batch, and the budgets are ToConv's counts in the fork's layout
(``benchmarks/peers_anyres.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.attention_weights import eager_attention
from benchmarks.layerwise_llm import DropStage, LayerwiseLlama, check_stages, mean_image_tokens
from benchmarks.memory import cache_bytes
from benchmarks.peer_reducers import bilinear_pool, prumerge, visionzip
from benchmarks.presets import OUTPUT_GRIDS
from benchmarks.sparsevlm import DROP_AFTER_LAYERS, KEEP_COUNTS, MIN_LAYERS, budget_setting
from benchmarks.timing import StageClock
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from vision_token_compression import TokenCompressor

BUDGETS = tuple(side * side for side in OUTPUT_GRIDS)  # LLaVA-1.5: 144 and 64 image tokens
FASTV_K = 2  # FastV's default: all image tokens through the first 2 decoder layers
PDROP_RATIO = 0.5  # PyramidDrop's default λ: each stage keeps half the image tokens of the one before
PDROP_STAGES = 4  # ... over 4 equal stages of the decoder (drops after layers 8, 16, 24 of 32)
PEER_METHODS = (
    "toconv", "bilinear", "visionzip", "prumerge", "prumerge_plus", "fastv", "fastv_sdpa", "pyramiddrop",
    "sparsevlm", "sparsevlm_sdpa", "bound",
)

Reduce = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
Arrange = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How one LLaVA-1.6 (anyres) image reaches the LLM: as ``tiles`` tower inputs (base image, then crops).

    ``arrange``: (B·tiles, side², D) projected tile tokens → (B, n, D), the fork's ``spatial_unpad``
    layout (base tile, crops unpadded, a newline per row); ``image_tokens(side)``: that n.
    """

    tiles: int
    arrange: Arrange
    image_tokens: Callable[[int], int]


@dataclasses.dataclass
class PeerMethod:
    """One method at one budget: how it reduces, what it needs, and what it chose."""

    name: str
    method: str  # one of PEER_METHODS, or "none"
    budget: int  # image tokens the method is configured for (for none: the uncompressed count, 576 for one tile)
    reduce: Reduce | None = None  # between tower and projector; None: all tokens go on
    arrange: Arrange | None = None  # after the projector: anyres tiles laid out as the fork does; None: as they are
    cls_attention: bool = False  # needs the CLS attention of the selected CLIP layer (eager there)
    stages: tuple[DropStage, ...] = ()  # drops inside the LLM
    setting: int | None = None  # the published setting run at this budget (SparseVLM's 192/128/96/64)
    chosen_counts: list[int] = dataclasses.field(default_factory=list)  # image tokens handed to the LLM per call

    def describe(self, num_layers: int) -> dict[str, Any]:
        """What the method handed the LLM in its last run, and how (call after running it)."""
        handed = self.chosen_counts[-1]
        return {
            "method": self.method, "budget": self.budget, "image_tokens_to_llm": handed,
            "mean_image_tokens_per_layer": mean_image_tokens(handed, num_layers, self.stages),
            "image_token_counts_chosen": sorted(set(self.chosen_counts)),
            "drop_stages": [dataclasses.asdict(s) for s in self.stages], "published_setting": self.setting,
            "attention_kernels": kernels(self),
        }


def kernels(method: PeerMethod) -> str:
    """Which attention kernel each part runs with, where the method departs from SDPA everywhere."""
    parts = []
    if method.cls_attention:
        parts.append("eager in CLIP's selected layer (CLS attention weights)")
    rows = "the raters' queries" if any(s.rows == "raters" for s in method.stages) else "the last token's query"
    if any(s.ranking == "eager" for s in method.stages):
        parts.append("eager in the LLM layer before each drop (full attention weights)")
    if any(s.ranking == "query" for s in method.stages):
        parts.append(f"SDPA + {rows} × cached keys at each drop")
    return "; ".join(parts) or "SDPA everywhere"


def build_methods(grid: int, channels: int, num_layers: int, device: torch.device, dtype: torch.dtype,
                  output_grids: tuple[int, ...] = OUTPUT_GRIDS, tiling: Tiling | None = None) -> list[PeerMethod]:
    """No compression, then every method at ToConv's token count for each output grid (the reducers'
    weights random, as in the main benchmark). With ``tiling``, one anyres image's counts."""
    count = (lambda side: side * side) if tiling is None else tiling.image_tokens
    arrange = None if tiling is None else tiling.arrange
    methods = [PeerMethod("none", "none", count(grid), arrange=arrange)]
    for side in output_grids:
        methods += [peer_method(name, count(side), side, grid, channels, num_layers, device, dtype, tiling)
                    for name in PEER_METHODS if unavailable(name, count(side), num_layers, tiling is not None) is None]
    return methods


def unavailable(name: str, budget: int, num_layers: int, anyres: bool) -> str | None:
    """Why a method has no published setting for this LLM depth, image layout or budget; None if it runs."""
    if not name.startswith("sparsevlm"):
        return None
    if anyres:
        return "SparseVLM's released settings are for LLaVA-1.5's 576 image tokens; it has none for anyres images"
    if num_layers < MIN_LAYERS:
        return (f"SparseVLM drops after decoder layers {', '.join(map(str, DROP_AFTER_LAYERS))}: the preset's LLM has "
                f"{num_layers} layers, it needs {MIN_LAYERS} (use tiny-deep or llava-1.5-7b)")
    if budget_setting(budget) is None:
        return f"SparseVLM has no setting at or under {budget} image tokens (its smallest is {min(KEEP_COUNTS)})"
    return None


def peer_method(name: str, budget: int, side: int, grid: int, channels: int, num_layers: int,
                device: torch.device, dtype: torch.dtype, tiling: Tiling | None = None) -> PeerMethod:
    """One method at one budget: ``budget`` image tokens to the LLM, ToConv's count at ``grid``→``side``.

    With ``tiling`` (anyres), the grid methods (ToConv, bilinear) reduce every tile and keep the fork's
    layout; the selecting ones reduce every tile to an equal share, in one batched call, and hand on
    the first ``budget`` of the tiles' tokens (the share is rounded up: at most tiles - 1 are cut off).
    """
    label = f"{name}-{budget}"
    arrange = None if tiling is None else tiling.arrange
    if name == "toconv":
        compressor = TokenCompressor(grid, side, channels).to(device=device, dtype=dtype).eval()
        return PeerMethod(label, name, budget, reduce=lambda x, _a: compressor(x), arrange=arrange)
    if name == "bilinear":
        return PeerMethod(label, name, budget, reduce=lambda x, _a: bilinear_pool(x, side * side), arrange=arrange)
    if name == "visionzip":
        return PeerMethod(label, name, budget, reduce=across_tiles(visionzip, budget, tiling), cls_attention=True)
    if name in ("prumerge", "prumerge_plus"):
        plus = name == "prumerge_plus"
        select = across_tiles(lambda x, a, share: prumerge(x, a, share, plus), budget, tiling)
        return PeerMethod(label, name, budget, reduce=select, cls_attention=True)
    if name in ("fastv", "fastv_sdpa"):  # fastv_sdpa: the same selection with SDPA kept (the eager layer's cost)
        ranking = "eager" if name == "fastv" else "query"
        return PeerMethod(label, name, budget, stages=(DropStage(FASTV_K, budget, ranking),), arrange=arrange)
    if name == "pyramiddrop":
        full = grid * grid if tiling is None else tiling.image_tokens(grid)
        return PeerMethod(label, name, budget, stages=pyramiddrop_stages(full, num_layers), arrange=arrange)
    if name in ("sparsevlm", "sparsevlm_sdpa"):  # sparsevlm_sdpa: the same drops, ranked with SDPA kept
        return sparsevlm_method(label, name, budget)
    if name == "bound":  # the fixed-cost bound: the first `budget` tokens, chosen at no cost
        return PeerMethod(label, name, budget, reduce=across_tiles(lambda x, _a, share: x[:, :share], budget, tiling))
    raise ValueError(f"Unknown peer method {name!r}; choose from {PEER_METHODS}.")


def across_tiles(select: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor], budget: int,
                 tiling: Tiling | None) -> Reduce:
    """``select(features, cls_attention, count)`` at ``budget``; with ``tiling``, per tile at an equal share,
    the tiles' tokens then joined per image and cut to ``budget``: (B·tiles, N, C) → (B, ≤ budget, C)."""
    if tiling is None:
        return lambda x, a: select(x, a, budget)
    share = -(-budget // tiling.tiles)

    def reduce(x: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        out = select(x, a, share)
        return out.reshape(-1, tiling.tiles * out.shape[1], out.shape[2])[:, :budget]

    return reduce


def sparsevlm_method(label: str, name: str, budget: int) -> PeerMethod:
    """SparseVLM at the largest of its published settings within ``budget`` (144 → 128, 64 → 64)."""
    setting = budget_setting(budget)
    if setting is None:
        raise ValueError(f"{label}: SparseVLM has no setting at or under {budget} image tokens.")
    ranking = "eager" if name == "sparsevlm" else "query"
    stages = tuple(DropStage(layer + 1, keep, ranking, rows="raters", recycle=True)
                   for layer, keep in zip(DROP_AFTER_LAYERS, KEEP_COUNTS[setting]))
    return PeerMethod(label, name, budget, stages=stages, setting=setting)


def pyramiddrop_stages(image_tokens: int, num_layers: int, stages: int = PDROP_STAGES,
                       ratio: float = PDROP_RATIO) -> tuple[DropStage, ...]:
    """PyramidDrop's default schedule: equal stages, each keeping ``ratio`` of the image tokens before it.

    576 image tokens over 32 layers: 576 in layers 0–7, 288 in 8–15, 144 in 16–23, 72 in 24–31 (a
    mean of 270 per layer). The schedule does not depend on the budget.
    """
    return tuple(
        DropStage(num_layers * s // stages, round(image_tokens * ratio**s), "query") for s in range(1, stages)
    )


class PeerPipeline:
    """Vision tower → method's reduction → projector → layer-by-layer LLM, end to end or stage by stage.

    Has the interface ``pipeline_measures.time_rounds`` times (``staged``, ``first_token``, ``device``).
    """

    def __init__(self, tower: CLIPVisionTower, projector: nn.Module, llm: nn.Module, device: torch.device) -> None:
        self.tower, self.projector, self.llm, self.device = tower, projector, llm, device
        self.decoder = LayerwiseLlama(llm)
        self.embed = llm.get_input_embeddings()
        last_run = tower.select_layer % (tower.config.num_hidden_layers + 1) - 1  # the layer whose output is selected
        layers = next(m for name, m in tower.vision_tower.named_modules() if name.endswith("encoder.layers"))
        self.selected_attention = layers[last_run].self_attn

    def encode(self, method: PeerMethod, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch features (B, N, C) and, where the method needs it, the CLS attention to each patch (B, N)."""
        if not method.cls_attention:
            return self.tower(images), None
        with eager_attention(self.selected_attention) as captured:
            features = self.tower(images)
        return features, captured.last[:, :, 0, 1:].float().mean(dim=1)

    @staticmethod
    def reduce(method: PeerMethod, features: torch.Tensor, cls_attention: torch.Tensor | None) -> torch.Tensor:
        return features if method.reduce is None else method.reduce(features, cls_attention)

    def project(self, method: PeerMethod, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens into the LLM's space (and, for anyres, into the fork's layout); records how many the LLM gets."""
        embeds = self.projector(tokens)
        if method.arrange is not None:
            embeds = method.arrange(embeds)
        method.chosen_counts.append(embeds.shape[1])
        return embeds

    def prefill(self, method: PeerMethod, prefix_ids, image_embeds, suffix_ids):
        embeds = torch.cat([self.embed(prefix_ids), image_embeds, self.embed(suffix_ids)], dim=1)
        return self.decoder.prefill(embeds, prefix_ids.shape[1], image_embeds.shape[1], method.stages)

    @staticmethod
    def sample(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].argmax(dim=-1, keepdim=True)

    def first_token(self, method: PeerMethod, images, prefix_ids, suffix_ids):
        features, attention = self.encode(method, images)
        tokens = self.project(method, self.reduce(method, features, attention))
        logits, state = self.prefill(method, prefix_ids, tokens, suffix_ids)
        return self.sample(logits), state

    def decode(self, token: torch.Tensor, state, steps: int) -> torch.Tensor:
        for _ in range(steps):
            token = self.sample(self.decoder.step(token, state))
        return token

    def generate(self, method: PeerMethod, images, prefix_ids, suffix_ids, steps: int) -> torch.Tensor:
        token, state = self.first_token(method, images, prefix_ids, suffix_ids)
        return self.decode(token, state, steps)

    def staged(self, method: PeerMethod, images, prefix_ids, suffix_ids, steps: int) -> tuple[dict[str, float], int]:
        """One generation timed stage by stage (synchronised between stages): seconds per stage, KV-cache bytes."""
        clock = StageClock(self.device)
        features, attention = self.encode(method, images)
        clock.mark("vision_tower")
        tokens = self.reduce(method, features, attention)
        clock.mark("compressor")
        image_embeds = self.project(method, tokens)
        clock.mark("projector")
        logits, state = self.prefill(method, prefix_ids, image_embeds, suffix_ids)
        clock.mark("prefill")
        token = self.sample(logits)
        clock.mark("first_token_sampling")
        kv_bytes = cache_bytes(state.cache)
        clock.restart()
        self.decode(token, state, steps)
        clock.mark("decode")
        return clock.times, kv_bytes


def check_methods(methods: list[PeerMethod], num_layers: int) -> None:
    """Refuse drop schedules the LLM cannot run, before anything is timed."""
    for m in methods:
        check_stages(m.stages, num_layers, m.name)
