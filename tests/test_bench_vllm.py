"""benchmarks/bench_vllm.py without vLLM: arguments, the comparison's arithmetic and the table (fast).

The benchmark against real servers runs in tests/test_vllm_plugin.py (slow, the vLLM venv).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_vllm


def _round(concurrency: int, size: tuple[int, int], rps: float, ttft: float, prompt_tokens: int) -> dict:
    return {"concurrency": concurrency, "image_size": list(size), "requests_per_s": rps, "ttft_median_s": ttft,
            "prompt_tokens": prompt_tokens}


def _report(rounds: dict[str, list[dict]]) -> dict:
    variants = {name: {"rounds": r, "vllm": "0.32.0+cpu"} for name, r in rounds.items()}
    return {
        "variants": variants, "comparison": bench_vllm.compare(variants),
        "environment": {"machine": "test CPU", "load_average_end": [1.5, 1.0, 1.0]},
        "settings": {"requests": 8, "max_tokens": 4, "repeats": 1},
    }


def test_compare_puts_each_ratio_beside_the_sequence_length_bound():
    report = _report({
        "none": [_round(1, (336, 336), 2.0, 0.40, 618), _round(4, (336, 336), 4.0, 0.80, 618)],
        "24→12": [_round(1, (336, 336), 3.0, 0.20, 186), _round(4, (336, 336), 8.0, 0.32, 186)],
    })
    first, second = report["comparison"]
    assert first["throughput_ratio"] == pytest.approx(1.5) and first["ttft_ratio"] == pytest.approx(2.0)
    assert second["throughput_ratio"] == pytest.approx(2.0) and second["ttft_ratio"] == pytest.approx(2.5)
    assert first["sequence_length_bound"] == pytest.approx(618 / 186)
    table = bench_vllm.markdown(report)
    assert "| 336×336 | 1 | 24→12 | 618 → 186 | 2.00 | 3.00 | 1.50 | 400 | 200 | 2.00 | 3.32 |" in table
    assert "| 336×336 | 4 | 24→12 | 618 → 186 | 4.00 | 8.00 | 2.00 | 800 | 320 | 2.50 | 3.32 |" in table


def test_every_compressed_variant_is_compared_with_none_for_every_image_size():
    """Anyres: two levels × two sizes → four rows, each against none's round of the same size."""
    sizes = [(400, 300), (1000, 1000)]
    report = _report({
        "none": [_round(1, sizes[0], 1.0, 1.0, 1400), _round(1, sizes[1], 0.5, 2.0, 2960)],
        "24→12": [_round(1, sizes[0], 2.0, 0.5, 380), _round(1, sizes[1], 1.5, 0.5, 776)],
        "24→8": [_round(1, sizes[0], 2.5, 0.4, 184), _round(1, sizes[1], 2.0, 0.4, 368)],
    })
    rows = {(r["variant"], tuple(r["image_size"])): r for r in report["comparison"]}
    assert len(rows) == 4
    assert rows[("24→8", sizes[1])]["sequence_length_bound"] == pytest.approx(2960 / 368)
    assert rows[("24→12", sizes[1])]["ttft_ratio"] == pytest.approx(4.0)
    assert rows[("24→12", sizes[0])]["throughput_ratio"] == pytest.approx(2.0)
    table = bench_vllm.markdown(report)
    assert table.count("\n| 400×300 |") == 2 and table.count("\n| 1000×1000 |") == 2
    assert table.index("| 400×300 |") < table.index("| 1000×1000 |")  # smaller images first


def test_repeats_give_the_median_of_paired_ratios_and_their_spread():
    """Three repeats of one cell: the ratio is the median of the three within-repeat ratios, not a ratio of medians."""
    none = [_round(1, (336, 336), 2.0, ttft, 618) for ttft in (0.40, 0.90, 0.50)]
    comp = [_round(1, (336, 336), 3.0, ttft, 186) for ttft in (0.20, 0.30, 0.50)]
    report = _report({"none": none, "24→12": comp})
    report["settings"]["repeats"] = 3
    (row,) = report["comparison"]
    assert row["repeats"] == 3
    assert row["ttft_ratio"] == pytest.approx(2.0)  # ratios 2.0, 3.0, 1.0
    assert row["ttft_ratio_range"] == pytest.approx([1.0, 3.0])
    assert row["ttft_median_s"] == {"none": pytest.approx(0.5), "compressed": pytest.approx(0.3)}
    assert "| 500 | 300 | 2.00 (1.00–3.00) | 3.32 |" in bench_vllm.markdown(report)


def test_rounds_must_pair_up():
    with pytest.raises(ValueError, match="must pair up"):
        bench_vllm.compare({"none": {"rounds": [_round(1, (336, 336), 1.0, 1.0, 10)]}, "24→12": {"rounds": []}})


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--requests", "0"], ["--max-tokens", "0"],
                                  ["--warmup", "-1"], ["--repeats", "0"]])
def test_bad_settings_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench_vllm.parse_args(argv)
    assert "must be at least" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--image-sizes", "400by300"], "'400by300' is not an image size"),
    (["--image-sizes", "0x300"], "'0x300': width and height must be at least 1"),
    (["--levels", "24"], "--levels 24: each a different compressed side from 1 to 23"),
    (["--levels", "12", "12"], "--levels 12 12: each a different"),
])
def test_bad_sizes_and_levels_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_vllm.parse_args(argv)
    assert message in capsys.readouterr().err


def test_image_sizes_default_to_the_presets():
    assert bench_vllm.parse_args([]).image_sizes == [(336, 336)]
    assert bench_vllm.parse_args(["--anyres"]).image_sizes == [(400, 300), (300, 700), (1000, 1000)]
    assert bench_vllm.parse_args(["--anyres", "--image-sizes", "20x20"]).image_sizes == [(20, 20)]


def test_one_model_without_the_other_is_refused(tmp_path):
    args = bench_vllm.parse_args(["--compressed", str(tmp_path)])
    with pytest.raises(SystemExit, match="both --compressed and --baseline"):
        bench_vllm.resolve_models(args, tmp_path)
    with pytest.raises(SystemExit, match="both --baseline-url and --compressed-url"):
        bench_vllm.given_urls(bench_vllm.parse_args(["--baseline-url", "http://127.0.0.1:1"]))


def _checkpoint(folder, **config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vision_config": {"image_size": 336, "patch_size": 14}, **config}))
    return str(folder)


def test_given_checkpoints_are_named_by_their_compressor(tmp_path):
    base = _checkpoint(tmp_path / "base", model_type="llava_next")
    c12 = _checkpoint(tmp_path / "c12", model_type="toconv_llava_next", compression_output_size=12)
    c8 = _checkpoint(tmp_path / "c8", model_type="toconv_llava_next", compression_output_size=8)
    models = bench_vllm.resolve_models(bench_vllm.parse_args(["--baseline", base, "--compressed", c12, c8]), tmp_path)
    assert {name: path.name for name, path in models.items()} == {"none": "base", "24→12": "c12", "24→8": "c8"}
    # The same level twice, or an uncompressed checkpoint as --compressed, is a mistake in the command line.
    for compressed in ([c12, c12], [base]):
        with pytest.raises(SystemExit, match="give each compression level once"):
            bench_vllm.resolve_models(bench_vllm.parse_args(["--baseline", base, "--compressed", *compressed]), tmp_path)
    with pytest.raises(SystemExit, match="cannot read the checkpoint's config"):
        bench_vllm.resolve_models(bench_vllm.parse_args(["--baseline", base, "--compressed", str(tmp_path)]), tmp_path)
