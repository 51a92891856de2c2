"""Tiny benchmarks in each benchmark's real format and layout, to try the eval scripts without the data.

``python -m llava.eval.sample_benchmarks`` writes, under ``--eval-dir`` (default
``playground/data/eval``, where ``scripts/v1_5/eval/*.sh`` look), two to four questions of every
benchmark (or of those named) with generated stand-in images, in upstream LLaVA's
``docs/Evaluation.md`` layout. The files are not the benchmarks' data and the scores on them mean
nothing; they let one run a script, a converter or a scorer end to end in seconds.

One writer per file format, shared by this command and the eval tests, so each format is spelled
out once. A writer takes the records a
test cares about and fills in the rest of the format: LLaVA's question lines (``question_id``,
``image``, ``text`` and the prompt suffix LLaVA-1.5 uses), the benchmark's own annotation keys, and
the file names and folders of upstream LLaVA's ``docs/Evaluation.md`` layout. Writers that produce a
question file return the image paths it names (relative to the benchmark's image folder), so a test
that runs the model can put real images there with :func:`save_images_as`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from llava.eval.eval_mme import SUBTASKS
from llava.standins import make_images

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
YES_NO = "Please answer yes or no."


# ---------------------------------------------------------------- generic files


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def llava_question(qid, image: str, text: str, **extra) -> dict:
    """One line of LLaVA's generic question JSONL (model_vqa, model_vqa_loader)."""
    return {"question_id": qid, "image": image, "text": text, **extra}


def answer(qid, text, prompt=f"q\n{SHORT_ANSWER}") -> dict:
    """One line of a LLaVA answers file."""
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


def save_images_as(folder: Path, names: Sequence[str], seed: int = 0) -> list[Path]:
    """Generated images (``llava.standins.make_images``) saved under ``folder`` with the given relative names."""
    paths = []
    for name, image in zip(names, make_images(len(names), size=(64, 48), seed=seed), strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths


def image_base64(image: Image.Image) -> str:
    """A PNG as the base64 text of an MMBench ``image`` cell."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------- TextVQA


@dataclass(frozen=True)
class TextVQAItem:
    image_id: str
    question: str
    answers: tuple[str, ...]  # the 10 human answers
    ocr_tokens: tuple[str, ...] = ()


def textvqa_prompt(question: str, ocr_tokens: Sequence[str]) -> str:
    """A question of llava_textvqa_val_v051_ocr.jsonl: the question, the OCR reference, the instruction."""
    return f"{question}\nReference OCR token: {', '.join(ocr_tokens)}\n{SHORT_ANSWER}"


def write_textvqa(root: Path, items: Sequence[TextVQAItem]) -> list[str]:
    """``TextVQA_0.5.1_val.json`` and LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` in ``root``.

    The question lines carry the image id as ``question_id``, as LLaVA's do. Returns the image
    names (under ``train_images/``).
    """
    write_json(root / "TextVQA_0.5.1_val.json", {
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [{"question": item.question, "image_id": item.image_id, "question_id": 34602 + i,
                  "image_classes": [], "set_name": "val", "answers": list(item.answers)}
                 for i, item in enumerate(items)],
    })
    names = [f"{item.image_id}.jpg" for item in items]
    write_jsonl(root / "llava_textvqa_val_v051_ocr.jsonl",
                [llava_question(item.image_id, name, textvqa_prompt(item.question, item.ocr_tokens))
                 for item, name in zip(items, names)])
    return names


# ---------------------------------------------------------------- POPE


@dataclass(frozen=True)
class PopeItem:
    category: str  # adversarial, popular, random
    image: str
    object: str
    label: str  # yes / no


def write_pope(root: Path, items: Sequence[PopeItem]) -> list[str]:
    """POPE's ``coco/coco_pope_<category>.json`` and LLaVA's ``llava_pope_test.jsonl`` in ``root``.

    POPE's question ids restart at 1 in each category file; LLaVA's run 0, 1, ... over the items.
    Returns the image names (under ``val2014/``), each once.
    """
    by_category: dict[str, list[dict]] = {}
    questions = []
    for i, item in enumerate(items):
        text = f"Is there a {item.object} in the image?"
        lines = by_category.setdefault(item.category, [])
        lines.append({"question_id": len(lines) + 1, "image": item.image, "text": text, "label": item.label})
        questions.append(llava_question(i, item.image, f"{text}\n{SHORT_ANSWER}", category=item.category))
    for category, lines in by_category.items():
        write_jsonl(root / "coco" / f"coco_pope_{category}.json", lines)
    write_jsonl(root / "llava_pope_test.jsonl", questions)
    return list(dict.fromkeys(item.image for item in items))


# ---------------------------------------------------------------- ScienceQA


@dataclass(frozen=True)
class SQAProblem:
    pid: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    question: str = "Which of these is right?"
    image: bool = True  # an image.png in images/<split>/<pid>/
    split: str = "test"
    hint: str = ""


def write_scienceqa(base: Path, problems: Sequence[SQAProblem]) -> list[str]:
    """ScienceQA's ``problems.json`` and ``pid_splits.json``, and LLaVA's ``llava_test_CQM-A.json``, in ``base``.

    The LLaVA file holds the test split (image problems as ``<image>\\n`` + context, question and
    lettered options). Returns the test images' paths (``<pid>/image.png`` under ``images/test``).
    """
    splits: dict[str, list[str]] = {}
    for problem in problems:
        splits.setdefault(problem.split, []).append(problem.pid)
    write_json(base / "pid_splits.json", splits)
    write_json(base / "problems.json", {
        p.pid: {"question": p.question, "choices": list(p.choices), "answer": p.answer, "hint": p.hint,
                "image": "image.png" if p.image else None, "task": "closed choice", "grade": "grade2",
                "subject": "natural science", "topic": "science", "category": "x", "skill": "x",
                "lecture": "", "solution": "", "split": p.split}
        for p in problems
    })
    items = []
    for p in problems:
        if p.split != "test":
            continue
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCDE", p.choices))
        value = f"Context: {p.hint or 'N/A'}\n{p.question}\n{options}"
        item = {"id": p.pid, "conversations": [{"from": "human", "value": ("<image>\n" if p.image else "") + value},
                                               {"from": "gpt", "value": "ABCDE"[p.answer]}]}
        if p.image:
            item["image"] = f"{p.pid}/image.png"
        items.append(item)
    write_json(base / "llava_test_CQM-A.json", items)
    return [item["image"] for item in items if "image" in item]


# ---------------------------------------------------------------- GQA


def gqa_question(answer_: str, structural: str, semantic: str = "attr", balanced: bool = True, group=None,
                 text: str = "Is it red?", image_id: str = "n1") -> dict:
    """One entry of GQA's ``{tier}_questions.json``."""
    return {"question": text, "answer": answer_, "isBalanced": balanced, "imageId": image_id,
            "types": {"structural": structural, "semantic": semantic, "detailed": "x"},
            "groups": {"global": group, "local": None},
            "semantic": [{"operation": "select", "argument": "dog", "dependencies": []},
                         {"operation": "verify color", "argument": "red", "dependencies": [0]}]}


def write_gqa_questions(path: Path, questions: dict[str, dict]) -> Path:
    """GQA's questions file (``testdev_balanced_questions.json``): ``{question id: question}``."""
    return write_json(path, questions)


def write_llava_gqa(path: Path, questions: dict[str, dict]) -> list[str]:
    """LLaVA's ``llava_gqa_testdev_balanced.jsonl`` for the balanced questions; returns the image names."""
    balanced = {qid: q for qid, q in questions.items() if q["isBalanced"]}
    write_jsonl(path, [llava_question(qid, f"{q['imageId']}.jpg", f"{q['question']}\n{SHORT_ANSWER}")
                       for qid, q in balanced.items()])
    return list(dict.fromkeys(f"{q['imageId']}.jpg" for q in balanced.values()))


# ---------------------------------------------------------------- VQAv2, VizWiz, MM-Vet, LLaVA-Bench


def vqav2_image(qid: int) -> str:
    """COCO test2015's file name of a question's image (VQA question ids are image id * 1000 + k)."""
    return f"COCO_test2015_{qid // 1000:012d}.jpg"


def write_vqav2(root: Path, texts: dict[int, str], test_dev: Sequence[int] = ()) -> list[str]:
    """LLaVA's ``llava_vqav2_mscoco_test2015.jsonl`` (every question) and ``..._test-dev2015.jsonl`` (``test_dev``).

    Returns the test-dev images' names (under ``test2015/``).
    """
    lines = {qid: llava_question(qid, vqav2_image(qid), f"{text}\n{SHORT_ANSWER}", category="default")
             for qid, text in texts.items()}
    write_jsonl(root / "llava_vqav2_mscoco_test2015.jsonl", lines.values())
    write_jsonl(root / "llava_vqav2_mscoco_test-dev2015.jsonl", [lines[qid] for qid in test_dev])
    return list(dict.fromkeys(vqav2_image(qid) for qid in test_dev))


def write_vizwiz(path: Path, texts: Sequence[str]) -> list[str]:
    """LLaVA's VizWiz ``llava_test.jsonl``, question ids 0, 1, ...; returns the image names (under ``test/``)."""
    names = [f"VizWiz_test_{i:08d}.jpg" for i in range(len(texts))]
    write_jsonl(path, [llava_question(i, name, f"{text}\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}")
                       for i, (name, text) in enumerate(zip(names, texts))])
    return names


def write_mmvet(path: Path, texts: Sequence[str]) -> list[str]:
    """LLaVA's ``llava-mm-vet.jsonl``, question ids 0, 1, ... for MM-Vet's v1_<id>; returns the image names."""
    names = [f"v1_{i}.png" for i in range(len(texts))]
    write_jsonl(path, [llava_question(i, name, text) for i, (name, text) in enumerate(zip(names, texts))])
    return names


def write_llavabench(path: Path, texts: Sequence[str]) -> list[str]:
    """llava-bench-in-the-wild's ``questions.jsonl`` (with its ``category``); returns the image names."""
    names = [f"{i + 1:03d}.jpg" for i in range(len(texts))]
    write_jsonl(path, [{"image": name, "text": text, "category": "conv", "question_id": i}
                       for i, (name, text) in enumerate(zip(names, texts))])
    return names


# ---------------------------------------------------------------- SEED-Bench


@dataclass(frozen=True)
class SeedQuestion:
    question_id: str  # a string in SEED-Bench.json
    question_type: str
    question_type_id: int
    answer: str  # A..D
    data_type: str = "image"  # or video
    question: str = "What is in the image?"
    choices: tuple[str, str, str, str] = ("a circle", "a square", "a triangle", "a star")

    @property
    def image(self) -> str:
        """The image LLaVA asks about: the picture, or the middle frame it extracted from the video."""
        if self.data_type == "video":
            return f"SEED-Bench-video-image/{self.question_id}.png"
        return f"SEED-Bench-image/{self.question_id}.jpg"


def write_seed_bench(root: Path, questions: Sequence[SeedQuestion]) -> list[str]:
    """``SEED-Bench.json`` and LLaVA's ``llava-seed-bench.jsonl`` in ``root``; returns the image paths.

    LLaVA's question lines hold the id as a number, SEED-Bench.json as a string.
    """
    types = {q.question_type: q.question_type_id for q in questions}
    write_json(root / "SEED-Bench.json", {
        "question_type": types,
        "questions": [
            {"answer": q.answer, **{f"choice_{c}": choice for c, choice in zip("abcd", q.choices)},
             "data_id": q.image.split("/")[-1] if q.data_type == "image" else f"{q.question_id}.mp4",
             "data_type": q.data_type, "question": q.question, "question_id": q.question_id,
             "question_type_id": q.question_type_id}
            for q in questions
        ],
    })
    lines = []
    for q in questions:
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", q.choices))
        lines.append({"image": q.image, "text": f"{q.question}\n{options}\n{OPTION_LETTER}",
                      "category": q.question_type, "question_id": int(q.question_id)})
    write_jsonl(root / "llava-seed-bench.jsonl", lines)
    return [q.image for q in questions]


# ---------------------------------------------------------------- MMBench


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source",
                   "l2-category", "comment", "split", "image"]


def mmbench_row(index: int, question: str, options: Sequence[str], answer_: str, image: str, hint: str = "nan",
                category: str = "recognition") -> list:
    """One row of an MMBench dev TSV in ``MMBENCH_COLUMNS`` order; missing options as empty cells."""
    cells = list(options) + [""] * (4 - len(options))
    return [index, question, hint, *cells, answer_, category, "s", "l2", "nan", "dev", image]


def write_mmbench_tsv(path: Path, rows: Sequence[Sequence]) -> Path:
    """An MMBench TSV: the header, then ``rows`` (a row may be cut short, as some are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(MMBENCH_COLUMNS)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- MME


# These keep images in images/ and the question files in questions_answers_YN/; the others side by side.
MME_IMAGES_DIR_SUBTASKS = ("artwork", "celebrity", "landmark", "posters", "scene")


@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image: str  # the image's stem, e.g. 0001
    question: str  # MME's wording, ending in "Please answer yes or no."
    truth: str  # Yes / No

    @property
    def image_path(self) -> str:
        """The image inside MME_Benchmark_release_version; also the question_id of LLaVA's lines."""
        if self.subtask in MME_IMAGES_DIR_SUBTASKS:
            return f"{self.subtask}/images/{self.image}.png"
        return f"{self.subtask}/{self.image}.png"

    @property
    def prompt(self) -> str:
        """LLaVA's question: MME's without the yes/no instruction, then the short-answer one."""
        return self.question.replace(YES_NO, "").strip() + "\n" + SHORT_ANSWER


def mme_questions(images: Sequence[str] = ("0001", "0002")) -> list[MMEQuestion]:
    """Two questions per image (Yes, then No) in all 14 subtasks; every No question is spelled with
    two spaces before the instruction, as some MME files are."""
    return [
        question
        for subtask in (*SUBTASKS["Perception"], *SUBTASKS["Cognition"])
        for image in images
        for question in (MMEQuestion(subtask, image, f"Is there a {subtask} {image}? {YES_NO}", "Yes"),
                         MMEQuestion(subtask, image, f"Is there no {subtask} {image}?  {YES_NO}", "No"))
    ]


def write_mme(mme_dir: Path, questions: Sequence[MMEQuestion], real_images: bool = False) -> list[str]:
    """MME's ``MME_Benchmark_release_version`` and LLaVA's ``llava_mme.jsonl`` in ``mme_dir``.

    Each image gets a ``<stem>.txt`` of ``question<TAB>Yes|No`` lines next to it (in
    ``questions_answers_YN/`` for the five subtasks that keep images in ``images/``). Images are
    empty files unless ``real_images``. Returns the image paths.
    """
    data = mme_dir / "MME_Benchmark_release_version"
    lines: dict[Path, list[str]] = {}
    for q in questions:
        qa_dir = data / q.subtask / ("questions_answers_YN" if q.subtask in MME_IMAGES_DIR_SUBTASKS else "")
        lines.setdefault(qa_dir / f"{q.image}.txt", []).append(f"{q.question}\t{q.truth}\n")
    for path, path_lines in lines.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(path_lines))
    images = list(dict.fromkeys(q.image_path for q in questions))
    if real_images:
        save_images_as(data, images)
    else:
        for image in images:
            (data / image).parent.mkdir(parents=True, exist_ok=True)
            (data / image).write_bytes(b"")
    write_jsonl(mme_dir / "llava_mme.jsonl",
                [llava_question(q.image_path, q.image_path, q.prompt, category=q.subtask) for q in questions])
    return images


# ---------------------------------------------------------------- the command


def _vqav2(folder: Path) -> None:
    save_images_as(folder / "test2015", write_vqav2(folder, {1000: "What is on the table?", 1001: "Is it red?",
                                                             2000: "How many dogs are there?"}, test_dev=[1000, 1001]))


def _gqa(folder: Path) -> None:
    questions = {"201": gqa_question("yes", "verify", image_id="n1"),
                 "202": gqa_question("red", "query", text="What color is it?", image_id="n2"),
                 "203": gqa_question("no", "verify", image_id="n3", balanced=False)}
    write_gqa_questions(folder / "data" / "testdev_balanced_questions.json", questions)
    save_images_as(folder / "data" / "images", write_llava_gqa(folder / "llava_gqa_testdev_balanced.jsonl", questions))


def _scienceqa(folder: Path) -> None:
    save_images_as(folder / "images" / "test", write_scienceqa(folder, [
        SQAProblem("1", ("a cat", "a dog"), 0, "Which animal is shown?"),
        SQAProblem("2", ("yes", "no"), 1, "Is the sky green?", image=False),
        SQAProblem("3", ("red", "blue", "green"), 2, "Which color is it?", split="val"),
    ]))


def _textvqa(folder: Path) -> None:
    save_images_as(folder / "train_images", write_textvqa(folder, [
        TextVQAItem("0054c91397f2fe05", "what brand is the camera?", ("nikon",) * 10, ("nikon", "d90")),
        TextVQAItem("003a8ae2ef43b901", "what number is shown?", ("7",) * 8 + ("seven",) * 2, ("7",)),
    ]))


def _pope(folder: Path) -> None:
    items = [PopeItem(split, f"COCO_val2014_00000000004{i}.jpg", thing, label)
             for i, (split, thing, label) in enumerate([("adversarial", "dog", "yes"), ("adversarial", "cat", "no"),
                                                        ("popular", "car", "yes"), ("random", "chair", "no")])]
    save_images_as(folder / "val2014", write_pope(folder, items))


def _mmbench_tsv(path: Path, questions: Sequence[str]) -> None:
    images = [image_base64(image) for image in make_images(len(questions), size=(64, 48), seed=3)]
    write_mmbench_tsv(path, [mmbench_row(i, question, ["red", "green", "blue"], "ABC"[i % 3], image)
                             for i, (question, image) in enumerate(zip(questions, images))])


def _seed(folder: Path) -> None:
    save_images_as(folder, write_seed_bench(folder, [
        SeedQuestion("101", "Scene Understanding", 1, "A"), SeedQuestion("102", "Instance Identity", 2, "C"),
        SeedQuestion("103", "Action Recognition", 10, "B", data_type="video"),
    ]))


# benchmark (scripts/v1_5/eval/<name>.sh) -> (its folder under the eval dir, the writer of its files there)
SAMPLES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "vqav2": ("vqav2", _vqav2),
    "gqa": ("gqa", _gqa),
    "vizwiz": ("vizwiz", lambda d: save_images_as(d / "test", write_vizwiz(d / "llava_test.jsonl", [
        "What is this?", "What color is the shirt?"]))),
    "sqa": ("scienceqa", _scienceqa),
    "textvqa": ("textvqa", _textvqa),
    "pope": ("pope", _pope),
    "mme": ("MME", lambda d: write_mme(d, mme_questions(images=("0001",)), real_images=True)),
    "mmbench": ("mmbench", lambda d: _mmbench_tsv(d / "mmbench_dev_20230712.tsv",
                                                  ["What color is the square?", "Which color is missing?"])),
    "mmbench_cn": ("mmbench_cn", lambda d: _mmbench_tsv(d / "mmbench_dev_cn_20231003.tsv",
                                                        ["方块是什么颜色？", "缺少哪种颜色？"])),
    "seed": ("seed_bench", _seed),
    "mmvet": ("mm-vet", lambda d: save_images_as(d / "images", write_mmvet(d / "llava-mm-vet.jsonl", [
        "What is in the image?", "How many shapes are there?"]))),
    "llavabench": ("llava-bench-in-the-wild", lambda d: save_images_as(d / "images", write_llavabench(
        d / "questions.jsonl", ["Describe the image.", "What stands out?"]))),
}


def write_samples(eval_dir: Path, names: Sequence[str] = tuple(SAMPLES)) -> list[Path]:
    """Write the tiny benchmarks ``names`` under ``eval_dir``; returns their folders.

    A benchmark folder that already exists is refused (never overwrite a real benchmark's files).
    """
    unknown = [name for name in names if name not in SAMPLES]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; the eval scripts are {list(SAMPLES)}.")
    folders = [eval_dir / SAMPLES[name][0] for name in names]
    present = [str(folder) for folder in folders if folder.exists()]
    if present:
        raise ValueError(f"{present} already exist; pass an empty --eval-dir (the samples never replace files).")
    for name, folder in zip(names, folders):
        SAMPLES[name][1](folder)
    return folders


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", type=Path, default=Path("playground/data/eval"),
                        help="where to write (the eval scripts' EVAL_DIR; default: %(default)s)")
    parser.add_argument("benchmarks", nargs="*", default=list(SAMPLES), metavar="BENCHMARK",
                        help=f"which to write (default: all of {', '.join(SAMPLES)})")
    args = parser.parse_args(argv)
    try:
        folders = write_samples(args.eval_dir, args.benchmarks)
    except ValueError as err:
        parser.error(str(err))
    for folder in folders:
        print(folder)
    return folders


if __name__ == "__main__":
    main()
