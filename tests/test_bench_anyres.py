"""The anyres (LLaVA-1.6) benchmark presets: token counts are the fork's, one row per image size × level (seconds)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch

from benchmarks import bench_compression
from benchmarks.anyres import run_anyres
from benchmarks.memory import expected_cache_bytes
from benchmarks.presets import ANYRES_IMAGE_SIZES, LLAVA_16_PINPOINTS, PRESETS, RunSettings
from llava.mm_utils import select_best_resolution

LEVELS = ("none", "toconv-24to12", "toconv-24to8")
# Hand-computed (LLaVA-1.6 pinpoints, spatial_unpad): base tile + unpadded crop rows × (columns + 1 newline).
# 400×300 → 672×336 canvas (2×1 crops), 300×700 → 336×1008 (1×3), 1000×1000 → 672×672 (2×2), 1008×336 → itself (3×1).
EXPECTED_TOKENS = {
    (400, 300): {"none": 576 + 24 * 33, "toconv-24to12": 144 + 12 * 17, "toconv-24to8": 64 + 8 * 11},
    (300, 700): {"none": 576 + 56 * 25, "toconv-24to12": 144 + 28 * 13, "toconv-24to8": 64 + 18 * 9},
    (1000, 1000): {"none": 576 + 48 * 49, "toconv-24to12": 144 + 24 * 25, "toconv-24to8": 64 + 16 * 17},
    (1008, 336): {"none": 576 + 24 * 73, "toconv-24to12": 144 + 12 * 37, "toconv-24to8": 64 + 8 * 25},
}
EXPECTED_TILES = {(400, 300): 3, (300, 700): 4, (1000, 1000): 5, (1008, 336): 4}


def fork_arithmetic(size: tuple[int, int], side: int) -> int:
    """Tokens of one image: LLaVA-1.6's canvas choice and upstream's unpad rule, ``side``×``side`` tokens per tile."""
    width, height = size
    canvas_w, canvas_h = select_best_resolution(size, [list(p) for p in LLAVA_16_PINPOINTS])
    rows, cols = canvas_h // 336 * side, canvas_w // 336 * side
    if width / height > cols / rows:  # wider than the grid: padding above and below
        new = int(height * (cols / width))
        rows -= 2 * ((rows - new) // 2)
    else:  # padding left and right
        new = int(width * (rows / height))
        cols -= 2 * ((cols - new) // 2)
    return side * side + rows * (cols + 1)


@pytest.fixture(scope="module")
def anyres_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-anyres")
    report = bench_compression.main(
        ["--preset", "anyres-micro", "--json", str(out / "anyres.json"), "--cache-dir", str(out / "cache")]
    )
    return report, out


def test_hand_counts_are_the_fork_arithmetic_and_the_issue_numbers():
    for size, levels in EXPECTED_TOKENS.items():
        assert [fork_arithmetic(size, side) for side in (24, 12, 8)] == [levels[name] for name in LEVELS]
    # The issue's numbers: 24→12 per tile against no compression.
    assert [EXPECTED_TOKENS[s]["toconv-24to12"] for s in ANYRES_IMAGE_SIZES[:3]] == [348, 508, 744]
    assert [EXPECTED_TOKENS[s]["none"] for s in ANYRES_IMAGE_SIZES[:3]] == [1368, 1976, 2928]


def test_one_row_per_image_size_and_level_with_the_fork_token_counts(anyres_report):
    report, out = anyres_report
    rows = report["rows"]
    assert [(tuple(r["image_size"]), r["level"]) for r in rows] == [
        (size, level) for size in ANYRES_IMAGE_SIZES for level in LEVELS
    ]
    on_disk = json.loads((out / "anyres.json").read_text())
    assert len(on_disk["rows"]) == len(ANYRES_IMAGE_SIZES) * len(LEVELS)
    assert on_disk["preset"]["image_grid_pinpoints"] == [list(p) for p in LLAVA_16_PINPOINTS]
    assert on_disk["preset"]["mm_patch_merge_type"] == "spatial_unpad"
    prompt = report["preset"]["prompt_len"]
    for r in rows:
        size = tuple(r["image_size"])
        assert r["image_tokens"] == EXPECTED_TOKENS[size][r["level"]], (size, r["level"])
        assert r["tiles"] == EXPECTED_TILES[size]
        assert r["tokens_per_tile"] == {"none": 576, "toconv-24to12": 144, "toconv-24to8": 64}[r["level"]]
        assert r["seq_len"] == prompt + r["image_tokens"]
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_expected"] > 0


def test_every_stage_and_the_bound(anyres_report):
    report, out = anyres_report
    repeats = report["preset"]["repeats"]
    base = {tuple(r["image_size"]): r for r in report["rows"] if r["level"] == "none"}
    for r in report["rows"]:
        for stage in ("vision_tower", "compressor", "projector", "merge", "prefill", "first_token_sampling", "ttft"):
            stats = r[f"{stage}_ms"]
            assert stats["n"] == repeats == len(stats["samples"])
            if stage == "compressor" and r["level"] == "none":
                assert stats["median"] == 0.0
                continue
            assert math.isfinite(stats["median"]) and stats["median"] > 0, (r["level"], stage)
        stages = sum(r[f"{s}_ms"]["median"] for s in ("vision_tower", "projector", "prefill"))
        assert stages < r["ttft_ms"]["median"] * 1.5  # the stages are parts of TTFT
        b = base[tuple(r["image_size"])]
        assert r["speedup"]["ideal_bound"] == pytest.approx(b["seq_len"] / r["seq_len"])
        assert r["speedup"]["kv_cache_saving"] == pytest.approx(1 - r["seq_len"] / b["seq_len"])
    table = (out / "anyres.md").read_text()
    assert report["command"] in table and "| merge ms |" in table
    assert table.count("| toconv-24to12 |") == len(ANYRES_IMAGE_SIZES)
    assert "| 1000×1000 | 5 | toconv-24to12 | 744 |" in table


@pytest.mark.parametrize("argv, message", [
    (["--variants", "toconv-24to12"], "--variants does not apply"),
    (["--vision-tower", "openai/clip-vit-large-patch14"], "LLaVA-1.6's tower"),
])
def test_options_that_do_not_apply_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench_compression.main(["--preset", "anyres-micro", *argv])


def test_half_precision_plumbing(tmp_path):
    report = bench_compression.main([
        "--preset", "anyres-micro", "--dtype", "bfloat16", "--repeats", "1", "--warmup", "0",
        "--cache-dir", str(tmp_path / "cache"),
    ])
    assert report["environment"]["dtype"] == "bfloat16"
    for r in report["rows"]:
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_expected"] == 2 * 2 * 4 * r["seq_len"] * 16 * 2


def test_the_gpu_ttft_pass_runs_the_fork_forward(tmp_path, monkeypatch):
    """On a GPU TTFT is a pass of its own through the fork's forward (ids + images); run that branch here."""
    import benchmarks.anyres

    monkeypatch.setattr(benchmarks.anyres, "separate_ttft_pass", lambda device: True)
    calls = []
    first_token = benchmarks.anyres.first_token
    monkeypatch.setattr(benchmarks.anyres, "first_token", lambda *a: calls.append(1) or first_token(*a))
    report = bench_compression.main([
        "--preset", "anyres-micro", "--repeats", "1", "--warmup", "0", "--cache-dir", str(tmp_path / "cache"),
    ])
    assert len(calls) == len(report["rows"]) == len(ANYRES_IMAGE_SIZES) * len(LEVELS)
    assert all(r["ttft_ms"]["median"] > 0 for r in report["rows"])


def test_7b_anyres_shapes_without_weights():
    """The GPU preset's shapes: Vicuna-7B, LLaVA-1.6's pinpoints, KV cache of its longest sequence in float16."""
    from transformers import LlamaConfig

    preset = PRESETS["llava-v1.6-vicuna-7b"]
    assert preset.anyres.grid_pinpoints == LLAVA_16_PINPOINTS and preset.anyres.merge_type == "spatial_unpad"
    assert preset.clip_overrides == {} and preset.llm["hidden_size"] == 4096
    config = LlamaConfig(**preset.llm)
    longest = max(fork_arithmetic(size, 24) for size in preset.anyres.image_sizes) + preset.prompt_len
    assert longest == 2928 + 64 <= config.max_position_embeddings  # no truncation at tokenizer_model_max_length
    assert expected_cache_bytes(config, 1, longest, torch.float16) == 2 * 32 * 32 * longest * 128 * 2  # 1.46 GiB


@pytest.mark.slow
def test_7b_anyres_preset_at_real_widths_and_one_layer(tmp_path):
    """The GPU preset's code path on a CPU at its real widths (ViT-L 1024, Vicuna 4096), one LLM layer, one image."""
    base = PRESETS["llava-v1.6-vicuna-7b"]
    preset = dataclasses.replace(
        base, llm={**base.llm, "num_hidden_layers": 1}, clip_overrides={"num_hidden_layers": 2},
        anyres=dataclasses.replace(base.anyres, image_sizes=((400, 300),)),
    )
    args = argparse.Namespace(preset="llava-v1.6-vicuna-7b", vision_tower="openai/clip-vit-large-patch14-336",
                              variants=None, cache_dir=tmp_path / "cache", json=tmp_path / "7b.json", markdown=None)
    settings = RunSettings(batch_sizes=(1,), prompt_len=base.prompt_len, decode_tokens=1, warmup=0, repeats=1)
    report = run_anyres(args, [], preset, settings, torch.device("cpu"), torch.float32)
    assert [r["image_tokens"] for r in report["rows"]] == [1368, 348, 152]
    assert report["models"]["projector_bytes"] == 4 * (1024 * 4096 + 4096 + 4096 * 4096 + 4096)
