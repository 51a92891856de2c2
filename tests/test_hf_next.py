"""HF-native LLaVA-NeXT (LLaVA-1.6, anyres) with ToConv compression on every tile, and its conversion.

A fork LLaVA-1.6 stand-in (anyres, spatial_unpad, LLaVA-1.6's five pinpoints) converted with
``toconv-convert-to-hf`` must give, for images of many sizes and aspect ratios, the fork's image-token
count (processor placeholders = model features = the fork's ``image_embeddings``) and the fork's
greedy tokens; at 24→12 (trained and average init) and 24→8. Also: a llava-hf ``llava_next`` source,
save / ``from_pretrained`` round trip, a batch of images of different sizes, and refusals.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import llava.hf  # noqa: F401  (registers toconv_llava_next)
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.hf import ToConvLlavaNextConfig, ToConvLlavaNextForConditionalGeneration, ToConvLlavaNextProcessor
from llava.hf.anyres import anyres_token_count
from llava.hf.convert import convert, main
from llava.hf.standins import build_tiny_llava_next_hf
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.standins import build_tiny_llava, make_images
from vision_token_compression import GridSizeMismatchError, build_compressor, save_compressor

# LLaVA-1.6's image_grid_pinpoints ([width, height] in the fork's config).
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# (width, height): wide, tall, square, tiny, larger than every pinpoint, very wide, and one where
# transformers' unpad_image (which rounds to 7 digits) keeps 2 more columns at 24→12 than the fork's int rule.
SIZES = [(400, 300), (300, 700), (1000, 1000), (20, 20), (2000, 1500), (1200, 200), (792, 352)]
ANYRES = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": PINPOINTS}
# name → (source fixture, converter options, load_pretrained_model options giving the fork the same model, side)
CONVERSIONS = {
    "trained-24to12": ("next_compressed", {}, {}, 12),
    "plain-24to12": ("next_plain", {"compression_output_size": 12},
                     {"use_token_compression": True, "compression_output_size": 12}, 12),
    "plain-24to8": ("next_plain", {"compression_output_size": 8},
                    {"use_token_compression": True, "compression_output_size": 8}, 8),
}
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def next_plain(tmp_path_factory, tiny_tower_336):
    """A fork LLaVA-1.6 stand-in trained without compression (2,928 image tokens for a 1000×1000 image)."""
    return build_tiny_llava(tmp_path_factory.mktemp("next") / "llava-v1.6-tiny", tiny_tower_336, **ANYRES)


@pytest.fixture(scope="module")
def next_compressed(tmp_path_factory, tiny_tower_336):
    """A fork LLaVA-1.6 stand-in trained with 24→12 compression on every tile."""
    return build_tiny_llava(tmp_path_factory.mktemp("next") / "llava-v1.6-tiny-toconv12", tiny_tower_336,
                            compression_output_size=12, seed=1, **ANYRES)


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """``converted(name)``: the folder of CONVERSIONS[name], converted once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            source_fixture, options, _, _ = CONVERSIONS[name]
            source = request.getfixturevalue(source_fixture)
            cache[name] = convert(source, tmp_path_factory.mktemp("hf") / name, **options)
        return cache[name]

    return get


def fork_prompt(question: str = QUESTION) -> str:
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], f"<image>\n{question}")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def image_of(size, seed: int = 5):
    return make_images(1, size=size, seed=seed)[0]


# ---- the converted checkpoint answers as the fork does ---------------------------------------------


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_counts_and_greedy_tokens_match_the_fork(converted, request, name):
    source_fixture, _, fork_options, side = CONVERSIONS[name]
    tokenizer, fork, image_processor, _ = load_pretrained_model(
        str(request.getfixturevalue(source_fixture)), None, "llava-v1.6-tiny", device="cpu", **fork_options
    )
    fork = fork.float().eval()
    model = AutoModelForImageTextToText.from_pretrained(converted(name)).eval()
    processor = AutoProcessor.from_pretrained(converted(name))
    assert type(model) is ToConvLlavaNextForConditionalGeneration and type(processor) is ToConvLlavaNextProcessor
    prompt = fork_prompt()
    fork_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    kwargs = {"do_sample": False, "max_new_tokens": 6}
    for i, size in enumerate(SIZES):
        image = image_of(size, seed=i)
        pixels = process_images([image], image_processor, fork.config)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        tiles = pixels[0].shape[0]
        assert torch.equal(inputs["pixel_values"][0, :tiles], pixels[0]), size  # the fork's tiles, bit for bit
        with torch.no_grad():
            fork_count = fork.image_embeddings(pixels, image_sizes=[image.size])[0].shape[0]
            features = model.get_image_features(pixel_values=inputs["pixel_values"],
                                                image_sizes=inputs["image_sizes"]).pooler_output
        placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
        expected_count = anyres_token_count(size[::-1], model.config.image_grid_pinpoints, 336, side)
        assert placeholders == features[0].shape[0] == fork_count == expected_count, size
        expected = fork.generate(fork_ids, images=pixels, image_sizes=[image.size],
                                 pad_token_id=tokenizer.pad_token_id, **kwargs)[0].tolist()
        generated = model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
        assert generated == expected, size


def test_token_counts_of_llava_1_6_sizes():
    """The brief's numbers: 400×300, 300×700, 1000×1000 under LLaVA-1.6's pinpoints ([h, w] here)."""
    pinpoints = [[h, w] for w, h in PINPOINTS]
    counts = {size: [anyres_token_count(size[::-1], pinpoints, 336, side) for side in (24, 12, 8)]
              for size in [(400, 300), (300, 700), (1000, 1000)]}
    assert counts == {(400, 300): [1368, 348, 152], (300, 700): [1976, 508, 226], (1000, 1000): [2928, 744, 336]}


def test_unpadding_is_the_forks_where_transformers_rounds_otherwise():
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from llava.hf.anyres import unpadded_size
    from llava.model.llava_arch import unpad_image as fork_unpad_image

    grid = torch.zeros(1, 12, 36)  # 792×352 (w×h) → 1×3 tiles of 12×12 tokens at 24→12
    assert tuple(fork_unpad_image(grid, (792, 352)).shape[1:]) == unpadded_size(12, 36, (352, 792)) == (12, 26)
    assert tuple(unpad_image(grid, (352, 792)).shape[1:]) == (12, 28)  # 792·12/352 = 26.999999999999996


def test_batch_of_sizes_save_round_trip_and_generate(converted, tmp_path):
    folder = converted("plain-24to12")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    images = [image_of(size, seed=i) for i, size in enumerate([(400, 300), (300, 700), (20, 20)])]
    prompts = [fork_prompt(), fork_prompt("Colour?"), fork_prompt("Shape?")]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [348, 508, 144 + 12 * 13]
    assert processor._get_num_multimodal_tokens(image_sizes=[(300, 400), (700, 300)]).num_image_tokens == [348, 508]
    batch = model.generate(**inputs, do_sample=False, max_new_tokens=4)[:, inputs["input_ids"].shape[1]:]
    for i, image in enumerate(images):  # each row as it generates alone
        alone = processor(images=image, text=prompts[i], return_tensors="pt")
        single = model.generate(**alone, do_sample=False, max_new_tokens=4)[0, alone["input_ids"].shape[1]:]
        assert batch[i].tolist() == single.tolist()

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "toconv_llava_next"
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("ToConvLlavaNextForConditionalGeneration")
    assert (tmp_path / "saved" / "toconv_llava_loader.py").is_file()
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
    reloaded = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert reloaded.compression_output_size == 12


def test_converted_layout_on_disk(converted):
    from safetensors import safe_open

    folder = converted("plain-24to8")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("token_compressor.grid_sizes").tolist() == [24, 8]
    assert {"image_newline", "token_compressor.conv.weight", "multi_modal_projector.linear_1.weight"} <= keys
    assert any(key.startswith("vision_tower.vision_model.") for key in keys)
    assert any(key.startswith("language_model.model.") for key in keys)
    config = json.loads((folder / "config.json").read_text())
    assert (config["compression_input_size"], config["compression_output_size"]) == (24, 8)
    assert config["image_grid_pinpoints"] == [[h, w] for w, h in PINPOINTS]
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "toconv_llava_loader.ToConvLlavaNextProcessor"}


# ---- a llava-hf LLaVA-NeXT source ------------------------------------------------------------------


def test_llava_hf_next_source_converts_and_keeps_its_weights(tmp_path, tiny_tower_336):
    source = tmp_path / "llava-v1.6-tiny-hf"
    original = build_tiny_llava_next_hf(source, tiny_tower_336)
    folder = convert(source, tmp_path / "out", compression_output_size=8)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model) is ToConvLlavaNextForConditionalGeneration
    assert torch.equal(model.model.image_newline, original.model.image_newline)
    assert torch.equal(model.lm_head.weight[: original.lm_head.weight.shape[0]], original.lm_head.weight)
    processor = AutoProcessor.from_pretrained(folder)
    image = image_of((400, 300))
    inputs = processor(images=image, text="USER: <image>\nHi ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 152
    model.generate(**inputs, do_sample=False, max_new_tokens=2)


# ---- refused, before anything is written ------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"mm_patch_merge_type": "spatial"}, "'spatial'"),
    ({"image_aspect_ratio": "anyres_max_9"}, "anyres_max_"),
    ({"image_grid_pinpoints": [[336, 600], [672, 672]]}, "[[336, 600]] ([width, height]) are not multiples of the tile size 336"),
])
def test_unsupported_sources_are_refused_by_name(tmp_path, tiny_tower_336, options, message):
    source = build_tiny_llava(tmp_path / "src", tiny_tower_336, **{**ANYRES, "image_aspect_ratio": "anyres"})
    config = json.loads((source / "config.json").read_text())
    config.update(options)
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_upstream_tile_grid_pinpoints_convert(tmp_path, tiny_tower_336):
    """A fork config with LLaVA-NeXT's "(1x1),...,(2x3)" form: expanded with the tower's tile, as [height, width] pairs."""
    source = build_tiny_llava(tmp_path / "src", tiny_tower_336, compression_output_size=12, **ANYRES)
    config = json.loads((source / "config.json").read_text())
    config["image_grid_pinpoints"] = "(1x1),...,(2x3)"
    (source / "config.json").write_text(json.dumps(config))
    folder = convert(source, tmp_path / "out")
    converted = json.loads((folder / "config.json").read_text())["image_grid_pinpoints"]
    # (w×h tiles) 1×1, 1×2, 1×3, 2×1, 2×2, 2×3 of 336 pixels, each written [height, width].
    assert converted == [[336, 336], [672, 336], [1008, 336], [336, 672], [672, 672], [1008, 672]]


def test_compressor_for_another_grid_or_width_is_refused(tmp_path, next_plain):
    for name, (grid, width) in {"grid": (16, 32), "width": (24, 16)}.items():
        path = tmp_path / f"{name}.safetensors"
        save_compressor(build_compressor(grid, 8, width), path)
        with pytest.raises(ValueError, match="expected 24" if name == "grid" else "expected 32"):
            convert(next_plain, tmp_path / f"out-{name}", token_compressor_path=path)
        assert not (tmp_path / f"out-{name}").exists()


def test_command_line_converts_llava_1_6(tmp_path, next_plain, capsys):
    main([str(next_plain), str(tmp_path / "out"), "--compression-output-size", "8"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    config = ToConvLlavaNextConfig.from_pretrained(tmp_path / "out")
    assert config.compression_output_size == 8


def linked_copy(source, folder, own: str):
    """``folder`` with links to ``source``'s files but ``own``, which the caller writes."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name != own:
            (folder / path.name).symlink_to(path)
    return folder


def test_loading_refuses_a_compressor_of_other_grid_sizes(tmp_path, converted):
    source = converted("plain-24to12")
    folder = linked_copy(source, tmp_path / "edited", "config.json")
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "compression_output_size": 8}))  # 3×3 kernels both
    with pytest.raises(GridSizeMismatchError, match=r"trained for 24→12.*compression_output_size=12"):
        AutoModelForImageTextToText.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"image_grid_pinpoints \[\[336, 500\]\] \(\[height, width\]\) are not multiples of the tile size"):
        ToConvLlavaNextConfig(**{**config, "image_grid_pinpoints": [[336, 672], [336, 500]]})


@pytest.mark.parametrize("edit, message", [
    ({"image_grid_pinpoints": [[336, 672], [672, 336]]},
     r"image_grid_pinpoints: processor \[\[336, 672\], \[672, 336\]\] vs model \[\[672, 336\]"),
    ({"crop_size": {"height": 224, "width": 224}}, r"tile size: processor crop_size 224 vs model .*image_size 336"),
])
def test_a_processor_whose_tiles_contradict_the_model_is_refused_at_load(tmp_path, converted, edit, message):
    source = converted("plain-24to12")
    folder = linked_copy(source, tmp_path / "edited", "processor_config.json")
    processor_config = json.loads((source / "processor_config.json").read_text())
    processor_config["image_processor"].update(edit)
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    with pytest.raises(ValueError, match=rf"{folder}: the processor .*{message}"):
        AutoProcessor.from_pretrained(folder)


_WITHOUT_IMPORT = """
import json
from transformers import AutoModelForImageTextToText

def attempt(**kwargs):
    try:
        model = AutoModelForImageTextToText.from_pretrained({folder!r}, **kwargs)
        return f"loaded {{type(model).__module__}}.{{type(model).__name__}}"
    except Exception as err:
        return f"{{type(err).__name__}}: {{err}}"

print("\\n" + json.dumps([attempt(), attempt(trust_remote_code=True)]))
"""


@pytest.mark.slow
def test_without_llava_hf_the_loader_stub_names_the_fix_and_loads(converted):
    code = _WITHOUT_IMPORT.format(folder=str(converted("plain-24to8")))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    plain, trusted = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain.startswith("ValueError") and "custom code" in plain and "trust_remote_code=True" in plain
    assert trusted == "loaded llava.hf.modeling_next.ToConvLlavaNextForConditionalGeneration"


def test_llava_hf_next_sources_with_bad_pinpoints_or_converted_already_are_refused(tmp_path, tiny_tower_336,
                                                                                 converted):
    source = tmp_path / "llava-v1.6-tiny-hf"
    build_tiny_llava_next_hf(source, tiny_tower_336, num_hidden_layers=1)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "image_grid_pinpoints": [[336, 672], [500, 336]]}))
    with pytest.raises(ValueError, match=re.escape("image_grid_pinpoints [[500, 336]] ([height, width]) are not")):
        convert(source, tmp_path / "out")
    with pytest.raises(ValueError, match="converted already \\(model_type toconv_llava_next, compression 24→8\\)"):
        convert(converted("plain-24to8"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
