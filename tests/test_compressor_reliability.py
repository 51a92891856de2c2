"""Issue 10: bad numbers and mismatched geometries are refused or reported, never passed on silently.

- A (item 4): the compressor trainer refuses nonsense settings before CLIP loads, each error naming
  the flag, the value and what is allowed; it stops on a non-finite loss (naming the step and the
  value) and never saves non-finite weights; every loader warns about non-finite weights, naming the
  file and the tensor.
- B (item 7): a compressor file is checked against its own header (shapes) before anything of the
  size its metadata claims is built.
- C (item 5): a compressor's grid sizes travel with its weights, so weights of one geometry loaded
  into another (24→12 weights after an edit of ``compression_output_size`` to 8: same 3×3 kernels)
  are refused on every path (``load_pretrained_model``, ``load_mm_adapter``, ``load_compressor_into``,
  torch's ``load_state_dict``, and at the first forward after a loader that bypasses both), while
  weights saved before the record existed still load exactly, with one warning.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import vision_token_compression.checkpoint as checkpoint_module
import vision_token_compression.training.trainer as train_module
from llava.model.builder import load_pretrained_model
from llava.standins import VisionModelArgs, build_tokenizer, create_tiny_llava, tiny_language_config
from vision_token_compression import (
    GridSizeMismatchError,
    TokenCompressor,
    load_compressor,
    load_compressor_into,
    read_metadata,
    save_compressor,
)
from vision_token_compression.testing import make_structured_images
from vision_token_compression.training.cli import main as train_main
from vision_token_compression.training.config import TrainConfig
from vision_token_compression.training.losses import LossConfig
from vision_token_compression.training.run_state import list_checkpoints

COMPRESSOR = "model.vision_tower.token_compressor."
WARNINGS = logging.WARNING


def _perturbed(compressor: TokenCompressor, seed: int = 0) -> TokenCompressor:
    """Give a compressor weights unlike any init (stands in for a trained one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in compressor.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return compressor


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= WARNINGS)


# =================================================================================================
# A. The trainer's settings, its loss guard, and non-finite weights at load
# =================================================================================================


@pytest.fixture(scope="module")
def train_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train-images")
    make_structured_images(folder, 24, size=336, seed=1)
    return folder


def _train_args(tower: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(images), "--output-dir", str(out), "--vision-tower", str(tower), "--batch-size", "8",
        "--num-workers", "0", "--log-every", "1", "--num-projections", "16", *extra,
    ]


# (flags, fragments the error must hold: the flag, the value, the allowed range)
NONSENSE = [
    (["--lr", "inf"], ["--lr", "got inf", "finite number > 0"]),
    (["--lr", "nan"], ["--lr", "got nan", "finite number > 0"]),
    (["--lr", "0"], ["--lr", "got 0.0", "> 0"]),
    (["--lr=-1e-4"], ["--lr", "got -0.0001", "> 0"]),
    (["--distribution", "sinkhorn", "--sinkhorn-epsilon", "0"], ["--sinkhorn-epsilon", "got 0.0", "> 0"]),
    (["--sinkhorn-epsilon", "-1"], ["--sinkhorn-epsilon", "got -1.0", "> 0"]),
    (["--sinkhorn-epsilon", "nan"], ["--sinkhorn-epsilon", "got nan", "finite number > 0"]),
    (["--sinkhorn-iterations", "0"], ["--sinkhorn-iterations", "got 0", "≥ 1"]),
    (["--num-projections", "0"], ["--num-projections", "got 0", "≥ 1"]),
    (["--grad-clip", "-1"], ["--grad-clip", "got -1.0", "≥ 0"]),
    (["--grad-clip", "nan"], ["--grad-clip", "got nan", "≥ 0"]),
    (["--save-every-steps", "-5"], ["--save-every-steps", "got -5", "≥ 0"]),
    (["--min-lr-ratio", "5"], ["--min-lr-ratio", "got 5.0", "[0, 1]"]),
    (["--min-lr-ratio", "-0.5"], ["--min-lr-ratio", "got -0.5", "[0, 1]"]),
    (["--warmup-ratio", "1"], ["--warmup-ratio", "got 1.0", "[0, 1)"]),
    (["--warmup-ratio", "nan"], ["--warmup-ratio", "got nan", "[0, 1)"]),
    (["--window-weight", "-1"], ["--window-weight", "got -1.0", "≥ 0"]),
    (["--window-weight", "inf"], ["--window-weight", "got inf", "finite number ≥ 0"]),
    (["--distribution-weight", "-2"], ["--distribution-weight", "got -2.0", "≥ 0"]),
    (["--weight-decay", "-0.1"], ["--weight-decay", "got -0.1", "≥ 0"]),
    (["--weight-decay", "inf"], ["--weight-decay", "got inf", "≥ 0"]),
    (["--epochs", "0"], ["--epochs", "got 0", "≥ 1"]),
    (["--max-steps", "0"], ["--max-steps", "got 0", "≥ 1"]),
    (["--batch-size", "0"], ["--batch-size", "got 0", "≥ 1"]),
    (["--log-every", "0"], ["--log-every", "got 0", "≥ 1"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints", "got 0", "≥ 1"]),
    (["--num-workers", "-1"], ["--num-workers", "got -1", "≥ 0"]),
    (["--seed", "-1"], ["--seed", "got -1", "[0, 4294967295]"]),
    (["--output-sizes", "0"], ["--output-sizes", "got 0", "≥ 1"]),
    (["--output-sizes", "12", "12"], ["--output-sizes", "[12, 12]", "distinct"]),
    (["--output-sizes", "24"], ["--output-sizes", "got 24", "[1, 23]"]),
    (["--select-layer", "7"], ["--select-layer", "got 7", "-3..2"]),
    (["--window-weight", "0", "--distribution", "none"], ["No loss term", "--window-weight", "=0.0", "'none'"]),
    (["--window-weight", "0", "--distribution-weight", "0"], ["No loss term", "--distribution-weight", "=0.0"]),
]


@pytest.mark.parametrize(("flags", "fragments"), NONSENSE, ids=[" ".join(f) for f, _ in NONSENSE])
def test_nonsense_settings_are_refused_before_clip_loads(flags, fragments, tiny_tower_336, train_images, tmp_path,
                                                         monkeypatch, capsys):
    def no_clip(*args, **kwargs):
        raise AssertionError("CLIP was loaded: the settings were not checked first")

    monkeypatch.setattr(train_module, "FrozenTowerFeatures", no_clip)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        train_main(_train_args(tiny_tower_336, train_images, out, *flags))
    assert exc.value.code == 2
    message = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"epochs": 1.5}, "--epochs (epochs) must be an integer ≥ 1, got 1.5"),
        ({"batch_size": True}, "--batch-size (batch_size) must be an integer ≥ 1, got True"),
        ({"lr": "1e-4"}, "--lr (lr) must be a finite number > 0, got '1e-4'"),
        ({"select_feature": "cls"}, "--select-feature (select_feature) must be one of 'patch', 'cls_patch'"),
        ({"precision": "fp8"}, "--precision (precision) must be one of"),
        ({"output_dir": ""}, "--output-dir (output_dir) must be a non-empty path"),
        ({"device": "gpu0"}, "--device (device) must be cpu, cuda or cuda:N, got 'gpu0'"),
        ({"loss": LossConfig(), "seed": 2**40}, "--seed (seed) must be an integer in [0, 4294967295]"),
    ],
)
def test_train_config_checks_types_for_python_callers(fields, fragment):
    with pytest.raises(ValueError) as exc:
        TrainConfig(**{"data": ["."], "output_dir": ".", **fields})
    assert fragment in str(exc.value)


def test_loss_config_refuses_a_loss_without_terms():
    with pytest.raises(ValueError, match="No loss term is on"):
        LossConfig(window_weight=0.0, distribution="none")
    LossConfig(window_weight=0.0, distribution="sinkhorn")  # one term is enough


def test_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tiny_tower_336, train_images, tmp_path,
                                                                              monkeypatch):
    real_loss = train_module.compression_loss
    calls = []

    def loss_turning_nan_at_step_3(*args, **kwargs):
        calls.append(1)
        losses = real_loss(*args, **kwargs)
        if len(calls) >= 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train_module, "compression_loss", loss_turning_nan_at_step_3)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError) as exc:
        train_main(_train_args(tiny_tower_336, train_images, out, "--epochs", "2", "--save-every-steps", "1"))
    message = str(exc.value)
    assert "step 3" in message and "the loss is nan" in message
    assert "step-00000002" in message  # where the last finite weights are

    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    top = load_file(out / "compressor_24to12.safetensors")
    assert all(torch.isfinite(t).all() for t in top.values() if t.is_floating_point())
    assert read_metadata(out / "compressor_24to12.safetensors").extra["step"] == "2"
    torch.testing.assert_close(top, load_file(out / "checkpoints" / "step-00000002" / "compressor_24to12.safetensors"),
                               rtol=0, atol=0)


def test_non_finite_weights_are_never_saved(tiny_tower_336, train_images, tmp_path, monkeypatch):
    real_step = train_module.Trainer.train_step

    def step_leaving_inf_weights_at_step_2(self, inputs):
        values = real_step(self, inputs)
        if self.step == 2:
            with torch.no_grad():
                self.bank.compressors["24to12"].conv.weight[0, 0, 0, 0] = float("inf")
        return values

    monkeypatch.setattr(train_module.Trainer, "train_step", step_leaving_inf_weights_at_step_2)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError) as exc:
        train_main(_train_args(tiny_tower_336, train_images, out, "--epochs", "1", "--save-every-steps", "1"))
    message = str(exc.value)
    assert "step 2" in message and "compressor_24to12.conv.weight" in message and "1 inf" in message
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]
    assert read_metadata(out / "compressor_24to12.safetensors").extra["step"] == "1"
    assert torch.isfinite(load_file(out / "compressor_24to12.safetensors")["conv.weight"]).all()


def _nan_compressor() -> TokenCompressor:
    compressor = _perturbed(TokenCompressor(24, 12, 8))
    with torch.no_grad():
        compressor.conv.weight[0, 1, 2, 2] = float("nan")
        compressor.conv.bias[3] = float("-inf")
    return compressor


def test_compressor_loaders_warn_on_non_finite_weights_naming_file_and_tensor(tmp_path, caplog):
    path = save_compressor(_nan_compressor(), tmp_path / "nan.safetensors")
    with caplog.at_level(WARNINGS):
        loaded = load_compressor(path)
    assert str(path) in _warnings(caplog)
    assert "conv.weight (1 NaN, 0 inf of 576 values)" in _warnings(caplog)
    assert "conv.bias (0 NaN, 1 inf of 8 values)" in _warnings(caplog)
    assert torch.isnan(loaded.conv.weight).any()  # a warning, not a refusal

    caplog.clear()
    with caplog.at_level(WARNINGS):
        load_compressor_into(TokenCompressor(24, 12, 8), path)
    assert str(path) in _warnings(caplog) and "conv.weight" in _warnings(caplog)


# =================================================================================================
# B. A file is checked against its own header before anything of the claimed size is built
# =================================================================================================

BIG = 20000  # 20000² · 3² · 4 bytes = 14.4 GB of conv weight


def _lying_file(path: Path, hidden_dim_claimed: int, **meta_overrides) -> Path:
    """A tiny compressor file (hidden_dim 2) whose metadata claims ``hidden_dim_claimed``."""
    small = TokenCompressor(24, 12, 2)
    meta = checkpoint_module.metadata_of(small).to_strings()
    meta.update(hidden_dim=str(hidden_dim_claimed), **meta_overrides)
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path), metadata=meta)
    return path


@pytest.fixture
def no_big_compressor(monkeypatch):
    """Fail (instead of allocating) if the checkpoint module builds a compressor wider than 64 channels."""
    real = checkpoint_module.TokenCompressor

    def guarded(input_grid_size, output_grid_size, hidden_dim, *args, **kwargs):
        if hidden_dim > 64:
            raise AssertionError(f"built a TokenCompressor with hidden_dim={hidden_dim} before checking the file")
        return real(input_grid_size, output_grid_size, hidden_dim, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "TokenCompressor", guarded)


def test_small_file_claiming_a_huge_compressor_is_refused_fast_without_allocating(tmp_path, no_big_compressor):
    path = _lying_file(tmp_path / "liar.safetensors", BIG)
    assert path.stat().st_size < 1024
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ValueError) as exc:
        load_compressor(path)
    elapsed = time.perf_counter() - start
    message = str(exc.value)
    assert str(path) in message
    assert f"hidden_dim {BIG}" in message
    assert f"({BIG}, {BIG}, 3, 3)" in message and "(2, 2, 3, 3)" in message  # claimed vs actual
    assert elapsed < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # < 200 MB grew


def test_metadata_claiming_another_geometry_than_the_file_holds_is_refused(tmp_path, no_big_compressor):
    # 24→10 is a 7×7 kernel; the file holds the 3×3 kernels of 24→12.
    path = _lying_file(tmp_path / "liar.safetensors", 2, output_grid_size="10", kernel_size="7")
    with pytest.raises(ValueError) as exc:
        load_compressor(path)
    assert str(path) in str(exc.value) and "(2, 2, 7, 7)" in str(exc.value) and "(2, 2, 3, 3)" in str(exc.value)


def test_grid_sizes_tensor_contradicting_the_metadata_is_refused(tmp_path):
    compressor = TokenCompressor(24, 12, 2)
    meta = checkpoint_module.metadata_of(compressor).to_strings()
    tensors = {k: v.contiguous() for k, v in compressor.state_dict().items()}
    tensors["grid_sizes"] = torch.tensor([24, 8])
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"c\.safetensors is inconsistent: its metadata says 24→12"):
        load_compressor(tmp_path / "c.safetensors")


def test_read_metadata_reads_the_header_only(tmp_path, monkeypatch):
    path = save_compressor(TokenCompressor(24, 12, 8), tmp_path / "c.safetensors")

    def no_tensors(*args, **kwargs):
        raise AssertionError("read a tensor")

    monkeypatch.setattr(checkpoint_module, "_read_tensors", no_tensors)
    assert read_metadata(path).hidden_dim == 8


# =================================================================================================
# C. Grid sizes travel with the weights
# =================================================================================================


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def trained_12(tmp_path_factory, tiny_tower_336, tokenizer_dir) -> Path:
    """A tiny LLaVA trained with 24→12 compression (weights unlike the average init)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12, seed=3)
    _perturbed(model.get_vision_tower().token_compressor, seed=1)
    out = tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny-toconv12"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _copy_with_output_size(source: Path, dst: Path, output_size: int) -> Path:
    shutil.copytree(source, dst)
    config = json.loads((dst / "config.json").read_text())
    config["compression_output_size"] = output_size
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _load(path: Path, **kwargs):
    return load_pretrained_model(str(path), None, "llava-tiny", device="cpu", **kwargs)


def test_checkpoint_with_its_config_edited_to_another_size_is_refused_at_load(trained_12, tmp_path):
    edited = _copy_with_output_size(trained_12, tmp_path / "edited", 8)
    with pytest.raises(GridSizeMismatchError) as exc:
        _load(edited)
    message = str(exc.value)
    assert "24→12" in message and "24→8" in message and str(edited) in message
    assert "compression_output_size=12" in message  # the fix


def test_trained_checkpoint_loads_with_its_own_size_and_records_it(trained_12, caplog):
    saved = load_file(trained_12 / "model.safetensors")
    assert saved[COMPRESSOR + "grid_sizes"].tolist() == [24, 12]
    with caplog.at_level(WARNINGS):
        _, model, _, _ = _load(trained_12)
    compressor = model.get_vision_tower().token_compressor
    assert compressor.grid_sizes.tolist() == [24, 12]
    assert torch.equal(compressor.conv.weight, saved[COMPRESSOR + "conv.weight"])
    assert "grid sizes" not in _warnings(caplog) and "non-finite" not in _warnings(caplog)


def test_old_checkpoint_without_grid_sizes_loads_its_trained_weights_exactly(trained_12, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(trained_12, old)
    weights = load_file(old / "model.safetensors")
    del weights[COMPRESSOR + "grid_sizes"]
    save_file(weights, str(old / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(WARNINGS):
        _, model, _, _ = _load(old)
    compressor = model.get_vision_tower().token_compressor
    # Neither transformers' init of the missing record nor the average init touched the trained weights.
    assert torch.equal(compressor.conv.weight, weights[COMPRESSOR + "conv.weight"])
    assert torch.equal(compressor.conv.bias, weights[COMPRESSOR + "conv.bias"])
    assert compressor.grid_sizes.tolist() == [24, 12]
    said = [r.getMessage() for r in caplog.records if "carry no grid sizes" in r.getMessage()]
    assert len(said) == 1 and str(old) in said[0]
    compressor(torch.randn(1, 576, 32))  # and it runs


def test_compress_checkpoint_output_edited_to_another_size_is_refused(trained_12, tmp_path, tiny_tower_336):
    from llava.model.compress_checkpoint import compress_checkpoint

    plain = tmp_path / "plain"
    shutil.copytree(trained_12, plain)
    config = json.loads((plain / "config.json").read_text())
    config.update(use_token_compression=False, compression_input_size=None, compression_output_size=None)
    weights = {k: v for k, v in load_file(plain / "model.safetensors").items() if "token_compressor" not in k}
    save_file(weights, str(plain / "model.safetensors"), metadata={"format": "pt"})
    (plain / "config.json").write_text(json.dumps(config))
    out = compress_checkpoint(plain, tmp_path / "toconv12", 12)
    assert load_file(out / "model-token_compressor.safetensors")[COMPRESSOR + "grid_sizes"].dtype == torch.int64
    config = json.loads((out / "config.json").read_text())
    config["compression_output_size"] = 8
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(GridSizeMismatchError, match="24→12.*24→8"):
        _load(out)


def _fresh_llava(tokenizer_dir, tower, output_size: int, adapter: Path | None = None):
    from llava.model import LlavaLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = LlavaLlamaForCausalLM(tiny_language_config(vocab_size=len(tokenizer)))
    args = VisionModelArgs(vision_tower=str(tower), use_token_compression=True, compression_output_size=output_size,
                           pretrain_mm_mlp_adapter=str(adapter) if adapter else None)
    model.get_model().initialize_vision_modules(args)
    return model


@pytest.fixture(scope="module")
def stage1_12(tmp_path_factory, tiny_tower_336, tokenizer_dir):
    """What projector-only pretraining at 24→12 writes (save_mm_adapter): mm_projector.bin and, beside it,
    token_compressor.safetensors; returns the folder and the compressor's state."""
    from llava.train.checkpointing import save_mm_adapter

    model = _fresh_llava(tokenizer_dir, tiny_tower_336, 12)
    _perturbed(model.get_vision_tower().token_compressor, seed=2)
    out = tmp_path_factory.mktemp("stage1")
    save_mm_adapter(model, out)
    return out, {k: v.clone() for k, v in model.get_vision_tower().token_compressor.state_dict().items()}


def _without_record(source: Path, target: Path) -> Path:
    """``source`` as save_mm_adapter wrote it before the grid-size record existed."""
    adapter = torch.load(source, weights_only=True)
    assert adapter[COMPRESSOR + "grid_sizes"].tolist() == [24, 12]
    torch.save({k: v for k, v in adapter.items() if not k.endswith("grid_sizes")}, target)
    return target


def test_stage1_adapter_is_refused_for_another_size_in_stage2(stage1_12, tiny_tower_336, tokenizer_dir):
    folder, _ = stage1_12
    with pytest.raises(GridSizeMismatchError) as exc:
        _fresh_llava(tokenizer_dir, tiny_tower_336, 8, adapter=folder / "mm_projector.bin")
    message = str(exc.value)
    assert "24→12" in message and "24→8" in message and "mm_projector.bin" in message
    assert "token_compressor.safetensors" not in message  # the record in mm_projector.bin decided


def test_old_stage1_adapter_is_refused_by_the_compressor_file_beside_it(stage1_12, tiny_tower_336, tokenizer_dir,
                                                                        tmp_path):
    folder, _ = stage1_12
    _without_record(folder / "mm_projector.bin", tmp_path / "mm_projector.bin")
    shutil.copy(folder / "token_compressor.safetensors", tmp_path / "token_compressor.safetensors")
    with pytest.raises(GridSizeMismatchError) as exc:
        _fresh_llava(tokenizer_dir, tiny_tower_336, 8, adapter=tmp_path / "mm_projector.bin")
    message = str(exc.value)
    assert "24→12" in message and "24→8" in message and "mm_projector.bin" in message
    assert "token_compressor.safetensors" in message  # where the record came from


def test_stage1_adapter_loads_into_stage2_of_the_same_size(stage1_12, tiny_tower_336, tokenizer_dir, caplog):
    folder, trained = stage1_12
    with caplog.at_level(WARNINGS):
        model = _fresh_llava(tokenizer_dir, tiny_tower_336, 12, adapter=folder / "mm_projector.bin")
    state = model.get_vision_tower().token_compressor.state_dict()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    assert "grid sizes" not in _warnings(caplog)


def test_adapter_with_its_own_record_is_refused_for_another_size(stage1_12, tiny_tower_336, tokenizer_dir, tmp_path):
    folder, trained = stage1_12
    adapter = torch.load(folder / "mm_projector.bin", weights_only=True)
    adapter[COMPRESSOR + "grid_sizes"] = trained["grid_sizes"]  # as compress_checkpoint writes it
    torch.save(adapter, tmp_path / "mm_projector.bin")  # no token_compressor.safetensors beside it
    with pytest.raises(GridSizeMismatchError, match=r"mm_projector\.bin were trained for 24→12.*24→8"):
        _fresh_llava(tokenizer_dir, tiny_tower_336, 8, adapter=tmp_path / "mm_projector.bin")


def test_old_adapter_without_any_record_loads_exactly_with_one_warning(stage1_12, tiny_tower_336, tokenizer_dir,
                                                                       tmp_path, caplog):
    folder, trained = stage1_12
    _without_record(folder / "mm_projector.bin", tmp_path / "mm_projector.bin")  # alone: nothing to check against
    with caplog.at_level(WARNINGS):
        model = _fresh_llava(tokenizer_dir, tiny_tower_336, 12, adapter=tmp_path / "mm_projector.bin")
    state = model.get_vision_tower().token_compressor.state_dict()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    said = [r.getMessage() for r in caplog.records if "carry no grid sizes" in r.getMessage()]
    assert len(said) == 1 and "mm_projector.bin" in said[0]


def test_load_mm_adapter_warns_on_non_finite_compressor_weights(stage1_12, tiny_tower_336, tokenizer_dir, tmp_path,
                                                                 caplog):
    folder, _ = stage1_12
    adapter = torch.load(folder / "mm_projector.bin", weights_only=True)
    adapter[COMPRESSOR + "conv.weight"][0, 0, 0, 0] = float("nan")
    torch.save(adapter, tmp_path / "mm_projector.bin")
    shutil.copy(folder / "token_compressor.safetensors", tmp_path / "token_compressor.safetensors")
    with caplog.at_level(WARNINGS):
        _fresh_llava(tokenizer_dir, tiny_tower_336, 12, adapter=tmp_path / "mm_projector.bin")
    assert str(tmp_path / "mm_projector.bin") in _warnings(caplog)
    assert "conv.weight (1 NaN" in _warnings(caplog)


def test_load_pretrained_model_warns_on_non_finite_compressor_weights(trained_12, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(trained_12, broken)
    weights = load_file(broken / "model.safetensors")
    weights[COMPRESSOR + "conv.bias"][0] = float("inf")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(WARNINGS):
        _load(broken)
    assert str(broken) in _warnings(caplog) and "conv.bias (0 NaN, 1 inf" in _warnings(caplog)


def test_load_compressor_into_refuses_another_geometry(tmp_path):
    path = save_compressor(_perturbed(TokenCompressor(24, 12, 8)), tmp_path / "c.safetensors")
    target = TokenCompressor(24, 8, 8)
    before = target.conv.weight.clone()
    with pytest.raises(ValueError) as exc:
        load_compressor_into(target, path)
    assert "output_grid_size: checkpoint 12 vs expected 8" in str(exc.value) and str(path) in str(exc.value)
    assert torch.equal(target.conv.weight, before)


def test_torch_load_state_dict_refuses_another_geometry_before_loading_anything():
    source = _perturbed(TokenCompressor(24, 12, 8))
    target = TokenCompressor(24, 8, 8)  # 3×3 kernels too: the shapes alone do not tell them apart
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(GridSizeMismatchError, match="trained for 24→12.*this compressor is 24→8"):
        target.load_state_dict(source.state_dict())
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_torch_load_state_dict_of_old_weights_loads_them_saying_so_once(caplog):
    source = _perturbed(TokenCompressor(24, 12, 8))
    old = {k: v for k, v in source.state_dict().items() if k != "grid_sizes"}
    target = TokenCompressor(24, 12, 8)
    with caplog.at_level(logging.INFO, logger="vision_token_compression"):
        target.load_state_dict(old)  # strict: the record is not reported missing
        target.load_state_dict(old)
    assert torch.equal(target.conv.weight, source.conv.weight)
    said = [r for r in caplog.records if "carry no grid sizes" in r.getMessage()]
    # INFO: a bare load_state_dict cannot tell an old file from a trainer reloading its parameters.
    assert [r.levelno for r in said] == [logging.INFO]


def test_a_record_set_by_a_loader_that_bypasses_load_state_dict_is_checked_at_the_first_forward():
    # accelerate's meta-device loading (upstream LLaVA's from_pretrained on transformers 4.x) and
    # transformers 5 replace the buffer directly.
    compressor = TokenCompressor(24, 8, 8)
    compressor(torch.randn(1, 576, 8))
    compressor._buffers["grid_sizes"] = torch.tensor([24, 12])
    with pytest.raises(GridSizeMismatchError, match="trained for 24→12"):
        compressor(torch.randn(1, 576, 8))


def test_grid_sizes_survive_dtype_casts_and_are_saved_with_the_compressor(tmp_path):
    compressor = TokenCompressor(24, 8, 8).to(torch.bfloat16)
    assert compressor.grid_sizes.dtype == torch.int64 and compressor.grid_sizes.tolist() == [24, 8]
    path = save_compressor(compressor.float(), tmp_path / "c.safetensors")
    assert load_file(path)["grid_sizes"].tolist() == [24, 8]
    assert load_compressor(path).grid_sizes.tolist() == [24, 8]
    assert math.isclose(load_compressor(path).conv.weight[0, 0, 1, 1].item(), 1 / 9, rel_tol=1e-2)
