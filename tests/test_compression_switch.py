"""Compression off means off (issue 17, part 1): the switch alone turns compression on or off.

A user who flips ``use_token_compression`` to False and leaves the sizes set (the seed's own args
style, a fork's ``ModelArguments`` with defaults, a config.json edited to compare) gets the full 576
tokens and one warning naming what is ignored, not an error; and a checkpoint saved that way is then
switched on at load time (``load_pretrained_model``, ``run_llava --use-token-compression``) to 144.
All models are random-weight stand-ins (tiny Llama + CLIP with ViT-L/14-336's 24×24 grid).
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from llava.eval import run_llava
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.standins import make_images, save_images
from llava.train.arguments import ModelArguments


def _ignored_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "ignored" in r.getMessage()]


def _seed_args(tower: str):
    """An args object in the seed's own style: class attributes, compression switched off, sizes still set."""

    class Args:
        mm_vision_tower = tower
        mm_vision_select_layer = -2
        mm_vision_select_feature = "patch"
        use_token_compression = False
        compression_input_size = 24
        compression_output_size = 12

    return Args()


def test_seed_style_args_with_compression_off_and_sizes_set_give_576_tokens_and_one_warning(tiny_tower_336, caplog):
    tower = build_vision_tower(_seed_args(str(tiny_tower_336)))
    assert tower.token_compressor is None and tower.num_patches == 576 and tower.num_patches_per_side == 24
    (message,) = _ignored_warnings(caplog)
    assert "compression_input_size=24" in message and "compression_output_size=12" in message, message
    caplog.clear()
    for _ in range(3):
        assert tower(torch.zeros(1, 3, 336, 336)).shape == (1, 576, 32)
    assert not _ignored_warnings(caplog)  # once per tower, not per forward


def test_the_switch_alone_switches(tiny_tower_336):
    args = _seed_args(str(tiny_tower_336))
    args.use_token_compression = True
    assert build_vision_tower(args).num_patches == 144


def test_training_args_leave_the_output_size_unset_until_compression_is_on(tiny_tower_336):
    off = ModelArguments(vision_tower=str(tiny_tower_336))
    assert off.compression_output_size is None  # "not given": nothing to warn about when off
    assert build_vision_tower(off).num_patches == 576
    on = ModelArguments(vision_tower=str(tiny_tower_336), use_token_compression=True)
    assert build_vision_tower(on).compression_output_size == 12 and build_vision_tower(on).num_patches == 144


@pytest.fixture
def off_with_sizes(tmp_path, tiny_llava_compressed):
    """A checkpoint trained with 24→12 compression whose config.json a user flipped off, sizes left set."""
    folder = tmp_path / "llava-v1.5-tiny-flipped"
    shutil.copytree(tiny_llava_compressed, folder)
    config = json.loads((folder / "config.json").read_text())
    assert (config["compression_input_size"], config["compression_output_size"]) == (24, 12)
    config["use_token_compression"] = False
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_saved_checkpoint_with_the_flag_off_and_sizes_set_loads_with_576_tokens(off_with_sizes, caplog):
    _, model, _, _ = load_pretrained_model(str(off_with_sizes), None, "llava-v1.5-tiny", device="cpu")
    tower = model.get_vision_tower()
    assert tower.token_compressor is None and tower.num_patches == 576
    (message,) = _ignored_warnings(caplog)
    assert "compression_input_size=24" in message and "compression_output_size=12" in message, message


def test_load_time_switch_turns_such_a_checkpoint_to_144_tokens(off_with_sizes, image_tokens):
    _, model, processor, _ = load_pretrained_model(
        str(off_with_sizes), None, "llava-v1.5-tiny", device="cpu", use_token_compression=True,
    )
    assert model.get_vision_tower().num_patches == 144
    model.encode_images(torch.zeros(1, 3, 336, 336))
    assert image_tokens == [144]


def test_run_llava_with_compression_switched_on_feeds_144_image_tokens(off_with_sizes, tmp_path, image_tokens, caplog):
    (image,) = save_images(make_images(1, size=[(400, 300)], seed=0), tmp_path)
    with caplog.at_level(logging.INFO):
        answer = run_llava.main([
            "--model-path", str(off_with_sizes), "--device", "cpu", "--temperature", "0", "--conv-mode", "llava_v1",
            "--use-token-compression", "--compression-output-size", "12", "--image-file", str(tmp_path / image),
            "--query", "What is in the image?", "--max_new_tokens", "4",
        ])
    assert isinstance(answer, str)
    assert image_tokens == [144]
    assert "Image tokens for the language model: 144 (compressed)" in caplog.text  # said in the log, not on stdout
    assert not _ignored_warnings(caplog)  # on: nothing is ignored
