"""lmms-eval's ``vllm`` model on a converted checkpoint, as docs/evaluation.md shows it (slow).

lmms-eval (``scripts/build_vllm_venv.sh`` installs it in the vLLM venv) runs from its command line
(``--model vllm --model_args model=...,max_new_tokens=8``) a local yes/no task (``lmms_eval_task/``,
through ``--include_path``) on a tiny fork LLaVA-1.5 trained with 24→12 compression, converted with
``toconv-convert-to-hf``. ``vllm_lmms_eval_run.py`` wraps ``vllm.LLM.chat`` to record what vLLM was
given: every prompt must hold one run of 144 image tokens, and the generation limit must be the
``max_new_tokens`` of ``--model_args`` (lmms-eval takes the larger of it and the task's, and its
default is 4096). Then lmms-eval's own results file must hold the task's score.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.vllm_server import subprocess_env
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


@pytest.fixture(scope="module")
def lmms_eval(venv_python) -> Path:  # noqa: F811 (the imported fixture)
    found = subprocess.run([str(venv_python), "-c", "import lmms_eval.__main__"], env=subprocess_env(),
                           capture_output=True, text=True, timeout=300, check=False)
    if found.returncode != 0:
        skip_or_fail_under_ci(f"lmms-eval is not importable in the vLLM venv: {found.stderr.strip()[-300:]}",
                              "scripts/build_vllm_venv.sh installs it; CI runs that before pytest.")
    return venv_python


def test_lmms_eval_vllm_model_gets_144_image_tokens_per_image(lmms_eval, tmp_path):
    from llava.standins import build_tiny_clip, make_images

    clip = build_tiny_clip(tmp_path / "clip")
    fork = build_fork_checkpoint(tmp_path / "fork-24to12", clip, compression_output_size=12)
    served = convert_to_hf(fork, tmp_path / "llava-v1.5-tiny-toconv12-hf")
    docs = tmp_path / "docs.jsonl"
    with docs.open("w") as f:
        for i, ((question, answer), image) in enumerate(zip(QUESTIONS, make_images(3, size=(336, 336), seed=5))):
            image.save(tmp_path / f"image_{i}.png")
            f.write(json.dumps({"question_id": i, "image": str(tmp_path / f"image_{i}.png"), "question": question,
                                "answer": answer}) + "\n")
    task = tmp_path / "task"
    task.mkdir()
    shutil.copy(TASK / "utils.py", task / "utils.py")
    (task / "toconv_yesno.yaml").write_text((TASK / "toconv_yesno.yaml.in").read_text().replace("DOCS", str(docs)))
    spec = {"model_args": f"model={served},max_new_tokens={MAX_NEW_TOKENS},max_model_len=2048,enforce_eager=True,"
                          "dtype=float32",
            "tasks": "toconv_yesno", "include_path": str(task), "output_path": str(tmp_path / "results"),
            "batch_size": 2}
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    done = subprocess.run([str(lmms_eval), str(RUNNER), str(tmp_path / "spec.json"), str(tmp_path / "seen.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200, check=False,
                          env=subprocess_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
                                              "HF_DATASETS_OFFLINE": "1"}))
    # lmms-eval logs an error during evaluation and exits 0, so what reached vLLM is checked, not only the status.
    log = done.stdout[-3000:] + done.stderr[-8000:]
    assert done.returncode == 0, log
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["prompt_token_ids"], log
    image_token = json.loads((served / "config.json").read_text())["image_token_index"]
    assert len(seen["prompt_token_ids"]) == len(QUESTIONS)
    for ids in seen["prompt_token_ids"]:
        positions = [i for i, token in enumerate(ids) if token == image_token]
        assert len(positions) == 144 and positions == list(range(positions[0], positions[0] + 144))
    assert seen["max_tokens"] == [MAX_NEW_TOKENS] * len(QUESTIONS)
    results = list((tmp_path / "results").rglob("*_results.json"))
    assert len(results) == 1, list((tmp_path / "results").rglob("*"))
    scores = json.loads(results[0].read_text())["results"]["toconv_yesno"]
    expected = sum(text.strip().lower() == answer for text, (_, answer) in zip(seen["texts"], QUESTIONS)) / 3
    assert scores["exact_match,none"] == pytest.approx(expected)
