"""``python -m llava.eval.sample_benchmarks``: tiny benchmarks in the layout the eval scripts read.

Checked without a model: every benchmark of ``scripts/v1_5/eval`` finds all its data (the suite's
own ``missing`` check), every image a question names exists and opens, and each benchmark's
question file agrees with its annotations (gold answers score 100% with the project's scorers).
Writing over an existing benchmark folder is refused. About 10 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llava.eval import eval_gqa, eval_mmbench, eval_pope, eval_science_qa, sample_benchmarks
from llava.eval.convert_seed_for_submission import main as convert_seed
from llava.eval.sample_benchmarks import SAMPLES, answer, write_jsonl
from llava.eval.suite_benchmarks import BENCHMARKS


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    assert sample_benchmarks.main(["--eval-dir", str(root)]) == [root / folder for folder, _ in SAMPLES.values()]
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_eval_script_finds_its_data(eval_dir):
    assert set(SAMPLES) == set(BENCHMARKS)
    assert {name: benchmark.missing(eval_dir) for name, benchmark in BENCHMARKS.items()} == {
        name: [] for name in BENCHMARKS}


@pytest.mark.parametrize("questions, images", [
    ("vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015"),
    ("gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images"),
    ("vizwiz/llava_test.jsonl", "vizwiz/test"),
    ("textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images"),
    ("pope/llava_pope_test.jsonl", "pope/val2014"),
    ("MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version"),
    ("seed_bench/llava-seed-bench.jsonl", "seed_bench"),
    ("mm-vet/llava-mm-vet.jsonl", "mm-vet/images"),
    ("llava-bench-in-the-wild/questions.jsonl", "llava-bench-in-the-wild/images"),
])
def test_every_question_names_an_image_that_opens(eval_dir, questions, images):
    for line in lines(eval_dir / questions):
        with Image.open(eval_dir / images / line["image"]) as image:
            assert image.size == (64, 48)


def test_gold_answers_score_full_marks(eval_dir, tmp_path, capsys):
    pope = eval_dir / "pope"
    labels = {}
    for path in sorted((pope / "coco").iterdir()):
        labels[path.stem.removeprefix("coco_pope_")] = [line["label"] for line in lines(path)]
    pope_answers = [answer(q["question_id"], labels[q["category"]].pop(0).capitalize())
                    for q in lines(pope / "llava_pope_test.jsonl")]
    write_jsonl(tmp_path / "pope.jsonl", pope_answers)
    scores = eval_pope.evaluate(str(pope / "coco"), str(pope / "llava_pope_test.jsonl"), str(tmp_path / "pope.jsonl"))
    assert {split: s.accuracy for split, s in scores.items()} == {"adversarial": 1.0, "popular": 1.0, "random": 1.0}

    sqa = eval_dir / "scienceqa"
    problems = json.loads((sqa / "problems.json").read_text())
    write_jsonl(tmp_path / "sqa.jsonl", [answer(item["id"], "ABCDE"[problems[item["id"]]["answer"]])
                                         for item in json.loads((sqa / "llava_test_CQM-A.json").read_text())])
    assert eval_science_qa.evaluate(str(sqa), str(tmp_path / "sqa.jsonl"))[1]["acc"] == 100.0

    gqa = json.loads((eval_dir / "gqa" / "data" / "testdev_balanced_questions.json").read_text())
    (tmp_path / "pred.json").write_text(json.dumps([{"questionId": q["question_id"], "prediction": gqa[q["question_id"]]["answer"]}
                                                    for q in lines(eval_dir / "gqa" / "llava_gqa_testdev_balanced.jsonl")]))
    assert eval_gqa.score(*eval_gqa.load(str(eval_dir / "gqa" / "data" / "testdev_balanced_questions.json"),
                                         str(tmp_path / "pred.json"))).accuracy == 100.0

    for folder, tsv in (("mmbench", "mmbench_dev_20230712.tsv"), ("mmbench_cn", "mmbench_dev_cn_20231003.tsv")):
        gold = eval_mmbench.load_questions(str(eval_dir / folder / tsv))
        write_jsonl(tmp_path / f"{folder}.jsonl", [answer(int(index), q.answer) for index, q in gold.items()])
        assert eval_mmbench.evaluate(str(eval_dir / folder / tsv), str(tmp_path / f"{folder}.jsonl")).accuracy == 100.0

    seed = json.loads((eval_dir / "seed_bench" / "SEED-Bench.json").read_text())
    write_jsonl(tmp_path / "seed.jsonl", [answer(int(q["question_id"]), q["answer"]) for q in seed["questions"]])
    scores = convert_seed(["--annotation-file", str(eval_dir / "seed_bench" / "SEED-Bench.json"),
                           "--result-file", str(tmp_path / "seed.jsonl"),
                           "--result-upload-file", str(tmp_path / "upload.jsonl")])
    assert scores.overall.accuracy == 100.0 and set(scores.per_data_type) == {"image", "video"}


def test_existing_benchmark_folders_are_never_written_over(eval_dir, capsys):
    before = (eval_dir / "pope" / "llava_pope_test.jsonl").read_bytes()
    with pytest.raises(SystemExit):
        sample_benchmarks.main(["--eval-dir", str(eval_dir), "pope"])
    assert "already exist" in capsys.readouterr().err
    assert (eval_dir / "pope" / "llava_pope_test.jsonl").read_bytes() == before
    with pytest.raises(SystemExit):
        sample_benchmarks.main(["--eval-dir", str(eval_dir / "new"), "popee"])
    assert "unknown benchmark(s) ['popee']" in capsys.readouterr().err and not (eval_dir / "new").exists()
