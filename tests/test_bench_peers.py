"""The peer comparison (--compare-peers): each reducer on inputs whose answer is known, the layer-by-layer
Llama against transformers' own forward, and the run at the test-sized preset (seconds)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_compression
from benchmarks.attention_weights import eager_attention
from benchmarks.layerwise_llm import DropStage, LayerwiseLlama, mean_image_tokens
from benchmarks.models import build_llm
from benchmarks.peer_reducers import (
    bilinear_pool,
    iqr_outliers,
    merge_neighbours,
    prumerge,
    prumerge_count,
    visionzip,
    visionzip_split,
)
from benchmarks.peers import BUDGETS, PEER_METHODS, Tiling, across_tiles, pyramiddrop_stages, unavailable
from benchmarks.peers_anyres import AnyresImage, image_tiling
from benchmarks.presets import LLAVA_16_PINPOINTS, MICRO_LLM, PRESETS
from benchmarks.sparsevlm import (
    budget_setting,
    cluster_count,
    density_peak_merge,
    rater_scores,
    recycle,
    recycled_count,
    select_raters,
)
from llava.mm_utils import get_anyres_image_grid_shape


def attention_with_top(n: int, top: list[int], batch: int = 2) -> torch.Tensor:
    """CLS attention (B, n): small distinct values, with the ``top`` tokens far above the rest."""
    scores = torch.linspace(0.1, 0.2, n).repeat(batch, 1)
    scores[:, top] = 10.0 + torch.arange(len(top), dtype=torch.float32)
    return scores


# ---------------------------------------------------------------- reducers outside the LLM


@pytest.mark.parametrize("budget", BUDGETS)
def test_visionzip_keeps_the_known_dominant_tokens_and_fills_the_budget(budget):
    dominant, contextual = visionzip_split(budget)
    assert dominant + contextual == budget and contextual > 0
    top = list(range(3, 576, 576 // dominant))[:dominant]
    features = torch.randn(2, 576, 8)
    out = visionzip(features, attention_with_top(576, top), budget)
    assert out.shape == (2, budget, 8)
    torch.testing.assert_close(out[:, :dominant], features[:, top])  # dominant tokens, in token order


def test_visionzip_contextual_tokens_are_the_means_of_their_groups():
    # The 522 non-dominant tokens come in 10 clusters (one direction each, in runs of 52, the last 54): the
    # targets are every 52nd of them, one in each cluster, so each contextual token is its cluster's mean.
    bounds = [52 * i for i in range(10)] + [522]
    cluster = torch.cat([torch.full((bounds[i + 1] - bounds[i],), i) for i in range(10)])
    rest = torch.eye(10, 16)[cluster] * torch.linspace(1, 2, 522).unsqueeze(1)
    features = torch.cat([torch.randn(54, 16), rest]).unsqueeze(0)
    out = visionzip(features, attention_with_top(576, list(range(54)), batch=1), 64)
    groups = [rest[bounds[i]:bounds[i + 1]] for i in range(10)]
    expected = torch.stack([g.mean(dim=0) for g in groups])
    torch.testing.assert_close(out[0, 54:], expected)


def test_prumerge_count_is_the_iqr_outliers_capped_at_the_budget():
    attention = attention_with_top(576, [5, 50, 500])
    assert iqr_outliers(attention).sum(dim=1).tolist() == [3, 3]
    assert prumerge_count(attention, 144) == 3 and prumerge_count(attention, 2) == 2
    features = torch.randn(2, 576, 8)
    assert prumerge(features, attention, 144).shape == (2, 3, 8)  # adaptive: not the budget
    assert prumerge(features, attention, 144, plus=True).shape == (2, 144, 8)  # PruMerge+ tops up to it
    assert prumerge(features, attention, 64, plus=True).shape == (2, 64, 8)


def test_prumerge_merge_is_the_attention_weighted_mean_of_the_nearest_tokens():
    features = torch.randn(1, 576, 8)
    attention = attention_with_top(576, [7], batch=1)
    kept = torch.tensor([[7]])
    torch.testing.assert_close(merge_neighbours(features, attention, kept, neighbours=1), features[:, [7]])
    near = F.normalize(features, dim=-1)[0] @ F.normalize(features[0, 7], dim=0)
    group = near.topk(4).indices
    weights = attention[0, group] / attention[0, group].sum()
    expected = (weights.unsqueeze(1) * features[0, group]).sum(dim=0)
    torch.testing.assert_close(merge_neighbours(features, attention, kept, neighbours=4)[0, 0], expected)


@pytest.mark.parametrize("budget", BUDGETS)
def test_bilinear_pool_resizes_the_grid(budget):
    features = torch.randn(2, 576, 8)
    grid = features.unflatten(1, (24, 24)).permute(0, 3, 1, 2)
    side = round(budget**0.5)
    expected = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(bilinear_pool(features, budget), expected)
    assert torch.allclose(bilinear_pool(torch.ones(1, 576, 4), budget), torch.ones(1, budget, 4))
    with pytest.raises(ValueError, match="square token budget.*120"):
        bilinear_pool(features, 120)


# ---------------------------------------------------------------- drops inside the LLM


@pytest.fixture(scope="module")
def llm():
    return build_llm({**MICRO_LLM, "num_hidden_layers": 4}, torch.device("cpu"), torch.float32)


def test_layerwise_llama_without_drops_is_transformers_forward(llm):
    embeds, token = torch.randn(2, 40, 64), torch.tensor([[5], [6]])
    decoder = LayerwiseLlama(llm)
    with torch.inference_mode():
        logits, state = decoder.prefill(embeds, 4, 30)
        full = llm(inputs_embeds=embeds, use_cache=True)
        torch.testing.assert_close(logits, full.logits[:, -1:], rtol=1e-4, atol=1e-5)
        step = decoder.step(token, state)
        cache_arg = decoder.cache_arg
        torch.testing.assert_close(step, llm(input_ids=token, **{cache_arg: full.past_key_values}).logits,
                                   rtol=1e-4, atol=1e-5)


def test_drops_keep_the_early_layers_cache_and_the_positions(llm):
    decoder = LayerwiseLlama(llm)
    with torch.inference_mode():
        _, fastv = decoder.prefill(torch.randn(1, 40, 64), 4, 30, (DropStage(2, 10, "eager"),))
        assert [layer.keys.shape[2] for layer in fastv.cache.layers] == [40, 40, 20, 20]
        assert fastv.next_position.item() == 40  # kept tokens keep their positions; the next one follows the full prompt
        decoder.step(torch.tensor([[3]]), fastv)
        assert [layer.keys.shape[2] for layer in fastv.cache.layers] == [41, 41, 21, 21]


def test_eager_and_last_query_rankings_keep_the_same_tokens(llm):
    """FastV's eager weights and PyramidDrop's recomputed last-query row are the same attention: same tokens kept."""
    decoder, embeds = LayerwiseLlama(llm), torch.randn(2, 40, 64)
    with torch.inference_mode():
        eager, a = decoder.prefill(embeds, 4, 30, (DropStage(2, 12, "eager"),))
        light, b = decoder.prefill(embeds, 4, 30, (DropStage(2, 12, "query"),))
    torch.testing.assert_close(eager, light, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.cache.layers[3].keys, b.cache.layers[3].keys, rtol=1e-4, atol=1e-5)


def test_keep_takes_the_known_top_image_tokens():
    hidden = torch.arange(10.0).view(1, 10, 1)
    positions = torch.arange(10).view(1, 10)
    kept, kept_positions = LayerwiseLlama._keep(hidden, positions, 2, 6, torch.tensor([[3, 6]]))
    assert kept.flatten().tolist() == [0, 1, 3, 6, 8, 9]  # text, the two image tokens, text
    assert kept_positions.tolist() == [[0, 1, 3, 6, 8, 9]]


def test_eager_attention_captures_one_module_and_restores_its_kernel(llm):
    attn = llm.model.layers[1].self_attn
    shared = attn.config
    with torch.inference_mode(), eager_attention(attn) as captured:
        llm(inputs_embeds=torch.randn(1, 12, 64))
    assert attn.config is shared and llm.model.layers[0].self_attn.config is shared
    assert len(captured.weights) == 1 and captured.last.shape == (1, 4, 12, 12)
    torch.testing.assert_close(captured.last.sum(dim=-1), torch.ones(1, 4, 12))


def test_pyramiddrop_default_schedule():
    stages = pyramiddrop_stages(576, 32)
    assert [(s.layer, s.keep) for s in stages] == [(8, 288), (16, 144), (24, 72)]
    assert mean_image_tokens(576, 32, stages) == 270
    assert mean_image_tokens(576, 4, (DropStage(2, 144, "eager"),)) == 360


# ---------------------------------------------------------------- SparseVLM


def test_sparsevlm_schedule_and_settings():
    """Its settings' keep counts plus one merged token per ten recycled (30% + 1 of the dropped, + 1)."""
    assert (recycled_count(510), cluster_count(154)) == (154, 16)  # 576 → 66 kept: 510 dropped
    assert (recycled_count(0), cluster_count(0)) == (0, 0)
    stages = {setting: tuple(DropStage(layer, keep, "eager", rows="raters", recycle=True)
                             for layer, keep in zip((3, 7, 16), keeps))
              for setting, keeps in {64: (66, 30, 17), 128: (303, 110, 36)}.items()}
    chain = []
    for stage in stages[64]:
        chain.append(stage.image_tokens_after(chain[-1] if chain else 576))
    assert chain == [82, 32, 18]
    # Over 32 layers: 3 × 576, 4 × 82, 9 × 32, 16 × 18, and for 128: 3 × 576, 4 × 312, 9 × 117, 16 × 39.
    assert mean_image_tokens(576, 32, stages[64]) == (3 * 576 + 4 * 82 + 9 * 32 + 16 * 18) / 32
    assert mean_image_tokens(576, 32, stages[128]) == (3 * 576 + 4 * 312 + 9 * 117 + 16 * 39) / 32
    assert [budget_setting(b) for b in (192, 144, 64, 63)] == [192, 128, 64, None]


def test_sparsevlm_runs_only_where_it_has_a_setting():
    assert unavailable("sparsevlm", 144, 32, anyres=False) is None
    assert unavailable("fastv", 144, 4, anyres=True) is None
    assert "4 layers, it needs 17" in unavailable("sparsevlm", 144, 4, anyres=False)
    assert "anyres" in unavailable("sparsevlm_sdpa", 744, 32, anyres=True)
    assert "no setting at or under 36" in unavailable("sparsevlm", 36, 32, anyres=False)


def test_raters_are_the_text_tokens_most_related_to_the_image():
    image = torch.zeros(2, 6, 4)
    image[..., 0] = 1.0  # every image token points along the first axis
    text = torch.zeros(2, 5, 4)
    text[:, [1, 3], 0] = 4.0  # tokens 1 and 3 align with the image, the others are orthogonal
    assert select_raters(image, text).tolist() == [[False, True, False, True, False]] * 2
    assert select_raters(image, text[:, :1]).tolist() == [[True]] * 2  # a one-token text still rates


def test_rater_scores_average_the_rater_rows():
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # (B=1, 3 text rows, 2 image tokens)
    torch.testing.assert_close(rater_scores(weights, torch.tensor([[True, True, False]])), torch.tensor([[0.5, 0.5]]))


def test_density_peak_merge_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = (5, 4, 6)
    points = torch.cat([c + 0.1 * torch.randn(n, 2, generator=gen) for c, n in zip(centres, sizes)])
    order = torch.randperm(points.shape[0], generator=gen)  # clusters interleaved in token order
    merged, chosen = density_peak_merge(points[order].unsqueeze(0), 3)
    means = torch.stack([points[sum(sizes[:i]):sum(sizes[:i + 1])].mean(dim=0) for i in range(3)])
    found = sorted(merged[0].tolist())
    torch.testing.assert_close(torch.tensor(found), torch.tensor(sorted(means.tolist())))
    blob = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))[order]
    assert sorted(blob[chosen[0]].tolist()) == [0, 1, 2]  # one centre in each cluster


def test_recycle_merges_the_best_rated_dropped_tokens():
    image = torch.arange(20.0).view(1, 20, 1).repeat(1, 1, 3)
    scores = torch.arange(20.0).view(1, 20)
    kept = torch.tensor([[17, 18, 19]])
    dropped = torch.arange(17).view(1, 17)  # 17 dropped → int(5.1) + 1 = 6 recycled (16 .. 11) → 1 merged token
    merged, centres = recycle(image, scores, dropped)
    assert merged.shape == (1, 1, 3) and kept.shape[1] + merged.shape[1] == 4
    torch.testing.assert_close(merged[0, 0], torch.full((3,), 13.5))  # the mean of tokens 11 .. 16
    assert 11 <= centres.item() <= 16


def test_sparsevlm_drop_keeps_merged_tokens_at_their_centres_positions(llm):
    decoder = LayerwiseLlama(llm)
    stage = DropStage(2, 10, "eager", rows="raters", recycle=True)  # 30 → 10 kept + 1 merged (20 dropped, 7 recycled)
    with torch.inference_mode():
        _, state = decoder.prefill(torch.randn(2, 40, 64), 4, 30, (stage,))
    assert [layer.keys.shape[2] for layer in state.cache.layers] == [40, 40, 21, 21]
    assert state.next_position.tolist() == [[40], [40]]


def test_sparsevlm_eager_and_query_rankings_keep_the_same_tokens(llm):
    """The raters' rows read from the eager weights and recomputed from the cached keys are the same attention."""
    decoder, embeds = LayerwiseLlama(llm), torch.randn(2, 40, 64)
    outputs = []
    with torch.inference_mode():
        for ranking in ("eager", "query"):
            outputs.append(decoder.prefill(embeds, 4, 30, (DropStage(2, 12, ranking, rows="raters", recycle=True),)))
    (eager, a), (light, b) = outputs
    torch.testing.assert_close(eager, light, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.cache.layers[3].keys, b.cache.layers[3].keys, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", ["last", "raters"])
def test_query_ranking_matches_eager_with_grouped_query_attention(rows):
    """With fewer KV heads than query heads (TinyLlama's layout) the recomputed rows still match eager."""
    llm = build_llm({**MICRO_LLM, "num_hidden_layers": 3, "num_key_value_heads": 2}, torch.device("cpu"), torch.float32)
    decoder, embeds = LayerwiseLlama(llm), torch.randn(2, 40, 64)
    with torch.inference_mode():
        (eager, a), (light, b) = (decoder.prefill(embeds, 4, 30, (DropStage(2, 12, ranking, rows=rows),))
                                  for ranking in ("eager", "query"))
    torch.testing.assert_close(eager, light, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.cache.layers[2].keys, b.cache.layers[2].keys, rtol=1e-4, atol=1e-5)


def test_keep_places_extra_tokens_after_the_kept_image_tokens():
    hidden = torch.arange(10.0).view(1, 10, 1)
    positions = torch.arange(10).view(1, 10)
    extra = torch.tensor([[[50.0]]]), torch.tensor([[5]])
    kept, kept_positions = LayerwiseLlama._keep(hidden, positions, 2, 6, torch.tensor([[3, 6]]), extra)
    assert kept.flatten().tolist() == [0, 1, 3, 6, 50, 8, 9]
    assert kept_positions.tolist() == [[0, 1, 3, 6, 5, 8, 9]]


# ---------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def peers_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    bench_compression.main(["--compare-peers", "--preset", "peers-micro", "--warmup", "0", "--repeats", "1",
                            "--json", str(out / "peers.json"), "--cache-dir", str(out / "cache")])
    return json.loads((out / "peers.json").read_text()), out


def test_json_has_one_row_per_method_and_budget(peers_report):
    report, out = peers_report
    rows = report["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 576)] + [
        (m, b) for b in BUDGETS for m in PEER_METHODS
    ]
    for r in rows:
        assert r["ttft_ms"]["median"] > 0 and r["kv_cache_bytes"] > 0 and r["peak_memory_bytes"] > 0, r["name"]
        if r["method"] in ("toconv", "bilinear", "visionzip", "prumerge_plus", "bound"):
            assert r["image_tokens_to_llm"] == r["budget"], r["name"]
    by = {(r["method"], r["budget"]): r for r in rows}
    for budget in BUDGETS:
        assert by[("toconv", budget)]["ttft_over_toconv"]["median"] == 1.0
        assert by[("bound", budget)]["ttft_over_bound"]["median"] == 1.0
        assert 1 <= by[("prumerge", budget)]["image_tokens_to_llm"] <= budget
        fastv = by[("fastv", budget)]
        assert fastv["image_tokens_to_llm"] == 576 and fastv["mean_image_tokens_per_layer"] == (576 * 2 + budget * 15) / 17
        # FastV's first two layers keep all 576 image tokens in their cache.
        assert fastv["kv_cache_bytes"] > by[("toconv", budget)]["kv_cache_bytes"]
        light = by[("fastv_sdpa", budget)]  # the same drop, ranked without the eager layer
        assert light["kv_cache_bytes"] == fastv["kv_cache_bytes"] and "eager" not in light["attention_kernels"]
        sparse, sparse_sdpa = by[("sparsevlm", budget)], by[("sparsevlm_sdpa", budget)]
        after = {144: (312, 117, 39), 64: (82, 32, 18)}[budget]  # its keep counts plus the recycled merged tokens
        assert sparse["published_setting"] == budget_setting(budget) and sparse["image_tokens_to_llm"] == 576
        assert sparse["mean_image_tokens_per_layer"] == (576 * 3 + after[0] * 4 + after[1] * 9 + after[2]) / 17
        assert [s["layer"] for s in sparse["drop_stages"]] == [3, 7, 16]
        assert sparse["kv_cache_bytes"] > by[("toconv", budget)]["kv_cache_bytes"]
        assert sparse_sdpa["kv_cache_bytes"] == sparse["kv_cache_bytes"] and "eager" not in sparse_sdpa["attention_kernels"]
        assert "raters" in sparse_sdpa["attention_kernels"]
    assert report["methods_not_run"] == {}
    none = by[("none", 576)]
    for r in rows:  # the cache holds what the schedule says each layer saw: KV bytes ∝ mean sequence per layer
        if r["method"] != "prumerge":
            ratio = r["kv_cache_bytes"] / none["kv_cache_bytes"]
            assert ratio == pytest.approx(r["mean_seq_len_per_layer"] / none["seq_len"]), r["name"]
    assert report["environment"]["load_average_start"] is not None
    table = (out / "peers.md").read_text()
    assert "| TTFT ÷ ToConv | TTFT ÷ bound |" in table and "Budget 64 image tokens" in table


def test_presets_without_room_for_the_drops_are_refused():
    assert PRESETS["micro"].llm["num_hidden_layers"] == 2
    with pytest.raises(SystemExit, match="fastv-144.*decoder layer 2.*2 layers"):
        bench_compression.main(["--compare-peers", "--preset", "micro"])
    assert PRESETS["anyres-micro"].llm["num_hidden_layers"] == 2
    with pytest.raises(SystemExit, match="fastv-.*decoder layer 2.*2 layers"):
        bench_compression.main(["--compare-peers", "--preset", "anyres-micro"])


# ---------------------------------------------------------------- LLaVA-1.6 (anyres) images

# (width, height) → image tokens of the fork's spatial_unpad layout at 24×24 (none), 12×12 and 8×8 per tile:
# the counts the fork's model, its vLLM model and transformers' processor give (tests/test_vllm_plugin.py).
ANYRES_COUNTS = {(400, 300): (1368, 348, 152), (300, 700): (1976, 508, 226), (1000, 1000): (2928, 744, 336),
                 (1008, 336): (2328, 588, 264)}


def standin_image(size: tuple[int, int]) -> AnyresImage:
    cols, rows = get_anyres_image_grid_shape(size, [list(p) for p in LLAVA_16_PINPOINTS], 336)
    return AnyresImage(size, (cols, rows), torch.zeros(1 + cols * rows, 3, 336, 336))


@pytest.mark.parametrize("size", list(ANYRES_COUNTS))
def test_anyres_layout_gives_the_forks_token_counts(size):
    image = standin_image(size)
    newline = torch.full((6,), -1.0)
    tiling = image_tiling(image, LLAVA_16_PINPOINTS, 336, newline)
    cols, rows = image.crop_grid
    for side, expected in zip((24, 12, 8), ANYRES_COUNTS[size]):
        assert tiling.image_tokens(side) == expected
        embeds = torch.rand(2 * tiling.tiles, side * side, 6)  # two images' tiles; newline is the only negative
        arranged = tiling.arrange(embeds)
        assert arranged.shape == (2, expected, 6)
        for b in range(2):
            tiles = embeds[b * tiling.tiles:(b + 1) * tiling.tiles]
            torch.testing.assert_close(arranged[b, :side * side], tiles[0])  # the base tile first
            newlines = (arranged[b] < 0).all(dim=-1).nonzero().flatten()
            height = len(newlines)  # one newline per row of the unpadded crops
            width = (expected - side * side) // height - 1
            assert height <= rows * side and width <= cols * side and height * (width + 1) == expected - side * side
            assert newlines.tolist() == [side * side + (i + 1) * (width + 1) - 1 for i in range(height)]


def test_across_tiles_reduces_every_tile_to_an_equal_share_and_cuts_to_the_budget():
    tiles, budget = 5, 744  # 1000×1000 at 24→12: a share of 149 per tile, 1 token cut from the last
    tiling = Tiling(tiles, arrange=lambda x: x, image_tokens=lambda side: 0)
    features = torch.arange(tiles, dtype=torch.float32).repeat(2).view(2 * tiles, 1, 1).expand(-1, 576, 4)
    out = across_tiles(lambda x, _a, share: x[:, :share], budget, tiling)(features, None)
    assert out.shape == (2, budget, 4)
    for b in range(2):
        assert torch.bincount(out[b, :, 0].long()).tolist() == [149, 149, 149, 149, 148]
    # VisionZip per tile keeps each tile's own dominant tokens: channel 0 = token index, channel 1 = tile
    top = [3, 100, 400]
    attention = attention_with_top(576, top, batch=2 * tiles)
    index = torch.arange(576, dtype=torch.float32).expand(2 * tiles, -1)
    tile = torch.arange(tiles, dtype=torch.float32).repeat(2)[:, None].expand(-1, 576)
    features = torch.stack([index, tile, torch.randn(2 * tiles, 576)], dim=-1)
    reduced = across_tiles(visionzip, 64 * tiles, tiling)(features, attention)
    assert reduced.shape == (2, 64 * tiles, 3)
    dominant, _ = visionzip_split(64)
    for b in range(2):
        for t in range(tiles):
            kept = reduced[b, t * 64:t * 64 + dominant]
            assert set(top) <= set(kept[:, 0].long().tolist()) and (kept[:, 1] == t).all()
    assert across_tiles(visionzip, 64, None)(features[:2], attention[:2]).shape == (2, 64, 3)


ANYRES_PEERS = [m for m in PEER_METHODS if not m.startswith("sparsevlm")]  # SparseVLM has no anyres settings


@pytest.mark.slow
def test_anyres_peers_run_every_method_at_toconvs_count_per_image(tmp_path):
    bench_compression.main(["--compare-peers", "--preset", "peers-anyres-micro", "--warmup", "0", "--repeats", "1",
                            "--json", str(tmp_path / "p.json"), "--cache-dir", str(tmp_path / "cache")])
    report = json.loads((tmp_path / "p.json").read_text())
    rows = report["rows"]
    sizes = [tuple(size) for size in PRESETS["peers-anyres-micro"].anyres.image_sizes]
    assert [(tuple(r["image_size"]), r["method"], r["budget"]) for r in rows] == [
        (size, m, b) for size in sizes for m, b in
        [("none", ANYRES_COUNTS[size][0])] + [(m, b) for b in ANYRES_COUNTS[size][1:] for m in ANYRES_PEERS]
    ]
    assert set(report["methods_not_run"]) == {"sparsevlm", "sparsevlm_sdpa"}
    assert "anyres" in report["methods_not_run"]["sparsevlm"]
    for r in rows:
        none = ANYRES_COUNTS[tuple(r["image_size"])][0]
        if r["method"] in ("none", "fastv", "fastv_sdpa", "pyramiddrop"):  # the uncompressed layout enters the LLM
            assert r["image_tokens_to_llm"] == none, r["name"]
        elif r["method"] == "prumerge":
            assert 1 <= r["image_tokens_to_llm"] <= r["budget"]
        else:
            assert r["image_tokens_to_llm"] == r["budget"], r["name"]
        assert r["tiles"] == {(400, 300): 3, (300, 700): 4, (1000, 1000): 5, (1008, 336): 4}[tuple(r["image_size"])]
        if r["method"] == "fastv":
            assert r["mean_image_tokens_per_layer"] == (none * 2 + r["budget"] * 2) / 4
            toconv = next(t for t in rows if t["image_size"] == r["image_size"] and t["name"] == f"toconv-{r['budget']}")
            assert r["kv_cache_bytes"] > toconv["kv_cache_bytes"]
            assert toconv["ttft_over_toconv"]["median"] == 1.0
    assert report["preset"]["anyres"]["merge_type"] == "spatial_unpad"
    table = (tmp_path / "p.md").read_text()
    assert "Batch 1, LLaVA-1.6 image 1000×1000 (5 tiles)" in table and "Budget 744 image tokens" in table
