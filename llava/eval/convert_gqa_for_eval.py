"""Turn a LLaVA GQA answers file into the predictions file GQA's ``eval.py`` reads.

``python scripts/convert_gqa_for_eval.py --src answers/merge.jsonl --dst
gqa/data/testdev_balanced_predictions.json`` (also ``python -m llava.eval.convert_gqa_for_eval``).

Each answer line becomes ``{"questionId": question_id, "prediction": text}``, the text lower-cased
with trailing periods removed; the list keeps the answers' order and is written as compact JSON.
Score it with ``python -m llava.eval.eval_gqa --tier testdev_balanced`` (or GQA's own ``eval.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from llava.eval.benchmark_io import exits_on_input_error, read_jsonl, refuse_overwriting_inputs, write_json


def gqa_prediction(text: str) -> str:
    """The answer as GQA compares it: trailing periods removed, lower-cased."""
    return text.rstrip(".").lower()


def convert(src: str) -> list[dict]:
    answers, _ = read_jsonl(src, "GQA answers file", required=("question_id", "text"), unique=("question_id",))
    return [{"questionId": a["question_id"], "prediction": gqa_prediction(a["text"])} for a in answers]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=str, required=True, help="answers JSONL (merge.jsonl)")
    parser.add_argument("--dst", type=str, required=True, help="predictions JSON to write")
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    refuse_overwriting_inputs({"--dst": args.dst}, {"--src": args.src})
    predictions = convert(args.src)
    write_json(args.dst, predictions)
    return predictions


if __name__ == "__main__":
    main()
