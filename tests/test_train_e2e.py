"""LLaVA-1.5 training with ToConv compression, end to end on tiny stand-ins (CPU).

Stand-ins: a 2-layer Llama (hidden 64) saved as a plain LLM checkpoint, the BPE tokenizer from
``llava.standins``, a CLIP stand-in with the real 336px / patch-14 geometry (24×24 grid, hidden
32), twelve generated images, and small caption / conversation JSON files.

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
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from llava.train.data import SampleError
from llava.train.train import train

COLORS = ["red circle", "green square", "blue triangle", "yellow circle"]
ADAPTER_KEYS = {
    "model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
    "model.mm_projector.2.bias", "model.vision_tower.token_compressor.conv.weight",
    "model.vision_tower.token_compressor.conv.bias",
}
# The compressor's grid-size record (an int64 buffer [in, out], not a parameter), saved with its weights.
GRID_SIZES_RECORD = "model.vision_tower.token_compressor.grid_sizes"
SAVED_ADAPTER_KEYS = ADAPTER_KEYS | {GRID_SIZES_RECORD}  # what mm_projector.bin holds


def _is_adapter(name: str) -> bool:
    return "mm_projector" in name or "token_compressor" in name


class Snapshot(TrainerCallback):
    """Copies every parameter when training begins."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """Tokenizer + plain tiny Llama, tiny CLIP, 12 images, caption and conversation data."""
    import transformers

    from llava.standins import build_tiny_clip, build_tokenizer, make_images, save_images, tiny_language_config

    root = tmp_path_factory.mktemp("train-e2e")
    llm = build_tokenizer(root / "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm)
    tiny = tiny_language_config(vocab_size=len(tokenizer)).to_dict()
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: tiny[k] for k in fields})).save_pretrained(llm)
    clip = build_tiny_clip(root / "clip")
    images = root / "images"
    names = save_images(make_images(12, size=(400, 300), seed=0), images)
    captions = [
        {"id": f"cap-{i}", "image": n, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"The image shows a {COLORS[i % 4]} on a white background."}]}
        for i, n in enumerate(names)
    ]
    chats = [
        {"id": f"chat-{i}", "image": n, "conversations": [
            {"from": "human", "value": "What is in the image?\n<image>"},
            {"from": "gpt", "value": f"A {COLORS[i % 4]}."},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": "one"}]}
        for i, n in enumerate(names)
    ]
    chats.append({"id": "text-0", "conversations": [
        {"from": "human", "value": "What color is the shape?"}, {"from": "gpt", "value": "red"}]})
    (root / "pretrain.json").write_text(json.dumps(captions))
    (root / "finetune.json").write_text(json.dumps(chats))
    return SimpleNamespace(root=root, llm=llm, clip=clip, images=images, names=names,
                           pretrain=root / "pretrain.json", finetune=root / "finetune.json")


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
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key].float(), b[key].float()), key


@pytest.fixture(scope="module")
def stage1(ws):
    out = ws.root / "llava-v1.5-tiny-toconv12-pretrain"
    snap = Snapshot()
    trainer = train(argv=stage1_flags(ws, out), callbacks=[snap])
    return SimpleNamespace(out=out, trainer=trainer, snap=snap, projector=out / "mm_projector.bin")


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
