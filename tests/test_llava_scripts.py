"""The eval and serve entry points on a tiny LLaVA trained without compression, switched on by flag."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from llava.eval import model_vqa_loader, run_llava
from llava.serve import cli as serve_cli
from llava.standins import build_tiny_llava, make_images, save_images, write_question_file

COMPRESS = ["--use-token-compression", "--compression-output-size", "12"]
ANSWER_FIELDS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_tower_336):
    return build_tiny_llava(tmp_path_factory.mktemp("llava-tiny"), tiny_tower_336)


@pytest.fixture(scope="module")
def anyres_path(tmp_path_factory, tiny_tower_336):
    return build_tiny_llava(tmp_path_factory.mktemp("llava-tiny-anyres"), tiny_tower_336,
                            image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", seed=3)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    images = make_images(5, size=[(400, 300), (200, 500), (336, 336), (640, 480), (700, 700)], seed=11)
    return folder, save_images(images, folder)


def common(path) -> list[str]:
    return ["--model-path", str(path), "--device", "cpu", "--temperature", "0", "--conv-mode", "llava_v1"]


def test_run_llava_answers_with_compression_switched_on(model_path, image_folder, caplog, capsys):
    folder, names = image_folder
    with caplog.at_level(logging.INFO, logger="llava.model.builder"):
        answer = run_llava.main(common(model_path) + COMPRESS + [
            "--image-file", str(folder / names[0]), "--query", "What is in the image?", "--max_new_tokens", "6",
        ])
    assert isinstance(answer, str) and answer
    assert answer in capsys.readouterr().out
    assert "switched on at load time: 24×24 → 12×12" in caplog.text
    assert "average init" in caplog.text


def _answers(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("which, batch_size", [("pad", 3), ("anyres", 2)])
def test_model_vqa_loader_batches_agree_with_one_at_a_time(model_path, anyres_path, image_folder, tmp_path,
                                                           which, batch_size):
    path = model_path if which == "pad" else anyres_path
    folder, names = image_folder
    questions = write_question_file(tmp_path / "questions.jsonl", names)
    runs = {}
    for bs in (1, batch_size):
        answers_file = tmp_path / f"answers-{bs}.jsonl"
        model_vqa_loader.main(common(path) + COMPRESS + [
            "--image-folder", str(folder), "--question-file", str(questions), "--answers-file", str(answers_file),
            "--max_new_tokens", "5", "--batch-size", str(bs), "--num-workers", "0",
        ])
        runs[bs] = _answers(answers_file)
    single, batched = runs[1], runs[batch_size]
    assert [a["question_id"] for a in single] == list(range(5))
    assert all(set(a) == ANSWER_FIELDS and a["text"] for a in single)
    assert [a["text"] for a in batched] == [a["text"] for a in single]
    assert single[0]["prompt"] == "What is in the image?" and single[0]["model_id"] == path.name


def test_model_vqa_loader_chunks(model_path, image_folder, tmp_path):
    folder, names = image_folder
    questions = write_question_file(tmp_path / "questions.jsonl", names)
    answers_file = tmp_path / "chunk.jsonl"
    model_vqa_loader.main(common(model_path) + [
        "--image-folder", str(folder), "--question-file", str(questions), "--answers-file", str(answers_file),
        "--max_new_tokens", "2", "--num-chunks", "2", "--chunk-idx", "1", "--num-workers", "0",
    ])
    assert [a["question_id"] for a in _answers(answers_file)] == [3, 4]


def test_cli_chats_over_stdin(model_path, image_folder, monkeypatch, capsys, caplog):
    """Two turns read from stdin, a non-empty answer to each, then exit; in this process."""
    folder, names = image_folder
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this?\nAnd the colour?\n"))
    with caplog.at_level(logging.INFO, logger="llava.model.builder"):
        answers = serve_cli.main(common(model_path) + COMPRESS + [
            "--image-file", str(folder / names[1]), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert out.count("USER: ") == 3 and out.count("ASSISTANT: ") == 2 and out.rstrip().endswith("exit...")
    assert len(answers) == 2 and all(answer.strip() for answer in answers)
    assert "switched on at load time" in caplog.text


# `python -m llava.serve.cli` in a subprocess; test_cli_chats_over_stdin runs the same chat in-process.
@pytest.mark.slow
def test_cli_chats_over_piped_stdin(model_path, image_folder):
    folder, names = image_folder
    args = common(model_path) + COMPRESS + ["--image-file", str(folder / names[1]), "--max-new-tokens", "4"]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", *args], input="What is this?\nAnd the colour?\n",
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("USER: ") == 3 and out.count("ASSISTANT: ") == 2 and out.rstrip().endswith("exit...")
    replies = [line.split("ASSISTANT: ", 1)[1] for line in out.splitlines() if "ASSISTANT: " in line]
    assert all(reply.strip() for reply in replies)
    assert "switched on at load time" in result.stderr
