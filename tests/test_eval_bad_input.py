"""Bad input to every eval scorer, converter and ``model_vqa*`` script: a clear error, never a lost file.

Each case writes a small valid benchmark in its real layout (``llava.eval.sample_benchmarks``), breaks
one thing (a field of one answer or annotation line, an output flag naming an input, an empty
input), runs the tool's ``main`` and asserts three properties:

* it exits with status != 0 through ``SystemExit`` (no ``KeyError``/``AttributeError``/... escapes);
* the message names the file (and, for a line-level fault, the line and the field);
* every file that existed before the run has the same bytes after it (no input overwritten).

The ``model_vqa*`` cases pass a checkpoint path that does not exist: the checks must come before the
model loads, so reaching the loader is itself a failure of the case.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
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
    model_vqa,
    model_vqa_loader,
    model_vqa_mmbench,
    model_vqa_science,
)
from llava.eval.sample_benchmarks import (
    PopeItem,
    SeedQuestion,
    SQAProblem,
    TextVQAItem,
    answer,
    gqa_question,
    image_base64,
    mmbench_row,
    mme_questions,
    textvqa_prompt,
    write_gqa_questions,
    write_json,
    write_jsonl,
    write_mmbench_tsv,
    write_mme,
    write_mmvet,
    write_pope,
    write_scienceqa,
    write_seed_bench,
    write_vizwiz,
    write_vqav2,
)
from llava.standins import make_images

Run = tuple[Callable, list[str], list[str]]  # (main, argv, pieces the error message must contain)
IMAGE_CELL = image_base64(make_images(1, size=(16, 16), seed=0)[0])
NO_MODEL = "no-such-checkpoint-dir"


# ---------------------------------------------------------------- a valid benchmark per answer-reading tool


def _pope(tmp: Path, answers: list) -> Run:
    write_pope(tmp, [PopeItem("adversarial", "a.jpg", "dog", "yes"), PopeItem("adversarial", "b.jpg", "cat", "no")])
    write_jsonl(tmp / "ans.jsonl", answers)
    return eval_pope.main, ["--annotation-dir", str(tmp / "coco"), "--question-file",
                            str(tmp / "llava_pope_test.jsonl"), "--result-file", str(tmp / "ans.jsonl")], []


def _sqa(tmp: Path, answers: list) -> Run:
    write_scienceqa(tmp, [SQAProblem("p1", ("x", "y"), 0), SQAProblem("p2", ("x", "y"), 1)])
    write_jsonl(tmp / "ans.jsonl", answers)
    return eval_science_qa.main, ["--base-dir", str(tmp), "--result-file", str(tmp / "ans.jsonl"),
                                  "--output-file", str(tmp / "out.json"), "--output-result", str(tmp / "res.json")], []


TEXTVQA_ITEMS = [TextVQAItem("img1", "what is it?", ("a",) * 10), TextVQAItem("img2", "what color?", ("red",) * 10)]


def _textvqa(tmp: Path, answers: list) -> Run:
    from llava.eval.sample_benchmarks import write_textvqa

    write_textvqa(tmp, TEXTVQA_ITEMS)
    write_jsonl(tmp / "ans.jsonl", answers)
    return eval_textvqa.main, ["--annotation-file", str(tmp / "TextVQA_0.5.1_val.json"),
                               "--result-file", str(tmp / "ans.jsonl")], []


def _mmbench_tsv(tmp: Path, answer_letters=("A", "B")) -> Path:
    return write_mmbench_tsv(tmp / "mmbench.tsv", [
        mmbench_row(i, f"q{i}?", ["red", "blue", "green"], letter, IMAGE_CELL) for i, letter in enumerate(answer_letters)
    ])


def _mmbench(tmp: Path, answers: list) -> Run:
    _mmbench_tsv(tmp)
    write_jsonl(tmp / "ans.jsonl", answers)
    return eval_mmbench.main, ["--annotation-file", str(tmp / "mmbench.tsv"), "--result-file",
                               str(tmp / "ans.jsonl")], []


def _convert_gqa(tmp: Path, answers: list) -> Run:
    write_jsonl(tmp / "ans.jsonl", answers)
    return convert_gqa_for_eval.main, ["--src", str(tmp / "ans.jsonl"), "--dst", str(tmp / "pred.json")], []


def _convert_mmvet(tmp: Path, answers: list) -> Run:
    write_jsonl(tmp / "ans.jsonl", answers)
    return convert_mmvet_for_eval.main, ["--src", str(tmp / "ans.jsonl"), "--dst", str(tmp / "res.json")], []


def _convert_vizwiz(tmp: Path, answers: list) -> Run:
    write_vizwiz(tmp / "llava_test.jsonl", ["what?", "which?"])
    write_jsonl(tmp / "ans.jsonl", answers)
    return convert_vizwiz_for_submission.main, [
        "--annotation-file", str(tmp / "llava_test.jsonl"), "--result-file", str(tmp / "ans.jsonl"),
        "--result-upload-file", str(tmp / "upload" / "m.json")], []


def _convert_vqav2(tmp: Path, answers: list) -> Run:
    write_vqav2(tmp, {1000: "what?", 2000: "which?"}, test_dev=[1000, 2000])
    write_jsonl(tmp / "answers" / "dev" / "m" / "merge.jsonl", answers)
    return convert_vqav2_for_submission.main, ["--dir", str(tmp), "--split", "dev", "--ckpt", "m"], []


def _convert_seed(tmp: Path, answers: list) -> Run:
    write_seed_bench(tmp, [SeedQuestion("1", "Scene", 1, "A"), SeedQuestion("2", "Scene", 1, "B")])
    write_jsonl(tmp / "ans.jsonl", answers)
    return convert_seed_for_submission.main, [
        "--annotation-file", str(tmp / "SEED-Bench.json"), "--result-file", str(tmp / "ans.jsonl"),
        "--result-upload-file", str(tmp / "upload.jsonl")], []


def _convert_mmbench(tmp: Path, answers: list) -> Run:
    _mmbench_tsv(tmp)
    write_jsonl(tmp / "res" / "m.jsonl", answers)
    return convert_mmbench_for_submission.main, [
        "--annotation-file", str(tmp / "mmbench.tsv"), "--result-dir", str(tmp / "res"),
        "--upload-dir", str(tmp / "up"), "--experiment", "m"], []


MME_QUESTIONS = [q for q in mme_questions(images=("0001",))]


def _convert_mme(tmp: Path, answers: list) -> Run:
    write_mme(tmp, MME_QUESTIONS)
    write_jsonl(tmp / "answers" / "m.jsonl", answers)
    return convert_answer_to_mme.main, ["--experiment", "m"], []


def _valid_answers(tool: str) -> list[dict]:
    """Two (or, for MME, all) answer lines that the tool accepts."""
    if tool == "pope":
        return [answer(0, "Yes"), answer(1, "No")]
    if tool == "sqa":
        return [answer("p1", "A"), answer("p2", "B")]
    if tool == "textvqa":
        return [answer(item.image_id, "a", prompt=textvqa_prompt(item.question, item.ocr_tokens))
                for item in TEXTVQA_ITEMS]
    if tool in ("mmbench", "convert_mmbench"):
        return [answer(0, "A"), answer(1, "B")]
    if tool == "convert_seed":
        return [answer(1, "A"), answer(2, "B")]
    if tool == "convert_vqav2":
        return [answer(1000, "yes"), answer(2000, "no")]
    if tool == "convert_mme":
        return [answer(q.image_path, "Yes", prompt=q.prompt) for q in MME_QUESTIONS]
    return [answer(0, "a"), answer(1, "b")]


ANSWER_TOOLS: dict[str, Callable[[Path, list], Run]] = {
    "pope": _pope, "sqa": _sqa, "textvqa": _textvqa, "mmbench": _mmbench, "convert_gqa": _convert_gqa,
    "convert_mmvet": _convert_mmvet, "convert_vizwiz": _convert_vizwiz, "convert_vqav2": _convert_vqav2,
    "convert_seed": _convert_seed, "convert_mmbench": _convert_mmbench, "convert_mme": _convert_mme,
}


def _set(key, value):
    def mutate(lines):
        lines[1][key] = value
    return mutate


def _drop(key):
    def mutate(lines):
        del lines[1][key]
    return mutate


def _duplicate(lines):
    lines[1] = dict(lines[0])


def _array(lines):
    lines[1] = [1, 2]


# mutation -> (change to the answer lines, pieces of the message besides the file name)
ANSWER_FAULTS: dict[str, tuple[Callable[[list], None] | None, list[str]]] = {
    "text-null": (_set("text", None), ["line 2", "'text'"]),
    "text-number": (_set("text", 3), ["line 2", "'text'"]),
    "text-missing": (_drop("text"), ["line 2", "'text'"]),
    "qid-missing": (_drop("question_id"), ["line 2", "'question_id'"]),
    "qid-null": (_set("question_id", None), ["line 2", "'question_id'"]),
    "qid-list": (_set("question_id", [1]), ["line 2", "'question_id'"]),
    "line-array": (_array, ["line 2"]),
    "duplicate": (_duplicate, ["line 2", "line 1"]),
    "empty": (None, ["empty"]),
}


def _answer_case(tool: str, fault: str) -> Callable[[Path], Run]:
    def build(tmp: Path) -> Run:
        mutate, pieces = ANSWER_FAULTS[fault]
        lines = _valid_answers(tool)
        if mutate is None:
            lines = []
        else:
            mutate(lines)
        main, argv, _ = ANSWER_TOOLS[tool](tmp, lines)
        name = "merge.jsonl" if tool == "convert_vqav2" else "m.jsonl" if tool in ("convert_mmbench", "convert_mme") \
            else "ans.jsonl"
        return main, argv, [name, *pieces]
    return build


CASES: dict[str, Callable[[Path], Run]] = {
    f"answers/{tool}/{fault}": _answer_case(tool, fault) for tool in ANSWER_TOOLS for fault in ANSWER_FAULTS
}


def case(name: str):
    def register(build):
        CASES[name] = build
        return build
    return register


# ---------------------------------------------------------------- annotations


def _rewrite_jsonl(path: Path, mutate) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    mutate(lines)
    write_jsonl(path, lines)


def _rewrite_json(path: Path, mutate) -> None:
    data = json.loads(path.read_text())
    mutate(data)  # in place
    write_json(path, data)


for _label in ("Yes", "maybe", None, 1):
    @case(f"annotations/pope/label-{_label}")
    def _pope_label(tmp, label=_label):
        run = _pope(tmp, _valid_answers("pope"))
        _rewrite_jsonl(tmp / "coco" / "coco_pope_adversarial.json", _set("label", label))
        return run[0], run[1], ["coco_pope_adversarial.json", "line 2", "'label'"]


@case("annotations/pope/label-missing")
def _pope_label_missing(tmp):
    run = _pope(tmp, _valid_answers("pope"))
    _rewrite_jsonl(tmp / "coco" / "coco_pope_adversarial.json", _drop("label"))
    return run[0], run[1], ["coco_pope_adversarial.json", "line 2", "'label'"]


@case("annotations/pope/empty-annotation-file")
def _pope_empty_labels(tmp):
    run = _pope(tmp, _valid_answers("pope"))
    (tmp / "coco" / "coco_pope_adversarial.json").write_text("")
    return run[0], run[1], ["coco_pope_adversarial.json", "empty"]


@case("annotations/pope/category-null")
def _pope_category(tmp):
    run = _pope(tmp, _valid_answers("pope"))
    _rewrite_jsonl(tmp / "llava_pope_test.jsonl", _set("category", None))
    return run[0], run[1], ["llava_pope_test.jsonl", "line 2", "'category'"]


@case("annotations/pope/question-duplicate")
def _pope_dup_question(tmp):
    run = _pope(tmp, _valid_answers("pope")[:1])
    _rewrite_jsonl(tmp / "llava_pope_test.jsonl", _duplicate)
    return run[0], run[1], ["llava_pope_test.jsonl", "line 2", "line 1"]


def _sqa_problem(mutate, pieces=("problems.json", "'p1'")):
    def build(tmp):
        run = _sqa(tmp, _valid_answers("sqa"))
        _rewrite_json(tmp / "problems.json", mutate)
        return run[0], run[1], list(pieces)
    return build


case("annotations/sqa/answer-beyond-choices")(_sqa_problem(lambda d: d["p1"].update(answer=5), ("problems.json", "'p1'", "'answer'")))
case("annotations/sqa/answer-null")(_sqa_problem(lambda d: d["p1"].update(answer=None), ("problems.json", "'p1'", "'answer'")))
case("annotations/sqa/answer-missing")(_sqa_problem(lambda d: d["p1"].pop("answer"), ("problems.json", "'p1'", "'answer'")))
case("annotations/sqa/choices-string")(_sqa_problem(lambda d: d["p1"].update(choices="xy"), ("problems.json", "'p1'", "'choices'")))


@case("annotations/sqa/problems-list")
def _sqa_problems_list(tmp):
    run = _sqa(tmp, _valid_answers("sqa"))
    write_json(tmp / "problems.json", [json.loads((tmp / "problems.json").read_text())])
    return run[0], run[1], ["problems.json"]


@case("annotations/sqa/splits-list")
def _sqa_splits(tmp):
    run = _sqa(tmp, _valid_answers("sqa"))
    write_json(tmp / "pid_splits.json", ["p1", "p2"])
    return run[0], run[1], ["pid_splits.json"]


@case("annotations/sqa/split-not-list")
def _sqa_split_value(tmp):
    run = _sqa(tmp, _valid_answers("sqa"))
    write_json(tmp / "pid_splits.json", {"test": "p1"})
    return run[0], run[1], ["pid_splits.json", "'test'"]


def _textvqa_annotation(mutate, pieces):
    def build(tmp):
        run = _textvqa(tmp, _valid_answers("textvqa"))
        _rewrite_json(tmp / "TextVQA_0.5.1_val.json", mutate)
        return run[0], run[1], ["TextVQA_0.5.1_val.json", *pieces]
    return build


case("annotations/textvqa/data-dict")(_textvqa_annotation(lambda d: d.update(data={"a": 1}), ["'data'"]))
case("annotations/textvqa/data-string")(_textvqa_annotation(lambda d: d.update(data="x"), ["'data'"]))
case("annotations/textvqa/item-no-image_id")(_textvqa_annotation(lambda d: d["data"][1].pop("image_id"), ["'image_id'", "2"]))
case("annotations/textvqa/question-null")(_textvqa_annotation(lambda d: d["data"][1].update(question=None), ["'question'", "2"]))
case("annotations/textvqa/answers-string")(_textvqa_annotation(lambda d: d["data"][1].update(answers="red"), ["'answers'", "2"]))
case("annotations/textvqa/item-list")(_textvqa_annotation(lambda d: d["data"].__setitem__(1, [1]), ["2"]))


def _seed_annotation(mutate, pieces):
    def build(tmp):
        run = _convert_seed(tmp, _valid_answers("convert_seed"))
        _rewrite_json(tmp / "SEED-Bench.json", mutate)
        return run[0], run[1], ["SEED-Bench.json", *pieces]
    return build


case("annotations/seed/questions-dict")(_seed_annotation(lambda d: d.update(questions={}), ["'questions'"]))
case("annotations/seed/questions-empty")(_seed_annotation(lambda d: d.update(questions=[]), ["empty"]))
case("annotations/seed/answer-missing")(_seed_annotation(lambda d: d["questions"][1].pop("answer"), ["'answer'", "2"]))
case("annotations/seed/type-id-missing")(_seed_annotation(lambda d: d["questions"][1].pop("question_type_id"),
                                                          ["'question_type_id'", "2"]))
case("annotations/seed/data-type-null")(_seed_annotation(lambda d: d["questions"][1].update(data_type=None),
                                                         ["'data_type'", "2"]))
case("annotations/seed/question-type-list")(_seed_annotation(lambda d: d.update(question_type=[]), ["'question_type'"]))
case("annotations/seed/question-duplicate")(_seed_annotation(
    lambda d: d["questions"][1].update(question_id=d["questions"][0]["question_id"]), ["'question_id'", "'1'"]))


def _gqa(tmp: Path, predictions=None, questions=None):
    qs = questions if questions is not None else {"q1": gqa_question("yes", "verify"), "q2": gqa_question("red", "query")}
    write_gqa_questions(tmp / "testdev_balanced_questions.json", qs)
    preds = predictions if predictions is not None else [{"questionId": "q1", "prediction": "yes"},
                                                          {"questionId": "q2", "prediction": "red"}]
    write_json(tmp / "testdev_balanced_predictions.json", preds)
    return eval_gqa.main, ["--tier", "testdev_balanced"]


def _gqa_prediction(mutate, pieces):
    def build(tmp):
        preds = [{"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "red"}]
        mutate(preds)
        main, argv = _gqa(tmp, predictions=preds)
        return main, argv, ["testdev_balanced_predictions.json", *pieces]
    return build


case("annotations/gqa/prediction-null")(_gqa_prediction(_set("prediction", None), ["entry 2", "'prediction'"]))
case("annotations/gqa/prediction-number")(_gqa_prediction(_set("prediction", 3), ["entry 2", "'prediction'"]))
case("annotations/gqa/questionId-null")(_gqa_prediction(_set("questionId", None), ["entry 2", "'questionId'"]))
case("annotations/gqa/duplicate")(_gqa_prediction(_duplicate, ["entry 2", "entry 1"]))
case("annotations/gqa/predictions-empty")(_gqa_prediction(lambda p: p.clear(), ["empty"]))


def _gqa_question(mutate, pieces):
    def build(tmp):
        qs = {"q1": gqa_question("yes", "verify"), "q2": gqa_question("red", "query")}
        mutate(qs)
        main, argv = _gqa(tmp, questions=qs)
        return main, argv, ["testdev_balanced_questions.json", *pieces]
    return build


case("annotations/gqa/answer-null")(_gqa_question(lambda q: q["q2"].update(answer=None), ["'q2'", "'answer'"]))
case("annotations/gqa/semantic-step-no-operation")(_gqa_question(lambda q: q["q2"]["semantic"][0].pop("operation"),
                                                                 ["'q2'", "'semantic'"]))
case("annotations/gqa/semantic-string")(_gqa_question(lambda q: q["q2"].update(semantic="x"), ["'q2'", "'semantic'"]))
case("annotations/gqa/questions-empty")(_gqa_question(lambda q: q.clear(), ["empty"]))


def _mmbench_answers(mutate, pieces):
    def build(tmp):
        lines = [dict(a, round_id=0, options=["red", "blue", "green"], option_char=["A", "B", "C"])
                 for a in _valid_answers("mmbench")]
        mutate(lines)
        main, argv, _ = _mmbench(tmp, lines)
        return main, argv, ["ans.jsonl", "line 2", *pieces]
    return build


case("annotations/mmbench/round_id-string")(_mmbench_answers(_set("round_id", "x"), ["'round_id'"]))
case("annotations/mmbench/options-string")(_mmbench_answers(_set("options", "red"), ["'options'"]))
case("annotations/mmbench/option_char-number")(_mmbench_answers(_set("option_char", 3), ["'option_char'"]))
case("annotations/mmbench/option_char-beyond")(_mmbench_answers(_set("option_char", ["A"]), ["'option_char'"]))


@case("annotations/mmbench/tsv-answer-not-a-letter")
def _mmbench_bad_gold(tmp):
    run = _mmbench(tmp, _valid_answers("mmbench"))
    _mmbench_tsv(tmp, answer_letters=("A", "maybe"))
    return run[0], run[1], ["mmbench.tsv", "'answer'", "row 3"]


@case("annotations/mmbench/tsv-answer-beyond-options")
def _mmbench_gold_beyond(tmp):
    run = _mmbench(tmp, _valid_answers("mmbench"))
    _mmbench_tsv(tmp, answer_letters=("A", "D"))
    return run[0], run[1], ["mmbench.tsv", "'answer'", "row 3"]


@case("annotations/mme/truth-maybe")
def _mme_truth(tmp):
    run = _convert_mme(tmp, _valid_answers("convert_mme"))
    path = tmp / "MME_Benchmark_release_version" / "existence" / "0001.txt"
    path.write_text(path.read_text().replace("\tYes", "\tmaybe"))
    return run[0], run[1], ["0001.txt", "line 1", "maybe"]


@case("annotations/mme/prompt-null")
def _mme_prompt(tmp):
    lines = _valid_answers("convert_mme")
    lines[1]["prompt"] = None
    run = _convert_mme(tmp, lines)
    return run[0], run[1], ["m.jsonl", "line 2", "'prompt'"]


@case("annotations/vizwiz/image-null")
def _vizwiz_image(tmp):
    run = _convert_vizwiz(tmp, _valid_answers("convert_vizwiz"))
    _rewrite_jsonl(tmp / "llava_test.jsonl", _set("image", None))
    return run[0], run[1], ["llava_test.jsonl", "line 2", "'image'"]


@case("annotations/vizwiz/question-duplicate")
def _vizwiz_dup(tmp):
    run = _convert_vizwiz(tmp, _valid_answers("convert_vizwiz")[:1])
    _rewrite_jsonl(tmp / "llava_test.jsonl", _duplicate)
    return run[0], run[1], ["llava_test.jsonl", "line 2", "line 1"]


@case("annotations/textvqa/prompt-null")
def _textvqa_prompt(tmp):
    lines = _valid_answers("textvqa")
    lines[1]["prompt"] = None
    run = _textvqa(tmp, lines)
    return run[0], run[1], ["ans.jsonl", "line 2", "'prompt'"]


@case("annotations/mme-result/empty-subtask-file")
def _mme_result_empty(tmp):
    from llava.eval.eval_mme import SUBTASKS
    for group in SUBTASKS.values():
        for subtask in group:
            (tmp / "r").mkdir(exist_ok=True)
            (tmp / "r" / f"{subtask}.txt").write_text("a.txt\tq\tYes\tyes\na.txt\tq2\tNo\tno\n")
    (tmp / "r" / "OCR.txt").write_text("")
    return eval_mme.main, ["--results_dir", str(tmp / "r")], ["OCR.txt"]


# ---------------------------------------------------------------- outputs that are inputs


def _link(kind: str, target: Path, link: Path) -> str:
    """``link`` made to be ``target``: the same string, another spelling, a symlink or a hard link."""
    if kind == "same":
        return str(target)
    if kind == "spelled":
        return os.path.join(str(target.parent), ".", "..", target.parent.name, target.name)
    link.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)
    return str(link)


LINKS = ("same", "spelled", "symlink", "hardlink")


def _output_case(tool: str, flag: str, input_name: Callable[[Path], Path], fix=None):
    """``flag`` of ``tool`` pointed at an input, in each of the four ways."""
    for kind in LINKS:
        @case(f"outputs/{tool}/{flag}={input_name.__name__}/{kind}")
        def build(tmp, kind=kind):
            main, argv, _ = ANSWER_TOOLS[tool](tmp, _valid_answers(tool))
            target = input_name(tmp)
            value = _link(kind, target, tmp / "links" / target.name)
            argv = list(argv)
            argv[argv.index(flag) + 1] = value
            return main, argv, [flag, target.name]


def answers_file(tmp):
    return tmp / "ans.jsonl"


def question_file(tmp):
    return tmp / "llava_test.jsonl"


def seed_json(tmp):
    return tmp / "SEED-Bench.json"


def problems_json(tmp):
    return tmp / "problems.json"


_output_case("convert_gqa", "--dst", answers_file)
_output_case("convert_mmvet", "--dst", answers_file)
_output_case("convert_vizwiz", "--result-upload-file", answers_file)
_output_case("convert_vizwiz", "--result-upload-file", question_file)
_output_case("convert_seed", "--result-upload-file", answers_file)
_output_case("convert_seed", "--result-upload-file", seed_json)
_output_case("sqa", "--output-file", answers_file)
_output_case("sqa", "--output-result", answers_file)
_output_case("sqa", "--output-file", problems_json)


@case("outputs/sqa/--output-file=--output-result")
def _sqa_two_outputs(tmp):
    main, argv, _ = _sqa(tmp, _valid_answers("sqa"))
    argv[argv.index("--output-result") + 1] = argv[argv.index("--output-file") + 1]
    return main, argv, ["--output-file", "--output-result"]


@case("outputs/convert_vqav2/upload-symlinked-to-answers")
def _vqav2_link(tmp):
    main, argv, _ = _convert_vqav2(tmp, _valid_answers("convert_vqav2"))
    _link("symlink", tmp / "answers" / "dev" / "m" / "merge.jsonl", tmp / "answers_upload" / "dev" / "m.json")
    return main, argv, ["merge.jsonl"]


@case("outputs/convert_vqav2/upload-hardlinked-to-questions")
def _vqav2_hardlink(tmp):
    main, argv, _ = _convert_vqav2(tmp, _valid_answers("convert_vqav2"))
    _link("hardlink", tmp / "llava_vqav2_mscoco_test2015.jsonl", tmp / "answers_upload" / "dev" / "m.json")
    return main, argv, ["llava_vqav2_mscoco_test2015.jsonl"]


@case("outputs/convert_mmbench/upload-hardlinked-to-tsv")
def _mmbench_upload_link(tmp):
    main, argv, _ = _convert_mmbench(tmp, _valid_answers("convert_mmbench"))
    _link("hardlink", tmp / "mmbench.tsv", tmp / "up" / "m.xlsx")
    return main, argv, ["mmbench.tsv"]


@case("outputs/convert_mme/subtask-file-symlinked-to-answers")
def _mme_answers_link(tmp):
    main, argv, _ = _convert_mme(tmp, _valid_answers("convert_mme"))
    _link("symlink", tmp / "answers" / "m.jsonl", tmp / "eval_tool" / "answers" / "m" / "existence.txt")
    return main, argv, ["m.jsonl"]


@case("outputs/convert_mme/subtask-file-hardlinked-to-ground-truth")
def _mme_truth_link(tmp):
    main, argv, _ = _convert_mme(tmp, _valid_answers("convert_mme"))
    _link("hardlink", tmp / "MME_Benchmark_release_version" / "count" / "0001.txt",
          tmp / "eval_tool" / "answers" / "m" / "count.txt")
    return main, argv, ["0001.txt"]


# ---------------------------------------------------------------- model_vqa*


def _vqa_argv(questions: Path, answers: str, *extra: str) -> list[str]:
    return ["--model-path", NO_MODEL, "--question-file", str(questions), "--answers-file", answers,
            "--device", "cpu", "--image-folder", str(questions.parent), *extra]


def _generic_questions(tmp: Path) -> Path:
    path = tmp / "questions.jsonl"
    write_mmvet(path, ["what?", "which?"])
    return path


def _science_questions(tmp: Path) -> Path:
    write_scienceqa(tmp, [SQAProblem("p1", ("x", "y"), 0), SQAProblem("p2", ("x", "y"), 1, image=False)])
    return tmp / "llava_test_CQM-A.json"


def _mmbench_questions(tmp: Path) -> Path:
    return _mmbench_tsv(tmp)


VQA_SCRIPTS = {
    "model_vqa": (model_vqa.main, _generic_questions),
    "model_vqa_loader": (model_vqa_loader.main, _generic_questions),
    "model_vqa_science": (model_vqa_science.main, _science_questions),
    "model_vqa_mmbench": (model_vqa_mmbench.main, _mmbench_questions),
}

for _script, (_main, _questions) in VQA_SCRIPTS.items():
    for _kind in LINKS:
        @case(f"outputs/{_script}/--answers-file=--question-file/{_kind}")
        def _answers_on_questions(tmp, main=_main, questions=_questions, kind=_kind):
            path = questions(tmp)
            return main, _vqa_argv(path, _link(kind, path, tmp / "links" / path.name)), ["--answers-file", path.name]

    @case(f"outputs/{_script}/image-token-sidecar=--question-file")
    def _sidecar_on_questions(tmp, main=_main, questions=_questions):
        path = questions(tmp)
        sidecar = tmp / "a.image_tokens.jsonl"
        os.link(path, sidecar)
        return main, _vqa_argv(path, str(tmp / "a.jsonl")), [path.name]


@case("empty/model_vqa/question-file")
def _vqa_empty(tmp):
    (tmp / "q.jsonl").write_text("\n")
    return model_vqa.main, _vqa_argv(tmp / "q.jsonl", str(tmp / "a.jsonl")), ["q.jsonl", "empty"]


@case("empty/model_vqa_loader/question-file")
def _loader_empty(tmp):
    (tmp / "q.jsonl").write_text("")
    return model_vqa_loader.main, _vqa_argv(tmp / "q.jsonl", str(tmp / "a.jsonl")), ["q.jsonl", "empty"]


@case("empty/model_vqa_science/question-list")
def _science_empty(tmp):
    write_json(tmp / "q.json", [])
    return model_vqa_science.main, _vqa_argv(tmp / "q.json", str(tmp / "a.jsonl")), ["q.json", "empty"]


@case("empty/model_vqa_mmbench/header-only")
def _mmbench_empty(tmp):
    write_mmbench_tsv(tmp / "q.tsv", [])
    return model_vqa_mmbench.main, _vqa_argv(tmp / "q.tsv", str(tmp / "a.jsonl")), ["q.tsv", "empty"]


for _field, _value in (("text", None), ("text", 3), ("image", None), ("question_id", None)):
    @case(f"questions/model_vqa/{_field}-{_value}")
    def _vqa_field(tmp, field=_field, value=_value):
        path = _generic_questions(tmp)
        _rewrite_jsonl(path, _set(field, value))
        return model_vqa.main, _vqa_argv(path, str(tmp / "a.jsonl")), [path.name, "line 2", f"'{field}'"]


@case("questions/model_vqa_science/value-null")
def _science_value(tmp):
    path = _science_questions(tmp)
    _rewrite_json(path, lambda items: items[1]["conversations"][0].update(value=None))
    return model_vqa_science.main, _vqa_argv(path, str(tmp / "a.jsonl")), [path.name, "item 1", "'value'"]


@case("questions/model_vqa_science/image-number")
def _science_image(tmp):
    path = _science_questions(tmp)
    _rewrite_json(path, lambda items: items[0].update(image=3))
    return model_vqa_science.main, _vqa_argv(path, str(tmp / "a.jsonl")), [path.name, "item 0", "'image'"]


@case("empty/textvqa/result-dir-without-answers")
def _textvqa_empty_dir(tmp):
    main, argv, _ = _textvqa(tmp, _valid_answers("textvqa"))
    (tmp / "results").mkdir()
    (tmp / "results" / "notes.txt").write_text("x")
    return main, argv[:2] + ["--result-dir", str(tmp / "results")], ["results", ".jsonl"]


# ---------------------------------------------------------------- the test


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_a_clear_error_and_loses_nothing(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main, argv, pieces = CASES[name](tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    assert code not in (0, None)
    message = code if isinstance(code, str) else capsys.readouterr().err
    for piece in pieces:
        assert piece in message, f"{piece!r} not in {message!r}"
    after = _snapshot(tmp_path)
    changed = [path for path, data in before.items() if after.get(path) != data]
    assert not changed, f"inputs changed: {changed}"


@pytest.mark.parametrize("tool", sorted(ANSWER_TOOLS))
def test_the_valid_benchmark_each_case_breaks_is_accepted(tool, tmp_path, monkeypatch):
    """The cases above fail because of their one fault: the benchmark they start from is scored."""
    monkeypatch.chdir(tmp_path)
    main, argv, _ = ANSWER_TOOLS[tool](tmp_path, _valid_answers(tool))
    main(argv)


def test_the_valid_gqa_predictions_are_scored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, argv = _gqa(tmp_path)
    assert main(argv).accuracy == 100.0
