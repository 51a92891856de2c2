"""HF-native ToConv LLaVA (``llava.hf``) and ``toconv-convert-to-hf``, on tiny stand-ins.

Covers: a converted checkpoint's greedy ``generate`` against the fork's for the same weights, image and
prompt (trained with compression; without, at 24→12 and 24→8), the processor's placeholder count and
pixels, ``get_image_features``, the chat template, a llava-hf-format source with a compressor added,
the saved key layout and config, bad input (refused before anything is written), and what a
transformers without ``llava.hf`` says.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

import llava.hf  # noqa: F401  (registers toconv_llava)
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.hf import ToConvLlavaConfig, ToConvLlavaForConditionalGeneration
from llava.hf.convert import convert, main
from llava.hf.standins import build_tiny_llava_hf
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.standins import build_tiny_llava, make_images
from vision_token_compression import GridSizeMismatchError, build_compressor, save_compressor

QUESTION = "What is in the image?"
# name → (source fixture, converter options, load_pretrained_model options that give the fork the same model)
CONVERSIONS = {
    "trained-24to12": ("tiny_llava_compressed", {}, {}),
    "plain-24to12": ("tiny_llava", {}, {"use_token_compression": True, "compression_output_size": 12}),
    "plain-24to8": ("tiny_llava", {"compression_output_size": 8},
                    {"use_token_compression": True, "compression_output_size": 8}),
}


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """``converted(name)``: the folder of CONVERSIONS[name] converted once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            source_fixture, options, _ = CONVERSIONS[name]
            source = request.getfixturevalue(source_fixture)
            cache[name] = convert(source, tmp_path_factory.mktemp("hf") / name, **options)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def llava_hf_source(tmp_path_factory, tiny_tower_336):
    """A llava-hf-format stand-in (LlavaForConditionalGeneration, <image> in its tokenizer, Hub key layout)."""
    return build_tiny_llava_hf(tmp_path_factory.mktemp("llava-hf") / "llava-1.5-tiny-hf", tiny_tower_336)


def fork_prompt(question: str = QUESTION) -> str:
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], f"<image>\n{question}")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def stored_keys(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not iterable


# ---- the converted checkpoint answers as the fork does ---------------------------------------------


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_generate_matches_the_fork(converted, request, name):
    source_fixture, _, fork_options = CONVERSIONS[name]
    tokenizer, fork, image_processor, _ = load_pretrained_model(
        str(request.getfixturevalue(source_fixture)), None, "llava-v1.5-tiny", device="cpu", **fork_options
    )
    fork = fork.float().eval()
    image = make_images(1, size=(400, 300), seed=3)[0]  # not square: LLaVA-1.5 pads it
    prompt = fork_prompt()
    fork_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixels = process_images([image], image_processor, fork.config)
    kwargs = {"do_sample": False, "max_new_tokens": 8}
    expected = fork.generate(fork_ids, images=pixels, image_sizes=[image.size], pad_token_id=tokenizer.pad_token_id,
                             **kwargs)[0].tolist()

    model = AutoModelForImageTextToText.from_pretrained(converted(name)).eval()
    processor = AutoProcessor.from_pretrained(converted(name))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], pixels)  # the fork's pad-to-square preprocessing
    placeholders = inputs["input_ids"] == model.config.image_token_id
    assert int(placeholders.sum()) == fork.get_vision_tower().num_patches
    assert inputs["input_ids"][~placeholders].tolist() == [i for i in fork_ids[0].tolist() if i != IMAGE_TOKEN_INDEX]
    generated = model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
    assert generated == expected


@pytest.mark.parametrize(("name", "tokens"), [("plain-24to12", 144), ("plain-24to8", 64)])
def test_processor_inserts_compressed_placeholders_and_image_features_match(converted, name, tokens):
    folder = converted(name)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model) is ToConvLlavaForConditionalGeneration
    inputs = processor(images=make_images(2, seed=4), text=[fork_prompt(), fork_prompt("Color?")], return_tensors="pt",
                       padding=True)
    assert (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [tokens, tokens]
    assert processor._get_num_multimodal_tokens(image_sizes=[(300, 400)]).num_image_tokens == [tokens]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"][:1]).pooler_output
    assert torch.stack(features).shape == (1, tokens, model.config.text_config.hidden_size)
    assert model.config.image_seq_length == tokens


def test_chat_template_renders_the_fork_prompt(converted):
    processor = AutoProcessor.from_pretrained(converted("plain-24to12"))
    image_turn = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    bos = processor.tokenizer.bos_token
    assert processor.apply_chat_template([{"role": "user", "content": image_turn}], add_generation_prompt=True) == (
        bos + fork_prompt()
    )
    conv = conv_templates["llava_v1"].copy()
    for role, text in (("USER", f"<image>\n{QUESTION}"), ("ASSISTANT", "A red circle."), ("USER", "Color?")):
        conv.append_message(role, text)
    conv.append_message("ASSISTANT", None)
    chat = [
        {"role": "user", "content": image_turn},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Color?"}]},
    ]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == bos + conv.get_prompt()
    # Tokenised without special tokens (as vLLM's chat endpoint does), the rendered chat gives the
    # fork's ids: one BOS, in front.
    rendered = processor.apply_chat_template(chat, add_generation_prompt=True)
    tokenizer = processor.tokenizer
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == tokenizer(conv.get_prompt())["input_ids"]


def test_images_are_padded_only_when_asked(tmp_path, tiny_llava, converted):
    image = make_images(1, size=(400, 200), seed=5)[0]
    padded = AutoProcessor.from_pretrained(converted("plain-24to12"))
    square = convert(tiny_llava, tmp_path / "square", image_aspect_ratio="square")
    cropped = AutoProcessor.from_pretrained(square)
    assert padded.pad_to_square and not cropped.pad_to_square
    expected = padded.image_processor(padded.expand_images(image), return_tensors="pt")["pixel_values"]
    assert torch.equal(padded(images=image, text="<image>", return_tensors="pt")["pixel_values"], expected)
    assert not torch.equal(cropped(images=image, text="<image>", return_tensors="pt")["pixel_values"], expected)


# ---- what is written ----------------------------------------------------------------------------


def test_saved_weights_and_config_are_the_llava_hf_layout(converted):
    folder = converted("trained-24to12")
    keys = stored_keys(folder)
    for name in (
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.post_layernorm.weight",
        "language_model.model.embed_tokens.weight", "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.lm_head.weight", "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias",
        "token_compressor.conv.weight", "token_compressor.conv.bias", "token_compressor.grid_sizes",
    ):
        assert name in keys, name
    assert all(key.startswith(("vision_tower.vision_model.", "language_model.model.", "language_model.lm_head.",
                               "multi_modal_projector.", "token_compressor.")) for key in keys), sorted(keys)
    grid_sizes = load_file(folder / "model.safetensors")["token_compressor.grid_sizes"]
    assert grid_sizes.dtype == torch.int64 and grid_sizes.tolist() == [24, 12]

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "toconv_llava"
    assert config["architectures"] == ["ToConvLlavaForConditionalGeneration"]
    assert (config["compression_input_size"], config["compression_output_size"], config["image_seq_length"]) == (
        24, 12, 144)
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    assert (config["projector_hidden_act"], config["multimodal_projector_bias"]) == ("gelu", True)
    assert config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    # <image> was added to the tokenizer (upstream LLaVA has none) and the vocabulary padded to 64 rows.
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"]
    vocab_size = config["text_config"]["vocab_size"]
    assert config["image_token_index"] < len(processor.tokenizer) <= vocab_size and vocab_size % 64 == 0
    assert (folder / "preprocessor_config.json").is_file()


def test_sharded_output_loads_the_same_model(tmp_path, tiny_llava_compressed, converted):
    sharded = convert(tiny_llava_compressed, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(stored_keys(converted("trained-24to12")))
    expected = AutoModelForImageTextToText.from_pretrained(converted("trained-24to12")).state_dict()
    for key, value in AutoModelForImageTextToText.from_pretrained(sharded).state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_save_pretrained_of_a_loaded_model_keeps_the_layout(converted, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(converted("plain-24to8"))
    model.save_pretrained(tmp_path / "resaved")
    assert set(stored_keys(tmp_path / "resaved")) == set(stored_keys(converted("plain-24to8")))
    assert (tmp_path / "resaved" / "toconv_llava_loader.py").is_file()  # the stub auto_map names
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "resaved")
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


# ---- a llava-hf source --------------------------------------------------------------------------


def test_llava_hf_source_gets_an_average_compressor_and_answers(tmp_path, llava_hf_source):
    folder = convert(llava_hf_source, tmp_path / "toconv")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    original = LlavaForConditionalGeneration.from_pretrained(llava_hf_source).eval()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    source_processor = AutoProcessor.from_pretrained(llava_hf_source)
    assert prompt == source_processor.apply_chat_template(chat, add_generation_prompt=True)  # llava-hf's template
    inputs = processor(images=make_images(1, size=(300, 400), seed=6), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144

    # The compressor sits between CLIP's selected patch tokens and the projector: at the average
    # init, the features are llava-hf's projector applied to the 3×3 window means (k3 s2 p1).
    with torch.no_grad():
        features = torch.stack(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        selected = original.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        grid = selected[:, 1:].unflatten(1, (24, 24)).permute(0, 3, 1, 2)  # (1, C, 24, 24)
        means = F.avg_pool2d(grid, 3, 2, 1, count_include_pad=False).flatten(2).transpose(1, 2)  # (1, 144, C)
        torch.testing.assert_close(features, original.model.multi_modal_projector(means))

    answer = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    assert answer.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_llava_hf_source_takes_a_compressor_checkpoint(tmp_path, llava_hf_source):
    compressor = build_compressor(24, 8, 32, init="random")
    path = save_compressor(compressor, tmp_path / "c.safetensors", select_layer=-2, select_feature="patch")
    folder = convert(llava_hf_source, tmp_path / "toconv8", token_compressor_path=path)  # size from its metadata
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.compression_output_size == 8
    for key, value in compressor.state_dict().items():
        assert torch.equal(model.token_compressor.state_dict()[key], value), key


# ---- bad input: refused before anything is written -----------------------------------------------


def refused(error, match, source, output, **options):
    with pytest.raises(error, match=match):
        convert(source, output, **options)
    assert not output.exists() and not list(output.parent.glob(f".{output.name}*"))


def test_siglip_towers_are_refused_until_hf_and_vllm_serve_them(tmp_path, tiny_llava):
    """Both source formats: a fork checkpoint whose mm_vision_tower is SigLIP, a llava-hf one with a SigLIP vision_config."""
    from transformers import LlavaConfig, SiglipVisionConfig

    fork = tmp_path / "fork-siglip"
    fork.mkdir()
    for path in tiny_llava.iterdir():
        (fork / path.name).symlink_to(path)
    config = json.loads((tiny_llava / "config.json").read_text())
    (fork / "config.json").unlink()
    (fork / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "google/siglip-so400m-patch14-384"}))
    refused(ValueError, "'google/siglip-so400m-patch14-384' .* is a SigLIP tower.*CLIP towers only.*later work",
            fork, tmp_path / "out")
    hf = tmp_path / "llava-hf-siglip"
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=384, patch_size=14)
    LlavaConfig(vision_config=vision, text_config={"model_type": "llama", "hidden_size": 32}).save_pretrained(hf)
    refused(ValueError, "vision_config is a SigLIP tower.*later work", hf, tmp_path / "out")


def test_compressor_checkpoints_that_do_not_fit_the_tower_are_refused(tmp_path, tiny_llava):
    other_grid = save_compressor(build_compressor(16, 8, 32), tmp_path / "grid16.safetensors")
    refused(ValueError, "does not fit this vision tower.*input_grid_size: checkpoint 16 vs expected 24", tiny_llava,
            tmp_path / "out", token_compressor_path=other_grid)
    other_width = save_compressor(build_compressor(24, 12, 16), tmp_path / "hidden16.safetensors")
    refused(ValueError, "hidden_dim: checkpoint 16 vs expected 32", tiny_llava, tmp_path / "out",
            token_compressor_path=other_width)
    # Metadata claiming another kernel than this version builds for 24→12 (k3 s2 p1).
    tensors = load_file(save_compressor(build_compressor(24, 12, 32), tmp_path / "k.safetensors"))
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        meta = {**f.metadata(), "kernel_size": "5"}
    tensors["conv.weight"] = torch.zeros(32, 32, 5, 5)
    save_file(tensors, str(tmp_path / "kernel5.safetensors"), metadata=meta)
    refused(ValueError, r"PartialConv\(k=5, s=2, p=1\) but this version builds k=3", tiny_llava, tmp_path / "out",
            token_compressor_path=tmp_path / "kernel5.safetensors")
    other_layer = save_compressor(build_compressor(24, 12, 32), tmp_path / "layer.safetensors", select_layer=-1)
    refused(ValueError, "fitted to other features.*select_layer: checkpoint -1 vs -2", tiny_llava, tmp_path / "out",
            token_compressor_path=other_layer)


def test_a_trained_compressor_is_checked_against_its_config(tmp_path, tiny_llava_compressed):
    refused(ValueError, "trained with compression_output_size=12: its compressor only fits 12",
            tiny_llava_compressed, tmp_path / "out", compression_output_size=8)
    edited = tmp_path / "edited"
    edited.mkdir()
    for path in tiny_llava_compressed.iterdir():
        (edited / path.name).symlink_to(path)
    config = json.loads((tiny_llava_compressed / "config.json").read_text())
    (edited / "config.json").unlink()
    (edited / "config.json").write_text(json.dumps({**config, "compression_output_size": 8}))
    refused(GridSizeMismatchError, "trained for 24→12.*compression_output_size=12", edited, tmp_path / "out")


def test_unsupported_projector_and_sizes_are_refused(tmp_path, tiny_tower_336, tiny_llava):
    linear = build_tiny_llava(tmp_path / "linear", tiny_tower_336, mm_projector_type="linear", num_hidden_layers=1)
    refused(ValueError, "mm_projector_type='linear' cannot be converted.*mlp2x_gelu", linear, tmp_path / "out")
    refused(ValueError, "--compression-output-size=24 is out of range.*use 1..23", tiny_llava, tmp_path / "out",
            compression_output_size=24)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert(tiny_llava, tmp_path / "taken")


def test_command_line(tmp_path, tiny_llava, capsys):
    main([str(tiny_llava), str(tmp_path / "cli"), "--compression-output-size", "8", "--conv-mode", "none"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["image_seq_length"] == 64
    assert AutoProcessor.from_pretrained(tmp_path / "cli").chat_template is None
    with pytest.raises(SystemExit):
        main([str(tiny_llava)])


# ---- loading refuses a compressor that does not fit ----------------------------------------------


def test_loading_refuses_a_compressor_that_does_not_fit_its_config(tmp_path, converted):
    source = converted("plain-24to12")
    for kind in ("grid", "hidden"):
        folder = tmp_path / kind
        folder.mkdir()
        for path in source.iterdir():
            (folder / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "grid" / "config.json").unlink()  # 24→8 has a 3×3 kernel too: only the record tells
    (tmp_path / "grid" / "config.json").write_text(json.dumps({**config, "compression_output_size": 8,
                                                               "image_seq_length": 64}))
    with pytest.raises(GridSizeMismatchError, match=r"trained for 24→12.*compression_output_size=12"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "grid")
    tensors = load_file(source / "model.safetensors")
    tensors["token_compressor.conv.weight"] = torch.zeros(16, 16, 3, 3)
    tensors["token_compressor.conv.bias"] = torch.zeros(16)
    (tmp_path / "hidden" / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "hidden" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shape \(16, 16, 3, 3\).*describes \(32, 32, 3, 3\).*toconv-convert-to-hf"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "hidden")


def _edited_copy(source, folder, name: str, edit: dict):
    """``folder`` with links to ``source``'s files, but its own ``name`` (a JSON file) updated with ``edit``."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name != name:
            (folder / path.name).symlink_to(path)
    (folder / name).write_text(json.dumps({**json.loads((source / name).read_text()), **edit}))
    return folder


@pytest.mark.parametrize("edit, counts", [
    ({"compression_output_size": 8}, r"processor 8 \(64 tokens per image or tile\) vs model 12 \(144"),
    ({"compression_output_size": 24}, r"processor 24 \(576 tokens per image or tile\) vs model 12 \(144"),
])
def test_a_processor_that_contradicts_the_compressor_is_refused_at_load(tmp_path, converted, edit, counts):
    source = converted("plain-24to12")
    edited = _edited_copy(source, tmp_path / "edited", "processor_config.json", edit)
    with pytest.raises(ValueError, match=rf"{edited}: the processor .* compression_output_size: {counts}.*Undo the edit"):
        AutoProcessor.from_pretrained(edited)
    with pytest.raises(ValueError, match=counts):  # the same as an argument
        AutoProcessor.from_pretrained(source, **edit)
    # The model's own edit is caught too: the processor then contradicts the compressor the config describes.
    edited = _edited_copy(converted("plain-24to8"), tmp_path / "config-edited", "config.json",
                          {"compression_output_size": 12, "image_seq_length": 144})
    with pytest.raises(ValueError, match=r"processor 8 \(64 tokens per image or tile\) vs model 12"):
        AutoProcessor.from_pretrained(edited)
    assert AutoProcessor.from_pretrained(source).num_image_tokens == 144  # an unedited one loads


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_compressor_weights_warn_at_load_as_in_the_fork(tmp_path, converted, value, caplog):
    source = converted("plain-24to12")
    folder = _edited_copy(source, tmp_path / "broken", "config.json", {})
    tensors = load_file(source / "model.safetensors")
    tensors["token_compressor.conv.weight"][0, 0, 0, 0] = value
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="vision_token_compression"):
        AutoModelForImageTextToText.from_pretrained(folder)
    nan, inf = (1, 0) if value != value else (0, 1)
    assert f"{folder} hold non-finite values: conv.weight ({nan} NaN, {inf} inf of 9216 values)" in caplog.text


def test_config_checks_its_compression_fields(converted):
    config = ToConvLlavaConfig.from_pretrained(converted("plain-24to12"))
    fields = {"vision_config": config.vision_config.to_dict(), "text_config": config.text_config.to_dict()}
    with pytest.raises(ValueError, match="compression_input_size=16 but the vision tower .* produces a 24×24"):
        ToConvLlavaConfig(**fields, compression_input_size=16)
    with pytest.raises(ValueError, match=r"compression_output_size=24 is out of range for a 24×24 input grid"):
        ToConvLlavaConfig(**fields, compression_output_size=24)
    with pytest.raises(ValueError, match="image_seq_length=576 contradicts compression_output_size=12"):
        ToConvLlavaConfig(**fields, image_seq_length=576)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        ToConvLlavaConfig(**fields, vision_feature_select_strategy="full")


# ---- transformers without llava.hf ---------------------------------------------------------------

_WITHOUT_PACKAGE = """
    import importlib.abc, json, sys
    from transformers import AutoModelForImageTextToText

    class Uninstalled(importlib.abc.MetaPathFinder):  # as if toconv-llava were not installed
        def find_spec(self, name, *args, **kwargs):
            if name.split(".")[0] in ("llava", "vision_token_compression"):
                raise ModuleNotFoundError(f"No module named {{name!r}}")

    def attempt(**kwargs):
        try:
            model = AutoModelForImageTextToText.from_pretrained({folder!r}, **kwargs)
            return f"loaded {{type(model).__module__}}.{{type(model).__name__}}"
        except Exception as err:
            return f"{{type(err).__name__}}: {{err}}"

    sys.meta_path.insert(0, Uninstalled())
    results = [attempt(), attempt(trust_remote_code=True)]
    sys.meta_path.pop(0)  # installed, but llava.hf never imported
    results.append(attempt(trust_remote_code=True))
    print("\\n" + json.dumps(results))  # on a line of its own, after transformers' [y/N] prompt
"""


@pytest.mark.slow
def test_transformers_without_the_package_names_the_fix(converted):
    code = textwrap.dedent(_WITHOUT_PACKAGE.format(folder=str(converted("plain-24to12"))))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    plain, trusted, installed = json.loads(result.stdout.strip().splitlines()[-1])
    # transformers' own message: the checkpoint holds custom code (its loader stub), not "upgrade transformers".
    assert plain.startswith("ValueError") and "custom code" in plain and "trust_remote_code=True" in plain
    # The stub names the fix.
    assert plain != trusted and trusted.startswith("ImportError")
    assert "pip install toconv-llava" in trusted and "import llava.hf" in trusted
    # With the package installed, the stub hands transformers the package's own classes.
    assert installed == "loaded llava.hf.modeling.ToConvLlavaForConditionalGeneration"
