"""Turn a LLaVA MM-Vet answers file into the results JSON MM-Vet's grader reads.

``python scripts/convert_mmvet_for_eval.py --src answers/m.jsonl --dst results/m.json`` (also
``python -m llava.eval.convert_mmvet_for_eval``).

Writes ``{"v1_<question_id>": text, ...}`` in the answers' order, indented by 2. MM-Vet's scores
come from its GPT-4 grader (``mm-vet_evaluator``); this only produces its input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from llava.eval.benchmark_io import exits_on_input_error, read_jsonl, refuse_overwriting_inputs, write_json

KEY_PREFIX = "v1_"


def convert(src: str) -> dict[str, str]:
    answers, _ = read_jsonl(src, "MM-Vet answers file", required=("question_id", "text"), unique=("question_id",))
    return {f"{KEY_PREFIX}{a['question_id']}": a["text"] for a in answers}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=str, required=True, help="answers JSONL")
    parser.add_argument("--dst", type=str, required=True, help="results JSON to write")
    return parser


@exits_on_input_error
def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = build_parser().parse_args(argv)
    refuse_overwriting_inputs({"--dst": args.dst}, {"--src": args.src})
    results = convert(args.src)
    write_json(args.dst, results, indent=2)
    return results


if __name__ == "__main__":
    main()
