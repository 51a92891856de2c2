"""The model-running eval scripts upstream's benchmark scripts call, on each benchmark's real file format.

``model_vqa`` (LLaVA-Bench / MM-Vet JSONL), ``model_vqa_science`` (ScienceQA JSON list with image and
text-only questions), ``model_vqa_mmbench`` (MMBench TSV with base64 images) and ``model_vqa_loader``
run the tiny stand-in checkpoints on the CPU. A wrapper around ``load_pretrained_model`` records what
reaches the model: the image tokens per image (a hook on the projector) and the prompt of every row
(decoded from the ids handed to ``generate``).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import random

import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.eval import model_vqa, model_vqa_loader, model_vqa_mmbench, model_vqa_science, vqa_common
from llava.standins import make_images, save_images, write_question_file

COMPRESS = ["--use-token-compression", "--compression-output-size", "12"]
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions. USER: {} ASSISTANT:")
LETTER = "Answer with the option's letter from the given choices directly."
VQA_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
MMBENCH_KEYS = ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id", "model_id",
                "metadata"]


def run_args(model_path, questions, answers, *extra) -> list[str]:
    return ["--model-path", str(model_path), "--question-file", str(questions), "--answers-file", str(answers),
            "--device", "cpu", "--temperature", "0", "--max_new_tokens", "4", "--conv-mode", "vicuna_v1", *extra]


def read_answers(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def without_ids(answers: list[dict]) -> list[dict]:
    return [{k: v for k, v in a.items() if k != "answer_id"} for a in answers]


class Seen:
    """What reached the model during one script run."""

    def __init__(self) -> None:
        self.tokens_per_image: list[int] = []  # one entry per image encoded
        self.prompts: list[str] = []  # one full prompt per row, the image as <image>
        self.batch_sizes: list[int] = []
        self.num_patches: int | None = None


@pytest.fixture
def seen(monkeypatch) -> Seen:
    """Wraps ``load_pretrained_model`` as the scripts call it, recording into a ``Seen``."""
    record = Seen()
    real_load = vqa_common.load_pretrained_model

    def load(*args, **kwargs):
        tokenizer, model, processor, context_len = real_load(*args, **kwargs)
        record.num_patches = model.get_vision_tower().num_patches
        model.get_model().mm_projector.register_forward_hook(
            lambda module, inputs, output: record.tokens_per_image.extend([inputs[0].shape[1]] * inputs[0].shape[0])
        )
        real_generate = model.generate

        def generate(input_ids, **kw):
            record.batch_sizes.append(input_ids.shape[0])
            for ids in input_ids.tolist():
                pieces, piece = [], []
                for token in ids + [IMAGE_TOKEN_INDEX]:
                    if token == IMAGE_TOKEN_INDEX:
                        pieces.append(tokenizer.decode(piece, skip_special_tokens=True))
                        piece = []
                    else:
                        piece.append(token)
                record.prompts.append("<image>".join(pieces))
            return real_generate(input_ids, **kw)

        model.generate = generate
        return tokenizer, model, processor, context_len

    monkeypatch.setattr(vqa_common, "load_pretrained_model", load)
    return record


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-images")
    images = make_images(5, size=[(400, 300), (200, 500), (336, 336), (640, 480), (300, 700)], seed=5)
    return folder, save_images(images, folder)


# ---- model_vqa: LLaVA-Bench / MM-Vet -------------------------------------------------------------


@pytest.fixture
def llavabench_questions(tmp_path, image_folder):
    """llava-bench-in-the-wild's questions.jsonl layout (with its extra ``category`` key)."""
    _, names = image_folder
    texts = ["What is in the image?", "Describe the image in detail.", "What color is the shape?",
             "How many shapes are there?", "Is there a circle?"]
    path = tmp_path / "questions.jsonl"
    with path.open("w") as f:
        for i, (name, text) in enumerate(zip(names, texts)):
            f.write(json.dumps({"image": name, "text": text, "category": "conv", "question_id": i}) + "\n")
    return path, texts


def test_model_vqa_batches_of_three_answer_as_one_at_a_time_with_compression_switched_on(
    tiny_llava, image_folder, llavabench_questions, tmp_path, seen
):
    folder, _ = image_folder
    questions, texts = llavabench_questions
    runs = {}
    for batch_size in (1, 3):
        answers = tmp_path / f"answers/bs{batch_size}.jsonl"  # upstream scripts write into a folder
        model_vqa.main(run_args(tiny_llava, questions, answers, "--image-folder", str(folder),
                                "--batch-size", str(batch_size), *COMPRESS))
        runs[batch_size] = read_answers(answers)
    single, batched = runs[1], runs[3]
    assert [list(a) for a in single] == [VQA_KEYS] * 5
    assert [a["question_id"] for a in single] == list(range(5))
    assert [a["prompt"] for a in single] == texts
    assert all(a["model_id"] == tiny_llava.name and a["metadata"] == {} and a["text"] for a in single)
    assert len({a["answer_id"] for a in single + batched}) == 10
    assert [a["text"] for a in batched] == [a["text"] for a in single]
    assert seen.batch_sizes == [1] * 5 + [3, 2]
    # Switched on by flag: 24×24 = 576 CLIP tokens reach the projector as 12×12 = 144, for every image.
    assert seen.num_patches == 144 and seen.tokens_per_image == [144] * 10
    assert seen.prompts[0] == VICUNA_V1.format("<image>\nWhat is in the image?")


def test_model_vqa_chunks_together_equal_the_whole(tiny_llava, image_folder, llavabench_questions, tmp_path, seen):
    folder, _ = image_folder
    questions, _ = llavabench_questions
    common = ["--image-folder", str(folder), "--batch-size", "2"]
    model_vqa.main(run_args(tiny_llava, questions, tmp_path / "whole.jsonl", *common))
    for k in (0, 1):
        model_vqa.main(run_args(tiny_llava, questions, tmp_path / f"chunk{k}.jsonl", *common,
                                "--num-chunks", "2", "--chunk-idx", str(k)))
    chunks = [read_answers(tmp_path / f"chunk{k}.jsonl") for k in (0, 1)]
    assert [[a["question_id"] for a in chunk] for chunk in chunks] == [[0, 1, 2], [3, 4]]
    assert without_ids(chunks[0] + chunks[1]) == without_ids(read_answers(tmp_path / "whole.jsonl"))
    # Without the flag the checkpoint (trained without compression) keeps all 576 tokens.
    assert seen.num_patches == 576 and set(seen.tokens_per_image) == {576}


def test_resume_answers_only_what_is_left_and_loads_nothing_when_complete(
    tiny_llava, image_folder, llavabench_questions, tmp_path, seen, monkeypatch
):
    folder, _ = image_folder
    questions, _ = llavabench_questions
    answers = tmp_path / "answers.jsonl"
    sidecar = tmp_path / "answers.image_tokens.jsonl"
    args = run_args(tiny_llava, questions, answers, "--image-folder", str(folder), "--batch-size", "2", *COMPRESS)
    model_vqa.main(args)
    full, counts = read_answers(answers), read_answers(sidecar)
    # The image tokens beside each answer are those the projector saw for its image: 144 (24→12 switched on).
    assert [c["image_tokens"] for c in counts] == seen.tokens_per_image == [144] * 5
    assert counts == [{"question_id": i, "images": 1, "image_tokens": 144} for i in range(5)]

    # A run killed while writing the third answer: two whole lines and a torn one.
    answers.write_text("".join(json.dumps(a) + "\n" for a in full[:2]) + json.dumps(full[2])[:25])
    seen.prompts.clear()
    model_vqa.main(args + ["--resume"])
    resumed = read_answers(answers)
    assert resumed[:2] == full[:2]  # kept as they were, answer ids included
    assert without_ids(resumed) == without_ids(full) and len(seen.prompts) == 3
    assert read_answers(sidecar) == counts

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded although every answer was there")

    monkeypatch.setattr(vqa_common, "load_pretrained_model", no_load)
    before = answers.read_text()
    model_vqa.main(args + ["--resume"])
    assert answers.read_text() == before
    # Answers of another model are not resumed: everything is answered again (and so the model loads).
    other = [dict(a, model_id="another-model") for a in resumed]
    answers.write_text("".join(json.dumps(a) + "\n" for a in other))
    with pytest.raises(AssertionError, match="the model loaded"):
        model_vqa.main(args + ["--resume"])


# ---- model_vqa_science: ScienceQA ----------------------------------------------------------------


@pytest.fixture
def scienceqa_questions(tmp_path, image_folder):
    """llava_test_CQM-A.json's layout: a JSON list, image questions interleaved with text-only ones."""
    _, names = image_folder
    items = []
    for i, has_image in enumerate([True, False, False, True, True]):
        context = " ".join(["A picture of shapes."] * (1 + 2 * i))  # rows of different lengths pad differently
        question = f"Which color is shape {i}?\nContext: {context}\nOptions: (A) red (B) blue (C) green"
        item = {"id": f"{4000 + i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if has_image else "") + question},
            {"from": "gpt", "value": "A"},
        ]}
        if has_image:
            item["image"] = names[i]
        items.append(item)
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps(items))
    return path, items


def test_model_vqa_science_mixes_image_and_text_only_questions_in_a_batch(
    tiny_llava_compressed, image_folder, scienceqa_questions, tmp_path, seen
):
    folder, _ = image_folder
    questions, items = scienceqa_questions
    runs = {}
    for batch_size in (1, 3):
        answers = tmp_path / f"sqa-bs{batch_size}.jsonl"
        model_vqa_science.main(run_args(tiny_llava_compressed, questions, answers, "--image-folder", str(folder),
                                        "--single-pred-prompt", "--batch-size", str(batch_size)))
        runs[batch_size] = read_answers(answers)
    single = runs[1]
    assert [list(a) for a in single] == [VQA_KEYS] * 5
    assert [a["question_id"] for a in single] == ["4000", "4001", "4002", "4003", "4004"]
    question = items[0]["conversations"][0]["value"].replace("<image>\n", "")
    assert single[0]["prompt"] == "<image>\n" + question + "\n" + LETTER
    text_only = items[1]["conversations"][0]["value"]
    assert single[1]["prompt"] == text_only + "\n" + LETTER
    assert [a["text"] for a in runs[3]] == [a["text"] for a in single]
    # The model sees the image token only in image questions; text-only rows consume no image.
    assert seen.prompts[0] == VICUNA_V1.format("<image>\n" + question + "\n" + LETTER)
    assert seen.prompts[1] == VICUNA_V1.format(text_only + "\n" + LETTER)
    assert [p.count("<image>") for p in seen.prompts] == [1, 0, 0, 1, 1] * 2
    assert seen.batch_sizes == [1] * 5 + [3, 2]
    # A checkpoint trained with 24→12 compression: 144 tokens per image, 3 images per run.
    assert seen.tokens_per_image == [144] * 6


# ---- model_vqa_mmbench: MMBench TSV --------------------------------------------------------------


def _base64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def mmbench_tsv(tmp_path):
    """An MMBench dev TSV as pandas ``to_csv(sep='\\t')`` writes it: NaN cells empty, images base64.

    Row 1001: empty hint (NaN), options A, B, then an empty C: D is never read (2 options).
    Row 1002: hint "nan" (NaN for pandas and upstream), 4 options, a noise image over csv's 128 KiB field limit.
    Row 1003: a long hint, 3 options, D "NA" (NaN for pandas); its image cell names row 1001 (VLMEvalKit style).
    """
    rng = random.Random(0)
    noise = Image.frombytes("RGB", (300, 300), bytes(rng.getrandbits(8) for _ in range(300 * 300 * 3)))
    shapes = make_images(1, size=(320, 240), seed=2)[0]
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
              "comment", "split", "image"]
    rows = [
        [1001, "What colour is the large shape?", "", "red", "green", "", "blue", "A", "attribute", "x", "y",
         "", "dev", _base64_png(shapes)],
        [1002, 'Which "shape" is on the left?', "nan", "circle", "square", "triangle", "none of them", "B",
         "spatial", "x", "y", "", "dev", _base64_png(noise)],
        [1003, "How many shapes are there?", "Count every shape. " * 6, "one", "two", "three", "NA", "C",
         "counting", "x", "y", "", "dev", "1001"],
    ]
    path = tmp_path / "mmbench_dev_20230712.tsv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    assert len(rows[1][-1]) > 131072
    return path


def test_mmbench_tsv_cells_read_as_pandas_and_upstream_do(mmbench_tsv):
    rows = model_vqa_mmbench.read_tsv(str(mmbench_tsv))
    assert [row["index"] for row in rows] == [1001, 1002, 1003]
    assert [model_vqa_mmbench.row_options(row) for row in rows] == [
        ["red", "green"], ["circle", "square", "triangle", "none of them"], ["one", "two", "three"]]
    assert rows[1]["question"] == 'Which "shape" is on the left?'
    assert [model_vqa_mmbench.is_missing(row["hint"]) for row in rows] == [True, True, False]
    assert all(model_vqa_mmbench.is_missing(v) for v in ["", "nan", "NaN", "None", "NONE", "NA", "N/A", "null"])
    assert not any(model_vqa_mmbench.is_missing(v) for v in ["0", "no", " ", "Nana", "none of them"])


def _edge_case_tsv(path):
    """Hints and options in every spelling pandas or upstream treats as missing, and near misses; CRLF lines."""
    cells = ["", "nan", "NaN", "NAN", "None", "none", "NA", "N/A", "n/a", "NULL", "null", "#N/A", "<NA>", "-nan",
             "1.#IND", "0", " ", "nan ", "Nan", "na", "'quoted'", '"a ""b"" c"', "x\ty"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\r\n")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "image"])
        for i, cell in enumerate(cells):
            writer.writerow([i, f"Question {i}?", cell, "yes", cell, "maybe", cell, "data"])
    return path


@pytest.mark.parametrize("which", ["fixture", "edge cases"])
def test_mmbench_tsv_reader_agrees_with_pandas(which, mmbench_tsv, tmp_path):
    """Upstream reads the TSV with ``pandas.read_table``: the same indices, questions, hints and options."""
    pd = pytest.importorskip("pandas")
    path = mmbench_tsv if which == "fixture" else _edge_case_tsv(tmp_path / "edge.tsv")

    def missing(value) -> bool:  # upstream's test on a pandas cell
        return (isinstance(value, float) and math.isnan(value)) or (
            isinstance(value, str) and value.lower() in ("nan", "none"))

    def pandas_view(row) -> tuple:
        options = []
        for letter in "ABCD":
            if missing(row[letter]):
                break
            options.append(row[letter])
        return int(row["index"]), row["question"], None if missing(row["hint"]) else row["hint"], options

    ours = [
        (row["index"], row["question"], None if model_vqa_mmbench.is_missing(row["hint"]) else row["hint"],
         model_vqa_mmbench.row_options(row))
        for row in model_vqa_mmbench.read_tsv(str(path))
    ]
    assert ours == [pandas_view(row) for _, row in pd.read_table(path).iterrows()]
    assert all(isinstance(row[0], int) for row in ours)


def test_model_vqa_mmbench_all_rounds_rotate_the_options(tiny_llava, mmbench_tsv, tmp_path, seen):
    runs = {}
    for batch_size in (1, 4):
        answers = tmp_path / f"mmbench-bs{batch_size}.jsonl"
        model_vqa_mmbench.main(run_args(tiny_llava, mmbench_tsv, answers, "--all-rounds", "--single-pred-prompt",
                                        "--lang", "cn", "--batch-size", str(batch_size), *COMPRESS))
        runs[batch_size] = read_answers(answers)
    single = runs[1]
    assert [list(a) for a in single] == [MMBENCH_KEYS] * 9
    assert [(a["question_id"], a["round_id"]) for a in single] == [
        (1001, 0), (1001, 1), (1002, 0), (1002, 1), (1002, 2), (1002, 3), (1003, 0), (1003, 1), (1003, 2)]
    assert [a["text"] for a in runs[4]] == [a["text"] for a in single]

    # Round 1 of 1002: the options move up one place, the letters A.. stay in order, option_char records
    # each option's original letter; the "nan" hint is left out.
    second = single[3]
    assert second["options"] == ["square", "triangle", "none of them", "circle"]
    assert second["option_char"] == ["B", "C", "D", "A"]
    assert second["prompt"] == ('Which "shape" is on the left?\nA. square\nB. triangle\nC. none of them\n'
                                "D. circle")
    assert single[0]["prompt"] == "What colour is the large shape?\nA. red\nB. green"
    assert single[7]["prompt"] == "Count every shape. " * 6 + "\nHow many shapes are there?\nA. two\nB. three\nC. one"
    # The Chinese instruction reaches the model but not the answer's prompt.
    assert seen.prompts[3] == VICUNA_V1.format("<image>\n" + second["prompt"] + "\n请直接回答选项字母。")
    assert seen.tokens_per_image == [144] * 18


def test_model_vqa_mmbench_one_round_and_english_instruction(tiny_llava, mmbench_tsv, tmp_path, seen):
    answers = tmp_path / "mmbench.jsonl"
    model_vqa_mmbench.main(run_args(tiny_llava, mmbench_tsv, answers, "--single-pred-prompt",
                                    "--num-chunks", "2", "--chunk-idx", "1"))
    lines = read_answers(answers)
    assert [(a["question_id"], a["round_id"], a["option_char"]) for a in lines] == [(1003, 0, ["A", "B", "C"])]
    assert seen.prompts == [VICUNA_V1.format("<image>\n" + lines[0]["prompt"] + "\n" + LETTER)]


# ---- Shared parts --------------------------------------------------------------------------------


def test_plain_pretrained_checkpoints_switch_to_the_mmtag_template():
    switch = vqa_common.plain_model_conv_mode
    assert switch("llava-v1.5-7b-pretrain-plain", "v1") == "v1_mmtag"
    assert switch("llava-v1.5-7b-pretrain-plain", "v0_mmtag") == "v0_mmtag"
    assert switch("llava-v1.5-7b-plain-finetune", "v1") == "v1"
    assert switch("llava-v1.5-7b-pretrain-plain", "vicuna_v1") == "vicuna_v1"  # no vicuna_v1_mmtag template
    assert switch("llava-v1.5-7b", "v1") == "v1"


@pytest.mark.parametrize("module, question_file, conv_mode, extra", [
    (model_vqa, "tables/question.jsonl", "llava_v1", {"top_p": None, "num_beams": 1, "max_new_tokens": 1024}),
    (model_vqa_science, "tables/question.json", "llava_v0",
     {"single_pred_prompt": False, "answer_prompter": False, "max_new_tokens": 1024}),
    (model_vqa_mmbench, "tables/question.jsonl", "llava_v1",
     {"all_rounds": False, "single_pred_prompt": False, "lang": "en", "top_p": None, "num_beams": 1}),
    (model_vqa_loader, "tables/question.jsonl", "llava_v1", {"max_new_tokens": 128, "num_workers": 4}),
])
def test_upstream_defaults(module, question_file, conv_mode, extra):
    args = module.build_parser().parse_args([])
    expected = {"model_path": "facebook/opt-350m", "model_base": None, "image_folder": "",
                "answers_file": "answer.jsonl", "question_file": question_file, "conv_mode": conv_mode, "num_chunks": 1, "chunk_idx": 0,
                "temperature": 0.2, "batch_size": 1, "device": None, "use_token_compression": False, **extra}
    assert {key: getattr(args, key) for key in expected} == expected


BAD_ARGS = [
    (["--conv-mode", "vicuna_v9"], ["'vicuna_v9'", "vicuna_v1", "llava_v1"]),
    (["--num-chunks", "0"], ["--num-chunks", "got 0"]),
    (["--num-chunks", "2", "--chunk-idx", "2"], ["--chunk-idx 2", "0..1"]),
    (["--chunk-idx", "-1"], ["--chunk-idx -1"]),
    (["--batch-size", "0"], ["--batch-size", "got 0"]),
    (["SAME"], ["is the same file as --question-file"]),
    (["--question-file", "missing.tsv"], ["'missing.tsv'", "does not exist"]),
]


@pytest.mark.parametrize("module", [model_vqa, model_vqa_science, model_vqa_mmbench, model_vqa_loader])
@pytest.mark.parametrize("bad, message", BAD_ARGS)
def test_bad_arguments_fail_before_the_model_loads(module, bad, message, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(vqa_common, "load_pretrained_model", no_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "questions").write_text("")
    answers = "questions" if bad == ["SAME"] else "answers/a.jsonl"
    argv = ["--model-path", "nowhere", "--question-file", "questions", "--answers-file", answers]
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv + ([] if bad == ["SAME"] else bad))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(part in err for part in message), err
    assert not (tmp_path / "answers").exists()


@pytest.mark.parametrize("module, content, message", [
    (model_vqa, '{"question_id": 0, "text": "Hi?"}\n', "line 1 has no 'image'"),
    (model_vqa_loader, '\n{"question_id": 0, "image": "a.png"}\n', "line 2 has no 'text'"),
    (model_vqa_science, '{"id": "1"}', "not a list"),
    (model_vqa_science, '[{"id": "1"}]', "item 0 has no 'conversations'"),
    (model_vqa_science, '[{"id": "1", "conversations": []}]', "item 0: 'conversations' is empty"),
    (model_vqa_mmbench, "index\tquestion\thint\tA\n1\tWhy?\t\tyes\n", "lacks the column(s) image"),
])
def test_malformed_question_files_fail_before_the_model_loads(module, content, message, tmp_path, monkeypatch):
    monkeypatch.setattr(vqa_common, "load_pretrained_model", lambda *a, **k: pytest.fail("model loaded"))
    questions = tmp_path / "questions"
    questions.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--model-path", "nowhere", "--question-file", str(questions),
                     "--answers-file", str(tmp_path / "a.jsonl")])
    assert str(exit_info.value.code).startswith("error: ") and message in exit_info.value.code


def test_model_vqa_loader_keeps_upstream_answer_lines(tiny_llava, image_folder, tmp_path, seen):
    folder, names = image_folder
    questions = write_question_file(tmp_path / "q.jsonl", names[:2])
    answers = tmp_path / "loader.jsonl"
    model_vqa_loader.main(run_args(tiny_llava, questions, answers, "--image-folder", str(folder),
                                   "--num-workers", "0"))
    lines = read_answers(answers)
    assert [list(a) for a in lines] == [VQA_KEYS] * 2
    assert [a["prompt"] for a in lines] == ["What is in the image?", "What color is the shape?"]
    assert seen.prompts[1] == VICUNA_V1.format("<image>\nWhat color is the shape?")
    assert torch.tensor(seen.tokens_per_image).eq(576).all()
