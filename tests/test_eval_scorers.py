"""Benchmark scorers and converters (llava/eval, scripts/convert_*.py) on hand-made fixtures.

Every fixture is written in the benchmark's real file format by the writers of
``llava.eval.sample_benchmarks`` (shared with the end-to-end script tests). For each scorer the ground truth
scores 100% and a known mix scores the value worked out by hand in the test; converters must
produce upstream LLaVA's structure exactly. A few tests run upstream's command lines through a
subprocess from the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import (
    convert_answer_to_mme,
    convert_gqa_for_eval,
    convert_mmbench_for_submission,
    convert_mmvet_for_eval,
    convert_seed_for_submission,
    convert_vizwiz_for_submission,
    convert_vqav2_for_submission,
    eval_gqa,
    eval_mmbench,
    eval_mme,
    eval_pope,
    eval_science_qa,
    eval_textvqa,
)
from llava.eval.benchmark_io import BenchmarkInputError
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor, STVQAANLSEvaluator, TextVQAAccuracyEvaluator
from llava.eval.sample_benchmarks import (
    PopeItem,
    SeedQuestion,
    SQAProblem,
    TextVQAItem,
    answer,
    gqa_question,
    mme_questions,
    write_gqa_questions,
    write_json,
    write_jsonl,
    write_mmbench_tsv,
    write_mme,
    write_pope,
    write_scienceqa,
    write_seed_bench,
    write_textvqa,
    write_vizwiz,
    write_vqav2,
)

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- answer normalisation, VQA accuracy


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("dont", "don't"),  # contraction restored
        ("Two", "2"),  # number word to digit
        ("none", "0"),
        ("the dog", "dog"),  # articles dropped
        ("A cat.", "cat"),  # trailing period stripped
        ("yes.", "yes"),
        ("1,000", "1000"),  # commas go first: the number stays whole, no "1 000"
        ("3.5", "3.5"),  # a period before a digit stays
        ("hello-world", "hello world"),  # a mark with no space beside it becomes a space
        ("a - b", "b"),  # a mark beside a space is deleted ("a" is an article)
        ("(red)", "red"),
        ("man's hat", "man 's hat"),  # 's split off
        ("What?", "what"),
        ("Line\tbreak\nhere", "line break here"),
        ("." * 40, "." * 8),  # EvalAI deletes at most 32 periods (re.UNICODE passed as count)
    ],
)
def test_evalai_normalisation(raw, normalised):
    assert EvalAIAnswerProcessor()(raw) == normalised


@pytest.mark.parametrize(("agreeing", "expected"), [(1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(agreeing, expected):
    # k of 10 annotators gave the answer. Leaving out one of those k leaves k-1 matches, leaving out
    # one of the other 10-k leaves k; each subset is worth min(matches/3, 1). For k = 2:
    # (2 * 1/3 + 8 * 2/3) / 10 = 18/30 = 0.6; k = 1: 9 * 1/3 / 10 = 0.3; k = 3: (3 * 2/3 + 7) / 10 = 0.9.
    humans = ["cat"] * agreeing + ["dog"] * (10 - agreeing)
    score = TextVQAAccuracyEvaluator().eval_pred_list([{"pred_answer": "Cat.", "gt_answers": humans}])
    assert score == pytest.approx(expected)


def test_vqa_accuracy_needs_ten_answers():
    with pytest.raises(ValueError, match="10 human answers"):
        TextVQAAccuracyEvaluator().eval_pred_list([{"pred_answer": "a", "gt_answers": ["a"] * 3}])


def test_anls():
    # "kitten" vs "sitting": edit distance 3 over length 7 -> 1 - 3/7 = 0.571 (>= 0.5, kept);
    # "abc" vs "xyz": 1 - 3/3 = 0 -> 0.
    anls = STVQAANLSEvaluator()
    assert anls.get_anls("kitten", "sitting") == pytest.approx(4 / 7)
    assert anls.eval_pred_list([{"pred_answer": "abc", "gt_answers": ["xyz", "ABC "]}]) == 1.0
    assert anls.get_anls("abc", "xyz") == 0.0


# ---------------------------------------------------------------- TextVQA


def textvqa_fixture(tmp_path: Path):
    write_textvqa(tmp_path, [
        TextVQAItem("img1", "What brand is it?", ("nikon",) * 10),
        TextVQAItem("img2", "What number?", ("7",) * 2 + ("1",) * 8),
        TextVQAItem("img3", "What color?", ("red",) * 10),
    ])
    annotation_file = tmp_path / "TextVQA_0.5.1_val.json"
    # The three prompt layouts LLaVA writes.
    prompts = [
        "what brand is it?\nReference OCR token: nikon, d3\nAnswer the question using a single word or phrase.",
        "What number?\nAnswer the question using a single word or phrase.",
        "OCR tokens: red, car Question: What color? Short answer:",
    ]
    return annotation_file, prompts


def test_textvqa_ground_truth_and_known_mix(tmp_path, capsys):
    annotation_file, prompts = textvqa_fixture(tmp_path)
    perfect = write_jsonl(tmp_path / "answers" / "perfect.jsonl",
                          [answer("img1", "Nikon", prompts[0]), answer("img2", "1", prompts[1]),
                           answer("img3", "red", prompts[2])])
    # 1.0 (all 10 say nikon) + 0.6 (2 of 10 say seven) + 0 (blue) -> 1.6 / 3 = 53.33%
    mix = write_jsonl(tmp_path / "answers" / "mix.jsonl",
                      [answer("img1", "nikon.", prompts[0]), answer("img2", "seven", prompts[1]),
                       answer("img3", "blue", prompts[2])])
    accuracies = eval_textvqa.main(
        ["--annotation-file", str(annotation_file), "--result-dir", str(tmp_path / "answers")]
    )
    assert accuracies[str(perfect)] == pytest.approx(1.0)
    assert accuracies[str(mix)] == pytest.approx(1.6 / 3)
    out = capsys.readouterr().out
    assert "mix\nSamples: 3\nAccuracy: 53.33%\n" in out
    assert "perfect\nSamples: 3\nAccuracy: 100.00%\n" in out


def test_textvqa_cli_and_bad_lines(tmp_path):
    annotation_file, prompts = textvqa_fixture(tmp_path)
    result = write_jsonl(tmp_path / "a.jsonl", [answer("img2", "7", prompts[1])])
    done = run_cli("-m", "llava.eval.eval_textvqa", "--annotation-file", str(annotation_file),
                   "--result-file", str(result))
    assert done.returncode == 0, done.stderr
    assert "Samples: 1\nAccuracy: 60.00%" in done.stdout

    no_id = tmp_path / "no_id.jsonl"
    no_id.write_text(json.dumps(answer("img2", "7", prompts[1])) + "\n"
                     + json.dumps({"prompt": prompts[1], "text": "7"}) + "\n")
    with pytest.raises(BenchmarkInputError, match=r"no_id.jsonl' line 2 has no 'question_id'"):
        eval_textvqa.score_result_file(eval_textvqa.load_annotations(str(annotation_file)), str(no_id))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [answer("img9", "7", prompts[1])])
    with pytest.raises(BenchmarkInputError, match="no annotation with image_id 'img9'"):
        eval_textvqa.score_result_file(eval_textvqa.load_annotations(str(annotation_file)), str(unknown))


# ---------------------------------------------------------------- POPE


def pope_fixture(tmp_path: Path, adversarial_texts):
    # questions 0-7 adversarial (labels yes x4, no x4), 8-9 random (yes, no)
    write_pope(tmp_path, [PopeItem("adversarial", f"{i}.jpg", "dog", "yes" if i < 4 else "no") for i in range(8)]
               + [PopeItem("random", "r.jpg", "cat", label) for label in ("yes", "no")])
    question_file = tmp_path / "llava_pope_test.jsonl"
    answers = [answer(i, text) for i, text in enumerate(adversarial_texts)] + [answer(8, "Yes"), answer(9, "No")]
    result_file = write_jsonl(tmp_path / "answers.jsonl", answers[::-1])  # order does not matter
    return tmp_path / "coco", question_file, result_file


def test_pope_known_confusion_matrix(tmp_path, capsys):
    texts = [
        "Yes, there is a dog.", "Yes", "Yes.", "No, there is not.",  # labels yes: TP TP TP FN
        "Yes.", "No", "There is no dog.", "Not sure.",  # labels no: FP TN TN FP ("Not" is not "not")
    ]
    annotation_dir, question_file, result_file = pope_fixture(tmp_path, texts)
    scores = eval_pope.main(["--annotation-dir", str(annotation_dir), "--question-file", str(question_file),
                             "--result-file", str(result_file)])
    adversarial = scores["adversarial"]
    assert (adversarial.tp, adversarial.fp, adversarial.tn, adversarial.fn) == (3, 2, 2, 1)
    # accuracy (3+2)/8, precision 3/5, recall 3/4, F1 2*0.6*0.75/1.35 = 2/3, yes ratio 5/8
    assert adversarial.accuracy == pytest.approx(0.625)
    assert adversarial.precision == pytest.approx(0.6)
    assert adversarial.recall == pytest.approx(0.75)
    assert adversarial.f1 == pytest.approx(2 / 3)
    assert adversarial.yes_ratio == pytest.approx(0.625)
    assert scores["random"].accuracy == 1.0 and scores["random"].f1 == 1.0  # ground truth
    out = capsys.readouterr().out
    assert "Category: adversarial, # samples: 8\nTP\tFP\tTN\tFN\t\n3\t2\t2\t1\n" in out
    assert "0.667, 0.625, 0.600, 0.750, 0.625\n====================================" in out


def test_pope_upstream_command_line(tmp_path):
    annotation_dir, question_file, result_file = pope_fixture(tmp_path, ["Yes"] * 4 + ["No"] * 4)
    done = run_cli("llava/eval/eval_pope.py", "--annotation-dir", str(annotation_dir),
                   "--question-file", str(question_file), "--result-file", str(result_file))
    assert done.returncode == 0, done.stderr
    assert "Category: adversarial, # samples: 8" in done.stdout
    assert "1.000, 1.000, 1.000, 1.000, 0.500" in done.stdout


def test_pope_bad_inputs(tmp_path):
    annotation_dir, question_file, result_file = pope_fixture(tmp_path, ["Yes"] * 8)
    with open(result_file, "a") as f:
        f.write(json.dumps(answer(99, "Yes")) + "\n")
    with pytest.raises(BenchmarkInputError, match="questions not in the question file"):
        eval_pope.evaluate(str(annotation_dir), str(question_file), str(result_file))
    short = write_jsonl(tmp_path / "short.jsonl", [answer(0, "Yes"), answer(8, "Yes"), answer(9, "No")])
    with pytest.raises(BenchmarkInputError, match="1 answers .* but 8 labels"):
        eval_pope.evaluate(str(annotation_dir), str(question_file), str(short))
    done = run_cli("llava/eval/eval_pope.py", "--annotation-dir", str(annotation_dir),
                   "--question-file", str(tmp_path / "missing.jsonl"), "--result-file", str(result_file))
    assert done.returncode == 1
    assert "error: POPE question file" in done.stderr and "missing.jsonl" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- ScienceQA


def sqa_fixture(tmp_path: Path) -> Path:
    base = tmp_path / "scienceqa"
    write_scienceqa(base, [
        SQAProblem("1", ("x", "y", "z"), 0),
        SQAProblem("2", ("x", "y"), 1, image=False),
        SQAProblem("3", ("x", "y"), 1),
        SQAProblem("4", ("x", "y", "z", "w"), 3, image=False),
        SQAProblem("5", ("x", "y"), 0, split="val"),
    ])
    return base


def test_science_qa_ground_truth(tmp_path):
    base = sqa_fixture(tmp_path)
    result = write_jsonl(tmp_path / "a.jsonl", [answer("1", "A", "<image>\nQ"), answer("2", "B"),
                                                answer("3", "B"), answer("4", "D")])
    out = eval_science_qa.main(["--base-dir", str(base), "--result-file", str(result),
                                "--output-file", str(tmp_path / "o.json"), "--output-result", str(tmp_path / "r.json")])
    assert out["acc"] == 100.0 and out["count"] == 4


def test_science_qa_known_mix_and_outputs(tmp_path, capsys):
    base = sqa_fixture(tmp_path)
    result = write_jsonl(tmp_path / "a.jsonl", [
        answer("1", "A", "<image>\nWhich?"),  # right
        answer("2", "B. y"),  # "B. " prefix -> B, right
        answer("3", "The answer is C.", "<image>\nWhich?"),  # C but only 2 choices -> -1, wrong
        # problem 4 unanswered -> FAILED, wrong
    ])
    output_file, output_result = tmp_path / "out" / "o.json", tmp_path / "out" / "r.json"
    eval_science_qa.main(["--base-dir", str(base), "--result-file", str(result),
                          "--output-file", str(output_file), "--output-result", str(output_result)])
    # 2 of 4 right; of the 2 image problems (1 and 3), 1 right.
    assert capsys.readouterr().out == "Total: 4, Correct: 2, Accuracy: 50.00%, IMG-Accuracy: 50.00%\n"
    document = json.loads(output_result.read_text())
    assert list(document) == ["acc", "correct", "count", "results", "outputs"]
    assert (document["acc"], document["correct"], document["count"]) == (50.0, 2, 4)
    assert document["results"] == {"1": 0, "2": 1, "3": -1, "4": -1}
    assert document["outputs"] == {"1": "A", "2": "B. y", "3": "The answer is C.", "4": "FAILED"}
    outcome = json.loads(output_file.read_text())
    assert [e["question_id"] for e in outcome["correct"]] == ["1", "2"]
    assert outcome["incorrect"][0] == {"question_id": "3", "parsed_ans": "C", "ground_truth": "B",
                                       "question": "<image>\nWhich?", "pred": "The answer is C.", "is_multimodal": True}
    assert outcome["incorrect"][1]["parsed_ans"] == "FAILED" and outcome["incorrect"][1]["question"] == "Unknown"
    assert output_result.read_text().startswith('{\n  "acc": 50.0')  # indented as upstream


def test_science_qa_answer_outside_split(tmp_path):
    base = sqa_fixture(tmp_path)
    result = write_jsonl(tmp_path / "a.jsonl", [answer("5", "A")])
    with pytest.raises(BenchmarkInputError, match="not in split 'test'"):
        eval_science_qa.evaluate(str(base), str(result))


# ---------------------------------------------------------------- GQA


def gqa_questions():
    return {
        "q1": gqa_question("yes", "verify"),
        "q2": gqa_question("table", "query", "cat"),
        "q3": gqa_question("left", "choose", "rel"),
        "q4": gqa_question("red", "query", "attr", group="color"),
        "q5": gqa_question("no", "verify", balanced=False),  # unbalanced: ignored, needs no prediction
        "q6": gqa_question("no", "logical", "obj"),
    }


def test_gqa_convert_and_score_via_upstream_command_line(tmp_path):
    answers = write_jsonl(tmp_path / "merge.jsonl", [
        answer("q1", "Yes."), answer("q2", "Table"), answer("q3", "right"),
        answer("q4", "blue"), answer("q6", "No"),
    ])
    data = tmp_path / "data"
    data.mkdir()
    done = run_cli("scripts/convert_gqa_for_eval.py", "--src", str(answers),
                   "--dst", str(data / "testdev_balanced_predictions.json"))
    assert done.returncode == 0, done.stderr
    predictions = json.loads((data / "testdev_balanced_predictions.json").read_text())
    assert predictions == [{"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "table"},
                           {"questionId": "q3", "prediction": "right"}, {"questionId": "q4", "prediction": "blue"},
                           {"questionId": "q6", "prediction": "no"}]
    write_gqa_questions(data / "testdev_balanced_questions.json", gqa_questions())
    done = run_cli("-m", "llava.eval.eval_gqa", "--tier", "testdev_balanced", cwd=data)
    assert done.returncode == 0, done.stderr
    # binary (structural != query): q1 right, q3 wrong, q6 right -> 66.67%; open: q2 right, q4 wrong -> 50%;
    # all 5 balanced: 3 right -> 60%. Distribution: group "color" expects {red: 1}, gets {blue: 1}:
    # (0 - 1)^2 / 1 = 1, weighted by size 1, / 100 -> 0.01.
    assert "Binary: 66.67%\nOpen: 50.00%\nAccuracy: 60.00%\nDistribution: 0.01 (lower is better)\n" in done.stdout
    assert ("Accuracy / structural type:\n  choose: 0.00% (1 questions)\n"
            "  logical: 100.00% (1 questions)\n") in done.stdout
    assert "  query: 50.00% (2 questions)\n  verify: 100.00% (1 questions)\n" in done.stdout


def test_gqa_ground_truth_and_bad_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    questions = gqa_questions()
    write_gqa_questions(tmp_path / "val_questions.json", questions)
    write_json(tmp_path / "val_predictions.json",
               [{"questionId": q, "prediction": v["answer"]} for q, v in questions.items() if v["isBalanced"]])
    scores = eval_gqa.main([])  # default tier "val", files named {tier}_*.json in the cwd
    assert (scores.accuracy, scores.binary, scores.open, scores.distribution) == (100.0, 100.0, 100.0, 0.0)

    write_json(tmp_path / "val_predictions.json", [{"questionId": "q1", "prediction": "yes"}])
    with pytest.raises(SystemExit, match="no prediction for 4 balanced question"):
        eval_gqa.main([])
    write_json(tmp_path / "val_predictions.json",
               [{"questionId": q, "prediction": "x"} for q in questions] + [{"questionId": "q99", "prediction": "x"}])
    with pytest.raises(SystemExit, match=r"questions not in 'val_questions.json': 'q99'"):
        eval_gqa.main([])


# ---------------------------------------------------------------- VQAv2, VizWiz, MM-Vet converters


def test_vqav2_submission_layout(tmp_path, capsys):
    root = tmp_path / "vqav2"
    write_vqav2(root, {11: "q", 12: "q", 13: "q"})
    merge = root / "answers" / "test-dev" / "ckpt" / "merge.jsonl"
    write_jsonl(merge, [answer(13, "The dog."), answer(11, "Two")])
    with open(merge, "a") as f:
        f.write('{"question_id": 12, "te\n')  # a line cut short by a killed worker: skipped, counted
    dst = convert_vqav2_for_submission.main(["--dir", str(root), "--split", "test-dev", "--ckpt", "ckpt"])
    assert dst == str(root / "answers_upload" / "test-dev" / "ckpt.json")
    assert json.loads(Path(dst).read_text()) == [
        {"question_id": 11, "answer": "2"}, {"question_id": 12, "answer": ""}, {"question_id": 13, "answer": "dog"},
    ]
    assert "total results: 2, total split: 3, error_line: 1" in capsys.readouterr().out


def test_vqav2_default_dir_via_script(tmp_path):
    # --dir defaults to ./playground/data/eval/vqav2 relative to the working directory
    root = tmp_path / "playground" / "data" / "eval" / "vqav2"
    write_vqav2(root, {1: "q"})
    write_jsonl(root / "answers" / "s" / "c" / "merge.jsonl", [answer(1, "Yes")])
    script = str(REPO / "scripts" / "convert_vqav2_for_submission.py")
    done = run_cli(script, "--split", "s", "--ckpt", "c", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((root / "answers_upload" / "s" / "c.json").read_text()) == [{"question_id": 1, "answer": "yes"}]


def test_vizwiz_submission(tmp_path):
    questions = tmp_path / "llava_test.jsonl"
    write_vizwiz(questions, ["q", "q"])
    result = write_jsonl(tmp_path / "a.jsonl", [answer(1, "Unanswerable"), answer(0, "A can of Coke.")])
    upload = tmp_path / "upload" / "m.json"
    convert_vizwiz_for_submission.main(["--annotation-file", str(questions), "--result-file", str(result),
                                        "--result-upload-file", str(upload)])
    assert json.loads(upload.read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "can of coke"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"},
    ]
    partial = write_jsonl(tmp_path / "p.jsonl", [answer(0, "x")])
    with pytest.raises(BenchmarkInputError, match="no answer for 1 of 2 questions"):
        convert_vizwiz_for_submission.convert(str(questions), str(partial))


def test_mmvet_results(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [answer(0, "A cat."), answer(1, "42")])
    dst = tmp_path / "results" / "m.json"
    convert_mmvet_for_eval.main(["--src", str(src), "--dst", str(dst)])
    assert dst.read_text() == json.dumps({"v1_0": "A cat.", "v1_1": "42"}, indent=2)


def test_converters_refuse_missing_files_and_lines_without_question_id(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps(answer(0, "x")) + "\n" + json.dumps({"text": "y"}) + "\n")
    with pytest.raises(SystemExit, match=r"a.jsonl' line 2 has no 'question_id'"):
        convert_gqa_for_eval.main(["--src", str(src), "--dst", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match=r"a.jsonl' line 2 has no 'question_id'"):
        convert_mmvet_for_eval.main(["--src", str(src), "--dst", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match=r"missing.jsonl' does not exist. Run the model over the benchmark first"):
        convert_gqa_for_eval.main(["--src", str(tmp_path / "missing.jsonl"), "--dst", str(tmp_path / "p.json")])


# ---------------------------------------------------------------- SEED-Bench


def test_seed_accuracy_and_upload(tmp_path, capsys):
    write_seed_bench(tmp_path, [
        SeedQuestion("101", "Scene Understanding", 1, "A"),
        SeedQuestion("102", "Scene Understanding", 1, "B"),
        SeedQuestion("103", "Instance Identity", 2, "C"),
        SeedQuestion("104", "Instance Identity", 2, "D"),
        SeedQuestion("105", "Action Recognition", 10, "A", data_type="video"),
        SeedQuestion("106", "Action Recognition", 10, "B", data_type="video"),
    ])
    annotation = tmp_path / "SEED-Bench.json"
    # ids as ints in the answers, strings in SEED-Bench.json: still matched
    result = write_jsonl(tmp_path / "merge.jsonl", [answer(101, "A"), answer(102, "C"), answer(103, "C"),
                                                    answer(104, "D"), answer(105, "A"), answer(106, "A")])
    upload = tmp_path / "upload" / "m.jsonl"
    convert_seed_for_submission.main(["--annotation-file", str(annotation), "--result-file", str(result),
                                      "--result-upload-file", str(upload)])
    # type 1: 1/2, type 2: 2/2, type 10: 1/2; total 4/6; image 3/4; video 1/2
    assert capsys.readouterr().out == (
        "Scene Understanding: 50.00%\nInstance Identity: 100.00%\nAction Recognition: 50.00%\n"
        "Total accuracy: 66.67%\nimage accuracy: 75.00%\nvideo accuracy: 50.00%\n"
    )
    lines = [json.loads(line) for line in upload.read_text().splitlines()]
    assert lines[0] == {"question_id": "101", "prediction": "A"}
    assert [line["question_id"] for line in lines] == ["101", "102", "103", "104", "105", "106"]

    partial = write_jsonl(tmp_path / "partial.jsonl", [answer(101, "A")])
    with pytest.raises(SystemExit, match="no answer for 5 of 6 questions"):
        convert_seed_for_submission.main(["--annotation-file", str(annotation), "--result-file", str(partial),
                                          "--result-upload-file", str(upload)])


# ---------------------------------------------------------------- MMBench


def mmbench_tsv(tmp_path: Path) -> Path:
    rows = [
        [0, "Which animal?", "nan", "cat", "dog", "bird", "fish", "B", "recognition", "s", "l2", "nan", "dev", "aGk="],
        [1, "Which color?", "A hint", "red", "blue", "green", "", "A", "attribute", "s", "l2", "nan", "dev", "aGk="],
        [2, "How many?", "nan", "one", "two", "three", "four", "D", "counting", "s", "l2", "nan", "dev"],  # short row
    ]
    return write_mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)


def test_mmbench_upload_xlsx(tmp_path):
    pytest.importorskip("pandas")
    openpyxl = pytest.importorskip("openpyxl")
    tsv = mmbench_tsv(tmp_path)
    write_jsonl(tmp_path / "answers" / "exp.jsonl", [answer(1, "A"), answer(0, "B")])
    path = convert_mmbench_for_submission.main(["--annotation-file", str(tsv),
                                                "--result-dir", str(tmp_path / "answers"),
                                                "--upload-dir", str(tmp_path / "upload"), "--experiment", "exp"])
    assert path == str(tmp_path / "upload" / "exp.xlsx")
    rows = list(openpyxl.load_workbook(path).active.iter_rows(values_only=True))
    assert rows[0] == ("index", "question", "A", "B", "C", "D", "prediction", "answer", "split")
    assert [(r[0], r[6]) for r in rows[1:]] == [(0, "B"), (1, "A"), (2, None)]


def test_mmbench_dev_accuracy(tmp_path, capsys):
    tsv = mmbench_tsv(tmp_path)
    truth = write_jsonl(tmp_path / "truth.jsonl", [answer(0, "B"), answer(1, "A"), answer(2, "D. four")])
    assert eval_mmbench.main(["--annotation-file", str(tsv), "--result-file", str(truth)]).accuracy == 100.0
    # 0: "dog" is option B's text -> right; 1: "C" wrong; 2: "The answer is D" right -> 2/3
    mix = write_jsonl(tmp_path / "mix.jsonl", [answer(0, "dog"), answer(1, "C"), answer(2, "The answer is D")])
    scores = eval_mmbench.main(["--annotation-file", str(tsv), "--result-file", str(mix)])
    assert scores.accuracy == pytest.approx(200 / 3) and scores.circular_accuracy is None
    assert scores.per_category == {"attribute": 0.0, "counting": 100.0, "recognition": 100.0}
    assert "Samples: 3\nAccuracy: 66.67%\n" in capsys.readouterr().out


def test_mmbench_circular_rounds(tmp_path):
    tsv = mmbench_tsv(tmp_path)
    lines = []
    for qid, options, answer_letter, right_rounds in ((0, ["cat", "dog", "bird", "fish"], "B", {0, 1, 2, 3}),
                                                      (2, ["one", "two", "three", "four"], "D", {0})):
        letters = ["A", "B", "C", "D"]
        for r in range(4):  # model_vqa_mmbench --all-rounds: options and their TSV letters rotate together
            shown, chars = options[r:] + options[:r], letters[r:] + letters[:r]
            correct_shown = letters[chars.index(answer_letter)]
            text = correct_shown if r in right_rounds else letters[(letters.index(correct_shown) + 1) % 4]
            lines.append({**answer(qid, text), "round_id": r, "options": shown, "option_char": chars})
    result = write_jsonl(tmp_path / "rounds.jsonl", lines)
    scores = eval_mmbench.evaluate(str(tsv), str(result))
    # round 0 right for both -> 100%; all rounds right only for question 0 -> 50%
    assert (scores.accuracy, scores.circular_accuracy) == (100.0, 50.0)


# ---------------------------------------------------------------- MME


def mme_fixture(tmp_path: Path) -> Path:
    """An MME release with all 14 subtasks, 2 images each, 2 questions per image (Yes, then No)."""
    write_mme(tmp_path / "MME", mme_questions())
    return tmp_path / "MME" / "MME_Benchmark_release_version"


def mme_answers(tmp_path: Path, wrong: dict) -> None:
    """Answers in LLaVA's format for every MME question; ``wrong`` maps (subtask, image, i) to a text."""
    lines = [answer(q.image_path, wrong.get((q.subtask, q.image, int(q.truth == "No")), q.truth), q.prompt)
             for q in mme_questions()]
    write_jsonl(tmp_path / "MME" / "answers" / "exp.jsonl", lines)


def test_mme_ground_truth_scores_full_marks(tmp_path, monkeypatch):
    mme_fixture(tmp_path)
    mme_answers(tmp_path, {})
    monkeypatch.chdir(tmp_path / "MME")
    result_dir = convert_answer_to_mme.main(["--experiment", "exp"])
    assert result_dir == os.path.join("eval_tool", "answers", "exp")
    assert (Path(result_dir) / "artwork.txt").read_text() == (
        "0001.txt\tIs there a artwork 0001? Please answer yes or no.\tYes\tYes\n"
        "0001.txt\tIs there no artwork 0001?  Please answer yes or no.\tNo\tNo\n"
        "0002.txt\tIs there a artwork 0002? Please answer yes or no.\tYes\tYes\n"
        "0002.txt\tIs there no artwork 0002?  Please answer yes or no.\tNo\tNo\n"
    )
    results = eval_mme.evaluate(result_dir)
    assert eval_mme.total(results["Perception"]) == 2000.0 and eval_mme.total(results["Cognition"]) == 800.0


def test_mme_known_mix_via_command_lines(tmp_path):
    mme_fixture(tmp_path)
    # existence: image 0001 right twice, 0002 once -> acc 3/4, acc+ 1/2 -> 75 + 50 = 125
    # count: "I don't know" reads as "other" (wrong) -> also 125; "yes, two." reads as yes (right)
    # text_translation: "No." to a Yes question, "nope" (reads no) right -> acc 3/4, acc+ 1/2 -> 125
    mme_answers(tmp_path, {("existence", "0002", 1): "Yes", ("count", "0001", 1): "I don't know",
                           ("count", "0002", 0): "yes, two.", ("text_translation", "0001", 0): "No.",
                           ("text_translation", "0002", 1): "nope"})
    done = run_cli("-m", "llava.eval.convert_answer_to_mme", "--experiment", "exp", cwd=tmp_path / "MME")
    assert done.returncode == 0, done.stderr
    done = run_cli("-m", "llava.eval.eval_mme", "--results_dir", "answers/exp", cwd=tmp_path / "MME" / "eval_tool")
    assert done.returncode == 0, done.stderr
    # Perception: 8 * 200 + 125 + 125 = 1850; Cognition: 3 * 200 + 125 = 725
    assert ("=========== Perception ===========\ntotal score: 1850.0 \n\n"
            "\t existence  score: 125.0\n\t count  score: 125.0\n") in done.stdout
    assert "=========== Cognition ===========\ntotal score: 725.0 \n" in done.stdout
    assert "\t existence  acc: 75.00  acc+: 50.00" in done.stdout


@pytest.mark.parametrize(("text", "label"), [("Yes", "yes"), ("No.", "no"), ("not really", "no"),
                                             ("Unknown", "other"), ("The answer is yes", "other")])
def test_mme_reads_predictions_like_mme(text, label):
    assert eval_mme.parse_prediction(text) == label


def test_mme_bad_inputs(tmp_path, monkeypatch):
    mme_fixture(tmp_path)
    write_jsonl(tmp_path / "MME" / "answers" / "exp.jsonl", [answer("nosuchtask/0001.png", "Yes", "Q?")])
    monkeypatch.chdir(tmp_path / "MME")
    with pytest.raises(SystemExit, match="subtask 'nosuchtask'"):
        convert_answer_to_mme.main(["--experiment", "exp"])
    results = tmp_path / "results"
    results.mkdir()
    (results / "existence.txt").write_text("0001.txt\tQ\tYes\tYes\n")
    with pytest.raises(SystemExit, match="lacks"):
        eval_mme.main(["--results_dir", str(results)])
    with pytest.raises(BenchmarkInputError, match="exactly 2 questions"):
        eval_mme.score_subtask(str(results / "existence.txt"))
