"""Each scripts/v1_5/eval benchmark script end to end, on a tiny fixture in the benchmark's real layout.

A test lays out ``playground/data/eval/<benchmark>`` in its temporary working directory as upstream
LLaVA's docs/Evaluation.md describes it (LLaVA's question files, generated images, the benchmark's
own annotations; the writers live in ``llava.eval.sample_benchmarks``), runs the script with ``bash`` on the
CPU with a stand-in LLaVA-1.5 checkpoint (3 new tokens per answer), and checks each stage:

* the command lines: a logging ``python`` first on the script's PATH records every call, so the
  steps and their flags (upstream's, and ours: compression, device, EVAL_ARGS) are checked too;
* answering: one answer line per question, in question order, with upstream's keys;
* conversion: the file the benchmark's evaluator or server takes, with its keys and counts;
* scoring: what the script printed equals what the scorer prints when run in this process on the
  answers the script wrote (the stand-in's answers are noise, so no score is known beforehand).

GQA, VQAv2 and SEED-Bench run with ``CUDA_VISIBLE_DEVICES=0,1``: two chunks answered side by side on
the CPU, then merged in order. POPE runs with and without ``COMPRESS_TO=12``, the two answer files
side by side. About 10 s per script on a CPU, mostly spent importing torch and transformers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llava.eval import (
    convert_answer_to_mme,
    convert_gqa_for_eval,
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
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor
from llava.eval.sample_benchmarks import (
    OPTION_LETTER,
    PopeItem,
    SeedQuestion,
    SQAProblem,
    TextVQAItem,
    gqa_question,
    image_base64,
    mmbench_row,
    mme_questions,
    save_images_as,
    write_gqa_questions,
    write_jsonl,
    write_llava_gqa,
    write_llavabench,
    write_mmbench_tsv,
    write_mme,
    write_mmvet,
    write_pope,
    write_scienceqa,
    write_seed_bench,
    write_textvqa,
    write_vizwiz,
    write_vqav2,
)
from llava.standins import make_images

# Each script starts several Python processes (about 7 s of imports each).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "v1_5" / "eval"
EVAL = Path("playground/data/eval")  # the scripts' default EVAL_DIR, relative to the working directory
# The variables the scripts read: none may leak in from the environment running the tests.
SCRIPT_VARIABLES = ("MODEL_PATH", "MODEL_BASE", "CKPT", "COMPRESS_TO", "TOKEN_COMPRESSOR", "CONV_MODE", "DEVICE",
                    "EVAL_DIR", "EVAL_ARGS", "SPLIT", "BENCH", "CUDA_VISIBLE_DEVICES")
NEW_TOKENS = "--max_new_tokens 3"
# model_vqa_loader also takes --num-workers: 0 spares forking 4 data loader workers per tiny run.
LOADER_ARGS = f"{NEW_TOKENS} --num-workers 0"
ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
MMBENCH_ANSWER_KEYS = ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id",
                       "model_id", "metadata"]
TINY_HIDDEN = 32  # the tiny CLIP's width (conftest.TINY_HIDDEN)
SWITCHED_ON_12 = "Token compression switched on at load time: 24×24 → 12×12"
FROM_CHECKPOINT_12 = "Token compression: 24×24 → 12×12, compressor from the checkpoint"


@dataclass
class Run:
    """A finished script run: its output and the ``python`` command lines it ran, in order."""

    stdout: str
    stderr: str
    calls: list[list[str]]

    @property
    def modules(self) -> list[str]:
        """What each ``python`` call ran: the module of ``-m``, else the file."""
        return [call[1] if call[0] == "-m" else call[0] for call in self.calls]

    def call(self, module: str) -> list[str]:
        """The one call that ran ``module``."""
        (found,) = [call for call in self.calls if call[:2] == ["-m", module]]
        return found

    @property
    def loads(self) -> int:
        """How many times the run loaded a model."""
        return self.stderr.count("INFO llava.model.builder: Loading LLaVA")


def flag(call: list[str], name: str) -> str:
    """The value given to ``name`` in a command line."""
    return call[call.index(name) + 1]


def python_shim(cwd: Path) -> Path:
    """A folder whose ``python`` logs each call's arguments (one shell-quoted line) and runs this interpreter."""
    folder = cwd / ".python-shim"
    folder.mkdir(exist_ok=True)
    shim = folder / "python"
    shim.write_text(f'''#!/bin/bash
line=$(printf '%q ' "$@")
echo "$line" >> "$(dirname "$0")/calls"
exec {shlex.quote(sys.executable)} "$@"
''')
    shim.chmod(0o755)
    (folder / "calls").write_text("")
    return folder


def script_env(cwd: Path, model_path: Path | None, eval_args: str = NEW_TOKENS, gpus: str = "0",
               **variables: str) -> dict:
    """The environment of a script run on the CPU; ``variables`` add to or override the defaults."""
    env = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
    env.update({
        "PATH": f"{python_shim(cwd)}{os.pathsep}{env.get('PATH', '')}",
        "DEVICE": "cpu", "EVAL_ARGS": eval_args, "CUDA_VISIBLE_DEVICES": gpus,
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    })
    if model_path is not None:
        env["MODEL_PATH"] = str(model_path)
    env.update(variables)
    return env


def run_script(name: str, cwd: Path, model_path: Path | None = None, *, eval_args: str = NEW_TOKENS,
               gpus: str = "0", returncode: int = 0, **variables: str) -> Run:
    """``bash scripts/v1_5/eval/<name>`` in ``cwd``; fails the test unless it exits with ``returncode``."""
    env = script_env(cwd, model_path, eval_args, gpus, **variables)
    done = subprocess.run(["bash", str(SCRIPTS / name)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == returncode, (
        f"{name} exited with {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"
    )
    calls = (cwd / ".python-shim" / "calls").read_text().splitlines()
    return Run(done.stdout, done.stderr, [shlex.split(line) for line in calls])


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_answers(path: Path, ids: list, model_path: Path, keys: list[str] = ANSWER_KEYS) -> list[dict]:
    """The answers file: one line per question, in question order, upstream's keys, the checkpoint's name."""
    answers = read_jsonl(path)
    assert [a["question_id"] for a in answers] == ids
    assert all(list(a) == keys for a in answers), answers[0]
    assert {a["model_id"] for a in answers} == {model_path.name}
    assert all(isinstance(a["text"], str) for a in answers)
    return answers


def check_chunks(folder: Path, ids: list) -> None:
    """Two chunk files of consecutive questions (the first one larger), merged in order into merge.jsonl."""
    half = math.ceil(len(ids) / 2)
    chunks = [folder / "2_0.jsonl", folder / "2_1.jsonl"]
    assert [[a["question_id"] for a in read_jsonl(chunk)] for chunk in chunks] == [ids[:half], ids[half:]]
    assert (folder / "merge.jsonl").read_text() == "".join(chunk.read_text() for chunk in chunks)


def printed(function, *args):
    """(``function(*args)``, what it printed), run in this process."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = function(*args)
    return result, buffer.getvalue()


def upstream_flags(call: list[str], model_path: Path) -> bool:
    """Whether an answering command line starts as upstream's scripts do: the model, greedy, vicuna_v1."""
    return call[2:8] == ["--model-path", str(model_path), "--temperature", "0", "--conv-mode", "vicuna_v1"]


# ---------------------------------------------------------------- compression switch


def test_pope_with_and_without_compression_side_by_side(tmp_path, tiny_llava):
    root = tmp_path / EVAL / "pope"
    images = write_pope(root, [
        PopeItem("adversarial", "COCO_val2014_000000000042.jpg", "dog", "yes"),
        PopeItem("adversarial", "COCO_val2014_000000000073.jpg", "cat", "no"),
        PopeItem("popular", "COCO_val2014_000000000042.jpg", "person", "no"),
        PopeItem("popular", "COCO_val2014_000000000073.jpg", "car", "yes"),
        PopeItem("random", "COCO_val2014_000000000042.jpg", "bus", "no"),
        PopeItem("random", "COCO_val2014_000000000073.jpg", "chair", "yes"),
    ])
    save_images_as(root / "val2014", images)

    plain = run_script("pope.sh", tmp_path, tiny_llava, eval_args=LOADER_ARGS)
    compressed = run_script("pope.sh", tmp_path, tiny_llava, eval_args=LOADER_ARGS, COMPRESS_TO="12")

    assert sorted(p.name for p in (root / "answers").iterdir()) == [
        "llava-v1.5-tiny-toconv12.image_tokens.jsonl", "llava-v1.5-tiny-toconv12.jsonl",
        "llava-v1.5-tiny.image_tokens.jsonl", "llava-v1.5-tiny.jsonl"]
    # Beside each answers file, the image tokens the LLM received for each answer.
    for tag, tokens in (("llava-v1.5-tiny", 576), ("llava-v1.5-tiny-toconv12", 144)):
        assert read_jsonl(root / "answers" / f"{tag}.image_tokens.jsonl") == [
            {"question_id": i, "images": 1, "image_tokens": tokens} for i in range(6)]
    assert "Token compression" not in plain.stderr
    assert SWITCHED_ON_12 in compressed.stderr and "average init" in compressed.stderr
    pope = "./playground/data/eval/pope"
    for done, tag, compression in ((plain, "llava-v1.5-tiny", []),
                                   (compressed, "llava-v1.5-tiny-toconv12",
                                    ["--use-token-compression", "--compression-output-size", "12"])):
        # upstream's command lines, plus the compression flags, the device and EVAL_ARGS
        assert done.calls == [
            ["-m", "llava.eval.model_vqa_loader", "--model-path", str(tiny_llava), "--temperature", "0",
             "--conv-mode", "vicuna_v1", *compression, "--device", "cpu", "--max_new_tokens", "3",
             "--num-workers", "0", "--question-file", f"{pope}/llava_pope_test.jsonl",
             "--image-folder", f"{pope}/val2014", "--answers-file", f"{pope}/answers/{tag}.jsonl"],
            ["-m", "llava.eval.eval_pope", "--annotation-dir", f"{pope}/coco",
             "--question-file", f"{pope}/llava_pope_test.jsonl", "--result-file", f"{pope}/answers/{tag}.jsonl"],
        ]
        answers = root / "answers" / f"{tag}.jsonl"
        check_answers(answers, list(range(6)), tiny_llava)
        scores, expected = printed(eval_pope.evaluate, str(root / "coco"), str(root / "llava_pope_test.jsonl"),
                                   str(answers))
        assert sorted(scores) == ["adversarial", "popular", "random"]
        assert all(s.total == 2 for s in scores.values())
        assert "Category: popular, # samples: 2\nTP\tFP\tTN\tFN\t\n" in expected
        assert expected in done.stdout


def test_token_compressor_without_compress_to_is_refused(tmp_path, tiny_llava):
    done = run_script("pope.sh", tmp_path, tiny_llava, returncode=2, TOKEN_COMPRESSOR="/ckpt/compressor.safetensors")
    assert done.stderr == ("TOKEN_COMPRESSOR=/ckpt/compressor.safetensors is set but COMPRESS_TO is not: "
                           "set COMPRESS_TO=12 or 8 to use it.\n")
    assert done.stdout == "" and done.calls == [] and not (tmp_path / "playground").exists()


# ---------------------------------------------------------------- scored locally


@pytest.fixture
def compressor_file(tmp_path, tiny_tower_336) -> Path:
    """A 24→12 compressor checkpoint for the tiny tower (its average init, saved)."""
    from vision_token_compression import TokenCompressor, save_compressor

    return save_compressor(TokenCompressor(24, 12, TINY_HIDDEN), tmp_path / "compressor" / "toconv12.safetensors",
                           vision_tower=str(tiny_tower_336), select_layer=-2, select_feature="patch")


def test_textvqa_with_a_token_compressor_file(tmp_path, tiny_llava, compressor_file):
    root = tmp_path / EVAL / "textvqa"
    images = write_textvqa(root, [
        TextVQAItem("0054c91397f2fe05", "what brand is the camera?", ("nikon",) * 8 + ("nikkon",) * 2,
                    ("nikon", "d3")),
        TextVQAItem("003a8ae2ef43b901", "what number is on the shirt?", ("7",) * 10, ("7",)),
        TextVQAItem("00685bc495504d61", "what color is the sign?", ("red",) * 6 + ("orange",) * 4, ()),
    ])
    save_images_as(root / "train_images", images)

    # The data loader's default 4 workers, as upstream runs it.
    done = run_script("textvqa.sh", tmp_path, tiny_llava, COMPRESS_TO="12", TOKEN_COMPRESSOR=str(compressor_file))

    assert f"{SWITCHED_ON_12}, compressor from {compressor_file}" in done.stderr
    assert done.modules == ["llava.eval.model_vqa_loader", "llava.eval.eval_textvqa"]
    answering = done.call("llava.eval.model_vqa_loader")
    assert upstream_flags(answering, tiny_llava) and flag(answering, "--token-compressor-path") == str(compressor_file)
    answers = root / "answers" / "llava-v1.5-tiny-toconv12.jsonl"
    check_answers(answers, ["0054c91397f2fe05", "003a8ae2ef43b901", "00685bc495504d61"], tiny_llava)
    annotations = eval_textvqa.load_annotations(str(root / "TextVQA_0.5.1_val.json"))
    accuracy, expected = printed(eval_textvqa.report, annotations, str(answers))
    assert expected == f"llava-v1.5-tiny-toconv12\nSamples: 3\nAccuracy: {100 * accuracy:.2f}%\n\n"
    assert expected in done.stdout


def test_sqa(tmp_path, tiny_llava_compressed):
    base = tmp_path / EVAL / "scienceqa"
    images = write_scienceqa(base, [
        SQAProblem("5", ("red", "blue", "green"), 0, "Which color is the largest shape?"),
        SQAProblem("12", ("a magnet", "a plant"), 1, "Which is alive?", image=False, hint="Plants grow."),
        SQAProblem("27", ("circle", "square", "triangle", "star"), 3, "Which shape is missing?"),
        SQAProblem("33", ("yes", "no"), 0, "Is the sky blue?", image=False),
        SQAProblem("40", ("x", "y"), 1, split="val"),  # another split: neither asked nor scored
    ])
    save_images_as(base / "images" / "test", images)

    done = run_script("sqa.sh", tmp_path, tiny_llava_compressed)

    assert FROM_CHECKPOINT_12 in done.stderr
    assert done.modules == ["llava.eval.model_vqa_science", "llava.eval.eval_science_qa"]
    answering = done.call("llava.eval.model_vqa_science")
    assert upstream_flags(answering, tiny_llava_compressed) and answering[-1] == "--single-pred-prompt"
    answers_dir = base / "answers"
    answers = check_answers(answers_dir / "llava-v1.5-tiny-toconv12.jsonl", ["5", "12", "27", "33"],
                            tiny_llava_compressed)
    assert [a["prompt"].startswith("<image>\n") for a in answers] == [True, False, True, False]
    assert all(a["prompt"].endswith("\n" + OPTION_LETTER) for a in answers)
    # The scorer here, on the script's answers, with outputs of its own.
    mine = tmp_path / "mine"
    result, expected = printed(eval_science_qa.main, [
        "--base-dir", str(base), "--result-file", str(answers_dir / "llava-v1.5-tiny-toconv12.jsonl"),
        "--output-file", str(mine / "output.jsonl"), "--output-result", str(mine / "result.json")])
    assert expected.startswith("Total: 4, Correct: ") and expected in done.stdout
    document = json.loads((answers_dir / "llava-v1.5-tiny-toconv12_result.json").read_text())
    assert list(document) == ["acc", "correct", "count", "results", "outputs"] and document["count"] == 4
    assert document == result
    outcome = json.loads((answers_dir / "llava-v1.5-tiny-toconv12_output.jsonl").read_text())
    assert sorted(e["question_id"] for e in outcome["correct"] + outcome["incorrect"]) == ["12", "27", "33", "5"]
    assert outcome == json.loads((mine / "output.jsonl").read_text())


def test_gqa_in_two_chunks(tmp_path, tiny_llava):
    gqa = tmp_path / EVAL / "gqa"
    questions = {
        "20968078": gqa_question("yes", "verify", text="Is the sky blue?", image_id="n161313"),
        "20968079": gqa_question("table", "query", "cat", text="What is under the cup?", image_id="n161313"),
        "201307251": gqa_question("left", "choose", "rel", text="Is the dog left or right?", image_id="n235859"),
        "201640614": gqa_question("red", "query", group="color", text="What color is the car?", image_id="n235859"),
        "202218649": gqa_question("no", "logical", "obj", text="Are there both cats and dogs?", image_id="n415016"),
    }
    write_gqa_questions(gqa / "data" / "testdev_balanced_questions.json", questions)
    images = write_llava_gqa(gqa / "llava_gqa_testdev_balanced.jsonl", questions)
    save_images_as(gqa / "data" / "images", images)
    # GQA's own evaluator, when present in data/eval, runs after ours (a stand-in that shows how it was called).
    (gqa / "data" / "eval").mkdir()
    (gqa / "data" / "eval" / "eval.py").write_text(
        "import os, sys\nprint('official eval.py', *sys.argv[1:], 'in', os.path.basename(os.getcwd()))\n")

    done = run_script("gqa.sh", tmp_path, tiny_llava, eval_args=LOADER_ARGS, gpus="0,1")

    assert done.loads == 2
    assert done.modules == ["llava.eval.model_vqa_loader"] * 2 + ["llava.eval.convert_gqa_for_eval",
                                                                  "llava.eval.eval_gqa", "eval/eval.py"]
    assert sorted((flag(c, "--num-chunks"), flag(c, "--chunk-idx")) for c in done.calls[:2]) == [("2", "0"),
                                                                                               ("2", "1")]
    folder = gqa / "answers" / "llava_gqa_testdev_balanced" / "llava-v1.5-tiny"
    check_chunks(folder, list(questions))
    answers = check_answers(folder / "merge.jsonl", list(questions), tiny_llava)
    predictions = json.loads((gqa / "data" / "testdev_balanced_predictions.json").read_text())
    assert [list(p) for p in predictions] == [["questionId", "prediction"]] * 5
    assert predictions == [{"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()}
                           for a in answers]
    assert predictions == convert_gqa_for_eval.convert(str(folder / "merge.jsonl"))
    data = gqa / "data"
    scores, expected = printed(eval_gqa.main, ["--tier", "testdev_balanced",
                                               "--questions", str(data / "{tier}_questions.json"),
                                               "--predictions", str(data / "{tier}_predictions.json")])
    assert "\nAccuracy: " in expected and expected in done.stdout
    assert scores.per_structural_type["query"][1] == 2  # all 5 questions scored
    assert done.stdout.endswith("official eval.py --tier testdev_balanced in data\n")


def test_mme(tmp_path, tiny_llava):
    mme = tmp_path / EVAL / "MME"
    questions = mme_questions(images=("0001",))  # MME's totals need all 14 subtasks: 28 questions
    write_mme(mme, questions, real_images=True)

    done = run_script("mme.sh", tmp_path, tiny_llava, eval_args=f"{LOADER_ARGS} --batch-size 7")

    assert done.modules == ["llava.eval.model_vqa_loader", "llava.eval.convert_answer_to_mme", "llava.eval.eval_mme"]
    assert done.calls[1:] == [["-m", "llava.eval.convert_answer_to_mme", "--experiment", "llava-v1.5-tiny"],
                              ["-m", "llava.eval.eval_mme", "--results_dir", "answers/llava-v1.5-tiny"]]
    answers = check_answers(mme / "answers" / "llava-v1.5-tiny.jsonl", [q.image_path for q in questions], tiny_llava)
    results_dir = mme / "eval_tool" / "answers" / "llava-v1.5-tiny"
    assert sorted(p.name for p in results_dir.iterdir()) == sorted(f"{q.subtask}.txt" for q in questions[::2])
    for q, a in zip(questions, answers):
        lines = (results_dir / f"{q.subtask}.txt").read_text().splitlines()
        assert len(lines) == 2
        assert lines[int(q.truth == "No")].split("\t") == [f"{q.image}.txt", q.question, q.truth,
                                                           convert_answer_to_mme.one_line(a["text"])]
    results, expected = printed(eval_mme.main, ["--results_dir", str(results_dir)])
    assert expected.startswith("=========== Perception ===========\ntotal score: ")
    assert [len(results["Perception"]), len(results["Cognition"])] == [10, 4]
    assert expected in done.stdout


def test_mmbench(tmp_path, tiny_llava):
    openpyxl = pytest.importorskip("openpyxl")
    images = [image_base64(image) for image in make_images(3, size=(64, 48), seed=3)]
    tsv = write_mmbench_tsv(tmp_path / EVAL / "mmbench" / "mmbench_dev_20230712.tsv", [
        mmbench_row(241, "Which shape is the largest?", ["circle", "square", "triangle", "star"], "B", images[0]),
        mmbench_row(242, "What colour is the background?", ["red", "green", "blue", "white"], "D", images[1],
                    hint="Look at the whole picture."),
        mmbench_row(245, "How many shapes are there?", ["one", "two", "three"], "A", images[2],
                    category="counting"),
    ])

    done = run_script("mmbench.sh", tmp_path, tiny_llava)

    assert done.modules == ["llava.eval.model_vqa_mmbench", "llava.eval.convert_mmbench_for_submission",
                            "llava.eval.eval_mmbench"]
    answering = done.call("llava.eval.model_vqa_mmbench")
    assert upstream_flags(answering, tiny_llava) and answering[-1] == "--single-pred-prompt"
    assert "--lang" not in answering
    root = tmp_path / EVAL / "mmbench"
    answers_file = root / "answers" / "mmbench_dev_20230712" / "llava-v1.5-tiny.jsonl"
    answers = check_answers(answers_file, [241, 242, 245], tiny_llava, keys=MMBENCH_ANSWER_KEYS)
    assert [a["round_id"] for a in answers] == [0, 0, 0]
    assert answers[1]["prompt"].startswith("Look at the whole picture.\nWhat colour")
    assert answers[2]["options"] == ["one", "two", "three"] and answers[2]["option_char"] == ["A", "B", "C"]
    upload = root / "answers_upload" / "mmbench_dev_20230712" / "llava-v1.5-tiny.xlsx"
    rows = list(openpyxl.load_workbook(upload).active.iter_rows(values_only=True))
    assert rows[0] == ("index", "question", "A", "B", "C", "D", "prediction", "answer", "split")
    assert [(r[0], r[6] or "", r[7]) for r in rows[1:]] == [(a["question_id"], a["text"], letter)
                                                            for a, letter in zip(answers, "BDA")]
    scores, expected = printed(eval_mmbench.main, ["--annotation-file", str(tsv), "--result-file", str(answers_file)])
    assert expected.startswith("Samples: 3\nAccuracy: ") and scores.circular_accuracy is None
    assert expected in done.stdout


def test_mmbench_cn(tmp_path, tiny_llava_compressed):
    openpyxl = pytest.importorskip("openpyxl")
    images = [image_base64(image) for image in make_images(2, size=(64, 48), seed=4)]
    split = "mmbench_dev_cn_20231003"
    tsv = write_mmbench_tsv(tmp_path / EVAL / "mmbench_cn" / f"{split}.tsv", [
        mmbench_row(1, "图中最大的形状是什么？", ["圆形", "正方形", "三角形", "星形"], "A", images[0]),
        mmbench_row(2, "背景是什么颜色？", ["红色", "绿色"], "B", images[1], hint="请看整张图片。"),
    ])

    done = run_script("mmbench_cn.sh", tmp_path, tiny_llava_compressed)

    assert FROM_CHECKPOINT_12 in done.stderr
    assert done.modules == ["llava.eval.model_vqa_mmbench", "llava.eval.convert_mmbench_for_submission",
                            "llava.eval.eval_mmbench"]
    answering = done.call("llava.eval.model_vqa_mmbench")
    assert upstream_flags(answering, tiny_llava_compressed) and answering[-3:] == ["--lang", "cn",
                                                                                   "--single-pred-prompt"]
    root = tmp_path / EVAL / "mmbench_cn"
    answers_file = root / "answers" / split / "llava-v1.5-tiny-toconv12.jsonl"
    answers = check_answers(answers_file, [1, 2], tiny_llava_compressed, keys=MMBENCH_ANSWER_KEYS)
    assert answers[1]["prompt"] == "请看整张图片。\n背景是什么颜色？\nA. 红色\nB. 绿色"
    rows = list(openpyxl.load_workbook(root / "answers_upload" / split / "llava-v1.5-tiny-toconv12.xlsx")
                .active.iter_rows(values_only=True))
    assert [(r[0], r[6] or "") for r in rows[1:]] == [(a["question_id"], a["text"]) for a in answers]
    _, expected = printed(eval_mmbench.main, ["--annotation-file", str(tsv), "--result-file", str(answers_file)])
    assert expected.startswith("Samples: 2\nAccuracy: ") and expected in done.stdout


def test_seed_in_two_chunks_with_compression(tmp_path, tiny_llava):
    root = tmp_path / EVAL / "seed_bench"
    questions = [
        SeedQuestion("101669", "Scene Understanding", 1, "A"),
        SeedQuestion("101670", "Scene Understanding", 1, "C", question="Where is the circle?"),
        SeedQuestion("102000", "Instance Counting", 5, "B", question="How many shapes are there?",
                     choices=("one", "two", "three", "four")),
        SeedQuestion("1", "Action Recognition", 10, "D", data_type="video", question="What happens?"),
        SeedQuestion("2", "Action Recognition", 10, "A", data_type="video", question="What moves?"),
    ]
    save_images_as(root, write_seed_bench(root, questions))

    done = run_script("seed.sh", tmp_path, tiny_llava, eval_args=LOADER_ARGS, gpus="0,1", COMPRESS_TO="12")

    assert done.loads == 2 and done.stderr.count(SWITCHED_ON_12) == 2
    assert done.modules == ["llava.eval.model_vqa_loader"] * 2 + ["llava.eval.convert_seed_for_submission"]
    folder = root / "answers" / "llava-v1.5-tiny-toconv12"
    ids = [int(q.question_id) for q in questions]
    check_chunks(folder, ids)
    answers = check_answers(folder / "merge.jsonl", ids, tiny_llava)
    upload = root / "answers_upload" / "llava-v1.5-tiny-toconv12.jsonl"
    assert read_jsonl(upload) == [{"question_id": q.question_id, "prediction": a["text"]}
                                  for q, a in zip(questions, answers)]
    mine = tmp_path / "mine.jsonl"
    scores, expected = printed(convert_seed_for_submission.main, [
        "--annotation-file", str(root / "SEED-Bench.json"), "--result-file", str(folder / "merge.jsonl"),
        "--result-upload-file", str(mine)])
    assert scores.overall.total == 5 and sorted(scores.per_type) == [1, 5, 10]
    assert "Total accuracy: " in expected and "\nvideo accuracy: " in expected
    assert done.stdout == expected


# ---------------------------------------------------------------- converted for a server or a grader


def test_vqav2_in_two_chunks(tmp_path, tiny_llava_compressed):
    root = tmp_path / EVAL / "vqav2"
    texts = {262144000: "What is this?", 262144001: "What color is it?", 262145000: "How many?",
             262146000: "Is it big?", 262147000: "What shape?", 262147001: "Where is it?"}
    test_dev = [262144000, 262145000, 262147000, 262147001]  # part of test2015, in the order asked
    save_images_as(root / "test2015", write_vqav2(root, texts, test_dev))

    done = run_script("vqav2.sh", tmp_path, tiny_llava_compressed, eval_args=LOADER_ARGS, gpus="0,1")

    assert done.loads == 2 and done.stderr.count(FROM_CHECKPOINT_12) == 2
    assert done.modules == ["llava.eval.model_vqa_loader"] * 2 + ["llava.eval.convert_vqav2_for_submission"]
    split = "llava_vqav2_mscoco_test-dev2015"
    folder = root / "answers" / split / "llava-v1.5-tiny-toconv12"
    check_chunks(folder, test_dev)
    answers = check_answers(folder / "merge.jsonl", test_dev, tiny_llava_compressed)
    assert "total results: 4, total split: 6, error_line: 0\n" in done.stdout
    upload = json.loads((root / "answers_upload" / split / "llava-v1.5-tiny-toconv12.json").read_text())
    assert [list(u) for u in upload] == [["question_id", "answer"]] * 6
    assert [u["question_id"] for u in upload] == list(texts)  # every test2015 question, in its order
    normalise = EvalAIAnswerProcessor()
    answered = {a["question_id"]: normalise(a["text"]) for a in answers}
    assert [u["answer"] for u in upload] == [answered.get(qid, "") for qid in texts]
    expected, _ = printed(convert_vqav2_for_submission.convert, str(folder / "merge.jsonl"),
                          str(root / "llava_vqav2_mscoco_test2015.jsonl"))
    assert upload == expected


def test_a_failed_chunk_fails_the_script_once_every_chunk_has_ended(tmp_path, tiny_llava):
    root = tmp_path / EVAL / "vqav2"
    texts = {1000 * (i + 1): f"What is shape {i}?" for i in range(6)}
    images = write_vqav2(root, texts, list(texts))
    save_images_as(root / "test2015", images[1:])  # chunk 0's first image is missing: it fails as it starts
    folder = root / "answers" / "llava_vqav2_mscoco_test-dev2015" / "llava-v1.5-tiny"
    write_jsonl(folder / "merge.jsonl", [{"question_id": 1000, "text": "from an earlier run"}])

    # Output to files, not pipes: the script's exit is what is timed, not that of a chunk left running.
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        script = subprocess.Popen(["bash", str(SCRIPTS / "vqav2.sh")], cwd=tmp_path, stdout=out, stderr=err,
                                  env=script_env(tmp_path, tiny_llava, LOADER_ARGS, gpus="0,1"))
        returncode = script.wait(timeout=600)

    stderr = (tmp_path / "stderr").read_text()
    assert returncode == 1, stderr[-3000:]
    assert "FileNotFoundError" in stderr
    assert f"chunk(s) 0 of 2 failed; no ./{folder.relative_to(tmp_path)}/merge.jsonl written." in stderr
    # Chunk 1 has ended with all its answers; no merge (not even an earlier run's) for a converter to read.
    assert [a["question_id"] for a in read_jsonl(folder / "2_1.jsonl")] == list(texts)[3:]
    assert not (folder / "merge.jsonl").exists() and not (root / "answers_upload").exists()


def test_vizwiz_with_an_eval_dir_elsewhere(tmp_path, tiny_llava):
    eval_dir = tmp_path / "eval data"  # EVAL_DIR elsewhere, absolute, with a space
    root = eval_dir / "vizwiz"
    save_images_as(root / "test", write_vizwiz(root / "llava_test.jsonl",
                                               ["What is this?", "What does the label say?", "Which color?"]))

    done = run_script("vizwiz.sh", tmp_path, tiny_llava, eval_args=LOADER_ARGS, EVAL_DIR=str(eval_dir))

    assert done.modules == ["llava.eval.model_vqa_loader", "llava.eval.convert_vizwiz_for_submission"]
    check_answers(root / "answers" / "llava-v1.5-tiny.jsonl", [0, 1, 2], tiny_llava)
    assert "total results: 3, total split: 3, error_line: 0\n" in done.stdout
    upload = json.loads((root / "answers_upload" / "llava-v1.5-tiny.json").read_text())
    assert [u["image"] for u in upload] == [f"VizWiz_test_{i:08d}.jpg" for i in range(3)]
    assert [list(u) for u in upload] == [["image", "answer"]] * 3
    expected, _ = printed(convert_vizwiz_for_submission.convert, str(root / "llava_test.jsonl"),
                          str(root / "answers" / "llava-v1.5-tiny.jsonl"))
    assert upload == expected
    assert not (tmp_path / "playground").exists()


def test_mmvet_with_ckpt_name(tmp_path, tiny_llava):
    root = tmp_path / EVAL / "mm-vet"
    save_images_as(root / "images", write_mmvet(root / "llava-mm-vet.jsonl",
                                                ["What is in the image?", "Describe the shapes.", "How many?"]))

    done = run_script("mmvet.sh", tmp_path, tiny_llava, CKPT="my-run")

    assert done.modules == ["llava.eval.model_vqa", "llava.eval.convert_mmvet_for_eval"]
    answers = check_answers(root / "answers" / "my-run.jsonl", [0, 1, 2], tiny_llava)
    results = json.loads((root / "results" / "my-run.json").read_text())
    assert results == {f"v1_{a['question_id']}": a["text"] for a in answers}
    assert list(results) == ["v1_0", "v1_1", "v1_2"]
    assert results == convert_mmvet_for_eval.convert(str(root / "answers" / "my-run.jsonl"))


def test_llavabench_with_64_tokens(tmp_path, tiny_llava):
    root = tmp_path / EVAL / "llava-bench-in-the-wild"
    texts = ["Describe the image in detail.", "What colors are there?"]
    save_images_as(root / "images", write_llavabench(root / "questions.jsonl", texts))

    done = run_script("llavabench.sh", tmp_path, tiny_llava, COMPRESS_TO="8")

    assert "Token compression switched on at load time: 24×24 → 8×8" in done.stderr
    assert done.modules == ["llava.eval.model_vqa"]
    assert flag(done.call("llava.eval.model_vqa"), "--compression-output-size") == "8"
    answers = check_answers(root / "answers" / "llava-v1.5-tiny-toconv8.jsonl", [0, 1], tiny_llava)
    assert [a["prompt"] for a in answers] == texts
