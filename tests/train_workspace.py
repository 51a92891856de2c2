"""The tiny LLaVA training workspace the training tests share: fixtures ``ws`` and ``stage1``, flags, helpers.

Registered as a pytest plugin in ``tests/conftest.py``, so ``ws`` and ``stage1`` reach every test
module that asks for them (module-scoped: each test module builds its own); the helpers are imported
by name. Used by ``test_train_e2e``, ``test_train_reliability`` and ``test_train_deepspeed``.

Stand-ins: a 2-layer Llama (hidden 64) saved as a plain LLM checkpoint, the BPE tokenizer from
``llava.standins``, a CLIP stand-in with the real 336px / patch-14 geometry (24×24 grid, hidden
32), twelve generated images, and small caption / conversation JSON files.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

# torch, transformers and the trainer are imported where they are used: as a plugin of every test
# session, this module must not add their import time to runs that never train.

ADAPTER_KEYS = {
    "model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
    "model.mm_projector.2.bias", "model.vision_tower.token_compressor.conv.weight",
    "model.vision_tower.token_compressor.conv.bias",
}
# The compressor's grid-size record (an int64 buffer [in, out], not a parameter), saved with its weights.
GRID_SIZES_RECORD = "model.vision_tower.token_compressor.grid_sizes"
SAVED_ADAPTER_KEYS = ADAPTER_KEYS | {GRID_SIZES_RECORD}  # what mm_projector.bin holds


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """Tokenizer + plain tiny Llama, tiny CLIP, 12 images, caption and conversation data."""
    from llava.standins import build_tiny_clip, build_tiny_language_model, make_images, save_images, write_training_data

    root = tmp_path_factory.mktemp("train-e2e")
    llm = build_tiny_language_model(root / "llama")
    clip = build_tiny_clip(root / "clip")
    images = root / "images"
    names = save_images(make_images(12, size=(400, 300), seed=0), images)
    pretrain, finetune = write_training_data(root, names)
    return SimpleNamespace(root=root, llm=llm, clip=clip, images=images, names=names, pretrain=pretrain,
                           finetune=finetune)


def model_flags(ws) -> list[str]:
    return [
        "--model_name_or_path", str(ws.llm), "--vision_tower", str(ws.clip), "--image_folder", str(ws.images),
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--use_token_compression", "True", "--compression_input_size", "24", "--compression_output_size", "12",
    ]


def run_flags(out: Path, steps: int, batch: int = 4) -> list[str]:
    return [
        "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--use_cpu", "True",
        "--report_to", "none", "--model_max_length", "512", "--dataloader_num_workers", "0", "--seed", "0",
        "--disable_tqdm", "True",
    ]


def stage1_flags(ws, out: Path, batch: int = 4) -> list[str]:
    return [*model_flags(ws), "--version", "plain", "--data_path", str(ws.pretrain), "--tune_mm_mlp_adapter", "True",
            "--learning_rate", "1e-2", "--warmup_ratio", "0.03", *run_flags(out, 4, batch)]


def stage2_flags(ws, projector: Path, out: Path) -> list[str]:
    return [*model_flags(ws), "--version", "v1", "--data_path", str(ws.finetune),
            "--pretrain_mm_mlp_adapter", str(projector), "--image_aspect_ratio", "pad",
            "--group_by_modality_length", "True", "--learning_rate", "2e-5", "--mm_projector_lr", "1e-2",
            *run_flags(out, 3)]


def losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def parameters_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved state without the compressor's grid-size record: the parameters alone."""
    return {k: v for k, v in state.items() if not k.endswith("token_compressor.grid_sizes")}


def strip_to_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        start = min(name.index(k) for k in ("mm_projector", "token_compressor") if k in name)
        out[name[start:]] = value
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    import torch

    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key].float(), b[key].float()), key


@pytest.fixture(scope="module")
def stage1(ws):
    """Stage 1 (projector and compressor, 24→12, 4 steps) trained once per test module."""
    from llava.train.train import train
    from train_callbacks import Snapshot

    out = ws.root / "llava-v1.5-tiny-toconv12-pretrain"
    snap = Snapshot()
    trainer = train(argv=stage1_flags(ws, out), callbacks=[snap])
    return SimpleNamespace(out=out, trainer=trainer, snap=snap, projector=out / "mm_projector.bin")


def run_torchrun(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run torchrun; on timeout stop it with SIGTERM (it then stops its workers) before failing."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stderr[-4000:]}")
    return proc.returncode, stderr
