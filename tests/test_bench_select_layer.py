"""CLIP stops at the selected layer: identical features, fewer layers run, state dicts unchanged."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def tower_path(tmp_path_factory):
    """Tiny ViT-L/14-336-shaped stand-in with 4 layers, so every select layer has something to skip."""
    from vision_token_compression.testing import build_clip_standin

    out = tmp_path_factory.mktemp("select-layer-clip")
    return build_clip_standin(
        "openai/clip-vit-large-patch14-336", out, num_hidden_layers=NUM_LAYERS,
        hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=16,
    )


def _layers(tower: CLIPVisionTower) -> nn.ModuleList:
    return tower.vision_tower.encoder.layers


@pytest.fixture(scope="module")
def towers(tower_path) -> dict[str, CLIPVisionTower]:
    """One loaded tower per select feature; tests set ``select_layer`` on it."""
    from types import SimpleNamespace

    def args(feature: str) -> SimpleNamespace:
        return SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature=feature)

    return {feature: CLIPVisionTower(str(tower_path), args(feature)) for feature in ("patch", "cls_patch")}


def _reference(tower: CLIPVisionTower, images: torch.Tensor) -> torch.Tensor:
    """The selected features from a plain full run of the CLIP model (every layer)."""
    hidden = tower.vision_tower(images, output_hidden_states=True).hidden_states[tower.select_layer]
    return hidden[:, 1:] if tower.select_feature == "patch" else hidden


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
@pytest.mark.parametrize("select_layer", [-2, -3, 0, 1, 2, -(NUM_LAYERS + 1), -1, NUM_LAYERS])
def test_features_identical_and_only_needed_layers_run(towers, select_layer, select_feature):
    tower = towers[select_feature]
    tower.select_layer = select_layer
    calls: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
        for index, layer in enumerate(_layers(tower))
    ]
    images = torch.randn(2, 3, 336, 336)
    try:
        with torch.inference_mode():
            features = tower(images)
            run = list(calls)
            reference = _reference(tower, images)
    finally:
        for hook in hooks:
            hook.remove()
        tower.select_layer = -2
    needed = select_layer % (NUM_LAYERS + 1)
    assert run == list(range(needed)), f"select_layer={select_layer} should run layers 0..{needed - 1}, ran {run}"
    assert torch.equal(features, reference)


def test_the_early_stop_unit_works_on_a_plain_clip_model(tower_path):
    from transformers import CLIPVisionModel

    from llava.model.multimodal_encoder.clip_encoder import CLIPEarlyStop

    model = CLIPVisionModel.from_pretrained(tower_path)
    images = torch.randn(1, 3, 336, 336)
    early_stop = CLIPEarlyStop("stand-in")
    assert [early_stop.layers_needed(layer, NUM_LAYERS) for layer in (-2, -1, 0, NUM_LAYERS + 1)] == [
        NUM_LAYERS - 1, None, 0, None
    ]
    with torch.inference_mode():
        outputs = early_stop(model, images, -2)
        full = model(images, output_hidden_states=True).hidden_states
    assert torch.equal(outputs.hidden_states[-2], full[-2])
    assert outputs.hidden_states[-1] is None and len(outputs.hidden_states) == len(full)


def test_state_dict_unchanged_and_loads(tower_path, make_args):
    from transformers import CLIPVisionModel

    tower = CLIPVisionTower(str(tower_path), make_args())
    keys_before = list(tower.state_dict())
    with torch.inference_mode():
        tower(torch.randn(1, 3, 336, 336))
    assert list(tower.state_dict()) == keys_before
    assert len(_layers(tower)) == NUM_LAYERS
    plain = CLIPVisionModel.from_pretrained(tower_path)
    assert list(tower.vision_tower.state_dict()) == list(plain.state_dict())
    tower.vision_tower.load_state_dict(plain.state_dict(), strict=True)
    # A copy of the tower (e.g. an EMA model) works on its own layers, not the original's.
    twin = copy.deepcopy(tower)
    with torch.inference_mode():
        assert torch.equal(twin(torch.ones(1, 3, 336, 336)), tower(torch.ones(1, 3, 336, 336)))


def test_gradients_reach_the_layers_that_run(tower_path, make_args):
    tower = CLIPVisionTower(str(tower_path), make_args())
    tower.vision_tower.requires_grad_(True)
    tower(torch.randn(1, 3, 336, 336)).sum().backward()
    layers = _layers(tower)
    assert all(p.grad is not None for p in layers[NUM_LAYERS - 2].parameters())
    assert all(p.grad is None for p in layers[NUM_LAYERS - 1].parameters())  # its output is never used


def test_failure_inside_the_call_restores_every_layer(tower_path, make_args):
    tower = CLIPVisionTower(str(tower_path), make_args())
    with pytest.raises(RuntimeError):
        tower(torch.randn(1, 4, 336, 336))  # wrong channel count fails inside CLIP's forward
    assert len(_layers(tower)) == NUM_LAYERS


def test_unknown_layout_runs_every_layer_and_says_so(tower_path, make_args, caplog):
    tower = CLIPVisionTower(str(tower_path), make_args())
    encoder = tower.vision_tower.encoder
    encoder.blocks = encoder.layers  # an unknown layout: the layers under another name
    del encoder.layers
    encoder.forward = lambda inputs_embeds, *args, **kwargs: _run_blocks(encoder.blocks, inputs_embeds)
    calls = []
    for layer in encoder.blocks:
        layer.register_forward_hook(lambda *hook_args: calls.append(1))
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        tower(torch.randn(1, 3, 336, 336))
        tower(torch.randn(1, 3, 336, 336))
    assert len(calls) == 2 * NUM_LAYERS
    assert sum("running every layer" in record.getMessage() for record in caplog.records) == 1


def _run_blocks(blocks: nn.ModuleList, hidden: torch.Tensor):
    from transformers.modeling_outputs import BaseModelOutput

    states = [hidden]
    for block in blocks:
        out = block(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
        states.append(hidden)
    return BaseModelOutput(last_hidden_state=hidden, hidden_states=tuple(states))
