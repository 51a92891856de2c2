"""LLaVA-1.5 training with ToConv compression, end to end on tiny stand-ins (CPU).

On the tiny stand-ins of ``train_workspace`` (2-layer Llama, 24×24-grid CLIP, 12 images, caption
and conversation data; its fixtures ``ws`` and ``stage1``):

- stage 1 (projector-only, 24→12): loss finite and moving; only projector + compressor change;
  ``mm_projector.bin`` (and every checkpoint's) holds both under their full names, with the
  compressor's grid-size record;
- stage 2 from that file: starts from exactly those weights; its output loads with
  ``load_pretrained_model`` (compressor included) and ``llava.eval.run_llava`` answers from it;
- LoRA stage 2: the same, through ``non_lora_trainables.bin``;
- stage 1 under ``torchrun --nproc_per_node 2`` (gloo): same files;
- broken samples stop training with the sample named, or are skipped and counted.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from llava.train.data import SampleError
from llava.train.train import train
from train_callbacks import Snapshot
from train_workspace import (
    ADAPTER_KEYS,
    GRID_SIZES_RECORD,
    SAVED_ADAPTER_KEYS,
    assert_same,
    losses,
    parameters_of,
    run_torchrun,
    stage1_flags,
    stage2_flags,
    strip_to_module,
)


def _is_adapter(name: str) -> bool:
    return "mm_projector" in name or "token_compressor" in name


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Projector + compressor weights keyed from the module name on (works for peft-wrapped models too)."""
    out = {}
    for name, param in model.named_parameters():
        if _is_adapter(name):
            start = min(name.index(k) for k in ("mm_projector", "token_compressor") if k in name)
            out[name[start:]] = param.detach().clone()
    return out


def test_stage1_trains_projector_and_compressor_only(stage1):
    values = losses(stage1.trainer.state.log_history)
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    assert max(values) - min(values) > 1e-3, values

    before = stage1.snap.before
    after = dict(stage1.trainer.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n in before if _is_adapter(n)} == ADAPTER_KEYS
    assert any("vision_tower.vision_tower" in n for n in before)  # CLIP was there, and stayed frozen

    saved = torch.load(stage1.projector, weights_only=True)
    assert set(saved) == SAVED_ADAPTER_KEYS
    assert_same(parameters_of(saved), {n: after[n].detach() for n in ADAPTER_KEYS})
    assert saved[GRID_SIZES_RECORD].dtype == torch.int64 and saved[GRID_SIZES_RECORD].tolist() == [24, 12]
    expected = {"config.json", "mm_projector.bin", "token_compressor.safetensors", "trainer_state.json"}
    assert files_under(stage1.out) == expected | {"llava_train_args.json"} | {
        f"checkpoint-{s}/{f}" for s in (2, 4) for f in expected
    }
    mid = torch.load(stage1.out / "checkpoint-2" / "mm_projector.bin", weights_only=True)
    assert set(mid) == SAVED_ADAPTER_KEYS
    config = json.loads((stage1.out / "config.json").read_text())
    assert config["use_token_compression"] is True and config["compression_output_size"] == 12


def test_stage1_compressor_file_matches(stage1):
    from vision_token_compression.checkpoint import load_compressor

    compressor = load_compressor(stage1.out / "token_compressor.safetensors")
    saved = torch.load(stage1.projector, weights_only=True)
    assert torch.equal(compressor.conv.weight, saved["model.vision_tower.token_compressor.conv.weight"])
    assert (compressor.input_grid_size, compressor.output_grid_size) == (24, 12)


def _answer(model_path: Path, image: Path, model_base: Path | None = None) -> str:
    from llava.eval import run_llava

    argv = ["--model-path", str(model_path), "--image-file", str(image), "--query", "What is in the image?",
            "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"]
    if model_base is not None:
        argv += ["--model-base", str(model_base)]
    return run_llava.main(argv)


def _check_stage2(ws, stage1, out: Path, snap: Snapshot, trainer, model_base: Path | None) -> None:
    # Started from exactly stage 1's projector and compressor.
    saved = strip_to_module(parameters_of(torch.load(stage1.projector, weights_only=True)))
    start = {n: t for n, t in strip_to_module({k: v for k, v in snap.before.items() if _is_adapter(k)}).items()}
    assert_same(start, saved)
    values = losses(trainer.state.log_history)
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    trained = adapter_state(trainer.model)
    assert not torch.equal(trained["token_compressor.conv.weight"], saved["token_compressor.conv.weight"])

    from llava.model.builder import load_pretrained_model

    _, model, processor, _ = load_pretrained_model(str(out), str(model_base) if model_base else None, out.name,
                                                   device="cpu")
    assert model.get_vision_tower().num_patches == 144
    assert_same(adapter_state(model), trained)
    # Runs end to end on the checkpoint. The text itself may be empty: training is seeded, and a tiny
    # random model's greedy answer can start with </s> (whether it does depends only on the seed).
    answer = _answer(out, ws.images / ws.names[0], model_base)
    assert isinstance(answer, str)


def test_stage2_full_finetune_round_trip(ws, stage1):
    out = ws.root / "llava-v1.5-tiny-toconv12"
    snap = Snapshot()
    trainer = train(argv=stage2_flags(ws, stage1.projector, out), callbacks=[snap])
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files_under(out)
    _check_stage2(ws, stage1, out, snap, trainer, model_base=None)


# A LoRA stage 2 run, then loading and answering; test_train_reliability's LoRA tests and
# test_llava_model's test_lora_checkpoint_with_model_base stay in the quick loop.
@pytest.mark.slow
def test_stage2_lora_round_trip(ws, stage1):
    out = ws.root / "llava-v1.5-tiny-toconv12-lora"
    snap = Snapshot()
    flags = ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", *stage2_flags(ws, stage1.projector, out)]
    trainer = train(argv=flags, callbacks=[snap])
    files = files_under(out)
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"} <= files
    assert "checkpoint-2/non_lora_trainables.bin" in files
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert {k.removeprefix("base_model.model.") for k in non_lora} == SAVED_ADAPTER_KEYS
    # Only LoRA weights, the projector and the compressor trained.
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), snap.before[n])}
    assert changed and all("lora_" in n or _is_adapter(n) for n in changed)
    _check_stage2(ws, stage1, out, snap, trainer, model_base=ws.llm)


@pytest.mark.slow
def test_stage1_under_torchrun_writes_the_same_files(ws, stage1):
    out = ws.root / "ddp-pretrain"
    # Two ranks × batch 2 = the single-process batch of 4.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llava.train.train", *stage1_flags(ws, out, batch=2), "--ddp_backend", "gloo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    returncode, stderr = run_torchrun(cmd, env, timeout=240)
    assert returncode == 0, stderr[-4000:]
    assert "[rank 0] INFO" in stderr and "[rank 1] INFO" not in stderr  # rank 1 logs warnings only
    assert files_under(out) == files_under(stage1.out)
    state = json.loads((out / "trainer_state.json").read_text())
    values = losses(state["log_history"])
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    saved = torch.load(out / "mm_projector.bin", weights_only=True)
    assert set(saved) == SAVED_ADAPTER_KEYS
    # The compressor trained away from its average init on both ranks together.
    from vision_token_compression.models.token_compressor import TokenCompressor

    init = TokenCompressor(24, 12, 32).conv.weight
    assert not torch.equal(saved["model.vision_tower.token_compressor.conv.weight"], init)


def test_frozen_compressor_stays_as_initialised(ws):
    out = ws.root / "frozen-pretrain"
    flags = stage1_flags(ws, out)
    flags[flags.index("--max_steps") + 1] = "2"  # the first step is warm-up at lr 0
    snap = Snapshot()
    trainer = train(argv=[*flags, "--freeze_token_compressor", "True"], callbacks=[snap])
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), snap.before[n])}
    assert changed == {n for n in ADAPTER_KEYS if "mm_projector" in n}
    # Still saved, so stage 2 starts from the same (average-init) compressor.
    assert set(torch.load(out / "mm_projector.bin", weights_only=True)) == SAVED_ADAPTER_KEYS


def test_unfrozen_clip_cannot_be_saved_by_stage_1():
    from llava.train.arguments import ModelArguments

    with pytest.raises(ValueError, match="Unfreeze CLIP in stage 2"):
        ModelArguments(tune_mm_mlp_adapter=True, unfreeze_mm_vision_tower=True)


def _broken_data(ws, name: str) -> Path:
    samples = json.loads(ws.pretrain.read_text())
    samples[1]["image"] = "missing.png"
    path = ws.root / name
    path.write_text(json.dumps(samples))
    return path


def test_broken_sample_stops_training_with_its_name(ws):
    data = _broken_data(ws, "broken.json")
    flags = stage1_flags(ws, ws.root / "broken-out", batch=12)
    flags[flags.index(str(ws.pretrain))] = str(data)
    with pytest.raises(SampleError, match=r"id 'cap-1'.*image file not found: .*missing.png"):
        train(argv=flags)


def test_broken_sample_skipped_and_counted(ws):
    data = _broken_data(ws, "skipped.json")
    flags = stage1_flags(ws, ws.root / "skip-out", batch=12)
    flags[flags.index(str(ws.pretrain))] = str(data)
    flags[flags.index("--max_steps") + 1] = "1"
    trainer = train(argv=[*flags, "--data_error_policy", "skip", "--max_skipped_fraction", "0.1"])
    assert trainer.data_skipped == 1
    assert any(entry.get("data_skipped") == 1 for entry in trainer.state.log_history)
