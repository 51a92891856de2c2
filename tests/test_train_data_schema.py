"""Malformed training data: every broken sample is a SampleError naming file, index, id and the fault.

Each case is a one-sample fault in a file ``[good sample, bad sample]``: under the default policy
fetching it raises ``SampleError`` whose message names the file, index 1, the bad sample's id and
what is wrong; under ``--data_error_policy skip`` it is skipped and counted, and a tiny LLaVA
trains on batches of a file holding all of them. File-level faults are ``DataFileError`` naming the
file and the line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.conversation import conv_templates
from llava.train.arguments import DataArguments
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset, SampleError, load_samples
from llava.train.data_schema import DataFileError, check_sample
from llava.train.llava_trainer import modality_length_grouped_indices

IMG, BOMB, NEAR_BOMB, TRUNCATED, CORRUPT = "image_0000.png", "bomb.png", "near_bomb.png", "truncated.png", "corrupt.png"
# Pillow's limit is lowered for these tests so that small files stand in for huge ones: images are
# refused over 2 × PIXEL_LIMIT pixels and only warned about between 1× and 2×.
PIXEL_LIMIT = 50_000
ASK = {"from": "human", "value": "<image>\nWhat is in the image?"}
ANSWER = {"from": "gpt", "value": "A red circle."}
GOOD = {"id": "good", "image": IMG, "conversations": [ASK, ANSWER]}
OMIT = object()


def _sample(image=IMG, conversations=(ASK, ANSWER)) -> dict:
    sample = {"conversations": list(conversations) if isinstance(conversations, tuple) else conversations}
    if image is not OMIT:
        sample["image"] = image
    return sample


# (name, bad sample without its id, what the message must say). The first ten are the reported ones.
REPORTED = [
    ("image-null", _sample(image=None), r"'image' is null; leave the key out for a text-only sample"),
    ("image-list", _sample(image=[IMG, IMG]), r"'image' is a list of 2 path\(s\).*one image per sample"),
    ("image-number", _sample(image=3), r"'image' is a number \(3\); it must be the image's path"),
    ("conversations-string", _sample(conversations="<image>\nhi"),
     r"'conversations' is a string .*not a list of turns"),
    ("turn-string", _sample(conversations=["<image>\nhi", ANSWER]), r"turn 0 is a string .*not an object"),
    ("turn-without-value", _sample(conversations=[{"from": "human"}, ANSWER]), r"turn 0 has no 'value'"),
    ("value-null", _sample(conversations=[ASK, {"from": "gpt", "value": None}]),
     r"turn 1 \(gpt\) has a 'value' that is null"),
    ("empty-answer", _sample(conversations=[ASK, {"from": "gpt", "value": ""}]), r"turn 1 is an empty answer"),
    ("lone-surrogate", _sample(conversations=[ASK, {"from": "gpt", "value": "A smile \ud83d"}]),
     r"turn 1 \(gpt\) holds a lone surrogate '\\ud83d' at character 8"),
    ("decompression-bomb", _sample(image=BOMB), r"over Pillow's decompression-bomb limit.*Downscale it"),
]
MORE = [
    ("sample-list", [ASK, ANSWER], r"a sample must be a JSON object with 'conversations', got a list"),
    ("sample-string", "<image>\nWhat is in the image?", r"a sample must be a JSON object"),
    ("no-conversations", {"image": IMG, "conversation": [ASK, ANSWER]},
     r"has no 'conversations' \(keys \['id', 'image', 'conversation'\]"),
    ("conversations-null", _sample(conversations=None), r"'conversations' is null"),
    ("conversations-object", _sample(conversations={"human": "hi", "gpt": "yo"}), r"'conversations' is an object"),
    ("conversations-empty", _sample(conversations=[]), r"the conversation is empty"),
    ("turn-without-from", _sample(conversations=[{"value": "<image>\nhi"}, ANSWER]), r"turn 0 has no 'from'"),
    ("openai-keys", _sample(conversations=[{"role": "user", "content": "<image>"}, ANSWER]),
     r"turn 0 has no 'from' and 'value'.*Rename OpenAI-style 'role'/'content'"),
    ("openai-roles", _sample(conversations=[{"from": "user", "value": "<image>"}, {"from": "assistant", "value": "x"}]),
     r"turn 0 is from 'user'.*Rename 'user' to 'human'"),
    ("value-number", _sample(conversations=[ASK, {"from": "gpt", "value": 3}]),
     r"turn 1 \(gpt\) has a 'value' that is a number \(3\)"),
    ("value-list", _sample(conversations=[{"from": "human", "value": ["<image>"]}, ANSWER]),
     r"turn 0 \(human\) .* a list"),
    ("blank-answer", _sample(conversations=[ASK, {"from": "gpt", "value": " \n "}]), r"turn 1 is an empty answer"),
    ("empty-question", _sample(conversations=[ASK, ANSWER, {"from": "human", "value": ""}, ANSWER]),
     r"turn 2 \(human\) has an empty value"),
    ("no-answer", _sample(conversations=[ASK]), r"no 'gpt' turn"),
    ("not-alternating", _sample(conversations=[ASK, {"from": "human", "value": "and?"}, ANSWER]),
     r"alternate human/gpt"),
    ("image-in-dropped-turn", _sample(conversations=[{"from": "gpt", "value": "<image>\nHello."},
                                                      {"from": "human", "value": "Hi"}, ANSWER]),
     r"turn 0 is a leading 'gpt' turn, which training drops .* holds the '<image>' placeholder"),
    ("two-image-tokens", _sample(conversations=[{"from": "human", "value": "<image> <image>"}, ANSWER]),
     r"image token mismatch: .* contains 2"),
    ("image-token-without-image", _sample(image=OMIT), r"image token mismatch: the sample has no image .* contains 1"),
    ("image-empty-string", _sample(image=""), r"'image' is an empty string"),
    ("image-surrogate", _sample(image="caf\udce9.png"), r"'image' path holds a lone surrogate"),
    ("image-outside-folder", _sample(image="../outside.png"),
     r"'image' path '../outside.png' leads outside image_folder"),
    ("image-absolute", None, r"leads outside image_folder"),  # the path is filled in by the fixture
    ("image-missing", _sample(image="nowhere.png"), r"image file not found: .*nowhere.png"),
    ("image-directory", _sample(image="subfolder"), r"image file not found: .*subfolder"),
    ("image-truncated", _sample(image=TRUNCATED), r"cannot read image .*truncated.png"),
    ("image-corrupt", _sample(image=CORRUPT), r"cannot read image .*corrupt.png"),
    ("image-near-bomb", _sample(image=NEAR_BOMB), r"over Pillow's decompression-bomb limit"),
]
CASES = REPORTED + MORE


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tokenizer (pad = unk), tiny CLIP processor, a good image and the broken image files."""
    from transformers import AutoTokenizer

    from llava.model.multimodal_encoder.clip_encoder import CLIPImageProcessor
    from llava.standins import build_tiny_clip, build_tokenizer, make_images, save_images

    root = tmp_path_factory.mktemp("train-data-schema")
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(root / "tok"), padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token
    clip = build_tiny_clip(root / "clip")
    processor = CLIPImageProcessor.from_pretrained(clip)
    images = root / "images"
    save_images(make_images(1, size=(200, 120), seed=1), images)  # 24,000 pixels: under the limit
    make_images(1, size=(400, 300), seed=2)[0].save(images / BOMB)  # 120,000 > 2 × limit
    make_images(1, size=(300, 250), seed=3)[0].save(images / NEAR_BOMB)  # 75,000: between 1× and 2×
    png = (images / IMG).read_bytes()
    (images / TRUNCATED).write_bytes(png[: len(png) // 2])
    (images / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (images / "subfolder").mkdir()
    (root / "outside.png").write_bytes(png)
    return {"root": root, "tokenizer": tokenizer, "processor": processor, "clip": clip, "images": images}


@pytest.fixture(autouse=True)
def _small_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)


def _bad(assets, name: str, sample) -> object:
    if name == "image-absolute":
        sample = _sample(image=str(assets["root"] / "outside.png"))
    if isinstance(sample, dict):
        sample = {"id": f"bad-{name}", **sample}
    return sample


def _write(path: Path, samples: list) -> Path:
    path.write_text(json.dumps(samples))  # ensure_ascii: a lone surrogate is written as its \uXXXX escape
    return path


def _dataset(assets, path, *, multimodal: bool = True, **kwargs) -> LazySupervisedDataset:
    args = DataArguments(data_path=str(path), image_folder=str(assets["images"]), image_aspect_ratio="pad", **kwargs)
    return LazySupervisedDataset(
        path, assets["tokenizer"], args, conv_templates["v1"],
        image_processor=assets["processor"] if multimodal else None, image_token_count=144, max_length=512,
    )


def _located(name: str, sample, path: Path, what: str) -> str:
    """The message a bad sample at index 1 must give: file, index, id, then what is wrong."""
    ident = f" id 'bad-{name}'" if isinstance(sample, dict) else ""
    return rf"^Sample index 1{ident} in {re.escape(str(path))}: .*{what}"


@pytest.mark.parametrize(("name", "sample", "what"), CASES, ids=[c[0] for c in CASES])
def test_malformed_sample_stops_with_file_index_id_and_fault(assets, name, sample, what):
    sample = _bad(assets, name, sample)
    path = _write(assets["root"] / f"raise-{name}.json", [GOOD, sample])
    ds = _dataset(assets, path)
    assert ds[0]["input_ids"].numel() > 0
    with pytest.raises(SampleError) as caught:
        ds[1]
    assert re.search(_located(name, sample, path, what), str(caught.value), re.S), str(caught.value)


@pytest.mark.parametrize(("name", "sample", "what"), CASES, ids=[c[0] for c in CASES])
def test_skip_policy_skips_and_counts_malformed_sample(assets, name, sample, what):
    sample = _bad(assets, name, sample)
    path = _write(assets["root"] / f"skip-{name}.json", [GOOD, sample])
    ds = _dataset(assets, path, data_error_policy="skip", max_skipped_fraction=0.5)
    assert all(n > 0 for n in ds.lengths)  # length grouping takes broken samples too
    item = ds[1]  # served by sample 0
    assert ds.num_skipped == 1 and len(item["skipped"]) == 1
    assert re.search(_located(name, sample, path, what), item["skipped"][0], re.S), item["skipped"][0]


def test_text_only_model_refuses_image_token_in_text(assets):
    """Without a vision tower, '<image>' in the text would become id -200 and crash the embedding."""
    text = {"id": "good", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    bad = {"id": "bad-token", "conversations": [{"from": "human", "value": "Look: <image>"}, ANSWER]}
    path = _write(assets["root"] / "text-only.json", [text, bad])
    with pytest.raises(SampleError, match=r"index 1 id 'bad-token' in .*text-only.json: image token mismatch"):
        _dataset(assets, path, multimodal=False)[1]
    ds = _dataset(assets, path, multimodal=False, data_error_policy="skip", max_skipped_fraction=0.5)
    assert ds[1]["input_ids"].min() >= 0 and ds.num_skipped == 1


# A full training loop (about 20 s of CPU); test_train_e2e's broken-sample tests keep the skip policy in the quick loop.
@pytest.mark.slow
def test_skip_policy_trains_past_every_malformed_sample(assets):
    """A tiny LLaVA trains on a file where every other sample is broken; every skip is reported."""
    from llava.standins import create_tiny_llava

    bad = [_bad(assets, name, sample) for name, sample, _ in CASES]
    samples = [s for b in bad for s in ({**GOOD, "id": f"good-{len(bad)}"}, b)] + [GOOD]
    path = _write(assets["root"] / "all-broken.json", samples)
    ds = _dataset(assets, path, data_error_policy="skip", max_skipped_fraction=0.6)
    order = modality_length_grouped_indices(ds.modality_lengths, batch_size=4, world_size=1,
                                            generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(samples)))

    model = create_tiny_llava(assets["clip"], assets["tokenizer"], compression_output_size=12)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    collate = DataCollatorForSupervisedDataset(assets["tokenizer"], max_length=512)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate)
    skipped, steps = [], 0
    for batch in loader:
        skipped += batch.pop("skipped_samples", [])
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    assert steps == -(-len(samples) // 4)
    assert len(skipped) == ds.num_skipped == len(CASES)
    for (name, _, what), message in zip(CASES, skipped):
        assert re.search(rf"index \d+ .*{what}", message, re.S), (name, message)


# ----------------------------------------------------------------------------------------------
# File-level faults
# ----------------------------------------------------------------------------------------------


def test_non_utf8_file_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.json"
    head = b'[\n  {"id": "a", "conversations": []},\n  {"id": "caf'
    path.write_bytes(head + b'\xe9", "conversations": []}\n]\n')
    with pytest.raises(DataFileError) as caught:
        load_samples(path)
    message = str(caught.value)
    assert f"{path}, line 3" in message and f"not UTF-8: byte {len(head)} " in message
    assert "column 14" in message and "iconv" in message


def test_bad_jsonl_line_names_file_and_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD)
    path.write_text(f"{good}\n\n{good}\n{good[:-1]},\n{good}\n")
    with pytest.raises(DataFileError, match=rf"^Training data {re.escape(str(path))}, line 4: not a valid JSON line"):
        load_samples(path)


def test_bad_json_names_file_and_line_and_hints_at_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    where = re.escape(f"{path}, line 2")
    with pytest.raises(DataFileError, match=rf"{where}: not valid JSON: Extra data.*name it \.jsonl"):
        load_samples(path)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (json.dumps(GOOD),
         r"the top level is an object \(keys \['id', 'image', 'conversations'\]\).*wrap a single sample"),
        ("42", r"the top level is int"),
        ("[]", r"holds no samples"),
        ("  \n", r"the file is empty"),
    ],
    ids=["object", "number", "empty-list", "empty-file"],
)
def test_top_level_that_is_not_a_list_of_samples(tmp_path, content, what):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataFileError, match=rf"^Training data {re.escape(str(path))}: {what}"):
        load_samples(path)


def test_jsonl_lines_end_only_at_newline(tmp_path):
    """A raw U+2028 or U+0085 inside a JSON string is text, not the end of a line (str.splitlines says otherwise)."""
    path = tmp_path / "data.jsonl"
    sample = {"id": "ls", "conversations": [{"from": "human", "value": "a\u2028b\x85c"}, ANSWER]}
    path.write_text(json.dumps(sample, ensure_ascii=False) + "\r\n" + json.dumps(sample) + "\n", encoding="utf-8")
    assert load_samples(path) == [sample, sample]


def test_jsonl_line_that_is_not_an_object_is_a_sample_error(assets):
    path = assets["root"] / "scalar.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "[1, 2]\n")
    with pytest.raises(SampleError, match=r"^Sample index 1 in .*scalar.jsonl: a sample must be a JSON object"):
        _dataset(assets, path)[1]


# ----------------------------------------------------------------------------------------------
# What a valid sample is
# ----------------------------------------------------------------------------------------------


def test_upstream_sample_passes_and_a_leading_gpt_turn_is_dropped():
    """llava_v1_5_mix665k's shape; upstream skips a first turn that is not from the human."""
    sample = {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "model": "", "conversations": [
        {"from": "gpt", "value": "Hello!"}, ASK, ANSWER,
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    checked = check_sample(sample)
    assert checked.id == "000000033471" and checked.image == "coco/train2017/000000033471.jpg"
    assert checked.turns == sample["conversations"][1:]
    text_only = check_sample({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    assert text_only.image is None and text_only.id is None


def test_long_fields_are_cut_in_messages():
    with pytest.raises(SampleError) as caught:
        check_sample({"conversations": [{"from": "human", "value": ["x" * 10_000]}, ANSWER]})
    assert len(str(caught.value)) < 300
