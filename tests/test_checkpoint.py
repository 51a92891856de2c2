"""Compressor checkpoints: safetensors with metadata, atomic writes, checks against the tower."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

import vision_token_compression.checkpoint as checkpoint_module
from vision_token_compression import (
    TokenCompressor,
    build_compressor,
    load_compressor,
    load_compressor_into,
    read_metadata,
    save_compressor,
)


def _trained(grid_in: int = 24, grid_out: int = 12, hidden_dim: int = 8, seed: int = 0) -> TokenCompressor:
    """A compressor whose weights differ from any init (stands in for a trained one)."""
    torch.manual_seed(seed)
    compressor = TokenCompressor(grid_in, grid_out, hidden_dim)
    with torch.no_grad():
        for param in compressor.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return compressor


def _assert_same_weights(a: TokenCompressor, b: TokenCompressor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    compressor = _trained()
    path = save_compressor(
        compressor, tmp_path / "ckpt" / "compressor.safetensors",
        vision_tower="openai/clip-vit-large-patch14-336", select_layer=-2, select_feature="patch",
        extra={"steps": "100"},
    )
    meta = read_metadata(path)
    assert (meta.input_grid_size, meta.output_grid_size, meta.hidden_dim) == (24, 12, 8)
    assert (meta.kernel_size, meta.stride, meta.padding) == (3, 2, 1)
    assert (meta.vision_tower, meta.select_layer, meta.select_feature) == ("openai/clip-vit-large-patch14-336", -2, "patch")
    assert meta.extra == {"steps": "100"}

    fresh = TokenCompressor(24, 12, 8)
    assert load_compressor_into(fresh, path, vision_tower="openai/clip-vit-large-patch14-336",
                                select_layer=-2, select_feature="patch") == meta
    _assert_same_weights(fresh, compressor)


def test_metadata_without_provenance_reads_back_as_none(tmp_path):
    meta = read_metadata(save_compressor(_trained(), tmp_path / "c.safetensors"))
    assert (meta.vision_tower, meta.select_layer, meta.select_feature) == (None, None, None)


def test_load_compressor_rebuilds_the_geometry(tmp_path):
    original = _trained(24, 10, hidden_dim=6)
    path = save_compressor(original, tmp_path / "c.safetensors")
    loaded = load_compressor(path)
    assert (loaded.input_grid_size, loaded.output_grid_size, loaded.hidden_dim) == (24, 10, 6)
    assert (loaded.kernel_size, loaded.stride, loaded.padding) == (7, 2, 1)
    _assert_same_weights(loaded, original)
    x = torch.randn(1, 576, 6)
    torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


def test_atomic_write_leaves_only_the_checkpoint(tmp_path):
    save_compressor(_trained(), tmp_path / "c.safetensors")
    save_compressor(_trained(seed=1), tmp_path / "c.safetensors")  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    _assert_same_weights(load_compressor(tmp_path / "c.safetensors"), _trained(seed=1))


def test_failed_write_keeps_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = save_compressor(_trained(), tmp_path / "c.safetensors")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_compressor(_trained(seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


@pytest.mark.parametrize(
    ("grid_in", "grid_out", "hidden_dim", "fragments"),
    [
        (24, 8, 8, ["output_grid_size: checkpoint 8 vs expected 12"]),
        (16, 12, 8, ["input_grid_size: checkpoint 16 vs expected 24"]),
        (24, 12, 16, ["hidden_dim: checkpoint 16 vs expected 8"]),
    ],
)
def test_checkpoint_for_another_shape_is_rejected_with_what_differs(tmp_path, grid_in, grid_out, hidden_dim, fragments):
    path = save_compressor(TokenCompressor(grid_in, grid_out, hidden_dim), tmp_path / "other.safetensors")
    target = TokenCompressor(24, 12, 8)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as exc:
        load_compressor_into(target, path)
    for fragment in fragments:
        assert fragment in str(exc.value)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])  # nothing was half-loaded


def test_other_provenance_is_a_warning_not_an_error(tmp_path, caplog):
    path = save_compressor(_trained(), tmp_path / "c.safetensors", vision_tower="openai/clip-vit-large-patch14-336",
                           select_layer=-2, select_feature="patch")
    target = TokenCompressor(24, 12, 8)
    with caplog.at_level(logging.WARNING, logger="vision_token_compression"):
        load_compressor_into(target, path, vision_tower="/models/clip-vit-large-patch14-336",
                             select_layer=-1, select_feature="cls_patch")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "select_layer: checkpoint -2 vs -1" in warning
    assert "select_feature" in warning
    assert "vision_tower" not in warning  # same tower by name, different local path


def test_corrupt_file_is_a_value_error(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00\x01 this is not safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        load_compressor(path)


def test_truncated_checkpoint_is_a_value_error(tmp_path):
    path = save_compressor(_trained(), tmp_path / "c.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=str(path.name)):
        load_compressor_into(TokenCompressor(24, 12, 8), path)


def test_safetensors_file_of_something_else_is_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a token compressor checkpoint"):
        load_compressor(path)


def test_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_compressor(tmp_path / "missing.safetensors")


def test_checkpoint_with_other_tensors_is_rejected(tmp_path):
    compressor = TokenCompressor(24, 12, 8, bias=False)
    path = save_compressor(compressor, tmp_path / "nobias.safetensors")
    with pytest.raises(ValueError, match="conv.bias"):
        load_compressor_into(TokenCompressor(24, 12, 8), path)


def test_saved_checkpoint_has_the_permissions_of_a_new_file(tmp_path):
    import os
    import stat

    from vision_token_compression import TokenCompressor, save_compressor

    old = os.umask(0o022)
    try:
        path = save_compressor(TokenCompressor(24, 12, 8), tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_build_compressor_is_the_average_init_without_a_checkpoint():
    built = build_compressor(24, 8, 8)
    _assert_same_weights(built, TokenCompressor(24, 8, 8))


def test_build_compressor_loads_and_checks_a_checkpoint(tmp_path, caplog):
    trained = _trained()
    path = save_compressor(trained, tmp_path / "c.safetensors", vision_tower="openai/clip-vit-large-patch14-336",
                           select_layer=-2, select_feature="patch")
    with caplog.at_level(logging.WARNING, logger="vision_token_compression"):
        built = build_compressor(24, 12, 8, path, vision_tower="openai/clip-vit-large-patch14-336", select_layer=-1,
                                 select_feature="patch")
    _assert_same_weights(built, trained)
    assert "select_layer: checkpoint -2 vs -1" in caplog.text  # provenance: a warning
    with pytest.raises(ValueError, match="output_grid_size: checkpoint 12 vs expected 8"):
        build_compressor(24, 8, 8, path)  # shape-defining: an error
