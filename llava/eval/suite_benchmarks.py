"""The benchmarks of ``scripts/v1_5/eval``, as the eval suite sees them: data, answers, headline score.

Each ``Benchmark`` names its script, the files the script reads (relative to ``EVAL_DIR``; all must
exist for the benchmark to run), where the script writes its answers for a tag (the image-token
sidecar sits beside them), and either how to read its headline metric from what the scorer printed
or the file to submit to the benchmark's server. The headline metrics are the columns of
LLaVA-1.5's results table (upstream's docs/MODEL_ZOO.md): MME is the perception score, ScienceQA
the accuracy on questions with an image (SQA-IMG), SEED-Bench the accuracy over all questions,
POPE the F1 score (here the mean over its three splits).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ScoreNotFoundError(ValueError):
    """The scorer's output lacks the headline metric (a scorer that changed its printout, or a partial run)."""


def _percent(pattern: str, what: str) -> Callable[[str], float]:
    """A reader of the first ``pattern`` match (one number group) in a scorer's output."""
    compiled = re.compile(pattern, re.MULTILINE)

    def read(output: str) -> float:
        match = compiled.search(output)
        if match is None:
            raise ScoreNotFoundError(f"no {what!r} line in the scorer's output (looked for /{pattern}/)")
        return float(match.group(1))

    return read


POPE_SPLITS = ("adversarial", "popular", "random")


def pope_f1(output: str) -> float:
    """Mean F1 (%) over POPE's three splits, from ``eval_pope``'s per-category printout."""
    blocks = re.split(r"^Category: ", output, flags=re.MULTILINE)[1:]
    f1 = {}
    for block in blocks:
        category = block.split(",", 1)[0]
        match = re.search(r"^F1 score: ([\d.eE+-]+)$", block, re.MULTILINE)
        if match:
            f1[category] = float(match.group(1))
    missing = [split for split in POPE_SPLITS if split not in f1]
    if missing:
        raise ScoreNotFoundError(f"eval_pope printed no F1 score for split(s) {', '.join(missing)}")
    return 100 * sum(f1[split] for split in POPE_SPLITS) / len(POPE_SPLITS)


@dataclass(frozen=True)
class Benchmark:
    """One ``scripts/v1_5/eval/<name>.sh``.

    Attributes:
        name: The script's name without ``.sh`` (what ``BENCHMARKS`` lists).
        title: The benchmark as tables name it.
        needs: Files and folders under ``EVAL_DIR`` the script reads.
        answers: The answers file for a tag, under ``EVAL_DIR`` (the merged file for chunked runs).
        metric: The headline metric's name; None for a benchmark scored by its server or a grader.
        score: Reads the headline metric from the script's standard output.
        submit: The file to submit for a tag, under ``EVAL_DIR`` (None when scored locally).
    """

    name: str
    title: str
    needs: tuple[str, ...]
    answers: str
    metric: str | None = None
    score: Callable[[str], float] | None = None
    submit: str | None = None

    def answers_file(self, eval_dir: Path, tag: str) -> Path:
        return eval_dir / self.answers.format(tag=tag)

    def submission_file(self, eval_dir: Path, tag: str) -> Path | None:
        return None if self.submit is None else eval_dir / self.submit.format(tag=tag)

    def missing(self, eval_dir: Path) -> list[Path]:
        """The data the script needs that is not under ``eval_dir``."""
        return [eval_dir / need for need in self.needs if not (eval_dir / need).exists()]


_ACCURACY = r"^Accuracy: ([\d.]+)%$"
_GQA = "gqa/answers/llava_gqa_testdev_balanced/{tag}/merge.jsonl"
_VQAV2 = "llava_vqav2_mscoco_test-dev2015"

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vqav2", "VQAv2 test-dev",
              (f"vqav2/{_VQAV2}.jsonl", "vqav2/llava_vqav2_mscoco_test2015.jsonl", "vqav2/test2015"),
              f"vqav2/answers/{_VQAV2}/{{tag}}/merge.jsonl", submit=f"vqav2/answers_upload/{_VQAV2}/{{tag}}.json"),
    Benchmark("gqa", "GQA",
              ("gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images", "gqa/data/testdev_balanced_questions.json"),
              _GQA, "accuracy (testdev-balanced, %)", _percent(_ACCURACY, "Accuracy")),
    Benchmark("vizwiz", "VizWiz test", ("vizwiz/llava_test.jsonl", "vizwiz/test"),
              "vizwiz/answers/{tag}.jsonl", submit="vizwiz/answers_upload/{tag}.json"),
    Benchmark("sqa", "ScienceQA-IMG",
              ("scienceqa/llava_test_CQM-A.json", "scienceqa/problems.json", "scienceqa/pid_splits.json",
               "scienceqa/images/test"),
              "scienceqa/answers/{tag}.jsonl", "IMG accuracy (test, %)",
              _percent(r"IMG-Accuracy: ([\d.]+)%", "IMG-Accuracy")),
    Benchmark("textvqa", "TextVQA val",
              ("textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images", "textvqa/TextVQA_0.5.1_val.json"),
              "textvqa/answers/{tag}.jsonl", "VQA accuracy (val, %)", _percent(_ACCURACY, "Accuracy")),
    Benchmark("pope", "POPE", ("pope/llava_pope_test.jsonl", "pope/val2014", "pope/coco"),
              "pope/answers/{tag}.jsonl", "F1 (mean of 3 splits, %)", pope_f1),
    Benchmark("mme", "MME", ("MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version"),
              "MME/answers/{tag}.jsonl", "perception score",
              _percent(r"^=+ Perception =+\ntotal score: ([\d.]+)", "Perception total score")),
    Benchmark("mmbench", "MMBench dev", ("mmbench/mmbench_dev_20230712.tsv",),
              "mmbench/answers/mmbench_dev_20230712/{tag}.jsonl", "accuracy (dev, %)",
              _percent(_ACCURACY, "Accuracy")),
    Benchmark("mmbench_cn", "MMBench-CN dev", ("mmbench_cn/mmbench_dev_cn_20231003.tsv",),
              "mmbench_cn/answers/mmbench_dev_cn_20231003/{tag}.jsonl", "accuracy (dev, %)",
              _percent(_ACCURACY, "Accuracy")),
    Benchmark("seed", "SEED-Bench",
              ("seed_bench/llava-seed-bench.jsonl", "seed_bench/SEED-Bench.json"),
              "seed_bench/answers/{tag}/merge.jsonl", "accuracy (all questions, %)",
              _percent(r"^Total accuracy: ([\d.]+)%$", "Total accuracy")),
    Benchmark("mmvet", "MM-Vet", ("mm-vet/llava-mm-vet.jsonl", "mm-vet/images"),
              "mm-vet/answers/{tag}.jsonl", submit="mm-vet/results/{tag}.json"),
    Benchmark("llavabench", "LLaVA-Bench (in the wild)",
              ("llava-bench-in-the-wild/questions.jsonl", "llava-bench-in-the-wild/images"),
              "llava-bench-in-the-wild/answers/{tag}.jsonl", submit="llava-bench-in-the-wild/answers/{tag}.jsonl"),
)}
