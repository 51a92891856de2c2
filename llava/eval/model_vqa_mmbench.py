"""Answer MMBench (a TSV with base64 images), writing upstream's answer JSONL.

``python -m llava.eval.model_vqa_mmbench --model-path ... --question-file mmbench_dev_20230712.tsv
--answers-file answers.jsonl --single-pred-prompt --temperature 0 --conv-mode vicuna_v1`` (add
``--lang cn`` for MMBench-CN). The TSV has the columns ``index``, ``question``, ``hint``, ``A``..``D``,
``image`` (base64) and others the script does not read (``answer``, ``category``, ``l2-category``,
``split``). Cells are missing as pandas reads them: an empty cell, or one of pandas' NA strings
(``nan``, ``NaN``, ``None``, ``NA``, ``N/A``, ``NULL``, ...), and, as upstream also checks, any case
of ``nan`` / ``none``.

A question's options are its ``A``..``D`` cells up to the first missing one. The prompt is the hint
(if any), the question, then one ``<letter>. <option>`` line per option; with ``--single-pred-prompt``
the instruction to answer with the letter follows (in Chinese with ``--lang cn``). With
``--all-rounds`` each question is asked once per option, the options rotated by one each round
while the letters stay A, B, ... in order. Each answer line has ``question_id`` (the row's
``index``), ``round_id``, ``prompt`` (hint, question and options, without the instruction),
``text``, ``options`` and ``option_char`` (as asked in that round: the option texts and their
original letters), ``answer_id``, ``model_id``, ``metadata``. Checkpoints named "plain" (projector
pretraining, no "finetune") get the ``_mmtag`` conversation mode, as upstream.

Beyond upstream: ``--batch-size`` (left-padded batches; greedy answers equal batch size 1),
``--max_new_tokens`` (upstream: a fixed 1024), ``--device``, the compression flags, and image cells
that hold the ``index`` of a row with the same image (VLMEvalKit's TSVs store each image once).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import sys
from collections.abc import Sequence
from functools import partial

from llava.eval import vqa_common
from llava.eval.benchmark_io import BenchmarkInputError, exits_on_input_error
from llava.eval.vqa_common import Prompt

logger = logging.getLogger("llava.eval.model_vqa_mmbench")

OPTION_LETTERS = ("A", "B", "C", "D")
SINGLE_PRED_PROMPTS = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
REQUIRED_COLUMNS = ("index", "question", "image")
# pandas.read_table's default NA strings: such a cell reads as NaN.
PANDAS_NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
_INT = re.compile(r"[+-]?\d+")
# Shorter image cells are references to another row's image (VLMEvalKit), not base64 data.
_IMAGE_REFERENCE_MAX_LEN = 64


def is_missing(value: str | None) -> bool:
    """Whether a cell is missing for upstream: NaN to pandas, or any case of "nan" / "none"."""
    return value is None or value in PANDAS_NA_STRINGS or value.lower() in ("nan", "none")


def read_tsv(path: str) -> list[dict[str, str]]:
    """The rows of an MMBench TSV as {column: cell}; a missing ``index`` column or a ragged row is an error.

    ``index`` becomes an int when every row's index is an integer (pandas' int64 column, so upstream
    writes ``question_id`` as a number); short rows are padded with empty (missing) cells.
    """
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed csv's 128 KiB default
    try:
        with open(os.path.expanduser(path), encoding="utf-8-sig", newline="") as f:
            lines = [row for row in csv.reader(f, delimiter="\t") if row]
    finally:
        csv.field_size_limit(previous_limit)
    if not lines:
        raise BenchmarkInputError(f"{path} is empty; an MMBench TSV starts with a header row.")
    header, body = lines[0], lines[1:]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise BenchmarkInputError(f"{path} lacks the column(s) {', '.join(missing)}; its header is {header}.")
    rows = []
    for number, cells in enumerate(body, start=2):
        if len(cells) > len(header):
            raise BenchmarkInputError(f"{path} row {number} has {len(cells)} cells for {len(header)} columns.")
        rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    if not rows:
        raise BenchmarkInputError(f"{path} is empty: it has a header but no question rows.")
    if rows and all(_INT.fullmatch(row["index"]) for row in rows):
        for row in rows:
            row["index"] = int(row["index"])
    return rows


def row_options(row: dict) -> list[str]:
    """The option texts of ``A``..``D`` up to the first missing one."""
    options = []
    for letter in OPTION_LETTERS:
        if is_missing(row.get(letter)):
            break
        options.append(row[letter])
    return options


def question_text(row: dict, options: Sequence[str]) -> str:
    """The hint (if any), the question, and the options lettered A, B, ... in the given order."""
    text = row["question"] if is_missing(row.get("hint")) else row["hint"] + "\n" + row["question"]
    for letter, option in zip(OPTION_LETTERS, options):
        text = text + "\n" + letter + ". " + option
    return text


def build_prompts(row: dict, image_data: str, *, all_rounds: bool, single_pred_prompt: bool,
                  lang: str = "en") -> list[Prompt]:
    """The prompts for one row: one round, or with ``all_rounds`` one per option, rotating the options."""
    options = row_options(row)
    letters = list(OPTION_LETTERS[:len(options)])
    image = partial(vqa_common.decode_rgb, image_data)
    prompts = []
    for round_id in range(len(options) if all_rounds else 1):
        shown = question_text(row, options)
        text = shown
        if single_pred_prompt:
            text = shown + "\n" + SINGLE_PRED_PROMPTS["cn" if lang == "cn" else "en"]
        fields = {"question_id": row["index"], "round_id": round_id, "prompt": shown, "text": None,
                  "options": options, "option_char": letters}
        prompts.append(Prompt(text=text, fields=fields, image=image))
        options, letters = options[1:] + options[:1], letters[1:] + letters[:1]
    return prompts


def image_lookup(rows: Sequence[dict]) -> dict[str, str]:
    """Each row's base64 image by ``str(index)``, to resolve image cells that refer to another row."""
    return {str(row["index"]): row["image"] for row in rows if len(row["image"]) > _IMAGE_REFERENCE_MAX_LEN}


def row_image(row: dict, lookup: dict[str, str]) -> str:
    """The row's base64 image, following a reference to another row's ``index``."""
    data = row["image"]
    if len(data) > _IMAGE_REFERENCE_MAX_LEN:
        return data
    if data not in lookup:
        raise BenchmarkInputError(f"Row with index {row['index']}: its image cell {data!r} is neither base64 data nor "
                         f"the index of a row with an image.")
    return lookup[data]


def build_parser() -> argparse.ArgumentParser:
    parser = vqa_common.build_parser(__doc__)
    parser.add_argument("--all-rounds", action="store_true",
                        help="Ask each question once per option, rotating the options (CircularEval).")
    parser.add_argument("--single-pred-prompt", action="store_true",
                        help="End each question with the instruction to answer with the option's letter.")
    parser.add_argument("--lang", type=str, default="en", help="'cn' gives the Chinese instruction (MMBench-CN).")
    return parser


def eval_model(args) -> str:
    """Answer every question (every round) of this chunk; returns the answers file path."""
    args = vqa_common.complete_args(build_parser(), args)
    vqa_common.check_args(args)
    if args.lang not in SINGLE_PRED_PROMPTS:
        logger.warning("--lang %r: using the English instruction (upstream knows 'en' and 'cn').", args.lang)
    rows = read_tsv(args.question_file)
    lookup = image_lookup(rows)
    rows = vqa_common.get_chunk(rows, args.num_chunks, args.chunk_idx)
    prompts = [
        prompt for row in rows
        for prompt in build_prompts(row, row_image(row, lookup), all_rounds=args.all_rounds,
                                    single_pred_prompt=args.single_pred_prompt, lang=args.lang)
    ]

    return vqa_common.answer_all(args, prompts, plain_mode_switch=True)


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> str:
    vqa_common.configure_logging()
    return eval_model(vqa_common.parse_args(build_parser(), argv))


if __name__ == "__main__":
    main(sys.argv[1:])
