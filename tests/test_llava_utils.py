"""Conversation templates, mm_utils helpers, and the package facts the LLaVA fork promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image
from transformers import AutoTokenizer

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import SeparatorStyle, conv_templates, get_conv_template
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    divide_to_patches,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    left_pad_input_ids,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
)
from llava.standins import build_tokenizer, make_images

ROOT = Path(__file__).resolve().parents[1]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def dialogue(name: str, image: bool = True) -> str:
    conv = get_conv_template(name)
    conv.append_message(conv.roles[0], ("<image>\nWhat is it?", Image.new("RGB", (8, 8)), "Default") if image else "Hi")
    conv.append_message(conv.roles[1], "A cat.")
    conv.append_message(conv.roles[0], "Sure?")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def test_templates_render_upstream_prompt_layouts():
    for name in ("plain", "v1", "vicuna_v1", "llava_v1", "llava_llama_2", "mistral_instruct", "chatml_direct"):
        assert name in conv_templates
    assert dialogue("llava_v1").endswith(
        "human's questions. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT:")
    assert dialogue("vicuna_v1").startswith("A chat between a curious user")
    llama2 = dialogue("llava_llama_2")
    assert llama2.startswith("[INST] <<SYS>>\nYou are a helpful language and vision assistant.")
    assert llama2.endswith("<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. </s><s>[INST] Sure? [/INST]")
    assert dialogue("mistral_instruct") == "[INST] <image>\nWhat is it? [/INST] A cat. </s>[INST] Sure? [/INST]"
    assert dialogue("chatml_direct") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nSure?<|im_end|><|im_start|>assistant\n")
    with pytest.raises(ValueError, match="no sep2"):  # "plain" has no sep2: upstream fails on an answered turn too
        dialogue("plain")
    assert "USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is it?" in dialogue("v1_mmtag")
    assert conv_templates["llava_v1"].sep_style == SeparatorStyle.TWO


def test_template_copies_are_independent():
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "hello")
    assert conv_templates["llava_v1"].messages == ()
    with pytest.raises(KeyError, match="llava_v1"):
        get_conv_template("llava_v9")


def test_tokenizer_image_token_puts_one_bos_and_the_image_index(tokenizer):
    prompt = "USER: <image>\nWhat? <image> ASSISTANT:"
    ids = tokenizer_image_token(prompt, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    text = [i for i in ids if i != IMAGE_TOKEN_INDEX]
    assert tokenizer.decode(text, skip_special_tokens=True) == prompt.replace("<image>", "")
    assert torch.equal(tokenizer_image_token(prompt, tokenizer, return_tensors="pt"), torch.tensor(ids))


def test_anyres_helpers():
    assert select_best_resolution((400, 300), PINPOINTS) == (672, 336)
    assert select_best_resolution((200, 500), PINPOINTS) == (336, 672)
    assert select_best_resolution((1000, 300), PINPOINTS) == (1008, 336)
    assert get_anyres_image_grid_shape((1000, 300), str(PINPOINTS), 336) == (3, 1)
    image = make_images(1, size=(400, 300))[0]
    padded = resize_and_pad_image(image, (672, 336))
    assert padded.size == (672, 336)
    assert padded.getpixel((0, 0)) == (0, 0, 0) and padded.getpixel((336, 168)) == image.resize((448, 336)).getpixel((224, 168))
    crops = divide_to_patches(padded, 336)
    assert [c.size for c in crops] == [(336, 336)] * 2 and crops[1].tobytes() == padded.crop((336, 0, 672, 336)).tobytes()
    square = expand2square(Image.new("RGB", (40, 20), (255, 0, 0)), (1, 2, 3))
    assert square.size == (40, 40) and square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((0, 20)) == (255, 0, 0)


def test_process_images_pad_and_anyres(tiny_tower_336):
    from llava.model.multimodal_encoder.clip_encoder import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tiny_tower_336)
    images = make_images(2, size=[(400, 300), (1000, 300)])

    class Cfg:
        image_aspect_ratio = "pad"
        image_grid_pinpoints = PINPOINTS

    assert process_images(images, processor, Cfg).shape == (2, 3, 336, 336)
    Cfg.image_aspect_ratio = "anyres"
    out = process_images(images, processor, Cfg)
    assert [tuple(x.shape) for x in out] == [(3, 3, 336, 336), (4, 3, 336, 336)]
    Cfg.image_aspect_ratio = None
    assert process_images(images, processor, Cfg).shape == (2, 3, 336, 336)


def test_model_name_and_left_padding():
    assert get_model_name_from_path("/ckpt/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert get_model_name_from_path("runs/llava-lora/checkpoint-500") == "llava-lora_checkpoint-500"
    ids, mask = left_pad_input_ids([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_keywords_stopping_criteria_works_per_row_and_ignores_the_prompt(tokenizer):
    prompt = torch.tensor([tokenizer("USER: hi### ASSISTANT:").input_ids])
    hash_ids = tokenizer(" ###", add_special_tokens=False).input_ids
    cat_ids = tokenizer(" cat", add_special_tokens=False).input_ids
    start = tokenizer("The", add_special_tokens=False).input_ids
    width = max(len(hash_ids), len(cat_ids))
    rows = [start * (1 + width - len(ids)) + ids for ids in (hash_ids, cat_ids)]

    # generate from inputs_embeds hands over the new tokens only: one on the first call
    stop = KeywordsStoppingCriteria(["###"], tokenizer, prompt)
    assert stop(torch.tensor([start, start]), None).tolist() == [False, False]
    assert stop(torch.tensor(rows), None).tolist() == [True, False]

    # generate from input_ids hands over prompt + new tokens: the "###" in the prompt must not count
    with_prompt = KeywordsStoppingCriteria(["###"], tokenizer, prompt)
    assert with_prompt(torch.cat([prompt, torch.tensor([start])], dim=1), None).tolist() == [False]
    assert with_prompt(torch.cat([prompt, torch.tensor([rows[0]])], dim=1), None).tolist() == [True]


def test_declared_transformers_range_is_the_one_tested():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirement = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "transformers")
    import transformers

    assert Version(transformers.__version__) in requirement.specifier, (transformers.__version__, str(requirement))


# Two Python subprocesses (a fresh interpreter is the only way to see what an import loads).
@pytest.mark.slow
def test_importing_the_vision_encoder_stays_light():
    code = ("import sys, llava.model.multimodal_encoder.clip_encoder; "
            "print(any(m.startswith('llava.model.language_model') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    code = "from llava.model import LlavaLlamaForCausalLM, LlavaMistralForCausalLM; from llava import LlavaLlamaForCausalLM"
    subprocess.run([sys.executable, "-c", code], check=True)
