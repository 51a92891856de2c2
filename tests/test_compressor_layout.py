"""The table of where LLaVA's weight layouts keep the compressor (``llava.model.compressor_layout``)."""

from __future__ import annotations

import pytest
import torch

from llava.model.compressor_layout import (
    FORK,
    HF_HUB,
    HF_MODULE,
    LAYOUTS,
    MM_PROJECTOR,
    NON_LORA,
    VLLM,
    is_compressor_key,
    module_prefix,
)
from vision_token_compression import GRID_SIZES_KEY, TokenCompressor


def compressor_state() -> dict[str, torch.Tensor]:
    return TokenCompressor(24, 12, 8, init="random").state_dict()


OTHERS = {"model.mm_projector.0.weight": torch.ones(2), "lm_head.weight": torch.zeros(3)}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_each_layout_round_trips_a_state_dict(layout):
    own = compressor_state()
    state = {**OTHERS, **layout.place(own)}
    extracted, rest = layout.split(state)
    assert rest == OTHERS  # nothing else is taken
    assert set(extracted) == set(own) == {"conv.weight", "conv.bias", GRID_SIZES_KEY}
    assert all(torch.equal(extracted[k], own[k]) for k in own)
    assert {**rest, **layout.place(extracted)}.keys() == state.keys()
    assert layout.keys_in(state) == list(layout.place(own))


def test_the_prefixes_are_what_each_writer_writes():
    """The spellings the files on disk and the modules in memory use (one place for all of them)."""
    assert FORK.key("conv.weight") == "model.vision_tower.token_compressor.conv.weight"
    assert MM_PROJECTOR.prefix == FORK.prefix  # stage 1 saves the model's own parameter names
    assert NON_LORA.key(GRID_SIZES_KEY) == "base_model.model.model.vision_tower.token_compressor.grid_sizes"
    assert HF_HUB.key("conv.bias") == "token_compressor.conv.bias"
    assert HF_MODULE.prefix == "model.multi_modal_projector.token_compressor."
    assert VLLM.prefix == "token_compressor."


def test_vllm_reads_the_hub_layout_and_what_transformers_5_saves():
    for key in ("token_compressor.conv.weight", "multi_modal_projector.token_compressor.conv.weight",
                "model.multi_modal_projector.token_compressor.conv.weight"):
        assert VLLM.compressor_name(key) == "conv.weight", key
    assert VLLM.compressor_name("multi_modal_projector.linear_1.weight") is None
    # Only ever written under its own prefix.
    assert list(VLLM.place({"conv.weight": torch.zeros(1)})) == ["token_compressor.conv.weight"]


def test_a_layout_does_not_take_another_layouts_keys():
    assert not FORK.owns(NON_LORA.key("conv.weight"))
    assert not HF_HUB.owns(HF_MODULE.key("conv.weight"))
    assert not FORK.owns("model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight")


def test_compressor_keys_found_by_name_in_any_layout():
    for layout in LAYOUTS.values():
        key = layout.key("conv.weight")
        assert is_compressor_key(key) and module_prefix(key) == layout.prefix
    assert not is_compressor_key("model.mm_projector.0.weight")
