"""scripts/v1_5/eval/suite.sh: every benchmark × compression level through the eval scripts, then one summary.

The quick tests check the parts without a model: the bad inputs refused before anything runs (no
script starts, so no model loads), which benchmarks run or are skipped for the data present, the
relative scores and the average row computed from the rows' own scores, and the score readers on
the scorers' own printouts. The slow ones run ``suite.sh`` on tiny fixtures in each benchmark's real
layout (``llava.eval.sample_benchmarks``) with random-weight stand-ins on the CPU: the image tokens measured at
the LLM's input (576 / 144 / 64; LLaVA-1.6 anyres per image size), a second run that answers nothing,
and a benchmark with broken data that fails alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from llava.eval import eval_gqa, eval_mme, eval_pope, eval_science_qa, suite
from llava.eval.convert_seed_for_submission import SeedScores, Tally, print_scores
from llava.eval.sample_benchmarks import (
    PopeItem,
    SQAProblem,
    TextVQAItem,
    gqa_question,
    save_images_as,
    write_gqa_questions,
    write_llava_gqa,
    write_mmvet,
    write_pope,
    write_scienceqa,
    write_textvqa,
)
from llava.eval.suite_benchmarks import BENCHMARKS, ScoreNotFoundError
from llava.eval.suite_report import add_relative_scores, average_row, markdown
from llava.standins import make_images
from test_eval_scripts import EVAL, SCRIPTS, printed, read_jsonl, script_env

SUITE = SCRIPTS / "suite.sh"
NEW_TOKENS = "--max_new_tokens 3"


def suite_env(tmp_path: Path, model_path: Path | str, **variables: str) -> dict[str, str]:
    """The environment of a suite run on the CPU (the eval scripts' test environment, plus the suite's)."""
    env = script_env(tmp_path, None, NEW_TOKENS, **variables)
    env["MODEL_PATH"] = str(model_path)
    env.pop("LEVELS", None)
    env.pop("BENCHMARKS", None)
    env.update(variables)
    return env


def run_suite(tmp_path: Path, model_path: Path, returncode: int = 0, **variables: str) -> dict:
    """``bash suite.sh`` in ``tmp_path``; the summary it wrote."""
    done = subprocess.run(["bash", str(SUITE)], cwd=tmp_path, env=suite_env(tmp_path, model_path, **variables),
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == returncode, f"suite.sh exited with {done.returncode}\n{done.stderr[-6000:]}"
    ckpt = variables.get("CKPT", model_path.name)
    eval_dir = Path(variables.get("EVAL_DIR", tmp_path / EVAL))
    return json.loads((eval_dir / "suite" / ckpt / "summary.json").read_text())


# ---------------------------------------------------------------- bad input, before anything runs


@pytest.fixture
def no_runs(monkeypatch):
    """Fails the test if the suite starts any eval script (each would load a model)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an eval script ran")

    monkeypatch.setattr(suite, "run_script", refuse)


def pope_data(root: Path) -> None:
    images = write_pope(root, [PopeItem(split, f"COCO_val2014_00000000004{i}.jpg", "dog", label)
                               for i, (split, label) in enumerate([("adversarial", "yes"), ("popular", "no"),
                                                                   ("random", "yes")])])
    save_images_as(root / "val2014", images)


@pytest.mark.parametrize("variables, message", [
    ({"BENCHMARKS": "pope textvq"}, "BENCHMARKS has unknown benchmark(s) 'textvq': the eval scripts are vqav2, gqa"),
    ({"LEVELS": "none twelve"}, "LEVELS has 'twelve': a level is 'none' (no compression) or an output grid side"),
    ({"LEVELS": "none 0"}, "LEVELS has '0'"),
    ({"LEVELS": "none 30"}, "LEVELS: level=30 is out of range for a 24×24 input grid: use 1..23"),
    ({"LEVELS": "none 24"}, "use 1..23"),
    ({"MODEL_PATH": "/nowhere/llava-v1.5-7b"}, "Model path '/nowhere/llava-v1.5-7b' not found"),
    ({"BENCHMARKS": "pope mme"}, "whose data is not under EVAL_DIR"),
    ({"TOKEN_COMPRESSOR": "/nowhere/c.safetensors"}, "TOKEN_COMPRESSOR='/nowhere/c.safetensors' is not a file"),
])
def test_bad_input_is_refused_before_any_script_runs(variables, message, tmp_path, tiny_llava, no_runs, capsys):
    pope_data(tmp_path / "eval" / "pope")
    env = {"MODEL_PATH": str(tiny_llava), "EVAL_DIR": str(tmp_path / "eval"), **variables}

    assert suite.main([str(SCRIPTS)], env) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "eval" / "suite").exists()


def test_a_level_other_than_the_trained_one_is_refused(tmp_path, tiny_llava_compressed, no_runs, capsys):
    pope_data(tmp_path / "eval" / "pope")
    env = {"MODEL_PATH": str(tiny_llava_compressed), "EVAL_DIR": str(tmp_path / "eval"), "LEVELS": "none 12 8"}

    assert suite.main([str(SCRIPTS)], env) == 2
    err = capsys.readouterr().err
    assert "LEVELS has 8, but" in err and "was trained with compression to 12×12" in err
    assert not (tmp_path / "eval" / "suite").exists()


def test_a_compressor_for_another_level_is_refused(tmp_path, tiny_llava, tiny_tower_336, no_runs, capsys):
    from vision_token_compression import TokenCompressor, save_compressor

    compressor = save_compressor(TokenCompressor(24, 12, 32), tmp_path / "c12.safetensors",
                                 vision_tower=str(tiny_tower_336), select_layer=-2, select_feature="patch")
    pope_data(tmp_path / "eval" / "pope")
    env = {"MODEL_PATH": str(tiny_llava), "EVAL_DIR": str(tmp_path / "eval"), "TOKEN_COMPRESSOR": str(compressor)}

    assert suite.main([str(SCRIPTS)], env) == 2  # LEVELS "none 12 8": 8 does not fit a 24→12 compressor
    assert 'compresses 24×24 to 12×12' in capsys.readouterr().err


def test_answers_made_with_other_settings_are_not_resumed(tmp_path, tiny_llava, tiny_llava_compressed, no_runs,
                                                          capsys):
    pope_data(tmp_path / "eval" / "pope")
    record = tmp_path / "eval" / "suite" / "shared" / "settings.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"model_path": str(tiny_llava.resolve()), "model_base": None,
                                  "token_compressor": None, "conv_mode": "vicuna_v1", "eval_args": ""}))
    env = {"MODEL_PATH": str(tiny_llava_compressed), "EVAL_DIR": str(tmp_path / "eval"), "CKPT": "shared",
           "LEVELS": "none"}

    assert suite.main([str(SCRIPTS)], env) == 2
    err = capsys.readouterr().err
    assert "The answers under CKPT=shared were made with other settings (model_path" in err
    assert "set another CKPT" in err


def test_bad_input_through_suite_sh_exits_2(tmp_path):
    done = subprocess.run(["bash", str(SUITE)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=suite_env(tmp_path, tmp_path / "missing-ckpt", LEVELS="none 12 zero"))
    assert done.returncode == 2
    assert "error: LEVELS has 'zero'" in done.stderr
    assert "Loading LLaVA" not in done.stderr and not (tmp_path / "playground").exists()


# ---------------------------------------------------------------- which benchmarks run


def test_benchmarks_without_data_are_skipped_with_the_missing_path(tmp_path):
    eval_dir = tmp_path / "eval"
    pope_data(eval_dir / "pope")
    (eval_dir / "textvqa").mkdir(parents=True)  # a folder without its files is not data
    settings = suite.read_settings({"EVAL_DIR": str(eval_dir)}, SCRIPTS)

    chosen, skipped = suite.plan(settings)

    assert [b.name for b in chosen] == ["pope"]
    assert [s["benchmark"] for s in skipped] == [name for name in BENCHMARKS if name != "pope"]
    textvqa = next(s for s in skipped if s["benchmark"] == "textvqa")
    assert textvqa["missing"][0] == str(eval_dir / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl")


def test_levels_and_benchmarks_are_read_in_order_once():
    assert suite.parse_levels("none 12 08 12") == ["none", "12", "8"]
    assert suite.parse_benchmarks("pope, mme pope") == ["pope", "mme"]
    assert suite.parse_benchmarks("  ") is None


# ---------------------------------------------------------------- the summary's arithmetic


def test_relative_scores_and_the_average_come_from_the_rows_own_scores():
    rows = [
        {"benchmark": "pope", "title": "POPE", "level": "none", "score": 80.0, "status": "ok", "metric": "F1"},
        {"benchmark": "pope", "title": "POPE", "level": "12", "score": 76.0, "status": "ok", "metric": "F1"},
        {"benchmark": "mme", "title": "MME", "level": "none", "score": 1500.0, "status": "ok", "metric": "p"},
        {"benchmark": "mme", "title": "MME", "level": "12", "score": 1650.0, "status": "ok", "metric": "p"},
        {"benchmark": "gqa", "title": "GQA", "level": "none", "score": None, "status": "failed", "metric": "acc",
         "error": "gqa.sh exited with 1", "log": "x.log"},
        {"benchmark": "gqa", "title": "GQA", "level": "12", "score": 50.0, "status": "ok", "metric": "acc"},
        {"benchmark": "vizwiz", "title": "VizWiz", "level": "12", "score": None, "status": "ok", "metric": None,
         "submission": "vizwiz/answers_upload/x-toconv12.json"},
    ]
    add_relative_scores(rows)
    assert [row["relative"] for row in rows] == [100.0, 95.0, 100.0, 110.0, None, None, None]
    average = average_row(rows, ["none", "12"])
    assert average == {"none": {"relative": 100.0, "benchmarks": 2}, "12": {"relative": 102.5, "benchmarks": 2}}
    summary = {"ckpt": "c", "model_path": "m", "model_base": None, "compressor": "w", "commit": "abc",
               "levels": ["none", "12"], "eval_dir": "e", "rows": rows, "average": average,
               "skipped": [{"benchmark": "mme", "missing": ["e/MME/llava_mme.jsonl"]}]}
    text = markdown(summary)
    assert "| POPE | 12 | — | F1 | 76.00 | 95.0 |  |" in text
    assert "| GQA | none | — | acc | — | — | **failed**: gqa.sh exited with 1 (log: `x.log`) |" in text
    assert "submit `vizwiz/answers_upload/x-toconv12.json`" in text
    assert "| **average of relative scores** | 12 | | over 2 benchmark(s) | | 102.5 | |" in text


def test_the_probe_counts_what_the_decoder_received_per_row_and_flags_cut_prompts():
    import torch

    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.eval.image_tokens import ImageTokenProbe, image_counts, summarise

    class Decoder(torch.nn.Module):
        def forward(self, inputs_embeds=None, attention_mask=None):
            return inputs_embeds

    decoder = Decoder()
    probe = ImageTokenProbe(decoder, max_length=40)
    pad, img = 0, IMAGE_TOKEN_INDEX
    ids = torch.tensor([[pad, pad, 5, img, 6, 7], [5, 6, img, 7, img, 8], [pad, 5, 6, 7, 8, 9]])
    mask = (torch.arange(6)[None] >= torch.tensor([[2], [0], [1]])).long()
    probe.expect(ids, mask)
    # The decoder's first forward: rows of 3 + 30, 4 + 2 × 18 (= 40, the limit) and 5 text tokens, left-padded.
    lengths = torch.tensor([33, 40, 5])
    decoder(inputs_embeds=torch.zeros(3, 40, 2), attention_mask=(torch.arange(40)[None] >= 40 - lengths[:, None]).long())
    assert probe.take() == [30, 36, 0] and probe.truncated == [False, True, False]
    assert image_counts(ids) == [1, 2, 0]
    decoder(inputs_embeds=torch.zeros(3, 1, 2), attention_mask=None)  # a decoding step: not read
    with pytest.raises(RuntimeError, match="nothing was measured"):
        probe.take()
    summary = summarise([{"images": 1, "image_tokens": 30}, {"images": 2, "image_tokens": 36, "truncated": True},
                         {"images": 0, "image_tokens": 0}])
    assert summary.as_dict() == {"answers": 3, "images": 3, "mean": 22, "min": 18, "max": 30, "truncated": 1}
    probe.close()


# ---------------------------------------------------------------- reading the scorers' printouts


def test_pope_f1_is_the_mean_of_the_three_splits_as_eval_pope_prints_them():
    scores = {"adversarial": eval_pope.PopeScores(8, 2, 7, 3), "popular": eval_pope.PopeScores(9, 1, 9, 1),
              "random": eval_pope.PopeScores(10, 0, 10, 0)}
    lines = []
    for category, score in scores.items():
        _, text = printed(eval_pope.print_scores, score)
        lines.append(f"Category: {category}, # samples: 20\n{text}====================================\n")
    expected = 100 * sum(s.f1 for s in scores.values()) / 3
    assert BENCHMARKS["pope"].score("".join(lines)) == pytest.approx(expected)
    with pytest.raises(ScoreNotFoundError, match="no F1 score for split"):
        BENCHMARKS["pope"].score(lines[0])


def test_gqa_mme_and_seed_scores_are_read_from_their_printouts():
    _, gqa = printed(eval_gqa.print_scores, eval_gqa.GQAScores(binary=70.0, open=40.0, accuracy=55.25, distribution=1))
    assert BENCHMARKS["gqa"].score(gqa) == 55.25
    results = {"Perception": {"existence": eval_mme.SubtaskScore(4, 3, 2, 1)},
               "Cognition": {"code_reasoning": eval_mme.SubtaskScore(4, 4, 2, 2)}}
    _, mme = printed(eval_mme.print_report, results)
    assert BENCHMARKS["mme"].score(mme) == pytest.approx(eval_mme.total(results["Perception"]))
    seed = SeedScores(per_type={1: Tally(3, 4)}, per_data_type={"image": Tally(3, 4)}, overall=Tally(3, 5))
    _, text = printed(print_scores, seed, {1: "Scene Understanding"})
    assert BENCHMARKS["seed"].score(text) == 60.0
    with pytest.raises(ScoreNotFoundError, match="no 'Total accuracy' line"):
        BENCHMARKS["seed"].score("image accuracy: 75.00%\n")


# ---------------------------------------------------------------- end to end (stand-in models, CPU)


@pytest.mark.slow
def test_suite_three_levels_then_a_second_run_answers_nothing(tmp_path, tiny_llava):
    eval_dir = tmp_path / EVAL
    pope_data(eval_dir / "pope")
    sqa = eval_dir / "scienceqa"
    save_images_as(sqa / "images" / "test", write_scienceqa(sqa, [
        SQAProblem("5", ("red", "blue", "green"), 0, "Which color is the largest shape?"),
        SQAProblem("12", ("a magnet", "a plant"), 1, "Which is alive?", image=False),
        SQAProblem("27", ("circle", "square"), 1, "Which shape is missing?"),
    ]))

    summary = run_suite(tmp_path, tiny_llava, BENCHMARKS="pope sqa")

    rows = summary["rows"]
    assert [(r["benchmark"], r["level"]) for r in rows] == [(b, level) for b in ("pope", "sqa")
                                                            for level in ("none", "12", "8")]
    assert all(r["status"] == "ok" for r in rows) and summary["failed"] == []
    # Measured at the LLM's input: 576, 144, 64 per image; the text-only ScienceQA question has none.
    assert [r["image_tokens"]["mean"] for r in rows] == [576, 144, 64] * 2
    assert [r["image_tokens"]["images"] for r in rows] == [3] * 3 + [2] * 3
    # Each score is what the scorer gives on the answers the run wrote; relative is score / score at none.
    for row in rows:
        answers = tmp_path / row["answers"]  # as EVAL_DIR gives it: relative to where the suite ran
        if row["benchmark"] == "pope":
            scores, _ = printed(eval_pope.evaluate, str(eval_dir / "pope" / "coco"),
                                str(eval_dir / "pope" / "llava_pope_test.jsonl"), str(answers))
            assert row["score"] == pytest.approx(100 * sum(s.f1 for s in scores.values()) / 3)
        else:
            result, text = printed(eval_science_qa.main, [
                "--base-dir", str(sqa), "--result-file", str(answers), "--output-file", str(tmp_path / "o.json"),
                "--output-result", str(tmp_path / "r.json")])
            assert f"IMG-Accuracy: {row['score']:.2f}%" in text
    for benchmark in ("pope", "sqa"):
        none, *compressed = [r for r in rows if r["benchmark"] == benchmark]
        for row in [none, *compressed]:
            expected = 100 * row["score"] / none["score"] if none["score"] else None
            assert row["relative"] == (pytest.approx(expected) if expected is not None else None)
    assert set(summary["average"]) == {"none", "12", "8"}
    out = eval_dir / "suite" / tiny_llava.name
    table = (out / "summary.md").read_text()
    assert sum(line.startswith("| POPE |") or line.startswith("| ScienceQA-IMG |") for line in table.splitlines()) == 6
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["commit"] and summary["model_path"] == str(tiny_llava)

    answers_before = {r["answers"]: (tmp_path / r["answers"]).read_text() for r in rows}
    again = run_suite(tmp_path, tiny_llava, BENCHMARKS="pope sqa")

    logs = "".join((out / "logs" / f"{b}-{level}.stderr.txt").read_text() for b in ("pope", "sqa")
                   for level in ("none", "12", "8"))
    assert "Loading LLaVA" not in logs and logs.count("nothing to answer") == 6
    assert {r["answers"]: (tmp_path / r["answers"]).read_text() for r in rows} == answers_before
    assert [(r["score"], r["image_tokens"]) for r in again["rows"]] == [(r["score"], r["image_tokens"]) for r in rows]


@pytest.mark.slow
def test_a_benchmark_with_broken_data_fails_alone(tmp_path, tiny_llava):
    eval_dir = tmp_path / EVAL
    gqa = eval_dir / "gqa"
    questions = {f"20{i}": gqa_question("yes" if i % 2 else "red", "verify" if i % 2 else "query") for i in range(4)}
    write_gqa_questions(gqa / "data" / "testdev_balanced_questions.json", questions)
    save_images_as(gqa / "data" / "images", write_llava_gqa(gqa / "llava_gqa_testdev_balanced.jsonl", questions))
    textvqa = eval_dir / "textvqa"
    save_images_as(textvqa / "train_images", write_textvqa(textvqa, [
        TextVQAItem("0054c91397f2fe05", "what brand is the camera?", ("nikon",) * 10, ("nikon",))]))
    (textvqa / "TextVQA_0.5.1_val.json").write_text('{"data": [')  # cut off
    save_images_as(eval_dir / "mm-vet" / "images", write_mmvet(eval_dir / "mm-vet" / "llava-mm-vet.jsonl",
                                                              ["What is in the image?", "How many?"]))

    summary = run_suite(tmp_path, tiny_llava, returncode=1, LEVELS="none", CUDA_VISIBLE_DEVICES="0,1")

    by_name = {r["benchmark"]: r for r in summary["rows"]}
    assert list(by_name) == ["gqa", "textvqa", "mmvet"]  # the others have no data here
    assert summary["failed"] == ["textvqa@none"]
    assert by_name["textvqa"]["status"] == "failed" and "textvqa.sh exited with 1" in by_name["textvqa"]["error"]
    assert "TextVQA_0.5.1_val.json" in by_name["textvqa"]["error"]
    # GQA ran in two chunks; their image-token sidecars were merged like the answers.
    gqa_row = by_name["gqa"]
    assert gqa_row["status"] == "ok" and gqa_row["score"] is not None
    assert gqa_row["image_tokens"] == {"answers": 4, "images": 4, "mean": 576, "min": 576, "max": 576,
                                       "truncated": 0}
    merged = tmp_path / gqa_row["answers"]
    assert [a["question_id"] for a in read_jsonl(merged)] == [r["question_id"] for r in
                                                             read_jsonl(merged.with_suffix(".image_tokens.jsonl"))]
    mmvet = by_name["mmvet"]
    assert mmvet["score"] is None and (tmp_path / mmvet["submission"]).is_file()
    assert mmvet["submission"].endswith("mm-vet/results/llava-v1.5-tiny.json")
    assert {s["benchmark"] for s in summary["skipped"]} == set(BENCHMARKS) - {"gqa", "textvqa", "mmvet"}


# LLaVA-1.6 stand-in image sizes and their image tokens uncompressed and at 24→12 (test_llava16_anyres.TABLE);
# each prompt fits the stand-in's 2,048-token context.
ANYRES_SIZES = {(400, 300): (1368, 348), (300, 700): (1976, 508), (20, 20): (1176, 300)}


@pytest.mark.slow
def test_llava16_anyres_reports_the_measured_mean_per_image(tmp_path, tiny_tower_336):
    from llava.standins import LLAVA_16_PINPOINTS, build_tiny_llava

    model = build_tiny_llava(tmp_path / "ckpt" / "llava-v1.6-vicuna-tiny", tiny_tower_336, seed=4,
                             image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                             image_grid_pinpoints=LLAVA_16_PINPOINTS)
    root = tmp_path / EVAL / "mm-vet"
    names = write_mmvet(root / "llava-mm-vet.jsonl", ["What is this?"] * len(ANYRES_SIZES))
    images = make_images(len(ANYRES_SIZES), size=list(ANYRES_SIZES), seed=6)
    for name, image in zip(names, images):
        (root / "images").mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / name)

    summary = run_suite(tmp_path, model, LEVELS="none 12")

    for row, column in zip(summary["rows"], (0, 1)):
        counts = [tokens[column] for tokens in ANYRES_SIZES.values()]
        assert row["image_tokens"] == {"answers": 3, "images": 3, "mean": sum(counts) / 3, "min": min(counts),
                                       "max": max(counts), "truncated": 0}
        sidecar = read_jsonl((tmp_path / row["answers"]).with_suffix(".image_tokens.jsonl"))
        assert [r["image_tokens"] for r in sidecar] == counts
    assert "1506.7 (1176–1976)" in (tmp_path / EVAL / "suite" / model.name / "summary.md").read_text()
