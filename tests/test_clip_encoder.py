"""CLIPVisionTower / CLIPVisionTowerS2 with ToConv compression, on tiny random-weight stand-ins."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower, CLIPVisionTowerS2
from vision_token_compression import TokenCompressor, save_compressor

C = 32  # hidden size of the tiny stand-ins (conftest.TINY_HIDDEN); every test below asserts it


def _compressed_args(make_args, grid_out: int = 12, **fields):
    return make_args(use_token_compression=True, compression_input_size=24, compression_output_size=grid_out, **fields)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter away from its init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _images(batch: int = 2, size: int = 336, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- construction and properties ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("tower_fixture", "grid_in", "grid_out"),
    [("tiny_tower_336", 24, 12), ("tiny_tower_336", 24, 8), ("tiny_tower_224", 16, 12), ("tiny_tower_224", 16, 8)],
)
def test_compressed_tower_shapes_and_properties(request, make_args, tower_fixture, grid_in, grid_out):
    path = request.getfixturevalue(tower_fixture)
    args = make_args(use_token_compression=True, compression_input_size=grid_in, compression_output_size=grid_out)
    tower = CLIPVisionTower(str(path), args)
    assert (tower.num_patches_per_side, tower.num_patches, tower.hidden_size) == (grid_out, grid_out**2, C)
    features = tower(_images(size=grid_in * 14))
    assert features.shape == (2, grid_out**2, C)
    assert bool(torch.isfinite(features).all())


@pytest.mark.parametrize(("tower_fixture", "grid"), [("tiny_tower_336", 24), ("tiny_tower_224", 16)])
def test_uncompressed_tower_is_unchanged(request, make_args, tower_fixture, grid):
    tower = CLIPVisionTower(str(request.getfixturevalue(tower_fixture)), make_args())
    assert tower.token_compressor is None
    assert not any(key.startswith("token_compressor") for key in tower.state_dict())
    assert (tower.num_patches_per_side, tower.num_patches, tower.hidden_size) == (grid, grid**2, C)
    assert tower(_images(size=grid * 14)).shape == (2, grid**2, C)


def test_compression_input_size_defaults_to_the_tower_grid(tiny_tower_224, make_args):
    tower = CLIPVisionTower(str(tiny_tower_224), make_args(use_token_compression=True, compression_output_size=8))
    assert tower.compression_input_size == 16
    assert tower.token_compressor.input_grid_size == 16


def test_compressor_is_built_at_construction_with_delay_load(tiny_tower_336, make_args, caplog):
    with caplog.at_level("INFO"):
        tower = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args), delay_load=True)
    assert not tower.is_loaded
    assert isinstance(tower.token_compressor, TokenCompressor)
    assert (tower.num_patches_per_side, tower.num_patches, tower.hidden_size) == (12, 144, C)
    assert "ToConv Token Compression enabled: 24x24 → 12x12" in caplog.messages
    assert sorted(tower.state_dict()) == [
        "token_compressor.conv.bias", "token_compressor.conv.weight", "token_compressor.grid_sizes"
    ]
    assert tower.token_compressor.grid_sizes.tolist() == [24, 12]


def test_load_model_keeps_trained_compressor_weights(tiny_tower_336, make_args):
    tower = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args), delay_load=True)
    compressor = tower.token_compressor
    _perturb(compressor)
    trained = {k: v.clone() for k, v in compressor.state_dict().items()}
    tower.load_model()
    assert tower.is_loaded
    assert tower.token_compressor is compressor
    for key, value in tower.token_compressor.state_dict().items():
        assert torch.equal(value, trained[key]), key
    tower.load_model()  # a second call is a no-op
    assert tower.token_compressor is compressor


def test_state_dict_round_trip_restores_the_compressor(tiny_tower_336, make_args):
    source = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args))
    _perturb(source.token_compressor)
    state = source.state_dict()
    images = _images()

    fresh = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args))
    assert not torch.equal(fresh.token_compressor.conv.weight, source.token_compressor.conv.weight)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(images), source(images), rtol=0, atol=0)

    # As LLaVA's from_pretrained does it: a delay-loaded tower gets the compressor weights, then loads CLIP.
    delayed = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args), delay_load=True)
    delayed.load_state_dict({k: v for k, v in state.items() if k.startswith("token_compressor.")})
    delayed.load_model()
    torch.testing.assert_close(delayed(images), source(images), rtol=0, atol=0)


def test_gradient_reaches_the_compressor_and_not_clip(tiny_tower_336, make_args):
    tower = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args))
    features = tower(_images())
    assert features.requires_grad
    features.square().sum().backward()
    for name, param in tower.token_compressor.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
    clip_params = list(tower.vision_tower.named_parameters())
    assert clip_params
    for name, param in clip_params:
        assert not param.requires_grad and param.grad is None, name


def test_untrained_compressor_is_the_window_mean_of_clip_features(tiny_tower_336, make_args):
    plain = CLIPVisionTower(str(tiny_tower_336), make_args())
    compressed = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args))
    images = _images()
    grid = plain(images).unflatten(1, (24, 24)).permute(0, 3, 1, 2)  # (B, C, 24, 24)
    expected = F.avg_pool2d(grid, 3, 2, 1, count_include_pad=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(compressed(images), expected, rtol=0, atol=1e-5)


def test_cls_patch_keeps_cls_first_and_compresses_the_patches(tiny_tower_336, make_args):
    plain = CLIPVisionTower(str(tiny_tower_336), make_args(mm_vision_select_feature="cls_patch"))
    tower = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args, mm_vision_select_feature="cls_patch"))
    _perturb(tower.token_compressor)
    images = _images()
    reference = plain(images)  # (B, 577, C)
    out = tower(images)
    assert out.shape == (2, 1 + 144, C)
    torch.testing.assert_close(out[:, 0], reference[:, 0], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(out[:, 1:], tower.token_compressor(reference[:, 1:]), rtol=0, atol=1e-6)


def test_list_input_maps_image_by_image(tiny_tower_336, make_args):
    tower = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args))
    images = _images()
    batched = tower(images)
    listed = tower([images[0], images[1]])
    assert isinstance(listed, list) and len(listed) == 2
    for i, features in enumerate(listed):
        assert features.shape == (1, 144, C)
        torch.testing.assert_close(features[0], batched[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_via_to(tiny_tower_336, make_args, dtype):
    tower = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args))
    reference = tower(_images())
    tower.to(dtype)
    assert tower.dtype == dtype and tower.token_compressor.dtype == dtype
    out = tower(_images().to(dtype))
    assert out.dtype == dtype and out.shape == (2, 144, C)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.1)
    # float32 images into a half tower come back in the images' dtype, as upstream LLaVA does.
    assert tower(_images()).dtype == torch.float32


def test_pretrain_token_compressor_loads_the_checkpoint(tiny_tower_336, make_args, tmp_path):
    trained = TokenCompressor(24, 12, C)
    _perturb(trained)
    path = save_compressor(trained, tmp_path / "compressor.safetensors", vision_tower="openai/clip-vit-large-patch14-336",
                           select_layer=-2, select_feature="patch")
    for delay_load in (False, True):
        tower = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args, pretrain_token_compressor=str(path)),
                                delay_load=delay_load)
        for key, value in trained.state_dict().items():
            assert torch.equal(tower.token_compressor.state_dict()[key], value), (delay_load, key)


def test_load_token_compressor_and_record_compression(tiny_tower_336, make_args, tmp_path):
    trained = TokenCompressor(24, 8, C)
    _perturb(trained)
    path = save_compressor(trained, tmp_path / "compressor.safetensors")
    tower = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args, grid_out=8), delay_load=True)
    tower.load_token_compressor(path)
    assert all(torch.equal(tower.token_compressor.state_dict()[k], v) for k, v in trained.state_dict().items())
    config = make_args(use_token_compression=False)
    tower.record_compression(config)
    assert (config.use_token_compression, config.compression_input_size, config.compression_output_size) == (True, 24, 8)

    plain = CLIPVisionTower(str(tiny_tower_336), make_args(), delay_load=True)
    with pytest.raises(ValueError, match="use_token_compression off"):
        plain.load_token_compressor(path)
    plain.record_compression(config)
    assert (config.use_token_compression, config.compression_input_size, config.compression_output_size) == (
        False, None, None
    )


# A Python subprocess (a fresh interpreter is the only way to see what an import loads).
# The tower calls the library (vision_token_compression.towers: families, select layer/feature, early exit)
# whether or not it compresses; with compression off it builds no compressor and loads neither the
# library's trainer nor its test fixtures.
@pytest.mark.slow
def test_compression_off_builds_no_compressor_and_loads_no_trainer(tiny_tower_336):
    code = (
        "import sys; from types import SimpleNamespace as A;"
        "from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower;"
        f"t = CLIPVisionTower({str(tiny_tower_336)!r}, A(mm_vision_select_layer=-2), delay_load=True);"
        "assert t.token_compressor is None;"
        "loaded = [m for m in sys.modules if m.startswith(('vision_token_compression.training',"
        " 'vision_token_compression.testing'))];"
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ---- bad configuration: ValueError at construction, naming the numbers ---------------------------

@pytest.mark.parametrize("delay_load", [False, True])
def test_compression_input_size_other_than_the_grid_is_rejected_at_construction(tiny_tower_336, make_args, delay_load):
    args = make_args(use_token_compression=True, compression_input_size=16, compression_output_size=8)
    with pytest.raises(ValueError, match="compression_input_size=16") as exc:
        CLIPVisionTower(str(tiny_tower_336), args, delay_load=delay_load)
    assert "24×24" in str(exc.value)


@pytest.mark.parametrize("grid_out", [24, 30, 0])
def test_bad_output_size_is_rejected_at_construction(tiny_tower_336, make_args, grid_out):
    with pytest.raises(ValueError, match=str(grid_out)):
        CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args, grid_out=grid_out), delay_load=True)


@pytest.mark.parametrize(
    ("grid_in", "grid_out", "hidden", "fragment"),
    [(24, 8, C, "output_grid_size: checkpoint 8 vs expected 12"), (24, 12, 2 * C, f"hidden_dim: checkpoint {2 * C} vs expected {C}")],
)
def test_checkpoint_for_another_tower_is_rejected(tiny_tower_336, make_args, tmp_path, grid_in, grid_out, hidden, fragment):
    path = save_compressor(TokenCompressor(grid_in, grid_out, hidden), tmp_path / "other.safetensors")
    with pytest.raises(ValueError) as exc:
        CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args, pretrain_token_compressor=str(path)))
    assert fragment in str(exc.value)


def test_non_checkpoint_file_is_rejected(tiny_tower_336, make_args, tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args, pretrain_token_compressor=str(path)))


def test_unknown_select_feature_is_rejected(tiny_tower_336, make_args):
    with pytest.raises(ValueError, match="'cls'"):
        CLIPVisionTower(str(tiny_tower_336), make_args(mm_vision_select_feature="cls"))


# ---- S2 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delay_load", [False, True])
def test_s2_without_compression(tiny_tower_336, make_args, delay_load):
    tower = CLIPVisionTowerS2(str(tiny_tower_336), make_args(s2_scales="336,672"), delay_load=delay_load)
    if delay_load:
        assert not tower.is_loaded
        tower.load_model()
    assert tower.token_compressor is None
    assert tower.image_processor.size["shortest_edge"] == 672
    assert tower.image_processor.crop_size["height"] == tower.image_processor.crop_size["width"] == 672
    assert (tower.num_patches_per_side, tower.num_patches, tower.hidden_size) == (24, 576, 2 * C)
    assert tower(_images(size=672)).shape == (2, 576, 2 * C)


@pytest.mark.parametrize("delay_load", [False, True])
def test_s2_with_compression(tiny_tower_336, make_args, delay_load):
    tower = CLIPVisionTowerS2(str(tiny_tower_336), _compressed_args(make_args, s2_scales="336,672"), delay_load=delay_load)
    assert isinstance(tower.token_compressor, TokenCompressor)
    if delay_load:
        tower.load_model()
    assert tower.image_processor.crop_size["height"] == 672
    assert (tower.num_patches_per_side, tower.num_patches, tower.hidden_size) == (12, 144, 2 * C)
    assert tower(_images(size=672)).shape == (2, 144, 2 * C)


def test_s2_compresses_each_split_then_merges(tiny_tower_336, make_args):
    """Scale 336: the compressed tower on the resized image. Scale 672: four compressed crops, 2×2-pooled."""
    s2 = CLIPVisionTowerS2(str(tiny_tower_336), _compressed_args(make_args, s2_scales="336,672"))
    _perturb(s2.token_compressor)
    plain = CLIPVisionTower(str(tiny_tower_336), _compressed_args(make_args))
    plain.token_compressor.load_state_dict(s2.token_compressor.state_dict())
    images = _images(batch=1, size=672)
    with torch.no_grad():
        out = s2(images)  # (1, 144, 2C)
        small = plain(F.interpolate(images, size=336, mode="bicubic"))
        crops = [[plain(images[..., r * 336:(r + 1) * 336, c * 336:(c + 1) * 336]) for c in range(2)] for r in range(2)]
    torch.testing.assert_close(out[..., :C], small, rtol=1e-4, atol=1e-4)
    grids = [[crop.unflatten(1, (12, 12)).permute(0, 3, 1, 2) for crop in row] for row in crops]  # (1, C, 12, 12)
    merged = torch.cat([torch.cat(row, dim=-1) for row in grids], dim=-2)  # (1, C, 24, 24)
    large = F.avg_pool2d(merged, 2).flatten(2).transpose(1, 2)  # (1, 144, C)
    torch.testing.assert_close(out[..., C:], large, rtol=1e-4, atol=1e-4)


def test_s2_smallest_scale_must_be_the_tower_image_size(tiny_tower_224, make_args):
    with pytest.raises(ValueError, match="336") as exc:
        CLIPVisionTowerS2(str(tiny_tower_224), make_args(use_token_compression=True, s2_scales="336,672"),
                          delay_load=True)
    assert "224" in str(exc.value)


def test_s2_bad_scales_are_rejected(tiny_tower_336, make_args):
    with pytest.raises(ValueError, match="336,x"):
        CLIPVisionTowerS2(str(tiny_tower_336), make_args(s2_scales="336,x"), delay_load=True)


def test_s2_without_s2wrapper_names_the_package(tiny_tower_336, make_args, monkeypatch):
    monkeypatch.setitem(sys.modules, "s2wrapper", None)
    with pytest.raises(ImportError, match="scaling-on-scales"):
        CLIPVisionTowerS2(str(tiny_tower_336), _compressed_args(make_args, s2_scales="336,672"))


def test_builder_picks_the_s2_tower_from_the_config(tiny_tower_336, make_args):
    cfg = _compressed_args(make_args, mm_vision_tower=str(tiny_tower_336), s2=True, s2_scales="336,672")
    tower = build_vision_tower(cfg, delay_load=True)
    assert isinstance(tower, CLIPVisionTowerS2) and tower.num_patches == 144
    cfg.s2 = False
    tower = build_vision_tower(cfg, delay_load=True)
    assert type(tower) is CLIPVisionTower and tower.num_patches == 144


def test_concurrent_threads_get_the_features_they_get_alone(tiny_tower_336, make_args, caplog):
    """A web-demo worker encodes several requests' images at once; the early stop must stay per call."""
    import threading

    tower = CLIPVisionTower(str(tiny_tower_336), make_args())
    torch.manual_seed(0)
    images = [torch.randn(1, 3, 336, 336) for _ in range(4)]
    with torch.no_grad():
        alone = [tower(image) for image in images]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def encode(worker: int) -> None:
        with torch.no_grad():
            for round_ in range(15):
                results[worker, round_] = tower(images[worker])

    with caplog.at_level("WARNING"):
        threads = [threading.Thread(target=encode, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not [m for m in caplog.messages if "encoder.layers" in m]
    for (worker, _), features in results.items():
        torch.testing.assert_close(features, alone[worker], rtol=0, atol=0)
