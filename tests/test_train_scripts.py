"""Launch scripts, DeepSpeed configs and ZeRO-3-aware saving/loading (with a simulated ZeRO-3)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

from llava.train import checkpointing as ckpt
from llava.train.arguments import parse_arguments
from vision_token_compression.models.token_compressor import TokenCompressor

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "v1_5"


def dry_run(script: str, **env: str) -> list[str]:
    """The command a launcher would run, as argv (DRY_RUN=1); LLaVA-1.5's GPU recipe unless ``DEVICE`` is given."""
    result = subprocess.run(
        ["bash", str(SCRIPTS / script)], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "DRY_RUN": "1", "DEVICE": "gpu", **env}, check=True,
    )
    return shlex.split(result.stdout)


def trainer_args(cmd: list[str]) -> list[str]:
    """The trainer's flags from a launcher command, made CPU-parsable (no DeepSpeed, bf16 or tf32)."""
    args = cmd[cmd.index("llava/train/train_mem.py") + 1:]
    if "--deepspeed" in args:
        i = args.index("--deepspeed")
        del args[i:i + 2]
    for flag in ("--bf16", "--tf32"):
        args[args.index(flag) + 1] = "False"
    return [*args, "--use_cpu", "True"]


@pytest.mark.parametrize("compress", [False, True])
def test_launchers_pass_flags_the_trainer_knows(compress, tmp_path):
    suffix = "_compress" if compress else ""
    env = {"OUTPUT_DIR": str(tmp_path / "out")}
    pre = dry_run(f"pretrain{suffix}.sh", **env)
    assert pre[:2] == ["deepspeed", "llava/train/train_mem.py"] and pre[3] == "./scripts/zero2.json"
    model, data, training = parse_arguments(trainer_args(pre))
    assert model.tune_mm_mlp_adapter and model.version == "plain" and model.mm_projector_type == "mlp2x_gelu"
    assert model.use_token_compression is compress
    assert training.learning_rate == 1e-3 and training.warmup_steps == 0.03 and training.gradient_checkpointing

    for script in (f"finetune{suffix}.sh", f"finetune_lora{suffix}.sh"):
        cmd = dry_run(script, **env)
        assert cmd[3] == "./scripts/zero3.json"
        model, data, training = parse_arguments(trainer_args(cmd))
        assert model.version == "v1" and data.image_aspect_ratio == "pad" and training.group_by_modality_length
        assert model.use_token_compression is compress
        if compress:
            assert model.compression_output_size == 12 and "toconv12-pretrain" in model.pretrain_mm_mlp_adapter
        assert training.lora_enable is ("lora" in script)


def test_launcher_settings_from_environment():
    cmd = dry_run("finetune_lora_compress.sh", COMPRESS_TO="8", FREEZE_COMPRESSOR="1", DS_CONFIG="",
                  LAUNCHER="torchrun --nproc_per_node 8", ENTRY="llava/train/train_mem.py")
    assert cmd[:3] == ["torchrun", "--nproc_per_node", "8"] and "--deepspeed" not in cmd
    model, _, _ = parse_arguments(trainer_args(cmd))
    assert model.compression_output_size == 8 and model.freeze_token_compressor
    assert model.pretrain_mm_mlp_adapter.endswith("llava-v1.5-13b-toconv8-pretrain/mm_projector.bin")


def _without_nvidia_smi(tmp_path: Path) -> str:
    """A PATH with bash and python but no nvidia-smi: what a machine without a GPU driver offers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "python", "dirname", "printf", "echo"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_without_a_gpu_the_launchers_train_on_the_cpu_and_say_so(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PATH": _without_nvidia_smi(tmp_path), "OUTPUT_DIR": str(tmp_path / "out")}
    env.pop("DEVICE", None)
    result = subprocess.run(["bash", str(SCRIPTS / "pretrain_compress.sh")], capture_output=True, text=True, cwd=REPO,
                            env=env, check=True)
    assert "No GPU found (nvidia-smi): training on the CPU" in result.stderr
    cmd = shlex.split(result.stdout)
    assert cmd[:2] == ["python", "llava/train/train.py"] and "--deepspeed" not in cmd
    args = cmd[2:]
    assert args[args.index("--bf16") + 1] == "False" and args[args.index("--tf32") + 1] == "False"
    model, _, training = parse_arguments(args)  # parses as is: no flag to strip for a CPU
    assert training.use_cpu and not training.bf16 and model.compression_output_size == 12
    # Asked for by name: the same command, no notice.
    quiet = subprocess.run(["bash", str(SCRIPTS / "pretrain_compress.sh")], capture_output=True, text=True,
                           cwd=REPO, env={**env, "DEVICE": "cpu"}, check=True)
    assert shlex.split(quiet.stdout) == cmd and "No GPU found" not in quiet.stderr


def test_an_unknown_device_is_refused_by_name():
    result = subprocess.run(["bash", str(SCRIPTS / "finetune.sh")], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "DRY_RUN": "1", "DEVICE": "tpu"}, check=False)
    assert result.returncode == 2 and "DEVICE=tpu is not a training device" in result.stderr


@pytest.mark.parametrize(("name", "stage"), [("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)])
def test_deepspeed_configs(name, stage):
    config = json.loads((REPO / "scripts" / name).read_text())
    assert config["zero_optimization"]["stage"] == stage
    # Batch sizes and precision come from the trainer's arguments.
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"]["enabled"] == "auto"
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# Two Python subprocesses importing the training stack.
@pytest.mark.slow
def test_train_py_runs_as_a_script():
    """The DeepSpeed launcher runs llava/train/train.py by path, not as a module."""
    for entry in ("llava/train/train.py", "llava/train/train_mem.py"):
        result = subprocess.run([sys.executable, entry, "--help"], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--use_token_compression" in result.stdout and "--tune_mm_mlp_adapter" in result.stdout


# A simulated ZeRO-3: parameters hold an empty shard; GatheredParameters restores the full tensor.


class FakeGatheredParameters:
    calls: list[tuple[int, int | None]] = []

    def __init__(self, params, modifier_rank=None):
        self.params, self.modifier_rank = list(params), modifier_rank
        FakeGatheredParameters.calls.append((len(self.params), modifier_rank))

    def __enter__(self):
        for p in self.params:
            p.data = p.ds_full.clone()

    def __exit__(self, *exc):
        for p in self.params:
            if self.modifier_rank is not None:
                p.ds_full = p.data.clone()
            p.data = torch.empty(0, dtype=p.ds_full.dtype)


@pytest.fixture
def fake_deepspeed(monkeypatch):
    module = types.ModuleType("deepspeed")
    module.zero = types.SimpleNamespace(GatheredParameters=FakeGatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    FakeGatheredParameters.calls = []
    return FakeGatheredParameters


class TinyTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_compressor = TokenCompressor(4, 2, 8)
        self.vision_tower_name, self.select_layer, self.select_feature = "tiny", -2, "patch"


class TinyLlava(nn.Module):
    """The module names of a LLaVA model, nothing else."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.mm_projector = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        self.model.vision_tower = TinyTower()
        self.model.embed_tokens = nn.Embedding(10, 16)
        self.config = PretrainedConfig()

    def get_vision_tower(self):
        return self.model.vision_tower


def partition(model: nn.Module) -> dict[str, torch.Tensor]:
    full = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        with torch.no_grad():
            p.add_(torch.randn_like(p))  # away from the average init
        full[name] = p.detach().clone()
        p.ds_id, p.ds_full = i, p.data.clone()
        p.data = torch.empty(0)
    return full


def test_zero3_adapter_save_gathers_full_tensors(fake_deepspeed, tmp_path):
    model = TinyLlava()
    full = partition(model)
    state = ckpt.save_mm_adapter(model, tmp_path)
    expected = {n for n in full if "mm_projector" in n or "token_compressor" in n}
    record = "model.vision_tower.token_compressor.grid_sizes"  # a buffer: whole on every rank, never gathered
    assert set(state) == expected | {record} and fake_deepspeed.calls
    saved = torch.load(tmp_path / "mm_projector.bin", weights_only=True)
    for name in expected:
        assert torch.equal(saved[name], full[name]), name
    assert saved[record].dtype == torch.int64 and saved[record].tolist() == [4, 2]
    from vision_token_compression.checkpoint import load_compressor

    compressor = load_compressor(tmp_path / "token_compressor.safetensors")  # written from a gathered twin
    assert torch.equal(compressor.conv.weight, full["model.vision_tower.token_compressor.conv.weight"])
    assert compressor.grid_sizes.tolist() == [4, 2]
    assert all(p.numel() == 0 for p in model.parameters())  # still partitioned afterwards


def test_zero3_peft_states_and_loading(fake_deepspeed):
    model = TinyLlava()
    model.model.embed_tokens.requires_grad_(False)
    full = partition(model)
    non_lora = ckpt.get_peft_state_non_lora_maybe_zero_3(model.named_parameters())
    assert set(non_lora) == {n for n in full if "embed_tokens" not in n}
    assert all(torch.equal(non_lora[n], full[n]) for n in non_lora)

    new = {k.removeprefix("model.mm_projector."): torch.zeros_like(v) for k, v in full.items() if "mm_projector" in k}
    shapes = {k: v.shape for k, v in new.items()}
    ckpt.load_state_maybe_zero_3(model.model.mm_projector, new)
    assert fake_deepspeed.calls[-1][1] == 0  # loaded on rank 0, scattered to all
    assert all(p.ds_full.abs().sum() == 0 for p in model.model.mm_projector.parameters())
    assert [p.ds_full.shape for p in model.model.mm_projector.parameters()] == list(shapes.values())


def test_non_lora_state_keeps_a_frozen_projector_and_compressor():
    """The LoRA base LLM has neither, so leaving them out would load them random / average-initialised."""
    model = TinyLlava()
    model.model.embed_tokens.requires_grad_(False)
    model.model.mm_projector.requires_grad_(False)
    model.model.vision_tower.token_compressor.requires_grad_(False)
    non_lora = ckpt.get_peft_state_non_lora_maybe_zero_3(model.named_parameters())
    assert set(non_lora) == {n for n, _ in model.named_parameters() if "embed_tokens" not in n}


def test_partitioned_parameters_without_deepspeed_say_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    model = TinyLlava()
    partition(model)
    with pytest.raises(ImportError, match="pip install"):
        ckpt.get_mm_adapter_state_maybe_zero_3(model.named_parameters(), ckpt.adapter_keys())
    # Ordinary tensors never need DeepSpeed.
    assert ckpt.gather_state([("w", torch.ones(2))])["w"].tolist() == [1.0, 1.0]


def test_lora_target_modules_leave_vision_and_projector_alone():
    model = TinyLlava()
    model.model.q_proj = nn.Linear(4, 4)
    model.model.vision_tower.q_proj = nn.Linear(4, 4)  # CLIP's attention has the same short names
    model.lm_head = nn.Linear(16, 10)
    # Full names: a short 'q_proj' would make peft wrap the vision tower's q_proj too.
    assert ckpt.find_all_linear_names(model) == ["model.q_proj"]


def test_adapter_check_accepts_a_tower_cast_to_the_compute_dtype(tiny_tower_336, tmp_path):
    """An fp32 stage-1 mm_projector.bin, then stage 2 in bf16: setup_vision casts the compressor after loading."""
    from transformers import AutoTokenizer

    from llava.standins import build_tokenizer, create_tiny_llava
    from llava.train.train import _adapter_check

    model = create_tiny_llava(tiny_tower_336, AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok")),
                              compression_output_size=12)
    adapter = {n: torch.randn_like(p) for n, p in model.named_parameters() if ckpt.matches(n, ckpt.adapter_keys())}
    torch.save(adapter, tmp_path / "mm_projector.bin")
    model.get_model().load_mm_adapter(tmp_path / "mm_projector.bin")
    model.get_vision_tower().to(dtype=torch.bfloat16)
    _adapter_check(model, str(tmp_path / "mm_projector.bin"))
    # A weight that really differs is still caught.
    with torch.no_grad():
        model.get_vision_tower().token_compressor.conv.bias.add_(1)
    with pytest.raises(RuntimeError, match="token_compressor.conv.bias"):
        _adapter_check(model, str(tmp_path / "mm_projector.bin"))
