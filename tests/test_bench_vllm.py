"""benchmarks/bench_vllm.py without vLLM: arguments, the comparison's arithmetic and the table (fast).

The benchmark against real servers runs in tests/test_vllm_plugin.py (slow, the vLLM venv).
"""

from __future__ import annotations

import pytest

from benchmarks import bench_vllm


def _level(concurrency: int, rps: float, ttft: float, prompt_tokens: int) -> dict:
    return {"concurrency": concurrency, "requests_per_s": rps, "ttft_median_s": ttft, "prompt_tokens": prompt_tokens}


def _report(levels: dict[str, list[dict]]) -> dict:
    variants = {name: {"levels": lv, "vllm": "0.32.0+cpu"} for name, lv in levels.items()}
    return {
        "variants": variants, "comparison": bench_vllm.compare(variants), "environment": {"machine": "test CPU"},
        "settings": {"requests": 8, "max_tokens": 4, "image_size": 336},
    }


def test_compare_puts_each_ratio_beside_the_sequence_length_bound():
    report = _report({
        "baseline": [_level(1, 2.0, 0.40, 618), _level(4, 4.0, 0.80, 618)],
        "compressed": [_level(1, 3.0, 0.20, 186), _level(4, 8.0, 0.32, 186)],
    })
    first, second = report["comparison"]
    assert first["throughput_ratio"] == pytest.approx(1.5) and first["ttft_ratio"] == pytest.approx(2.0)
    assert second["throughput_ratio"] == pytest.approx(2.0) and second["ttft_ratio"] == pytest.approx(2.5)
    assert first["sequence_length_bound"] == pytest.approx(618 / 186)
    table = bench_vllm.markdown(report)
    assert "| 1 | 618 → 186 | 2.00 | 3.00 | 1.50 | 400 | 200 | 2.00 | 3.32 |" in table
    assert "| 4 | 618 → 186 | 4.00 | 8.00 | 2.00 | 800 | 320 | 2.50 | 3.32 |" in table


def test_levels_must_pair_up():
    with pytest.raises(ValueError):
        bench_vllm.compare({"baseline": {"levels": [_level(1, 1.0, 1.0, 10)]}, "compressed": {"levels": []}})


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--requests", "0"], ["--max-tokens", "0"],
                                  ["--warmup", "-1"]])
def test_bad_settings_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench_vllm.parse_args(argv)
    assert "must be at least" in capsys.readouterr().err


def test_one_model_without_the_other_is_refused(tmp_path):
    args = bench_vllm.parse_args(["--compressed", str(tmp_path)])
    with pytest.raises(SystemExit, match="both --compressed and --baseline"):
        bench_vllm.resolve_models(args, tmp_path)
