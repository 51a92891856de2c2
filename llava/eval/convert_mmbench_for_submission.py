"""Turn LLaVA MMBench answers into the Excel file the MMBench (OpenCompass) server takes.

``python scripts/convert_mmbench_for_submission.py --annotation-file mmbench_dev_20230712.tsv
--result-dir answers/mmbench_dev_20230712 --upload-dir answers_upload/mmbench_dev_20230712
--experiment llava-v1.5-13b`` (also ``python -m llava.eval.convert_mmbench_for_submission``).

Reads the benchmark TSV and ``<result-dir>/<experiment>.jsonl`` (answers from
``model_vqa_mmbench``, whose ``question_id`` is the TSV's ``index``) and writes
``<upload-dir>/<experiment>.xlsx``: the TSV's rows in order, without the ``hint``, ``category``,
``source``, ``image``, ``comment`` and ``l2-category`` columns, with a ``prediction`` column (the
answer text, empty when a row has no answer) inserted as the seventh column. For the dev TSV the
columns are ``index, question, A, B, C, D, prediction, answer, split``.

Answers from ``--all-rounds`` runs hold one line per option rotation; only round 0 (the TSV's own
option order) goes into the upload. Needs ``pandas`` and ``openpyxl``
(``pip install pandas openpyxl``); the upload folder is created if missing.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from llava.eval.benchmark_io import (
    BenchmarkInputError,
    exits_on_input_error,
    read_jsonl,
    refuse_overwriting_inputs,
    require_file,
    unknown_ids_error,
)
from vision_token_compression import atomic_write

logger = logging.getLogger(__name__)

DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_POSITION = 6


def _pandas():
    try:
        import openpyxl  # noqa: F401  (pandas' Excel writer)
        import pandas
    except ImportError as err:
        raise BenchmarkInputError(
            f"writing the MMBench upload needs pandas and openpyxl ({err}); run `pip install pandas openpyxl`."
        ) from None
    return pandas


def first_round_texts(result_file: str) -> dict[str, str]:
    """Answer text by TSV index (as a string), round 0 only."""
    answers, _ = read_jsonl(result_file, "MMBench answers file", required=("question_id", "text"),
                            unique=("question_id", "round_id"))
    texts, later_rounds = {}, 0
    for answer in answers:
        if answer.get("round_id", 0) != 0:
            later_rounds += 1
            continue
        texts[str(answer["question_id"])] = answer["text"]
    if later_rounds:
        logger.info("%s: left out %d answers of rotated-option rounds (round_id > 0).", result_file, later_rounds)
    return texts


def build_upload(annotation_file: str, result_file: str):
    """The upload table (a pandas DataFrame)."""
    pd = _pandas()
    require_file(annotation_file, "MMBench TSV", "Download it from https://download.openmmlab.com/mmclassification/datasets/mmbench/.")
    table = pd.read_table(annotation_file)
    if "index" not in table.columns:
        raise BenchmarkInputError(f"MMBench TSV {annotation_file!r} has no 'index' column; pass MMBench's TSV.")
    texts = first_round_texts(result_file)
    index = table["index"].astype(str)
    unknown = sorted(set(texts) - set(index))
    if unknown:
        raise unknown_ids_error(
            unknown, result_file, "MMBench answers file", f"the 'index' column of {annotation_file!r}",
            "Pass the TSV the answers were generated from.",
        )
    upload = table.drop(columns=[c for c in DROPPED_COLUMNS if c in table.columns])
    upload.insert(PREDICTION_POSITION, "prediction", [texts.get(i) for i in index])
    return upload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", type=str, required=True)
    parser.add_argument("--result-dir", type=str, required=True)
    parser.add_argument("--upload-dir", type=str, required=True)
    parser.add_argument("--experiment", type=str, required=True)
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> str:
    """Write the upload file and return its path."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    result_file = os.path.join(args.result_dir, f"{args.experiment}.jsonl")
    path = os.path.join(args.upload_dir, f"{args.experiment}.xlsx")
    refuse_overwriting_inputs({"upload file (--upload-dir/--experiment.xlsx)": path},
                              {"--annotation-file": args.annotation_file, "answers file": result_file})
    upload = build_upload(args.annotation_file, result_file)
    with atomic_write(path) as tmp:
        upload.to_excel(tmp, index=False, engine="openpyxl")
    return path


if __name__ == "__main__":
    main()
