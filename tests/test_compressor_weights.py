"""The library's one check of a host's compressor weights (``vision_token_compression.weights``)."""

from __future__ import annotations

import logging

import pytest
import torch

from vision_token_compression import (
    GRID_SIZES_KEY,
    CompressorMetadata,
    GridSizeMismatchError,
    TokenCompressor,
    check_compressor_tensors,
    check_provenance,
    check_weights_in_place,
    load_compressor_tensors,
)

C = 8
SOURCE = "/ckpt/mm_projector.bin"


def trained(output: int = 12, hidden: int = C) -> dict[str, torch.Tensor]:
    """A compressor's state dict with weights far from the average init."""
    compressor = TokenCompressor(24, output, hidden, init="random")
    return {k: v.clone() for k, v in compressor.state_dict().items()}


def warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_recorded_weights_load_exactly():
    state = trained()
    compressor = TokenCompressor(24, 12, C)
    loaded = load_compressor_tensors(compressor, state, SOURCE)
    for key, value in state.items():
        assert torch.equal(compressor.state_dict()[key], value), key
    assert loaded[GRID_SIZES_KEY].tolist() == [24, 12]


def test_a_record_of_other_sizes_is_refused_naming_source_and_fix():
    compressor = TokenCompressor(24, 8, C)
    before = {k: v.clone() for k, v in compressor.state_dict().items()}
    with pytest.raises(GridSizeMismatchError) as exc:
        load_compressor_tensors(compressor, trained(12), SOURCE)
    message = str(exc.value)
    assert SOURCE in message and "24→12" in message and "24→8" in message
    assert "compression_output_size=12" in message  # the fix
    assert all(torch.equal(compressor.state_dict()[k], v) for k, v in before.items())  # nothing loaded


def test_weights_without_a_record_are_accepted_saying_so(caplog):
    state = trained()
    del state[GRID_SIZES_KEY]
    compressor = TokenCompressor(24, 12, C)
    with caplog.at_level(logging.WARNING):
        loaded = load_compressor_tensors(compressor, state, SOURCE)
    assert torch.equal(compressor.conv.weight, state["conv.weight"])
    assert loaded[GRID_SIZES_KEY].tolist() == [24, 12]
    assert "carry no grid sizes" in warnings(caplog) and SOURCE in warnings(caplog)


def test_a_record_given_by_the_caller_decides_and_is_named():
    state = trained()
    del state[GRID_SIZES_KEY]
    with pytest.raises(GridSizeMismatchError) as exc:
        check_compressor_tensors(TokenCompressor(24, 8, C), state, SOURCE, recorded_grid_sizes=(24, 12),
                                 record_source="/ckpt/token_compressor.safetensors")
    assert "token_compressor.safetensors" in str(exc.value) and SOURCE in str(exc.value)
    checked = check_compressor_tensors(TokenCompressor(24, 12, C), state, SOURCE, recorded_grid_sizes=(24, 12))
    assert checked[GRID_SIZES_KEY].tolist() == [24, 12]


def test_a_tensor_of_another_width_is_refused_before_anything_loads():
    compressor = TokenCompressor(24, 12, C)
    before = compressor.conv.weight.detach().clone()
    with pytest.raises(ValueError) as exc:
        load_compressor_tensors(compressor, trained(hidden=2 * C), SOURCE, fix="Pass the right --vision-tower.",
                                features="CLIP features")
    message = str(exc.value)
    assert SOURCE in message
    assert f"conv.weight is ({2 * C}, {2 * C}, 3, 3), expected ({C}, {C}, 3, 3)" in message
    assert f"over {C}-channel CLIP features" in message and message.endswith("Pass the right --vision-tower.")
    assert torch.equal(compressor.conv.weight, before)


def test_missing_and_unexpected_tensors_are_refused():
    state = trained()
    with pytest.raises(ValueError, match=r"lack conv\.bias"):
        check_compressor_tensors(TokenCompressor(24, 12, C), {k: v for k, v in state.items() if k != "conv.bias"},
                                 SOURCE)
    with pytest.raises(ValueError, match=r"unexpected extra\.weight"):
        check_compressor_tensors(TokenCompressor(24, 12, C), {**state, "extra.weight": torch.zeros(1)}, SOURCE)
    with pytest.raises(ValueError, match=r"lack conv\.weight, conv\.bias \(found: none\)"):
        check_compressor_tensors(TokenCompressor(24, 12, C), {}, SOURCE)


def test_non_finite_values_load_with_a_warning_naming_source_and_tensor(caplog):
    state = trained()
    state["conv.weight"][0, 0, 0, 0] = float("nan")
    compressor = TokenCompressor(24, 12, C)
    with caplog.at_level(logging.WARNING):
        load_compressor_tensors(compressor, state, SOURCE)
    assert SOURCE in warnings(caplog) and "conv.weight (1 NaN, 0 inf" in warnings(caplog)
    assert torch.isnan(compressor.conv.weight).any()  # loaded all the same, for inspection


def test_checking_leaves_the_compressor_unchanged():
    compressor = TokenCompressor(24, 12, C)
    before = {k: v.clone() for k, v in compressor.state_dict().items()}
    check_compressor_tensors(compressor, trained(), SOURCE)
    assert all(torch.equal(compressor.state_dict()[k], v) for k, v in before.items())


def test_weights_loaded_in_place_are_checked(caplog):
    compressor = TokenCompressor(24, 8, C)
    compressor.conv.to(memory_format=torch.contiguous_format)  # what a framework's loader leaves
    with torch.no_grad():
        compressor.grid_sizes.copy_(torch.tensor([24, 12]))  # a loader wrote another geometry's record
    with pytest.raises(GridSizeMismatchError, match="/ckpt/folder"):
        check_weights_in_place(compressor, "/ckpt/folder")
    compressor.reset_grid_sizes()
    with torch.no_grad():
        compressor.conv.bias[0] = float("inf")
    with caplog.at_level(logging.WARNING):
        check_weights_in_place(compressor, "/ckpt/folder", recorded=False)
    assert "carry no grid sizes" in warnings(caplog) and "conv.bias (0 NaN, 1 inf" in warnings(caplog)
    assert compressor.conv.weight.is_contiguous(memory_format=torch.channels_last)


def meta(**fields) -> CompressorMetadata:
    values = dict(input_grid_size=24, output_grid_size=12, hidden_dim=C, kernel_size=3, stride=2, padding=1,
                  vision_tower="openai/clip-vit-large-patch14-336", select_layer=-2, select_feature="patch")
    return CompressorMetadata(**{**values, **fields})


TOWER = dict(input_grid_size=24, hidden_dim=C, vision_tower="/models/clip-vit-large-patch14-336", select_layer=-2,
             select_feature="patch")


def test_provenance_accepts_the_same_features_from_a_local_copy_of_the_tower():
    check_provenance(meta(), "c.safetensors", **TOWER)
    check_provenance(meta(vision_tower=None, select_layer=None), "c.safetensors", output_grid_size=12, **TOWER)


@pytest.mark.parametrize("fields, match", [
    ({"select_layer": -1}, r"fitted to other features.*select_layer: checkpoint -1 vs -2"),
    ({"select_feature": "cls_patch"}, r"select_feature: checkpoint 'cls_patch' vs 'patch'"),
    ({"vision_tower": "openai/clip-vit-base-patch16"}, r"vision_tower: checkpoint 'openai/clip-vit-base-patch16'"),
    ({"hidden_dim": 16}, r"does not fit this vision tower.*hidden_dim: checkpoint 16 vs expected 8"),
])
def test_provenance_refuses_other_features_or_sizes_naming_the_file(fields, match):
    with pytest.raises(ValueError, match=match) as exc:
        check_provenance(meta(**fields), "/x/c.safetensors", **TOWER)
    assert "/x/c.safetensors" in str(exc.value)
    with pytest.raises(ValueError, match="output_grid_size: checkpoint 12 vs expected 8") as exc:
        check_provenance(meta(), "/x/c.safetensors", output_grid_size=8, **TOWER)
    assert "set compression_input_size/compression_output_size to 24/12" in str(exc.value)


def test_a_compressor_for_another_width_names_the_real_fix():
    """Only the width differs: setting the grid sizes (already right) cannot help; the message says what can."""
    with pytest.raises(ValueError, match="hidden_dim: checkpoint 16 vs expected 8") as exc:
        check_provenance(meta(hidden_dim=16, vision_tower="openai/clip-vit-base-patch16"), "/x/c.safetensors", **TOWER)
    message = str(exc.value)
    assert "compression_input_size" not in message
    assert "fitted to a 16-channel vision tower (openai/clip-vit-base-patch16), and this one has 8 channels" in message
    assert "toconv-train-compressor --vision-tower" in message
