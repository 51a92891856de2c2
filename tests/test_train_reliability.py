"""LLaVA training survives kills, resumes exactly, repeats itself under a seed and stops on NaN.

On the tiny stand-ins of ``train_workspace`` (2-layer Llama, 24×24-grid CLIP, 24→12 compression):

- LoRA resume restores ``non_lora_trainables.bin`` (projector, compressor) with the adapter; a
  checkpoint without it, or with it cut short, is an error naming the file;
- ``mm_projector.bin`` and ``non_lora_trainables.bin`` carry the compressor's grid sizes (int64):
  stage 2, LoRA resume and ``load_pretrained_model`` refuse them for another size naming both
  geometries, and files written before the record existed still load with a warning;
- an empty or truncated ``mm_projector.bin`` / ``non_lora_trainables.bin`` at inference is a
  ``CheckpointError`` naming the file;
- checkpoints and outputs appear whole or not at all; an automatic resume skips an incomplete
  ``checkpoint-N`` with a warning naming it; a truncated ``mm_projector.bin`` is an error naming it;
- two runs with the same ``--seed`` are identical;
- a NaN loss or gradient norm stops training before the step's update, naming the step and value;
- kill tests (``slow``): training processes killed with SIGKILL at seeded random points, inside
  file writes of a save among them, then resumed, end with the uninterrupted run's weights.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from llava.constants import MM_PROJECTOR_FILE, NON_LORA_FILE, TOKEN_COMPRESSOR_FILE
from llava.model.builder import load_pretrained_model
from llava.standins import VisionModelArgs, create_tiny_llava, tiny_language_config
from llava.train.checkpointing import (
    CheckpointError,
    checkpoint_problem,
    non_lora_trainables_state,
    save_mm_adapter,
)
from llava.train.llava_trainer import NonFiniteLossError
from llava.train.train import log_trainable, train
from train_callbacks import Snapshot
from train_workspace import (
    GRID_SIZES_RECORD,
    assert_same,
    losses,
    parameters_of,
    stage1_flags,
    stage2_flags,
    strip_to_module,
)
from vision_token_compression import GridSizeMismatchError

HERE = Path(__file__).resolve().parent
WORKER = HERE / "train_kill_worker.py"


def lora_flags(ws, projector: Path, out: Path) -> list[str]:
    """LoRA stage 2: 3 steps, checkpoints at steps 2 and 3."""
    return ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", *stage2_flags(ws, projector, out)]


LORA_GRID_SIZES_RECORD = f"base_model.model.{GRID_SIZES_RECORD}"  # under the prefix of the peft model's weights


def non_lora(path: Path) -> dict[str, torch.Tensor]:
    """The parameters of a ``non_lora_trainables.bin``, keyed from the module name on (its record left out)."""
    return strip_to_module(parameters_of(torch.load(path, weights_only=True)))


@pytest.fixture(scope="module")
def lora_run(ws, stage1, tmp_path_factory):
    """An uninterrupted LoRA run (checkpoint-2, checkpoint-3, final outputs)."""
    out = tmp_path_factory.mktemp("lora-reference") / "llava-v1.5-tiny-lora"
    train(argv=lora_flags(ws, stage1.projector, out))
    return out


def killed_after_checkpoint_2(lora_run: Path, tmp_path: Path) -> Path:
    """A copy of ``lora_run``'s folder as a run killed during step 3 leaves it."""
    out = tmp_path / lora_run.name
    shutil.copytree(lora_run / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(lora_run / "llava_train_args.json", out)
    return out


# ----------------------------------------------------------------------------------------------
# 1. LoRA resume restores the non-LoRA trainables
# ----------------------------------------------------------------------------------------------


def test_lora_resume_restores_projector_and_compressor(ws, stage1, lora_run, tmp_path):
    out = killed_after_checkpoint_2(lora_run, tmp_path)
    snap = Snapshot()
    trainer = train(argv=lora_flags(ws, stage1.projector, out), callbacks=[snap])
    # Step 3 started from checkpoint-2's projector and compressor, not from stage 1's.
    start = strip_to_module({k: v for k, v in snap.before.items() if "mm_projector" in k or "token_compressor" in k})
    assert_same(start, non_lora(out / "checkpoint-2" / NON_LORA_FILE))
    # ... and the run ends exactly where the uninterrupted one did.
    assert_same(non_lora(out / NON_LORA_FILE), non_lora(lora_run / NON_LORA_FILE))
    assert_same(load_file(out / "adapter_model.safetensors"), load_file(lora_run / "adapter_model.safetensors"))
    assert losses(trainer.state.log_history) == losses(json.loads((lora_run / "trainer_state.json").read_text())[
        "log_history"])


def test_resume_from_the_last_checkpoint_trains_no_further(ws, stage1, lora_run, tmp_path):
    """A kill after checkpoint-3 (of 3) was written: before the oldest checkpoint was deleted, and the outputs."""
    out = killed_after_checkpoint_2(lora_run, tmp_path)
    shutil.copytree(lora_run / "checkpoint-3", out / "checkpoint-3")
    shutil.copytree(lora_run / "checkpoint-2", out / "checkpoint-1")  # one more than --save_total_limit 2
    trainer = train(argv=[*lora_flags(ws, stage1.projector, out), "--save_total_limit", "2"])
    assert trainer.state.global_step == 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert_same(non_lora(out / NON_LORA_FILE), non_lora(lora_run / NON_LORA_FILE))
    assert_same(load_file(out / "adapter_model.safetensors"), load_file(lora_run / "adapter_model.safetensors"))


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_lora_checkpoint_without_non_lora_trainables_is_an_error(ws, stage1, lora_run, tmp_path, damage):
    out = killed_after_checkpoint_2(lora_run, tmp_path)
    path = out / "checkpoint-2" / NON_LORA_FILE
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    expected = {"missing": "does not exist", "empty": r"is empty \(0 bytes\)", "truncated": "cannot be read"}[damage]
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.* {expected}.*--resume_from_checkpoint"):
        train(argv=lora_flags(ws, stage1.projector, out))


# ----------------------------------------------------------------------------------------------
# 2. Checkpoints and outputs are atomic; resume skips incomplete checkpoints
# ----------------------------------------------------------------------------------------------


def test_automatic_resume_skips_an_incomplete_checkpoint(ws, stage1, lora_run, tmp_path, caplog):
    out = killed_after_checkpoint_2(lora_run, tmp_path)
    # What a kill while checkpoint-3 was written (before this fix) left: half an adapter, no trainer_state.json.
    partial = out / "checkpoint-3"
    partial.mkdir()
    data = (lora_run / "checkpoint-3" / "adapter_model.safetensors").read_bytes()
    (partial / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    (partial / "optimizer.pt").write_bytes(b"")
    snap = Snapshot()
    with caplog.at_level(logging.WARNING, logger="llava.train.train"):
        train(argv=lora_flags(ws, stage1.projector, out), callbacks=[snap])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = f"Skipping incomplete checkpoint {partial}: it has no trainer_state.json"
    assert any(expected in w for w in warnings), warnings
    start = strip_to_module({k: v for k, v in snap.before.items() if "mm_projector" in k or "token_compressor" in k})
    assert_same(start, non_lora(out / "checkpoint-2" / NON_LORA_FILE))
    assert_same(non_lora(out / NON_LORA_FILE), non_lora(lora_run / NON_LORA_FILE))
    assert checkpoint_problem(out / "checkpoint-3") is None  # written again, whole


def test_resume_from_an_incomplete_checkpoint_by_name_is_an_error(ws, stage1, lora_run, tmp_path):
    out = killed_after_checkpoint_2(lora_run, tmp_path)
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    flags = [*lora_flags(ws, stage1.projector, out), "--resume_from_checkpoint", str(out / "checkpoint-2")]
    expected = rf"{re.escape(str(out / 'checkpoint-2'))} is incomplete: it has no trainer_state.json"
    with pytest.raises(CheckpointError, match=expected):
        train(argv=flags)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_truncated_pretrained_projector_names_the_file_and_the_fix(ws, stage1, tmp_path, damage):
    data = stage1.projector.read_bytes()
    broken = tmp_path / MM_PROJECTOR_FILE
    broken.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    expected = rf"{re.escape(str(broken))} .*Pass the mm_projector.bin of a finished stage 1"
    with pytest.raises(CheckpointError, match=expected):
        train(argv=stage2_flags(ws, broken, tmp_path / "out"))


# ----------------------------------------------------------------------------------------------
# The compressor's grid sizes travel with its weights in the training outputs
# ----------------------------------------------------------------------------------------------


def with_output_size(flags: list[str], size: int) -> list[str]:
    flags = list(flags)
    flags[flags.index("--compression_output_size") + 1] = str(size)
    return flags


def drop_record(path: Path) -> None:
    """Rewrite a weights file as this code wrote it before the grid-size record existed."""
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.endswith("grid_sizes")}, path)


def lora_output_copy(lora_run: Path, tmp_path: Path, **config) -> Path:
    """The LoRA run's final output folder (without its checkpoints), with ``config`` fields edited."""
    out = tmp_path / lora_run.name
    out.mkdir()
    for path in lora_run.iterdir():
        if path.is_file():
            shutil.copy(path, out)
    fields = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**fields, **config}))
    return out


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_training_outputs_carry_the_grid_sizes(stage1, lora_run):
    files = {
        GRID_SIZES_RECORD: [stage1.projector, stage1.out / "checkpoint-2" / MM_PROJECTOR_FILE],
        LORA_GRID_SIZES_RECORD: [lora_run / NON_LORA_FILE, lora_run / "checkpoint-2" / NON_LORA_FILE],
    }
    for record, paths in files.items():
        for path in paths:
            state = torch.load(path, weights_only=True)
            assert state[record].dtype == torch.int64 and state[record].tolist() == [24, 12], path
            assert record.replace("grid_sizes", "conv.weight") in state  # the prefix of the compressor's weights
    # A buffer: never a parameter, never trained or counted as trainable.
    model = stage1.trainer.model
    assert not any(name.endswith("grid_sizes") for name, _ in model.named_parameters())
    compressor = model.get_vision_tower().token_compressor
    conv_numel = 32 * 32 * 9 + 32  # weight and bias only
    assert log_trainable(model)["token_compressor"] == sum(p.numel() for p in compressor.parameters()) == conv_numel


def test_grid_size_record_is_saved_as_int64_from_a_bf16_model(ws, tmp_path):
    peft = pytest.importorskip("peft")
    tokenizer = AutoTokenizer.from_pretrained(ws.llm)
    model = create_tiny_llava(ws.clip, tokenizer, compression_output_size=12).to(torch.bfloat16)
    saved = save_mm_adapter(model, tmp_path)
    on_disk = torch.load(tmp_path / MM_PROJECTOR_FILE, weights_only=True)
    for state in (saved, on_disk):
        assert state[GRID_SIZES_RECORD].dtype == torch.int64 and state[GRID_SIZES_RECORD].tolist() == [24, 12]
        assert state["model.vision_tower.token_compressor.conv.weight"].dtype == torch.bfloat16
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    state = non_lora_trainables_state(lora)
    assert state[LORA_GRID_SIZES_RECORD].dtype == torch.int64 and state[LORA_GRID_SIZES_RECORD].tolist() == [24, 12]


def test_lora_checkpoint_with_its_config_edited_to_another_size_is_refused(ws, lora_run, tmp_path):
    out = lora_output_copy(lora_run, tmp_path, compression_output_size=8)
    assert not (out / TOKEN_COMPRESSOR_FILE).exists()  # the record in non_lora_trainables.bin is all there is
    with pytest.raises(GridSizeMismatchError) as exc:
        load_pretrained_model(str(out), str(ws.llm), out.name, device="cpu")
    message = str(exc.value)
    assert str(out / NON_LORA_FILE) in message and "trained for 24→12" in message and "is 24→8" in message, message


def test_lora_checkpoint_without_the_record_still_loads_with_a_warning(ws, lora_run, tmp_path, caplog):
    out = lora_output_copy(lora_run, tmp_path)
    drop_record(out / NON_LORA_FILE)
    with caplog.at_level(logging.WARNING):
        _, model, _, _ = load_pretrained_model(str(out), str(ws.llm), out.name, device="cpu")
    assert f"from {out / NON_LORA_FILE} carry no grid sizes" in warnings_of(caplog)
    loaded = {k: v for k, v in model.named_parameters() if "token_compressor" in k}
    assert_same(strip_to_module(loaded), {k: v for k, v in non_lora(lora_run / NON_LORA_FILE).items()
                                          if "token_compressor" in k})
    assert model.get_vision_tower().token_compressor.grid_sizes.tolist() == [24, 12]


def test_stage1_adapter_is_refused_by_a_stage2_of_another_size(ws, stage1, tmp_path):
    alone = tmp_path / MM_PROJECTOR_FILE
    shutil.copy(stage1.projector, alone)  # without token_compressor.safetensors: the file's own record decides
    with pytest.raises(GridSizeMismatchError) as exc:
        train(argv=with_output_size(stage2_flags(ws, alone, tmp_path / "out"), 8))
    message = str(exc.value)
    assert f"from {alone} were trained for 24→12" in message and "is 24→8" in message, message


def test_projector_only_checkpoint_without_the_record_still_loads(ws, stage1, tmp_path, caplog):
    out = tmp_path / stage1.out.name
    out.mkdir()
    for name in ("config.json", MM_PROJECTOR_FILE):  # no token_compressor.safetensors beside it
        shutil.copy(stage1.out / name, out)
    drop_record(out / MM_PROJECTOR_FILE)
    with caplog.at_level(logging.WARNING):
        _, model, _, _ = load_pretrained_model(str(out), str(ws.llm), out.name, device="cpu")
    assert f"from {out / MM_PROJECTOR_FILE} carry no grid sizes" in warnings_of(caplog)
    loaded = {k: v for k, v in model.named_parameters() if "token_compressor" in k or "mm_projector" in k}
    assert_same(loaded, parameters_of(torch.load(stage1.projector, weights_only=True)))


def test_lora_resume_of_another_size_is_refused(ws, stage1, lora_run, tmp_path):
    out = killed_after_checkpoint_2(lora_run, tmp_path)
    flags = with_output_size(lora_flags(ws, stage1.projector, out), 8)
    i = flags.index("--pretrain_mm_mlp_adapter")  # stage 1 was 24→12 too: leave it out to reach the resume
    del flags[i : i + 2]
    with pytest.raises(GridSizeMismatchError) as exc:
        train(argv=flags)
    message = str(exc.value)
    path = out / "checkpoint-2" / NON_LORA_FILE
    assert f"from {path} were trained for 24→12" in message and "is 24→8" in message, message


def test_lora_resume_from_a_checkpoint_without_the_record(ws, stage1, lora_run, tmp_path, caplog):
    out = killed_after_checkpoint_2(lora_run, tmp_path)
    drop_record(out / "checkpoint-2" / NON_LORA_FILE)
    with caplog.at_level(logging.WARNING):
        train(argv=lora_flags(ws, stage1.projector, out))
    assert f"from {out / 'checkpoint-2' / NON_LORA_FILE} carry no grid sizes" in warnings_of(caplog)
    assert_same(non_lora(out / NON_LORA_FILE), non_lora(lora_run / NON_LORA_FILE))
    assert torch.load(out / NON_LORA_FILE, weights_only=True)[LORA_GRID_SIZES_RECORD].tolist() == [24, 12]


# ----------------------------------------------------------------------------------------------
# Empty or truncated weights files at inference name the file
# ----------------------------------------------------------------------------------------------


def damaged(source: Path, target: Path, damage: str) -> Path:
    data = source.read_bytes()
    target.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    return target


DAMAGE_MESSAGE = {"empty": r"is empty \(0 bytes\)", "truncated": r"\(\d+ bytes\) cannot be read"}


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_projector_file_at_load_pretrained_model_names_it(ws, stage1, tmp_path, damage):
    out = tmp_path / "pretrain"
    out.mkdir()
    shutil.copy(stage1.out / "config.json", out)
    broken = damaged(stage1.projector, out / MM_PROJECTOR_FILE, damage)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(broken))} {DAMAGE_MESSAGE[damage]}"):
        load_pretrained_model(str(out), str(ws.llm), out.name, device="cpu")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_pretrain_mm_mlp_adapter_at_initialize_vision_modules_names_it(ws, stage1, tmp_path, damage):
    from llava.model import LlavaLlamaForCausalLM

    broken = damaged(stage1.projector, tmp_path / MM_PROJECTOR_FILE, damage)
    tokenizer = AutoTokenizer.from_pretrained(ws.llm)
    model = LlavaLlamaForCausalLM(tiny_language_config(vocab_size=len(tokenizer)))
    args = VisionModelArgs(vision_tower=str(ws.clip), use_token_compression=True, compression_output_size=12,
                           pretrain_mm_mlp_adapter=str(broken))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(broken))} {DAMAGE_MESSAGE[damage]}"):
        model.get_model().initialize_vision_modules(args)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # as before: a missing file
        model.get_model().load_mm_adapter(tmp_path / "missing" / MM_PROJECTOR_FILE)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_non_lora_trainables_at_load_pretrained_model_names_it(ws, lora_run, tmp_path, damage):
    out = lora_output_copy(lora_run, tmp_path)
    broken = damaged(lora_run / NON_LORA_FILE, out / NON_LORA_FILE, damage)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(broken))} {DAMAGE_MESSAGE[damage]}"):
        load_pretrained_model(str(out), str(ws.llm), out.name, device="cpu")


class Interrupted(BaseException):
    """Stands in for a kill in the in-process tests (the slow tests below use real SIGKILLs)."""


# "final" trains 4 steps twice with a save each step (11 s of CPU); "checkpoint-2" is the quick case.
@pytest.mark.parametrize("when", ["checkpoint-2", pytest.param("final", marks=pytest.mark.slow)])
def test_interrupted_stage1_save_leaves_no_partial_file(ws, tmp_path, monkeypatch, when):
    out = tmp_path / "pretrain"
    flags = [*stage1_flags(ws, out), "--save_steps", "1"]
    real_save = torch.save
    writes = []

    def save(obj, f, *args, **kwargs):
        if MM_PROJECTOR_FILE in os.fspath(f):
            writes.append(f)
            if len(writes) == {"checkpoint-2": 2, "final": 5}[when]:
                real_save(obj, f, *args, **kwargs)
                Path(f).write_bytes(Path(f).read_bytes()[:100])  # cut short, then the process dies
                raise Interrupted
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(Interrupted):
        train(argv=flags)
    visible = [p for p in out.rglob("*") if not any(part.startswith(".") for part in p.relative_to(out).parts)]
    assert not any(p.name == MM_PROJECTOR_FILE and p.stat().st_size < 1000 for p in visible), visible
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == (["checkpoint-1"] if when == "checkpoint-2" else [f"checkpoint-{s}" for s in (1, 2, 3, 4)])
    assert all(checkpoint_problem(out / name) is None for name in checkpoints)
    assert not (out / MM_PROJECTOR_FILE).exists()

    monkeypatch.setattr(torch, "save", real_save)
    train(argv=flags)  # the rerun clears the temporaries and writes everything whole
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert set(torch.load(out / MM_PROJECTOR_FILE, weights_only=True)) == set(
        torch.load(out / "checkpoint-4" / MM_PROJECTOR_FILE, weights_only=True))


# ----------------------------------------------------------------------------------------------
# 8. Seeded runs are reproducible
# ----------------------------------------------------------------------------------------------


# Three LoRA training runs (about 17 s of CPU).
@pytest.mark.slow
def test_same_seed_gives_the_same_lora_run(ws, stage1, tmp_path):
    runs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        snap = Snapshot()
        out = tmp_path / name
        flags = [*lora_flags(ws, stage1.projector, out), "--max_steps", "2", "--seed", seed]
        trainer = train(argv=flags, callbacks=[snap])
        lora_init = {k: v for k, v in snap.before.items() if "lora_A" in k}
        final = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs.append((lora_init, final))
    (init_a, final_a), (init_b, final_b), (init_c, _) = runs
    assert init_a and final_a
    assert_same(init_a, init_b)
    assert_same(final_a, final_b)
    assert not all(torch.equal(init_a[k], init_c[k]) for k in init_a)  # the seed is what decides


# ----------------------------------------------------------------------------------------------
# Finite-loss guard
# ----------------------------------------------------------------------------------------------


class PoisonAtStep(TrainerCallback):
    """Make the projector's output (``where="loss"``) or a gradient (``where="gradient"``) NaN in step ``step``."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        projector = model.get_model().mm_projector

        def poisoned(tensor):
            return tensor * float("nan") if state.global_step + 1 == self.step else tensor

        if self.where == "loss":
            projector.register_forward_hook(lambda module, inputs, output: poisoned(output))
        else:
            projector[0].weight.register_hook(poisoned)


@pytest.mark.parametrize(("where", "what"), [("loss", "loss"), ("gradient", "gradient norm")])
def test_non_finite_loss_stops_training_naming_step_and_value(ws, tmp_path, where, what):
    out = tmp_path / "pretrain"
    flags = [*stage1_flags(ws, out), "--save_steps", "1"]
    with pytest.raises(NonFiniteLossError, match=rf"training {what} is nan at step 3 \(of 4\)"):
        train(argv=flags, callbacks=[PoisonAtStep(3, where)])
    # Nothing NaN was saved: the checkpoints before the step are there and finite, nothing after.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = torch.load(out / "checkpoint-2" / MM_PROJECTOR_FILE, weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (out / MM_PROJECTOR_FILE).exists()


# ----------------------------------------------------------------------------------------------
# Kill tests: SIGKILL at seeded random points (inside saves among them), then resume
# ----------------------------------------------------------------------------------------------

KILLS_PER_RUN = 6


class KillWorker:
    """Client of ``train_kill_worker.py``: runs training in forked children, killing them on request."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.count = 0

    def run(self, argv: list[str], **kill) -> dict:
        self.count += 1
        request = {"argv": argv, "log": str(self.log_dir / f"run-{self.count}.log"),
                   "events": str(self.log_dir / f"run-{self.count}.events"), **kill}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"the kill worker died (exit {self.proc.wait()})")
        reply = json.loads(line)
        reply["log"], reply["events"] = Path(request["log"]), Path(request["events"])
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def kill_worker(tmp_path_factory):
    worker = KillWorker(tmp_path_factory.mktemp("kill-logs"))
    yield worker
    worker.close()


def kill_flags(kind: str, ws, projector: Path, out: Path) -> list[str]:
    flags = {
        "stage1": lambda: stage1_flags(ws, out),
        "full": lambda: stage2_flags(ws, projector, out),
        "lora": lambda: lora_flags(ws, projector, out),
    }[kind]()
    return [*flags, "--save_steps", "1", "--save_total_limit", "2"]  # old checkpoints are deleted too


def final_weights(kind: str, out: Path) -> dict[str, torch.Tensor]:
    """The weights a run ends with: projector + compressor, and the LLM (full) or the LoRA weights."""
    if kind == "stage1":
        return torch.load(out / MM_PROJECTOR_FILE, weights_only=True)
    if kind == "full":
        return load_file(out / "model.safetensors")
    lora = {f"lora:{k}": v for k, v in load_file(out / "adapter_model.safetensors").items()}
    return {**lora, **torch.load(out / NON_LORA_FILE, weights_only=True)}


def read_events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def was_mid_save(events: list[str]) -> bool:
    """True when the process died between a ``save-begin`` and its ``save-end``."""
    inside = False
    for line in events:
        if line.startswith("- save-begin"):
            inside = True
        elif line.startswith("- save-end"):
            inside = False
    return inside


def assert_whole(out: Path) -> None:
    """No visible file is empty or cut short; every visible checkpoint-N is complete."""
    for path in out.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(out).parts) or not path.is_file():
            continue
        assert path.stat().st_size > 0, f"0-byte file {path}"
        if path.suffix in (".bin", ".pt", ".pth"):
            torch.load(path, weights_only=False, map_location="cpu")
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    for checkpoint in out.glob("checkpoint-*"):
        assert checkpoint_problem(checkpoint) is None, checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stage1", "full", "lora"])
def test_killed_runs_resume_to_the_uninterrupted_result(kind, ws, stage1, kill_worker, tmp_path):
    reference_out = tmp_path / "reference"
    reference = kill_worker.run(kill_flags(kind, ws, stage1.projector, reference_out))
    assert reference["exit"] == 0, reference["log"].read_text()[-3000:]
    events = read_events(reference["events"])
    writes = [line for line in events if not line.startswith("-")]
    saves = [line for line in events if line.startswith("- save-begin")]
    per_save = max(len(writes) // max(len(saves), 1), 1)
    first_save_s = float(saves[0].rsplit("@", 1)[1])

    out = tmp_path / "killed"
    rng = random.Random(f"kill-{kind}")
    kills = []
    for _ in range(2 * KILLS_PER_RUN):
        if len(kills) == KILLS_PER_RUN:
            break
        if rng.random() < 0.6:  # inside the k-th file write / rename / delete of the process
            kill = {"kill_at_event": rng.randint(1, per_save + 2)}
        else:  # at a random moment from the first save on (before it, the process only loads and trains)
            kill = {"kill_after_s": rng.uniform(0.8 * first_save_s, reference["seconds"])}
        reply = kill_worker.run(kill_flags(kind, ws, stage1.projector, out), **kill)
        if reply["signal"] != signal.SIGKILL:  # it finished before the kill point: run it again
            assert reply["exit"] == 0, reply["log"].read_text()[-3000:]
            continue
        kills.append({**kill, "mid_save": was_mid_save(read_events(reply["events"]))})
        assert_whole(out)
    final = kill_worker.run(kill_flags(kind, ws, stage1.projector, out))
    assert final["exit"] == 0, final["log"].read_text()[-3000:]

    assert_whole(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # temporaries cleared
    assert len(list(out.glob("checkpoint-*"))) == 2
    expected, got = final_weights(kind, reference_out), final_weights(kind, out)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    exact = all(torch.equal(got[n], expected[n]) for n in expected)
    state = json.loads((out / "trainer_state.json").read_text())
    reference_state = json.loads((reference_out / "trainer_state.json").read_text())
    assert losses(state["log_history"]) == pytest.approx(losses(reference_state["log_history"]), rel=1e-5)
    print(f"\n{kind}: {len(kills)} kills, {sum(k['mid_save'] for k in kills)} mid-save, bit-exact={exact}: {kills}")
    assert len(kills) >= KILLS_PER_RUN // 2 and any(k["mid_save"] for k in kills)
