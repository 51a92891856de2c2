"""Stage 1 and stage 2 under real DeepSpeed ZeRO-2 / ZeRO-3, two ranks, on the tiny stand-ins.

Skipped where deepspeed cannot be imported (the test extra installs it, so CI runs these); ``tests/test_train_scripts.py``
covers the ZeRO-3 gathering with a simulated partitioning everywhere. Here DeepSpeed partitions for
real, with the shipped ``scripts/zero2.json`` / ``scripts/zero3.json``:

- stage 1 (ZeRO-3 and ZeRO-2): loss finite; ``mm_projector.bin`` holds the projector and the
  compressor under their full names, with the model's full shapes (gathered, not empty shards),
  equal to the live weights at the end; under ZeRO-3 the projector and compressor weights really
  were partitioned;
- stage 2 under ZeRO-3 from the ZeRO-3 stage-1 file: once DeepSpeed has partitioned the model,
  the gathered projector and compressor are exactly that file's weights.

Without a GPU it runs on CPU (``DS_ACCELERATOR=cpu``, gloo). The Trainer's accelerate finds no
device for DeepSpeed there (with ``--use_cpu`` it sets up torch.distributed but not DeepSpeed's
communicator, so the ZeRO config sees world size 1; without it, no distributed backend at all), so
the launcher below tells accelerate "multi-CPU, gloo" -- the only thing it changes; DeepSpeed's
engine, partitioning and ``GatheredParameters`` are the real ones. The first run on a machine
JIT-builds DeepSpeed's small shared-memory comm op (about a minute; cached afterwards).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'toconv-llava[train]'); "
                    "these tests run stage 1/2 under real ZeRO-2/3 where it is")

from train_workspace import (  # noqa: E402  (after the importorskip)
    ADAPTER_KEYS,
    GRID_SIZES_RECORD,
    SAVED_ADAPTER_KEYS,
    losses,
    run_torchrun,
    stage1_flags,
    stage2_flags,
)

pytestmark = pytest.mark.slow  # torchrun, two ranks, and a JIT-built comm op on first use

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # tiny stand-ins: CLIP hidden 32, LLM hidden 64, 24→12 (k=3) compressor
    "model.mm_projector.0.weight": (64, 32), "model.mm_projector.0.bias": (64,),
    "model.mm_projector.2.weight": (64, 64), "model.mm_projector.2.bias": (64,),
    "model.vision_tower.token_compressor.conv.weight": (32, 32, 3, 3),
    "model.vision_tower.token_compressor.conv.bias": (32,),
}

LAUNCHER = '''
"""llava.train.train under DeepSpeed, recording the adapter parameters as DeepSpeed holds them."""
import json, os, sys
import torch
from transformers import TrainerCallback

if not torch.cuda.is_available():
    # accelerate finds no device for DeepSpeed on CPU: make it set up gloo / multi-CPU.
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState._prepare_backend = lambda self, *a, **k: ("gloo", DistributedType.MULTI_CPU)

from llava.train.checkpointing import gather_state, is_partitioned
from llava.train.train import configure_logging, train

OUT = os.environ["PROBE_OUT"]
RANK = int(os.environ.get("RANK", "0"))

def adapter(model):
    return [(n, p) for n, p in model.named_parameters() if "mm_projector" in n or "token_compressor" in n]

class Probe(TrainerCallback):
    def _record(self, model, tag):
        params = adapter(model)
        info = {n: {"partitioned": is_partitioned(p), "local_numel": p.numel(),
                    "shape": list(getattr(p, "ds_shape", p.shape))} for n, p in params}
        state = gather_state(params)  # collective under ZeRO-3: every rank
        if RANK == 0:
            torch.save(state, os.path.join(OUT, tag + ".pt"))
            with open(os.path.join(OUT, tag + ".json"), "w") as f:
                json.dump(info, f)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model, "begin")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._record(model, "end")

configure_logging()
train(argv=sys.argv[1:], callbacks=[Probe()])
'''


def run_deepspeed(tmp: Path, flags: list[str], config: str) -> SimpleNamespace:
    """Two ranks of ``flags`` under ``--deepspeed scripts/<config>``; what the probe recorded."""
    tmp.mkdir(parents=True, exist_ok=True)
    launcher = tmp / "ds_launch.py"
    launcher.write_text(LAUNCHER)
    flags = list(flags)
    i = flags.index("--use_cpu")  # see the module docstring: DeepSpeed on CPU goes without it
    del flags[i : i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(launcher), *flags, "--deepspeed", str(REPO / "scripts" / config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PROBE_OUT": str(tmp),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    returncode, stderr = run_torchrun(cmd, env, timeout=480)
    assert returncode == 0, stderr[-6000:]
    return SimpleNamespace(
        stderr=stderr,
        begin=torch.load(tmp / "begin.pt", weights_only=True),
        end=torch.load(tmp / "end.pt", weights_only=True),
        begin_info=json.loads((tmp / "begin.json").read_text()),
    )


def check_adapter_file(path: Path, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    saved = torch.load(path, weights_only=True)
    assert set(saved) == SAVED_ADAPTER_KEYS
    record = saved.pop(GRID_SIZES_RECORD)  # a buffer, whole on every rank; int64 whatever the training dtype
    assert record.dtype == torch.int64 and record.tolist() == [24, 12]
    for name, tensor in saved.items():
        assert tuple(tensor.shape) == SHAPES[name], name  # whole, not an empty ZeRO-3 shard
        assert torch.equal(tensor, live[name]), name
    return saved


def check_stage1(out: Path, run: SimpleNamespace) -> None:
    values = losses(json.loads((out / "trainer_state.json").read_text())["log_history"])
    assert len(values) == 4 and all(math.isfinite(v) for v in values), values
    assert {n: tuple(i["shape"]) for n, i in run.begin_info.items()} == SHAPES
    saved = check_adapter_file(out / "mm_projector.bin", run.end)
    weight = "model.vision_tower.token_compressor.conv.weight"
    assert not torch.equal(saved[weight], run.begin[weight])  # the compressor trained
    assert set(torch.load(out / "checkpoint-2" / "mm_projector.bin", weights_only=True)) == SAVED_ADAPTER_KEYS

    from vision_token_compression.checkpoint import load_compressor

    compressor = load_compressor(out / "token_compressor.safetensors")
    assert torch.equal(compressor.conv.weight, saved[weight])


@pytest.fixture(scope="module")
def zero3_stage1(ws):
    out = ws.root / "zero3-pretrain"
    run = run_deepspeed(ws.root / "zero3-pretrain-probe", stage1_flags(ws, out, batch=2), "zero3.json")
    return SimpleNamespace(out=out, run=run)


def test_zero3_stage1_saves_gathered_projector_and_compressor(zero3_stage1):
    run = zero3_stage1.run
    # DeepSpeed partitioned the weight matrices (the biases fall under the persistence threshold).
    for name, info in run.begin_info.items():
        if name.endswith("weight"):
            assert info["partitioned"] and info["local_numel"] < math.prod(info["shape"]), (name, info)
    check_stage1(zero3_stage1.out, run)


def test_zero2_stage1_saves_projector_and_compressor(ws):
    out = ws.root / "zero2-pretrain"
    run = run_deepspeed(ws.root / "zero2-pretrain-probe", stage1_flags(ws, out, batch=2), "zero2.json")
    assert not any(info["partitioned"] for info in run.begin_info.values())  # ZeRO-2 shards optimizer state only
    check_stage1(out, run)


def test_zero3_stage2_starts_from_stage1_weights(ws, zero3_stage1):
    projector = zero3_stage1.out / "mm_projector.bin"
    out = ws.root / "zero3-finetune"
    run = run_deepspeed(ws.root / "zero3-finetune-probe", stage2_flags(ws, projector, out), "zero3.json")
    assert "Started from" in run.stderr
    saved = torch.load(projector, weights_only=True)
    assert {n for n, i in run.begin_info.items() if i["partitioned"]} >= {n for n in SHAPES if n.endswith("weight")}
    assert set(run.begin) == ADAPTER_KEYS
    for name in ADAPTER_KEYS:
        assert torch.equal(run.begin[name], saved[name]), name
    values = losses(json.loads((out / "trainer_state.json").read_text())["log_history"])
    assert len(values) == 3 and all(math.isfinite(v) for v in values), values
    # The full model (stage3_gather_16bit_weights_on_model_save) holds the trained adapters, whole.
    from safetensors.torch import load_file

    model = load_file(out / "model.safetensors")
    for name, shape in SHAPES.items():
        assert tuple(model[name].shape) == shape, name
        assert torch.equal(model[name], run.end[name]), name
