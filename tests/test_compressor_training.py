"""Compressor pretraining end to end on a tiny stand-in tower and generated structured images.

Covers issue 5's acceptance list: a short run lowers the training loss and beats random init on
the evaluation metrics; a killed run keeps its last complete checkpoint and resuming continues
from the saved step and optimizer state (bit for bit); a 2-process gloo run; the checkpoint loads
into CLIPVisionTower and changes its output, and other grid sizes are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vision_token_compression import TokenCompressor, load_compressor, read_metadata
from vision_token_compression.testing import make_structured_images
from vision_token_compression.training.cli import main as train_main
from vision_token_compression.training.data import ImageFolderDataset
from vision_token_compression.training.evaluate import main as evaluate_main
from vision_token_compression.training.feature_cache import FeatureCache
from vision_token_compression.training.features import FrozenCLIPFeatures, ImagePreprocessor, load_image_processor
from vision_token_compression.training.losses import LossConfig, compression_loss
from vision_token_compression.training.run_state import list_checkpoints, read_trainer_state

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train-images")
    make_structured_images(folder, 24, size=336, seed=1)
    return folder


@pytest.fixture(scope="module")
def held_out_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("held-out-images")
    make_structured_images(folder, 12, size=(400, 300), seed=2)  # non-square: exercises the padding
    return folder


def _train_args(tower: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(images), "--output-dir", str(out), "--vision-tower", str(tower), "--batch-size", "8",
        "--num-workers", "0", "--log-every", "1", "--num-projections", "64", *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(tiny_tower_336, train_images, tmp_path_factory) -> Path:
    """3 epochs × 3 steps, two grids (24→12 and 24→8) trained side by side."""
    out = tmp_path_factory.mktemp("run") / "out"
    train_main(_train_args(tiny_tower_336, train_images, out, "--epochs", "3",
                           "--output-sizes", "12", "8"))
    return out


def _full_loss(tower: Path, images: Path, compressor: TokenCompressor) -> float:
    """The training objective over every image, with fixed projection directions."""
    extractor = FrozenCLIPFeatures(str(tower))
    dataset = ImageFolderDataset([images], ImagePreprocessor(load_image_processor(str(tower))))
    tokens = extractor(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    with torch.no_grad():
        losses = compression_loss(tokens, compressor(tokens), compressor.geometry, LossConfig(num_projections=512),
                                  torch.Generator().manual_seed(123))
    return losses["loss"].item()


# Full-loss passes before and after, and the evaluator over every baseline (about 14 s of CPU). The
# trained_run fixture (the run itself) and the evaluator stay in the quick loop through the two
# checkpoint-loading tests below.
@pytest.mark.slow
def test_short_run_lowers_the_loss_and_beats_random_init(trained_run, tiny_tower_336, train_images,
                                                         held_out_images, tmp_path, capsys):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["output_sizes"] == [12, 8] and config["total_steps"] == 9 and config["loss"]["distribution"]
    assert config["resolved_lr"] == pytest.approx({"24to12": 0.1 / (9 * 32), "24to8": 0.1 / (9 * 32)})  # auto lr
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 10))
    for key in ("loss", "24to12/lr", "24to12/window", "24to8/distribution", "images_per_s", "data_wait_fraction"):
        assert key in steps[0], key
    with Image.open(trained_run / "loss_curve.png") as png:
        assert png.format == "PNG"

    for grid in (12, 8):
        path = trained_run / f"compressor_24to{grid}.safetensors"
        meta = read_metadata(path)
        assert (meta.vision_tower, meta.select_layer, meta.select_feature) == (str(tiny_tower_336), -2, "patch")
        assert meta.extra["step"] == "9"
        trained = load_compressor(path)
        before = _full_loss(tiny_tower_336, train_images, TokenCompressor(24, grid, 32))
        after = _full_loss(tiny_tower_336, train_images, trained)
        assert after < before, (grid, before, after)

    # Held-out evaluation against the untrained alternatives, with a stand-in LLaVA projector.
    torch.manual_seed(0)
    projector = {"model.mm_projector.0.weight": torch.randn(48, 32) / 6, "model.mm_projector.0.bias": torch.zeros(48),
                 "model.mm_projector.2.weight": torch.randn(48, 48) / 7, "model.mm_projector.2.bias": torch.zeros(48)}
    torch.save(projector, tmp_path / "mm_projector.bin")
    assert evaluate_main([  # None: console scripts exit with main's return value
        "--checkpoint", str(trained_run / "compressor_24to12.safetensors"), str(trained_run / "compressor_24to8.safetensors"),
        "--data", str(held_out_images), "--projector", str(tmp_path / "mm_projector.bin"),
        "--num-workers", "0", "--output", str(tmp_path / "eval.json"),
    ]) is None
    table = capsys.readouterr().out
    assert "window_cos" in table and "random_init" in table and "proj_sliced_w2" in table
    assert "adaptive_avg_pool" in table and "avg_pool " not in table.replace("adaptive_avg_pool", "")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_images"] == 12
    for name in ("24to12", "24to8"):
        methods = report["results"][name]["methods"]
        assert set(methods) == {"trained", "average_init", "random_init", "adaptive_avg_pool"}
        trained, random_init = methods["trained"], methods["random_init"]
        assert trained["window_cos"] > random_init["window_cos"], name
        assert trained["sliced_w2"] < random_init["sliced_w2"], name
        assert trained["proj_sliced_w2"] < random_init["proj_sliced_w2"], name
    # At 24→8 the average init's windows (3×3, stride 3) are exactly average pooling's.
    assert report["results"]["24to8"]["methods"]["average_init"] == pytest.approx(
        report["results"]["24to8"]["methods"]["adaptive_avg_pool"])


_CRASH_DURING_SECOND_SAVE = textwrap.dedent("""
    import os, sys
    import vision_token_compression.training.run_state as run_state
    from vision_token_compression.training.cli import main
    write, calls = run_state.write_trainer_state, []
    def crash_on_second_save(state, path):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half a file")  # killed mid-write
            os._exit(17)
        write(state, path)
    run_state.write_trainer_state = crash_on_second_save
    main(sys.argv[1:])
""")


# Training subprocesses, one killed; the sampler's and run log's resume have fast tests in test_compressor_training_parts.
@pytest.mark.slow
def test_killed_run_keeps_its_last_checkpoint_and_resume_continues_exactly(tiny_tower_336, train_images, tmp_path):
    args = ["--epochs", "2", "--seed", "5"]
    crashed = tmp_path / "crashed"
    result = subprocess.run(
        [sys.executable, "-c", _CRASH_DURING_SECOND_SAVE, *_train_args(tiny_tower_336, train_images, crashed, *args)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 17, result.stderr[-2000:]

    # The second checkpoint died half-written in its hidden partial folder; the first is intact.
    assert [p.name for p in list_checkpoints(crashed)] == ["step-00000003"]
    assert (crashed / "checkpoints" / ".step-00000006.partial").is_dir()
    first = crashed / "checkpoints" / "step-00000003"
    assert read_trainer_state(first)["step"] == 3
    top = load_compressor(crashed / "compressor_24to12.safetensors")
    torch.testing.assert_close(top.state_dict(), load_compressor(first / "compressor_24to12.safetensors").state_dict())
    assert read_metadata(crashed / "compressor_24to12.safetensors").extra["step"] == "3"

    with pytest.raises(FileExistsError, match="--resume"):
        train_main(_train_args(tiny_tower_336, train_images, crashed, *args))
    train_main(_train_args(tiny_tower_336, train_images, crashed, *args, "--resume"))
    assert not (crashed / "checkpoints" / ".step-00000006.partial").exists()
    state = read_trainer_state(crashed / "checkpoints" / "step-00000006")
    assert state["step"] == 6
    assert all(s["step"] == 6 for s in state["optimizer"]["state"].values())  # Adam continued from step 3
    records = [json.loads(line) for line in (crashed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 7))

    # Same weights as a run that was never interrupted: step, data order and Adam moments all resumed.
    straight = tmp_path / "straight"
    train_main(_train_args(tiny_tower_336, train_images, straight, *args))
    resumed = load_file(crashed / "compressor_24to12.safetensors")
    uninterrupted = load_file(straight / "compressor_24to12.safetensors")
    assert not torch.equal(resumed["conv.weight"], load_file(first / "compressor_24to12.safetensors")["conv.weight"])
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=1e-6)


# Two training processes (gloo), about 20 s of CPU.
@pytest.mark.slow
def test_two_process_gloo_run_trains_and_writes_one_checkpoint(tiny_tower_336, train_images, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vision_token_compression.train",
         *_train_args(tiny_tower_336, train_images, out, "--epochs", "1", "--device", "cpu")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["steps_per_epoch"] == 2  # 24 images / (2 × 8), rounded up
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["compressor_24to12.safetensors"]
    assert not list((out / "checkpoints").glob(".*"))
    trained = load_file(out / "compressor_24to12.safetensors")["conv.weight"]
    assert not torch.equal(trained, TokenCompressor(24, 12, 32).conv.weight)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]  # rank 0 alone writes the log


def test_bf16_autocast_with_the_sinkhorn_loss(tiny_tower_336, train_images, tmp_path):
    out = tmp_path / "bf16"
    train_main(_train_args(tiny_tower_336, train_images, out, "--epochs", "1", "--precision", "bf16",
                           "--distribution", "sinkhorn", "--sinkhorn-iterations", "20"))
    config = json.loads((out / "config.json").read_text())
    assert config["autocast_dtype"] == "bfloat16" and config["loss"]["distribution"] == "sinkhorn"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["24to12/distribution"])) for r in records)
    weights = load_file(out / "compressor_24to12.safetensors")
    assert weights["conv.weight"].dtype == torch.float32  # autocast computes in bf16, the weights stay fp32
    assert not torch.equal(weights["conv.weight"], TokenCompressor(24, 12, 32).conv.weight)
    with pytest.raises(ValueError, match="fp16.*needs a GPU"):
        train_main(_train_args(tiny_tower_336, train_images, tmp_path / "fp16", "--precision", "fp16",
                               "--device", "cpu"))


def test_feature_cache_matches_the_tower_and_is_reused(tiny_tower_336, train_images, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    args = ["--epochs", "1", "--feature-cache", str(cache_dir)]
    train_main(_train_args(tiny_tower_336, train_images, tmp_path / "a", *args))
    (array,) = cache_dir.glob("features-*.npy")
    cache = FeatureCache(array)
    assert len(cache) == 24 and cache.shape == (24, 576, 32)
    extractor = FrozenCLIPFeatures(str(tiny_tower_336))
    dataset = ImageFolderDataset([train_images], ImagePreprocessor(load_image_processor(str(tiny_tower_336))))
    for index in (0, 23):
        want = extractor(dataset[index][0][None])[0]
        torch.testing.assert_close(cache[index][0].float(), want, rtol=2e-3, atol=2e-3)  # stored as float16

    caplog.set_level("INFO")
    mtime = array.stat().st_mtime_ns
    train_main(_train_args(tiny_tower_336, train_images, tmp_path / "b", *args))
    assert "Using feature cache" in caplog.text and array.stat().st_mtime_ns == mtime
    assert (tmp_path / "b" / "compressor_24to12.safetensors").is_file()

    # A bf16 tower computes other features: it gets its own cache instead of the fp32 one.
    train_main(_train_args(tiny_tower_336, train_images, tmp_path / "c", *args, "--precision", "bf16"))
    assert len(list(cache_dir.glob("features-*.npy"))) == 2 and array.stat().st_mtime_ns == mtime


def test_features_equal_clip_vision_tower(tiny_tower_336, make_args):
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    pixels = torch.randn(2, 3, 336, 336)
    for layer in (-2, -1, 1):
        for feature in ("patch", "cls_patch"):
            tower = CLIPVisionTower(str(tiny_tower_336), make_args(mm_vision_select_layer=layer,
                                                                    mm_vision_select_feature=feature))
            ours = FrozenCLIPFeatures(str(tiny_tower_336), layer, feature)
            assert torch.equal(ours(pixels), tower(pixels)), (layer, feature)


def test_checkpoint_loads_into_clip_vision_tower_and_other_grids_are_refused(trained_run, tiny_tower_336, make_args):
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    pixels = torch.randn(2, 3, 336, 336)
    args = {"use_token_compression": True, "compression_output_size": 12}
    plain = CLIPVisionTower(str(tiny_tower_336), make_args(**args))
    loaded = CLIPVisionTower(str(tiny_tower_336), make_args(
        **args, pretrain_token_compressor=str(trained_run / "compressor_24to12.safetensors")))
    torch.testing.assert_close(loaded.token_compressor.state_dict(),
                               load_compressor(trained_run / "compressor_24to12.safetensors").state_dict())
    out_plain, out_loaded = plain(pixels), loaded(pixels)
    assert out_loaded.shape == out_plain.shape == (2, 144, 32)
    assert (out_loaded - out_plain).abs().max() > 1e-3

    with pytest.raises(ValueError, match=r"does not fit.*output_grid_size: checkpoint 8 vs expected 12"):
        CLIPVisionTower(str(tiny_tower_336), make_args(
            **args, pretrain_token_compressor=str(trained_run / "compressor_24to8.safetensors")))


def test_checkpoint_loads_through_load_pretrained_model_and_the_llava_projector_evaluates(
        trained_run, tiny_tower_336, held_out_images, tmp_path):
    """The eval scripts' --token-compressor-path route, and --projector reading a LLaVA checkpoint folder."""
    from llava.model.builder import load_pretrained_model
    from llava.standins import build_tiny_llava
    from vision_token_compression.training.projector import load_projector

    llava_dir = build_tiny_llava(tmp_path / "llava", tiny_tower_336)  # trained without compression
    checkpoint = trained_run / "compressor_24to12.safetensors"
    _, model, _, _ = load_pretrained_model(
        str(llava_dir), None, "llava-tiny", device="cpu", use_token_compression=True,
        compression_output_size=12, token_compressor_path=str(checkpoint),
    )
    tower = model.get_vision_tower()
    assert tower.num_patches == 144
    torch.testing.assert_close(tower.token_compressor.state_dict(), load_compressor(checkpoint).state_dict())

    projector = load_projector(llava_dir)
    tokens = torch.randn(2, 144, 32)
    torch.testing.assert_close(projector(tokens), model.get_model().mm_projector(tokens))
    evaluate_main(["--checkpoint", str(checkpoint), "--data", str(held_out_images), "--projector",
                   str(llava_dir), "--max-images", "4", "--num-workers", "0", "--output", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_images"] == 4
    trained = report["results"]["24to12"]["methods"]["trained"]
    assert all(torch.isfinite(torch.tensor(v)) for v in trained.values()) and "proj_rel_l2" in trained


def test_evaluate_says_which_settings_it_assumes_for_a_checkpoint_without_them(
        tiny_tower_336, held_out_images, tmp_path, caplog):
    from vision_token_compression import save_compressor
    from vision_token_compression.training.evaluate import evaluate

    checkpoint = save_compressor(TokenCompressor(24, 12, 32), tmp_path / "bare.safetensors")  # no provenance
    report = evaluate([checkpoint], [held_out_images], vision_tower=str(tiny_tower_336), max_images=2, num_workers=0)
    assert report["select_layer"] == -2 and report["image_aspect_ratio"] == "pad"
    assert "assuming -2 (pass --select-layer)" in caplog.text
    assert "assuming 'pad' (pass --image-aspect-ratio)" in caplog.text


# ---- a run that starts where a killed one stopped --------------------------------------------------


class _Killed(Exception):
    """Stands in for SIGKILL right after a checkpoint was saved (in-process, so the test stays quick)."""


def _epoch_records(out: Path) -> list[dict]:
    """log.jsonl's epoch records without the timings (which differ between any two runs)."""
    timings = ("images_per_s", "data_wait_fraction", "data_s", "compute_s")
    return [{k: v for k, v in record.items() if k not in timings}
            for record in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if record["event"] == "epoch"]


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("few-images")
    make_structured_images(folder, 6, size=64, seed=3)
    return folder


# Three short in-process runs (about 10 s of CPU each kill point); mid epoch 2 covers the epoch boundary too.
@pytest.mark.parametrize("kill_at", [pytest.param(2, marks=pytest.mark.slow), 4])  # mid epoch 1 / 2 (3 steps each)
def test_a_resumed_runs_epoch_records_are_the_uninterrupted_runs(tiny_tower_336, few_images, tmp_path, monkeypatch,
                                                                 kill_at):
    from vision_token_compression.training import loop

    args = ["--epochs", "2", "--batch-size", "2", "--save-every-steps", "1", "--log-every", "2"]
    straight = tmp_path / "straight"
    train_main(_train_args(tiny_tower_336, few_images, straight, *args))
    resumed = tmp_path / "resumed"
    checkpoint = loop._checkpoint_if_due

    def killed_after_saving(trainer):
        checkpoint(trainer)
        if trainer.step == kill_at:
            raise _Killed

    monkeypatch.setattr(loop, "_checkpoint_if_due", killed_after_saving)
    with pytest.raises(_Killed):
        train_main(_train_args(tiny_tower_336, few_images, resumed, *args))
    monkeypatch.setattr(loop, "_checkpoint_if_due", checkpoint)
    train_main(_train_args(tiny_tower_336, few_images, resumed, *args, "--resume"))
    expected = _epoch_records(straight)
    assert [r["step"] for r in expected] == [3, 6]
    assert _epoch_records(resumed) == expected  # the means cover the steps before the kill too
    train_records = [{k: v for k, v in r.items() if k in ("step", "loss")}
                     for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines()) if r["event"] == "train"]
    assert train_records == [{k: v for k, v in r.items() if k in ("step", "loss")}
                             for r in map(json.loads, (straight / "log.jsonl").read_text().splitlines())
                             if r["event"] == "train"]


def test_a_killed_runs_temporaries_are_removed_at_the_next_start(tiny_tower_336, few_images, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    stale = [".config.json.abc12345.tmp", ".log.jsonl.x_y_z123.tmp", ".compressor_24to12.safetensors.k2j3h4g5.tmp",
             ".loss_curve.png.aaaaaaaa.tmp"]
    users = [".notes.txt.abc12345.tmp", ".mine.tmp", "data.tmp"]
    for name in stale + users:
        (out / name).write_text("left")
    with caplog.at_level("WARNING", logger="vision_token_compression.atomic"):
        train_main(_train_args(tiny_tower_336, few_images, out, "--max-steps", "1", "--batch-size", "2"))
    assert not [name for name in stale if (out / name).exists()]
    assert all((out / name).read_text() == "left" for name in users)
    assert all(f"Removed {out / name}" in caplog.text for name in stale)


# Paths only: a Hub-style name goes to the Hub first (test_settings_validation checks that offline, in a subprocess).
@pytest.mark.parametrize("tower", ["/nonexistent/clip", "./missing-clip", "~/missing-clip"])
def test_a_vision_tower_that_does_not_exist_is_not_found(tower, few_images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--data", str(few_images), "--output-dir", str(tmp_path / "out"), "--vision-tower", tower])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"--vision-tower (vision_tower) {tower!r} not found" in message, message
    assert "Repo id" not in message and not (tmp_path / "out").exists()


def test_an_image_over_the_pixel_limit_stops_the_run_naming_it(tiny_tower_336, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    make_structured_images(images, 3, size=64, seed=4)
    Image.new("RGB", (120, 120)).save(images / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(SystemExit) as exit_:
        train_main(_train_args(tiny_tower_336, images, tmp_path / "out", "--batch-size", "4"))
    assert f"Image {images / 'huge.png'} is 120×120 = 14400 pixels, over the limit of 10000" in str(exit_.value.code)
