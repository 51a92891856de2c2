"""SigLIP towers (LLaVA-NeXT's ``SigLipVisionTower``): the selection rule, the features, the early exit, compression.

Tiny stand-ins (32 channels, 3 layers) with so400m-384's real geometry: 384 px, patch 14, a 27×27 grid
(729 tokens), no CLS token, an attention-pooling head.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower, ViTVisionTower
from llava.model.multimodal_encoder.siglip_encoder import SigLipVisionTower
from vision_token_compression.testing import build_siglip_standin
from vision_token_compression.towers import SIGLIP, EarlyExit, tower_family

LAYERS = 3
GRID = 27


@pytest.fixture(scope="module")
def siglip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("towers") / "tiny-siglip-384"
    return build_siglip_standin("google/siglip-so400m-patch14-384", out, num_hidden_layers=LAYERS, tiny=True)


def _args(**fields) -> SimpleNamespace:
    return SimpleNamespace(**{"mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", **fields})


def _layers(tower: ViTVisionTower):
    return tower.vision_tower.get_submodule(
        next(n for n, _ in tower.vision_tower.named_modules() if n.endswith("encoder.layers"))
    )


def test_builder_picks_siglip_by_name_or_config(siglip, tiny_tower_336, tmp_path):
    by_name = build_vision_tower(_args(mm_vision_tower=str(siglip)), delay_load=True)
    assert type(by_name) is SigLipVisionTower and isinstance(by_name, ViTVisionTower)
    renamed = shutil.copytree(siglip, tmp_path / "tower")  # no "siglip" in the path: its config.json says so
    assert tower_family(renamed) is SIGLIP
    assert type(build_vision_tower(_args(vision_tower=str(renamed)), delay_load=True)) is SigLipVisionTower
    assert type(build_vision_tower(_args(mm_vision_tower=str(tiny_tower_336)), delay_load=True)) is CLIPVisionTower
    with pytest.raises(ValueError, match="s2=True.*SigLIP tower: set s2=False"):
        build_vision_tower(_args(mm_vision_tower=str(siglip), s2=True), delay_load=True)


def test_features_are_siglip_hidden_states_at_the_select_layer_in_fp32(siglip):
    from transformers import SiglipVisionModel

    tower = SigLipVisionTower(str(siglip), _args())
    reference = SiglipVisionModel.from_pretrained(siglip).eval()
    images = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        features = tower(images)
        full = reference(images, output_hidden_states=True)
    assert features.dtype == torch.float32 and features.shape == (2, GRID * GRID, 32)
    assert torch.equal(features, full.hidden_states[-2])
    assert not torch.allclose(features, full.last_hidden_state)  # no post_layernorm, no later layer


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1, -(LAYERS + 1)])
def test_early_exit_runs_only_the_needed_layers_and_never_the_head(siglip, select_layer):
    tower = SigLipVisionTower(str(siglip), _args(mm_vision_select_layer=select_layer))
    calls: list[str] = []
    modules = {f"layer{i}": layer for i, layer in enumerate(_layers(tower))}
    modules["head"] = tower.vision_tower.get_submodule(
        next(n for n, _ in tower.vision_tower.named_modules() if n.endswith("head"))
    )
    hooks = [m.register_forward_hook(lambda *a, name=name: calls.append(name)) for name, m in modules.items()]
    images = torch.randn(1, 3, 384, 384)
    try:
        with torch.no_grad():
            features = tower(images)
            run = list(calls)
            full = tower.vision_tower(images, output_hidden_states=True).hidden_states[select_layer]
    finally:
        for hook in hooks:
            hook.remove()
    needed = select_layer % (LAYERS + 1)
    assert run == [f"layer{i}" for i in range(needed)]
    assert torch.equal(features, full)
    assert len(_layers(tower)) == LAYERS and hasattr(tower.vision_tower, "head")  # restored after the call


def test_early_exit_unit_on_a_plain_siglip_model(siglip):
    from transformers import SiglipVisionModel

    model = SiglipVisionModel.from_pretrained(siglip).eval()
    images = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        outputs = EarlyExit("stand-in")(model, images, -2)
        full = model(images, output_hidden_states=True).hidden_states
    assert torch.equal(outputs.hidden_states[-2], full[-2])
    assert outputs.hidden_states[-1] is None and len(outputs.hidden_states) == len(full)


@pytest.mark.parametrize("out", [14, 9, 13, 26, 1])
def test_compression_from_the_27_grid(siglip, out):
    tower = SigLipVisionTower(str(siglip), _args(use_token_compression=True, compression_output_size=out))
    assert (tower.tower_grid_size, tower.num_patches_per_side, tower.num_patches) == (GRID, out, out * out)
    assert tower.token_compressor.name == f"{GRID}to{out}"
    with torch.no_grad():
        features = tower(torch.randn(2, 3, 384, 384))
    assert features.shape == (2, out * out, 32)
    config = SimpleNamespace()
    tower.record_compression(config)
    assert (config.use_token_compression, config.compression_input_size, config.compression_output_size) == (
        True, GRID, out)


def test_uncompressed_tower_reports_the_27_grid_and_its_contract(siglip):
    tower = SigLipVisionTower(str(siglip), _args())
    assert (tower.num_patches_per_side, tower.num_patches, tower.hidden_size) == (GRID, 729, 32)
    assert tower.image_size == 384 and tower.dtype == torch.float32 and tower.device.type == "cpu"
    assert tower.dummy_feature.shape == (1, 32) and tower.token_compressor is None
    assert type(tower.image_processor).__name__.startswith("SiglipImageProcessor")
    config = SimpleNamespace()
    tower.record_compression(config)
    assert config.use_token_compression is False


def test_compression_output_size_at_or_above_the_grid_is_refused(siglip):
    with pytest.raises(ValueError, match=r"compression_output_size=27 is out of range.*use 1\.\.26"):
        SigLipVisionTower(str(siglip), _args(use_token_compression=True, compression_output_size=27))


def test_cls_patch_is_refused_naming_the_fix(siglip):
    with pytest.raises(ValueError, match=r"mm_vision_select_feature='cls_patch'.*siglip tower.*set "
                                         r"mm_vision_select_feature='patch'") as err:
        SigLipVisionTower(str(siglip), _args(mm_vision_select_feature="cls_patch"), delay_load=True)
    assert str(siglip) in str(err.value)


def test_delay_load_reads_the_config_and_builds_the_compressor(siglip):
    tower = SigLipVisionTower(str(siglip), _args(use_token_compression=True, compression_output_size=14),
                              delay_load=True)
    assert not tower.is_loaded and tower.num_patches == 196 and tower.hidden_size == 32
    assert tower.token_compressor is not None and tower.token_compressor.input_grid_size == GRID
    tower.load_model()
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 384, 384)).shape == (1, 196, 32)


def test_siglip_processor_feeds_pad_and_anyres(siglip):
    from llava.mm_utils import process_images
    from llava.standins import make_images

    tower = SigLipVisionTower(str(siglip), _args())
    images = make_images(2, size=(500, 300), seed=0)
    padded = process_images(images, tower.image_processor, SimpleNamespace(image_aspect_ratio="pad"))
    assert padded.shape == (2, 3, 384, 384)
    anyres = process_images(images[:1], tower.image_processor, SimpleNamespace(
        image_aspect_ratio="anyres", image_grid_pinpoints=[[384, 768], [768, 384], [768, 768]]))
    assert anyres.shape == (1, 3, 3, 384, 384)  # the whole image, then 2 crops side by side


# ---- inside LLaVA: anyres on the (compressed) 27 grid ----------------------------------------------


# A 400×300 image under the 384-px pinpoints is the whole image plus 2×1 crops; its unpadded crop grid
# keeps every row and int(400 · side / 300) columns, each row ended by image_newline.
@pytest.mark.parametrize("output_size, expected", [(14, 196 + 14 * (18 + 1)), (9, 81 + 9 * (12 + 1)),
                                                   (None, 729 + 27 * (36 + 1))])
def test_anyres_spatial_unpad_on_a_siglip_tower(siglip, tmp_path, output_size, expected):
    from transformers import AutoTokenizer

    from llava.mm_utils import process_images
    from llava.standins import build_tokenizer, create_tiny_llava, make_images

    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tokenizer"))
    model = create_tiny_llava(siglip, tokenizer, compression_output_size=output_size,
                              image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad").eval()
    tower = model.get_vision_tower()
    assert isinstance(tower, SigLipVisionTower) and tower.num_patches_per_side == (output_size or GRID)
    images = make_images(1, size=(400, 300), seed=2)
    pixels = process_images(images, tower.image_processor, model.config)
    assert pixels.shape == (1, 3, 3, 384, 384)
    with torch.no_grad():
        features = model.image_embeddings(pixels, [images[0].size])[0]
    assert features.shape == (expected, 64)


# ---- the compressor trainer and evaluator on a SigLIP tower ------------------------------------------


def test_trainer_and_evaluator_take_a_siglip_tower(siglip, tmp_path, capsys):
    import json

    from vision_token_compression import read_metadata
    from vision_token_compression.testing import make_structured_images
    from vision_token_compression.training.cli import main as train_main
    from vision_token_compression.training.evaluate import main as evaluate_main

    images = tmp_path / "images"
    make_structured_images(images, 8, size=(400, 300), seed=1)
    out = tmp_path / "run"
    train_main(["--data", str(images), "--output-dir", str(out), "--vision-tower", str(siglip), "--batch-size", "4",
                "--num-workers", "0", "--epochs", "1", "--output-sizes", "14", "9", "--num-projections", "16"])
    for side in (14, 9):
        meta = read_metadata(out / f"compressor_27to{side}.safetensors")
        assert (meta.input_grid_size, meta.output_grid_size, meta.hidden_dim) == (GRID, side, 32)
        assert (meta.vision_tower, meta.select_layer, meta.select_feature) == (str(siglip), -2, "patch")
    assert evaluate_main(["--checkpoint", str(out / "compressor_27to14.safetensors"), "--data", str(images),
                          "--num-workers", "0", "--output", str(tmp_path / "eval.json")]) is None
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["results"]["27to14"]["methods"]) >= {"trained", "average_init", "adaptive_avg_pool"}
    tower = SigLipVisionTower(str(siglip), _args(use_token_compression=True, compression_output_size=14,
                                                 pretrain_token_compressor=str(out / "compressor_27to14.safetensors")))
    assert tower.num_patches == 196


def test_trainer_refuses_cls_patch_on_a_siglip_tower(siglip):
    from vision_token_compression.training.features import FrozenTowerFeatures

    with pytest.raises(ValueError, match="select_feature='cls_patch'.*set select_feature='patch'"):
        FrozenTowerFeatures(str(siglip), -2, "cls_patch")


def test_real_so400m_geometry(tmp_path):  # so400m's real width, 2 of its 27 layers: about 9 s on CPU
    path = build_siglip_standin("google/siglip-so400m-patch14-384", tmp_path / "siglip-so400m", num_hidden_layers=2)
    tower = SigLipVisionTower(str(path), _args(use_token_compression=True, compression_output_size=14))
    assert (tower.hidden_size, tower.tower_grid_size, tower.num_patches) == (1152, 27, 196)
    assert tower.config.intermediate_size == 4304 and tower.config.num_attention_heads == 16
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 384, 384)).shape == (1, 196, 1152)


def test_trainer_cli_refuses_cls_patch_on_a_siglip_tower_before_loading_it(siglip, tmp_path, capsys):
    from vision_token_compression.training.cli import main as train_main

    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit) as exc:
        train_main(["--data", str(tmp_path / "images"), "--output-dir", str(tmp_path / "run"), "--vision-tower",
                    str(siglip), "--select-feature", "cls_patch"])
    assert exc.value.code == 2
    message = capsys.readouterr().err
    assert "--select-feature" in message and "'cls_patch'" in message and "='patch'" in message, message
