"""The benchmark (benchmarks/bench_compression.py and its modules) at the test-sized preset (seconds)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_compression
from benchmarks.memory import expected_cache_bytes
from benchmarks.presets import PRESETS
from benchmarks.reducers import REDUCER_KINDS, build_reducer, build_variants

STAT_MEASURES = (
    "vision_tower_ms", "compressor_ms", "projector_ms", "prefill_ms", "first_token_sampling_ms", "ttft_ms",
    "decode_ms_per_token",
)
BYTE_MEASURES = ("kv_cache_bytes", "peak_memory_bytes")
VARIANTS_24 = [
    "none", "toconv-24to12", "window_mean-24to12", "conv-24to12", "toconv-24to8", "window_mean-24to8", "conv-24to8",
]


@pytest.fixture(scope="module")
def micro_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--preset", "micro", "--json", str(out / "micro.json"), "--cache-dir", str(out / "cache")]
    bench_compression.main(argv)
    return json.loads((out / "micro.json").read_text()), out


def _finite_positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_json_holds_every_measure_for_every_variant(micro_report):
    report, _ = micro_report
    (run,) = report["runs"]
    assert list(run["variants"]) == VARIANTS_24
    for name, r in run["variants"].items():
        for measure in STAT_MEASURES:
            stats = r[measure]
            assert stats["n"] == report["preset"]["repeats"] == len(stats["samples"]), (name, measure)
            if name == "none" and measure == "compressor_ms":
                assert stats["median"] == 0.0  # nothing to compress
                continue
            assert _finite_positive(stats["median"]) and stats["q1"] <= stats["median"] <= stats["q3"], (name, measure)
        for measure in BYTE_MEASURES:
            assert isinstance(r[measure], int) and r[measure] > 0, (name, measure)
        speedup = r["speedup"]
        assert all(_finite_positive(speedup[k]) for k in ("ttft", "prefill", "decode", "ideal_bound")), name
        assert speedup["ideal_bound"] == pytest.approx(run["variants"]["none"]["seq_len"] / r["seq_len"])


def test_token_counts_and_kv_cache_match_the_shapes(micro_report):
    report, _ = micro_report
    (run,) = report["runs"]
    prompt = report["preset"]["prompt_len"]
    expected_tokens = {"none": 576, "24to12": 144, "24to8": 64}
    for name, r in run["variants"].items():
        tokens = expected_tokens[name.split("-")[-1]]
        assert r["image_tokens"] == tokens and r["seq_len"] == prompt + tokens
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_expected"]
    none, toconv = run["variants"]["none"], run["variants"]["toconv-24to12"]
    assert none["kv_cache_bytes"] / toconv["kv_cache_bytes"] == pytest.approx(none["seq_len"] / toconv["seq_len"])
    assert (toconv["kernel"], toconv["stride"], toconv["padding"]) == (3, 2, 1)
    assert run["variants"]["conv-24to8"]["kernel"] == run["variants"]["toconv-24to8"]["kernel"] == 3


def test_environment_microbenchmark_and_outputs(micro_report):
    report, out = micro_report
    env = report["environment"]
    for key in ("device", "device_name", "torch", "transformers", "threads", "dtype"):
        assert env[key], key
    assert report["preset"]["name"] == "micro"
    assert report["command"].startswith("python benchmarks/bench_compression.py")
    micro = report["microbenchmark"]
    assert set(micro["compressors"]) == {"24to12", "24to8"}
    for c in micro["compressors"].values():
        assert all(_finite_positive(c[k]["median"]) for k in ("toconv_ms", "conv_ms", "window_mean_ms"))
        assert _finite_positive(c["toconv_over_conv"]) and _finite_positive(c["toconv_pct_of_vision_tower"])
        assert c["toconv_flops"] > 0 and 0 < c["toconv_flops_pct_of_vision_tower"] < 100
    select = micro["select_layer"]
    assert select["features_identical"] is True
    assert (select["layers_run"], select["layers_total"]) == (1, 2)
    assert 0 < select["selected_run_flops"] < select["full_run_flops"] and 0 < select["flops_saving"] < 1
    table = (out / "micro.md").read_text()
    assert env["device_name"] in table and report["command"] in table
    assert "| ToConv / Conv2d |" in table
    assert all(f"| {name} |" in table for name in VARIANTS_24)


def test_reducers_keep_the_compressor_geometry():
    import torch
    import torch.nn.functional as F

    x = torch.randn(2, 576, 8)
    window_mean = build_reducer("window_mean", 24, 12, 8)
    grid = x.unflatten(1, (24, 24)).permute(0, 3, 1, 2)
    expected = F.avg_pool2d(grid, 3, 2, 1, count_include_pad=False).flatten(2).transpose(1, 2)
    assert torch.equal(window_mean(x), expected)
    # The average-initialised ToConv compressor is exactly this window mean (partial-conv renormalisation).
    torch.testing.assert_close(build_reducer("toconv", 24, 12, 8)(x), expected)
    conv = build_reducer("conv", 16, 12, 8)
    assert (conv.conv.kernel_size, conv.conv.stride, conv.conv.padding) == ((5, 5), (1, 1), (0, 0))
    assert conv(torch.randn(1, 256, 8)).shape == (1, 144, 8)


def test_variant_names_of_the_old_avgpool_kind_are_refused_naming_the_new_one():
    import torch

    with pytest.raises(SystemExit, match=r"avgpool-24to12 is now window_mean-24to12"):
        build_variants(24, 8, torch.device("cpu"), torch.float32, ["avgpool-24to12"])


def test_plain_conv_baseline_matches_toconv_layout():
    """The Conv2d baseline reads the same tokens the same way as ToConv: only the renormalisation differs."""
    import torch

    x = torch.randn(2, 576, 8)
    toconv, conv = build_reducer("toconv", 24, 8, 8), build_reducer("conv", 24, 8, 8)
    # Both hold channels-last weights, matching the channels-last grid view both convolve (no per-call conversion).
    for reducer in (toconv, conv, conv.to(torch.float64)):
        assert reducer.conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv = conv.float()
    assert all(build_reducer(kind, 24, 12, 8)(x).shape == (2, 144, 8) for kind in REDUCER_KINDS)
    # 24→8 (k3 s3 p0) has no padding, so no window is renormalised: with ToConv's weights the plain conv
    # gives ToConv's output exactly.
    with torch.no_grad():
        conv.conv.weight.copy_(toconv.conv.weight)
        conv.conv.bias.copy_(toconv.conv.bias)
    assert conv.conv.weight.is_contiguous(memory_format=torch.channels_last)  # copy_ keeps the layout
    torch.testing.assert_close(conv(x), toconv(x), rtol=0, atol=0)


def test_7b_shapes_without_weights():
    """The 7B preset's KV cache and model sizes, from configs on the meta device (no memory, no GPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = PRESETS["llava-1.5-7b"]
    config = LlamaConfig(**preset.llm)
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    params = sum(p.numel() for p in llm.parameters())
    assert 6.6e9 < params < 6.9e9  # Vicuna-7B: 6.74 B
    # LLaVA-1.5 at batch 8 with a 64-token prompt: 640 vs 208 tokens of KV cache in float16.
    full = expected_cache_bytes(config, 8, 64 + 576, torch.float16)
    assert full == 2 * 32 * 8 * 32 * 640 * 128 * 2
    assert full / expected_cache_bytes(config, 8, 64 + 144, torch.float16) == pytest.approx(640 / 208)


def test_cuda_is_refused_cleanly_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_compression.main(["--preset", "micro", "--device", "cuda", "--no-microbenchmark"])


def test_224_tower_runs_16_to_12_and_16_to_8(tmp_path):
    import torch

    threads = torch.get_num_threads()
    report = bench_compression.main([
        "--preset", "micro", "--vision-tower", "openai/clip-vit-large-patch14", "--no-microbenchmark",
        "--repeats", "1", "--warmup", "0", "--variants", "toconv-16to12", "window_mean-16to8",
        "--cache-dir", str(tmp_path / "cache"),
    ])
    variants = report["runs"][0]["variants"]
    assert list(variants) == ["none", "toconv-16to12", "window_mean-16to8"]
    assert [v["image_tokens"] for v in variants.values()] == [256, 144, 64]
    assert report["environment"]["threads"] == 1 and torch.get_num_threads() == threads  # the preset's, then restored


def test_half_precision_plumbing(tmp_path):
    """The GPU presets run in float16: every piece casts alike and the KV cache is counted at 2 bytes."""
    report = bench_compression.main([
        "--preset", "micro", "--dtype", "bfloat16", "--no-microbenchmark", "--repeats", "1", "--warmup", "0",
        "--variants", "toconv-24to12", "--cache-dir", str(tmp_path / "cache"),
    ])
    assert report["environment"]["dtype"] == "bfloat16"
    for r in report["runs"][0]["variants"].values():
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_expected"]
        assert r["kv_cache_bytes"] == 2 * 2 * 4 * r["seq_len"] * 16 * 2  # K+V, 2 layers, 4 heads, head dim 16, bf16


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["benchmarks/bench_compression.py"], ["-m", "benchmarks.bench_compression"]],
                         ids=["script", "module"])
def test_runs_as_a_script_and_as_a_module_from_any_directory(entry, tmp_path):
    """Both documented command lines work outside the repository root too (benchmarks is installed)."""
    repo = Path(__file__).resolve().parents[1]
    if entry[0].endswith(".py"):
        entry = [str(repo / entry[0])]
    argv = ["--preset", "micro", "--no-microbenchmark", "--repeats", "1", "--warmup", "0",
            "--variants", "window_mean-24to8", "--json", "out.json", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run([sys.executable, *entry, *argv], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert list(report["runs"][0]["variants"]) == ["none", "window_mean-24to8"]
    assert (tmp_path / "out.md").read_text() in result.stdout  # the markdown written is the one printed


def test_image_sizes_replace_an_anyres_presets_and_are_ignored_with_a_warning_elsewhere(caplog):
    args = bench_compression.parse_args(["--preset", "anyres-tiny", "--image-sizes", "1000x1000", "20x30"])
    preset = bench_compression.resolve_preset(args)
    assert preset.anyres.image_sizes == ((1000, 1000), (20, 30))
    assert preset.llm == PRESETS["anyres-tiny"].llm and PRESETS["anyres-tiny"].anyres.image_sizes != preset.anyres.image_sizes
    assert bench_compression.resolve_preset(bench_compression.parse_args(["--preset", "anyres-tiny"])) is PRESETS["anyres-tiny"]
    with caplog.at_level("WARNING"):
        plain = bench_compression.resolve_preset(bench_compression.parse_args(["--preset", "tiny", "--image-sizes", "400x300"]))
    assert plain is PRESETS["tiny"] and "--image-sizes applies to the anyres presets" in caplog.text


@pytest.mark.parametrize("size", ["400", "0x300", "axb", "100000x100000"])
def test_bad_image_sizes_are_refused_by_name(size, capsys):
    with pytest.raises(SystemExit):
        bench_compression.parse_args(["--preset", "anyres-tiny", "--image-sizes", size])
    assert repr(size) in capsys.readouterr().err


def test_gpu_script_refuses_a_machine_without_cuda_before_running_anything(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_benchmarks.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "No CUDA device" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []
