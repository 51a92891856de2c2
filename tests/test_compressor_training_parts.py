"""Unit tests of the compressor-pretraining parts: losses, data, sampler, projector loading, plotting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vision_token_compression import TokenCompressor, choose_geometry, expand_to_square
from vision_token_compression.testing import make_structured_images
from vision_token_compression.training.config import TrainConfig
from vision_token_compression.training.data import (
    ImageFileError,
    ImageFolderDataset,
    ShardedShuffleSampler,
    find_images,
    open_image,
)
from vision_token_compression.training.evaluate import adaptive_avg_pool
from vision_token_compression.training.losses import (
    LossConfig,
    compression_loss,
    entropic_ot,
    random_directions,
    sliced_wasserstein,
    window_cosine,
)
from vision_token_compression.training.optim import warmup_cosine
from vision_token_compression.training.plotting import COLOURS, Axes, plot_curves
from vision_token_compression.training.projector import build_projector, load_projector
from vision_token_compression.training.run_log import Meter, RunLog


@pytest.mark.parametrize("grids", [(24, 12), (24, 8), (16, 12), (24, 10)])
def test_window_cosine_matches_a_loop_over_windows(grids):
    geometry = choose_geometry(*grids)
    side, out = grids
    torch.manual_seed(0)
    original, compressed = torch.randn(2, side * side, 8), torch.randn(2, out * out, 8)
    got = window_cosine(original, compressed, geometry)  # (B, M)
    grid = original.view(2, side, side, 8)
    for i in range(out):
        for j in range(out):
            (r0, r1), (c0, c1) = geometry.window(i), geometry.window(j)
            window = grid[:, r0:r1, c0:c1].reshape(2, -1, 8)
            want = F.cosine_similarity(window, compressed[:, i * out + j, None], dim=-1).mean(1)
            torch.testing.assert_close(got[:, i * out + j], want)


def test_window_cosine_names_the_grids_on_a_mismatch():
    with pytest.raises(ValueError, match="576 original and 144 compressed"):
        window_cosine(torch.randn(1, 576, 4), torch.randn(1, 64, 4), choose_geometry(24, 12))


@pytest.mark.parametrize("sizes", [(6, 4), (576, 144), (256, 144), (7, 7)])
def test_sliced_wasserstein_is_exact_for_unequal_set_sizes(sizes):
    n, m = sizes
    torch.manual_seed(1)
    x, y = torch.randn(2, n, 5), torch.randn(2, m, 5) * 2 + 1
    directions = random_directions(5, 7)
    got = sliced_wasserstein(x, y, directions, normalize=False)
    # Repeating every atom m (resp. n) times gives two equal-size sets with the same distributions.
    px = (x @ directions).repeat_interleave(m, 1).sort(1).values
    py = (y @ directions).repeat_interleave(n, 1).sort(1).values
    torch.testing.assert_close(got, (px - py).pow(2).mean((1, 2)))


def test_sliced_wasserstein_is_zero_on_itself_and_grows_with_a_shift():
    x = torch.randn(3, 64, 16)
    directions = random_directions(16, 32, torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x, directions).abs().max() < 1e-6
    near, far = sliced_wasserstein(x, x + 0.1, directions), sliced_wasserstein(x, x + 1.0, directions)
    assert (near < far).all()


def test_entropic_ot_prefers_the_closer_set_and_passes_gradients():
    torch.manual_seed(2)
    x = torch.randn(2, 64, 8)
    close = (x[:, ::4] + 0.05 * torch.randn(2, 16, 8)).requires_grad_()
    far = (x[:, ::4] + 3.0).requires_grad_()
    d_close, d_far = entropic_ot(x, close), entropic_ot(x, far)
    assert (d_close < d_far).all()
    d_far.sum().backward()
    assert far.grad is not None and far.grad.abs().sum() > 0


@pytest.mark.parametrize("distribution", ["sliced_wasserstein", "sinkhorn", "none"])
def test_compression_loss_reaches_every_compressor_parameter(distribution):
    compressor = TokenCompressor(24, 12, 16, init="random")
    tokens = torch.randn(2, 576, 16)
    config = LossConfig(distribution=distribution, num_projections=16, sinkhorn_iterations=10)
    losses = compression_loss(tokens, compressor(tokens), compressor.geometry, config, torch.Generator().manual_seed(0))
    assert ("distribution" in losses) == (distribution != "none")
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for name, parameter in compressor.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_loss_config_rejects_an_unknown_distribution():
    with pytest.raises(ValueError, match="sliced_wasserstein"):
        LossConfig(distribution="mmd")


def test_image_folder_finds_every_format_recursively_and_names_bad_files(tmp_path):
    make_structured_images(tmp_path / "a", 6, size=64, formats=("png", "jpg", "webp"), subfolders=2)
    (tmp_path / "a" / "sub0" / "UPPER.JPEG").write_bytes((tmp_path / "a" / "sub1" / "image_00001.jpg").read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    make_structured_images(tmp_path / "b", 2, size=64, subfolders=0)
    files = find_images([tmp_path / "a", tmp_path / "b"])
    assert len(files) == 9
    assert {p.suffix.lower() for p in files} == {".png", ".jpg", ".jpeg", ".webp"}

    (tmp_path / "a" / "sub0" / "broken.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset([tmp_path / "a"], transform=lambda im: torch.zeros(1))
    broken = dataset.files.index(tmp_path / "a" / "sub0" / "broken.png")
    with pytest.raises(ValueError, match="broken.png"):
        dataset[broken]
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images([tmp_path / "missing"])


@pytest.mark.parametrize("side, message", [
    (80, r"is 80×80 = 6400 pixels, over the limit of 5000 \(PIL.Image.MAX_IMAGE_PIXELS\)"),  # Pillow only warns
    (110, r"is over the limit of 5000 pixels \(PIL.Image.MAX_IMAGE_PIXELS; Pillow: Image size \(12100 pixels\)"),
])
def test_an_image_over_the_pixel_limit_is_refused_naming_it(tmp_path, monkeypatch, side, message):
    Image.new("RGB", (side, side)).save(tmp_path / "big.png")
    Image.new("RGB", (70, 70)).save(tmp_path / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # read at call time, as Pillow reads it
    dataset = ImageFolderDataset([tmp_path], transform=lambda im: torch.zeros(1))
    with pytest.raises(ImageFileError, match=rf"Image {tmp_path / 'big.png'} {message}.*remove it from --data"):
        dataset[dataset.files.index(tmp_path / "big.png")]
    assert open_image(tmp_path / "fine.png").size == (70, 70)


def test_meter_state_continues_the_running_means():
    whole, first = Meter(), Meter()
    for step in range(5):
        values = {"loss": float(step), "grad_norm": step / 2}
        whole.add(values, 8, 0.1, 0.2)
        if step == 2:  # "killed" here: a new meter continues from the saved state
            second = Meter()
            second.load_state_dict(first.state_dict())
            first = second
        first.add(values, 8, 0.1, 0.2)
    assert first.summary() == whole.summary()


def test_sampler_shards_cover_the_data_and_resume_mid_epoch():
    shards = [list(ShardedShuffleSampler(10, 2, rank, seed=3)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == list(range(10))
    sampler = ShardedShuffleSampler(10, 2, 1, seed=3)
    sampler.set_epoch(0, start=2)
    assert list(sampler) == shards[1][2:] and len(sampler) == 3
    sampler.set_epoch(1)
    assert list(sampler) != shards[1]  # a new permutation each epoch


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(100) == pytest.approx(0.1)


def test_expand_to_square_centres_the_image():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((20, 20)) == (255, 0, 0)


def test_projector_loader_matches_llava_projector(tmp_path):
    from llava.model.multimodal_projector.builder import build_vision_projector

    class Config:
        mm_hidden_size, hidden_size, mm_projector_type = 32, 48, "mlp2x_gelu"

    reference = build_vision_projector(Config())
    torch.save({f"model.mm_projector.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "mm_projector.bin")
    loaded = load_projector(tmp_path / "mm_projector.bin")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(loaded(x), reference(x))

    Config.mm_projector_type = "linear"
    linear = build_vision_projector(Config())
    torch.testing.assert_close(build_projector(linear.state_dict())(x), linear(x))
    with pytest.raises(ValueError, match="No mm_projector weights"):
        torch.save({"other.weight": torch.zeros(1)}, tmp_path / "other.bin")
        load_projector(tmp_path / "other.bin")


def test_adaptive_avg_pool_baseline_averages_2x2_blocks_at_24_to_12():
    tokens = torch.randn(2, 576, 4)
    pooled = adaptive_avg_pool(12)(tokens)  # (2, 144, 4)
    blocks = tokens.view(2, 12, 2, 12, 2, 4).mean(dim=(2, 4)).reshape(2, 144, 4)
    torch.testing.assert_close(pooled, blocks)


def test_plot_curves_draws_the_losses(tmp_path):
    losses = [(i, math.exp(-i / 5)) for i in range(20)]
    series = {"loss": losses, "flat": [(0, 0.5)]}
    path = plot_curves(series, tmp_path / "c.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (900, 540)
        pixels = image.convert("RGB").load()
    axes = Axes.fit(series, (900, 540))
    left, top, right, bottom = (round(v) for v in axes.box)

    # Read the curve back from the image: in each column of the plot area, the rows in the loss
    # colour, mapped through the axes, are the losses (linearly interpolated between steps).
    read_back = []
    for px in range(left + 2, right - 1):
        rows = [py for py in range(top + 1, bottom) if pixels[px, py] == COLOURS[0]]
        assert rows, f"no curve in column {px}"
        x, y = axes.from_px(px, sum(rows) / len(rows))
        read_back.append((x, y))
    for x, y in read_back:
        i = min(int(x), len(losses) - 2)
        expected = losses[i][1] + (x - i) * (losses[i + 1][1] - losses[i][1])
        assert abs(y - expected) < 0.01, (x, y, expected)  # 0.01: under 5 of the 450 rows' worth of y
    assert read_back[0][0] < 0.1 and read_back[-1][0] > 18.9  # from the first step to the last

    # The one-point series is a dot in the second colour, and nothing else is drawn in the loss colour.
    dot_x, dot_y = (round(v) for v in axes.to_px(0, 0.5))
    assert pixels[dot_x + 1, dot_y] == COLOURS[1]
    far_x, far_y = (round(v) for v in axes.to_px(10, 0.9))  # well above exp(-2) = 0.135
    assert pixels[far_x, far_y] != COLOURS[0]


def test_console_scripts_point_at_the_entry_points():
    import importlib
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("toconv-train-compressor", "toconv-eval-compressor"):
        module, _, attribute = scripts[name].partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), name


@pytest.mark.parametrize("lr", [0.0, -1e-4])
def test_train_config_refuses_a_non_positive_lr_instead_of_picking_the_auto_lr(lr):
    with pytest.raises(ValueError, match=r"--lr \(lr\) must be a finite number > 0"):
        TrainConfig(data=["."], output_dir=".", lr=lr)


def test_run_log_resume_drops_a_torn_last_line_and_later_records(tmp_path, caplog):
    (tmp_path / "log.jsonl").write_text('{"event": "train", "step": 1}\n{"event": "train", "step": 2}\n{"event": "tr')
    log = RunLog(tmp_path, resume_step=1, enabled=True)
    assert log.records == [{"event": "train", "step": 1}]
    assert "torn last line" in caplog.text
    assert (tmp_path / "log.jsonl").read_text() == '{"event": "train", "step": 1}\n'
    (tmp_path / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        RunLog(tmp_path, resume_step=2, enabled=True)
