"""lmms-eval's ``vllm`` model on a converted checkpoint, as docs/evaluation.md shows it (slow).

lmms-eval (``scripts/build_vllm_venv.sh`` installs it in the vLLM venv) runs from its command line
(``--model vllm --model_args model=...,max_new_tokens=8``) a local yes/no task (``lmms_eval_task/``,
through ``--include_path``) on a tiny fork LLaVA-1.5 trained with 24→12 compression, converted with
``toconv-convert-to-hf``. ``vllm_lmms_eval_run.py`` wraps ``vllm.LLM.chat`` to record what vLLM was
given: every prompt must hold one run of 144 image tokens, and the generation limit must be the
``max_new_tokens`` of ``--model_args`` (lmms-eval takes the larger of it and the task's, and its
default is 4096). Then lmms-eval's own results file must hold the task's score. Then lmms-eval's
``openai`` model against ``vllm serve`` of the same folder: the server's usage must report the same
prompt lengths, and the task's ``max_new_tokens`` (the ``openai`` model ignores the one in
``--model_args``). About 4 minutes on two cores (two vLLM start-ups).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.vllm_server import VllmServer, subprocess_env
from benchmarks.vllm_standins import build_fork_checkpoint, convert_to_hf
from prerequisites import skip_or_fail_under_ci
from test_vllm_plugin import venv_python  # noqa: F401 (the fixture: the vLLM venv, checked to serve this checkout)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "tests" / "lmms_eval_task"
RUNNER = ROOT / "tests" / "vllm_lmms_eval_run.py"
QUESTIONS = [("Is there a circle in the image?", "yes"), ("Is there a dog in the image?", "no"),
             ("Is the background white?", "no")]
MAX_NEW_TOKENS = 8  # above the task's 4, so the model's setting is the one that counts
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def lmms_eval(venv_python) -> Path:  # noqa: F811 (the imported fixture)
    found = subprocess.run([str(venv_python), "-c", "import lmms_eval.__main__"], env=subprocess_env(),
                           capture_output=True, text=True, timeout=300, check=False)
    if found.returncode != 0:
        skip_or_fail_under_ci(f"lmms-eval is not importable in the vLLM venv: {found.stderr.strip()[-300:]}",
                              "scripts/build_vllm_venv.sh installs it; CI runs that before pytest.")
    return venv_python


@dataclass
class Workspace:
    folder: Path
    served: Path  # the converted checkpoint
    task: Path  # the --include_path folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """A tiny fork LLaVA-1.5 trained with 24→12, converted; the local task over three images."""
    from llava.standins import build_tiny_clip, make_images

    folder = tmp_path_factory.mktemp("lmms-eval")
    clip = build_tiny_clip(folder / "clip")
    fork = build_fork_checkpoint(folder / "fork-24to12", clip, compression_output_size=12)
    served = convert_to_hf(fork, folder / "llava-v1.5-tiny-toconv12-hf")
    docs = folder / "docs.jsonl"
    with docs.open("w") as f:
        for i, ((question, answer), image) in enumerate(zip(QUESTIONS, make_images(3, size=(336, 336), seed=5))):
            image.save(folder / f"image_{i}.png")
            f.write(json.dumps({"question_id": i, "image": str(folder / f"image_{i}.png"), "question": question,
                                "answer": answer}) + "\n")
    task = folder / "task"
    task.mkdir()
    shutil.copy(TASK / "utils.py", task / "utils.py")
    (task / "toconv_yesno.yaml").write_text((TASK / "toconv_yesno.yaml.in").read_text().replace("DOCS", str(docs)))
    return Workspace(folder, served, task)


def lmms_eval_results(output_path: Path) -> tuple[dict, list[dict]]:
    """lmms-eval's scores of the task and its logged samples (``--log_samples``), from ``--output_path``."""
    results = list(output_path.rglob("*_results.json"))
    samples = list(output_path.rglob("*_samples_toconv_yesno.jsonl"))
    assert len(results) == 1 and len(samples) == 1, list(output_path.rglob("*"))
    scores = json.loads(results[0].read_text())["results"]["toconv_yesno"]
    return scores, [json.loads(line) for line in samples[0].read_text().splitlines()]


@pytest.fixture(scope="module")
def vllm_run(lmms_eval, workspace) -> dict:
    """``python -m lmms_eval --model vllm ...`` (through the recording runner); what reached ``vllm.LLM``."""
    folder = workspace.folder
    spec = {"model_args": f"model={workspace.served},max_new_tokens={MAX_NEW_TOKENS},max_model_len=2048,"
                          "enforce_eager=True,dtype=float32",
            "tasks": "toconv_yesno", "include_path": str(workspace.task), "output_path": str(folder / "results-vllm"),
            "batch_size": 2}
    (folder / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([str(lmms_eval), str(RUNNER), str(folder / "spec.json"), str(folder / "seen.json")],
                          cwd=folder, capture_output=True, text=True, timeout=1200, check=False,
                          env=subprocess_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **OFFLINE}))
    # lmms-eval logs an error during evaluation and exits 0, so what reached vLLM is checked, not only the status.
    log = done.stdout[-3000:] + done.stderr[-8000:]
    assert done.returncode == 0, log
    seen = json.loads((folder / "seen.json").read_text())
    assert seen["prompt_token_ids"], log
    return seen


def test_lmms_eval_vllm_model_gets_144_image_tokens_per_image(vllm_run, workspace):
    image_token = json.loads((workspace.served / "config.json").read_text())["image_token_index"]
    assert len(vllm_run["prompt_token_ids"]) == len(QUESTIONS)
    for ids in vllm_run["prompt_token_ids"]:
        positions = [i for i, token in enumerate(ids) if token == image_token]
        assert len(positions) == 144 and positions == list(range(positions[0], positions[0] + 144))
    # max_new_tokens of --model_args, not the task's 4: lmms-eval's vLLM model takes the larger.
    assert vllm_run["max_tokens"] == [MAX_NEW_TOKENS] * len(QUESTIONS)
    scores, samples = lmms_eval_results(workspace.folder / "results-vllm")
    expected = [float(text.strip().lower() == answer) for text, (_, answer) in zip(vllm_run["texts"], QUESTIONS)]
    assert [sample["exact_match"] for sample in samples] == expected
    assert scores["exact_match,none"] == pytest.approx(sum(expected) / len(expected))


def test_lmms_eval_openai_model_against_vllm_serve(lmms_eval, vllm_run, workspace):
    folder = workspace.folder
    with VllmServer(workspace.served, log_path=folder / "serve.log") as server:
        model_args = (f"model={workspace.served},base_url={server.url}/v1,api_key=EMPTY,timeout=300,"
                      f"max_new_tokens={MAX_NEW_TOKENS}")
        done = subprocess.run(
            [str(lmms_eval), "-m", "lmms_eval", "--model", "openai", "--model_args", model_args,
             "--tasks", "toconv_yesno", "--include_path", str(workspace.task), "--batch_size", "2",
             "--output_path", str(folder / "results-openai"), "--log_samples"],
            cwd=folder, capture_output=True, text=True, timeout=1200, check=False, env=subprocess_env(OFFLINE))
    log = done.stdout[-3000:] + done.stderr[-8000:]
    assert done.returncode == 0, log
    # The openai model ignores max_new_tokens in --model_args (it warns); the task's generation_kwargs count.
    assert "Unknown model_args ignored: ['max_new_tokens']" in done.stdout + done.stderr
    scores, samples = lmms_eval_results(folder / "results-openai")
    counts = [sample["token_counts"][0] for sample in samples]
    # The server's usage: the same prompts as vllm.LLM's above (144 image tokens each), 4 new tokens each.
    assert [c["input_tokens"] for c in counts] == [len(ids) for ids in vllm_run["prompt_token_ids"]], log
    assert [c["output_tokens"] for c in counts] == [4] * len(QUESTIONS)
    assert "exact_match,none" in scores
