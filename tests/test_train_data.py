"""LLaVA training data: label masking for plain/v1, sample errors, skip-and-count, batching, sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.train import data as data_mod
from llava.train.arguments import DataArguments, parse_arguments
from llava.train.data import (
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    SampleError,
    mask_labels,
    preprocess,
    preprocess_multimodal,
)
from llava.train.llava_trainer import modality_length_grouped_indices

CHAT = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "one"},
]
CAPTION = [
    {"from": "human", "value": "<image>\nDescribe the image."},
    {"from": "gpt", "value": "The image shows a red circle."},
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Stand-in tokenizer (pad = unk, as training sets it), CLIP processor, four images."""
    from transformers import AutoTokenizer

    from llava.model.multimodal_encoder.clip_encoder import CLIPImageProcessor
    from llava.standins import build_tiny_clip, build_tokenizer, make_images, save_images

    root = tmp_path_factory.mktemp("train-data")
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(root / "tok"), padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token
    processor = CLIPImageProcessor.from_pretrained(build_tiny_clip(root / "clip"))
    names = save_images(make_images(4, size=(200, 120), seed=1), root / "images")
    return {"root": root, "tokenizer": tokenizer, "processor": processor, "images": names}


def _supervised_text(sample, tokenizer) -> str:
    ids = sample.input_ids[sample.labels != IGNORE_INDEX].tolist()
    return tokenizer.decode(ids)


def test_v1_learns_exactly_the_answers_and_their_eos(assets):
    tok = assets["tokenizer"]
    conv = preprocess_multimodal(CHAT, has_image=True)
    assert conv[0]["value"] == "<image>\nWhat is in the image?"
    sample = preprocess(conv, tok, conv_templates["v1"])
    assert (sample.input_ids == IMAGE_TOKEN_INDEX).sum() == 1
    assert sample.input_ids[0] == tok.bos_token_id and sample.labels[0] == IGNORE_INDEX
    assert _supervised_text(sample, tok).replace(" ", "") == "Ared circle.</s>one</s>".replace(" ", "")
    # Everything before the first answer (system, USER turn, image, "ASSISTANT:") is masked.
    first = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    assert tok.decode(sample.input_ids[first:first + 1]).strip() == "A"


def test_plain_masks_image_and_learns_caption_and_newline(assets):
    tok = assets["tokenizer"]
    conv = preprocess_multimodal(CAPTION, has_image=True)
    sample = preprocess(conv, tok, conv_templates["plain"])
    # [BOS, IMAGE, caption..., "\n"]: the first two are masked, the rest learned.
    assert sample.input_ids[:2].tolist() == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert (sample.labels[:2] == IGNORE_INDEX).all() and (sample.labels[2:] != IGNORE_INDEX).all()
    assert _supervised_text(sample, tok) == "The image shows a red circle.\n"


def test_tokenization_matches_tokenizer_image_token(assets):
    from llava.mm_utils import tokenizer_image_token

    tok = assets["tokenizer"]
    ids, spans = data_mod.tokenize_with_offsets("<image>\nhello world</s>USER: hi", tok)
    assert ids == tokenizer_image_token("<image>\nhello world</s>USER: hi", tok)
    assert len(spans) == len(ids)


def test_token_across_answer_boundary_is_a_mismatch():
    # One token "ab" where "a" is prompt and "b" the answer: no label can be right.
    with pytest.raises(SampleError, match="tokenization mismatch"):
        mask_labels("ab", [5], [(0, 2)], [(1, 2)])
    # Leading whitespace in a token (byte-level "Ġword") is not a mismatch.
    assert mask_labels(" b", [5], [(0, 2)], [(1, 2)]).tolist() == [5]


def test_reference_tokenization_mismatch_names_the_sample(assets, monkeypatch):
    path = assets["root"] / "one.json"
    path.write_text(json.dumps([{"id": "odd-one", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "there"}]}]))
    monkeypatch.setattr(data_mod, "tokenizer_image_token", lambda prompt, tok: [1, 2, 3])
    ds = LazySupervisedDataset(path, assets["tokenizer"], DataArguments(), conv_templates["v1"])
    with pytest.raises(SampleError, match=r"id 'odd-one'.*tokenization mismatch"):
        ds[0]


def test_truncation_that_leaves_nothing_to_learn_is_an_error(assets):
    conv = preprocess_multimodal(CHAT, has_image=True)
    with pytest.raises(SampleError, match="no answer token is left"):
        preprocess(conv, assets["tokenizer"], conv_templates["v1"], max_length=10)


@pytest.mark.parametrize(
    ("conversation", "has_image", "found"),
    [
        ([{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "ok"}], True, 0),
        ([{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "ok"}], True, 2),
        ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}], False, 1),
    ],
)
def test_image_token_mismatch(conversation, has_image, found):
    with pytest.raises(SampleError, match=f"image token mismatch.*contains {found}"):
        preprocess_multimodal(conversation, has_image=has_image)


def test_turns_must_alternate(assets):
    bad = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    with pytest.raises(SampleError, match="alternate"):
        preprocess(bad, assets["tokenizer"], conv_templates["v1"])


def test_unsupported_template_says_which_are():
    with pytest.raises(NotImplementedError, match="plain"):
        preprocess(CAPTION, None, conv_templates["llama_2"])


def _write(root: Path, name: str, samples: list[dict]) -> Path:
    path = root / name
    path.write_text(json.dumps(samples))
    return path


def _samples(names: list[str]) -> list[dict]:
    out = [{"id": f"s{i}", "image": n, "conversations": CHAT} for i, n in enumerate(names)]
    out.append({"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    return out


def _dataset(assets, path, **kwargs) -> LazySupervisedDataset:
    args = DataArguments(data_path=str(path), image_folder=str(assets["root"] / "images"), image_aspect_ratio="pad",
                         **kwargs)
    return LazySupervisedDataset(path, assets["tokenizer"], args, conv_templates["v1"],
                                 image_processor=assets["processor"], image_token_count=144, max_length=512)


def test_dataset_items_and_collated_batch(assets):
    ds = _dataset(assets, _write(assets["root"], "good.json", _samples(assets["images"])))
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["image"].shape == (3, 336, 336) and items[0]["image_size"] == (200, 120)
    assert items[-1]["image"].abs().sum() == 0  # text-only sample: blank image, used by no token
    batch = DataCollatorForSupervisedDataset(assets["tokenizer"], max_length=512)(items)
    assert batch["images"].shape == (5, 3, 336, 336)
    lengths = [len(x["input_ids"]) for x in items]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][~batch["attention_mask"]] == IGNORE_INDEX).all()
    assert "skipped_samples" not in batch
    assert ds.modality_lengths[-1] < 0 < ds.modality_lengths[0]


def test_anyres_batch_mixing_image_and_text_only_samples_trains(assets, tmp_path):
    """A text-only sample's blank image has no size; the batch still carries its images' sizes."""
    from llava.standins import build_tiny_clip, create_tiny_llava

    model = create_tiny_llava(build_tiny_clip(tmp_path / "clip"), assets["tokenizer"], compression_output_size=12,
                              image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad")
    path = _write(assets["root"], "anyres.json", _samples(assets["images"][:1]))
    args = DataArguments(data_path=str(path), image_folder=str(assets["root"] / "images"), image_aspect_ratio="anyres",
                         image_grid_pinpoints=str(model.config.image_grid_pinpoints))
    ds = LazySupervisedDataset(path, assets["tokenizer"], args, conv_templates["v1"],
                               image_processor=assets["processor"], image_token_count=144, max_length=512)
    batch = DataCollatorForSupervisedDataset(assets["tokenizer"], max_length=512)([ds[0], ds[1]])
    assert batch["image_sizes"] == [(200, 120), None]
    assert torch.isfinite(model(**batch).loss)


def test_missing_image_stops_with_the_sample_named(assets):
    samples = _samples(assets["images"])
    samples[1]["image"] = "nowhere.png"
    ds = _dataset(assets, _write(assets["root"], "missing.json", samples))
    with pytest.raises(SampleError, match=r"index 1 id 's1' in .*missing.json: image file not found: .*nowhere.png"):
        ds[1]


def test_skip_policy_logs_counts_and_reports_through_the_batch(assets, caplog):
    samples = _samples(assets["images"])
    samples[1]["image"] = "nowhere.png"
    samples[2]["conversations"] = [{"from": "human", "value": "no token"}, {"from": "gpt", "value": "x"}]
    ds = _dataset(assets, _write(assets["root"], "skip.json", samples), data_error_policy="skip",
                  max_skipped_fraction=0.5)
    with caplog.at_level("WARNING", logger="llava.train.data"):
        item = ds[1]
    # Samples 1 and 2 are broken: index 1 is served by sample 3, and both skips ride along.
    assert ds.num_skipped == 2
    assert len(item["skipped"]) == 2 and "id 's1'" in item["skipped"][0] and "id 's2'" in item["skipped"][1]
    assert "nowhere.png" in caplog.text and "image token mismatch" in caplog.text
    batch = DataCollatorForSupervisedDataset(assets["tokenizer"])([item, ds[0]])
    assert len(batch["skipped_samples"]) == 2


def test_skip_policy_has_a_budget(assets):
    samples = _samples(assets["images"])
    samples[0]["image"] = samples[1]["image"] = "nowhere.png"
    ds = _dataset(assets, _write(assets["root"], "budget.json", samples), data_error_policy="skip",
                  max_skipped_fraction=0.2)
    with pytest.raises(RuntimeError, match="max_skipped_fraction"):
        ds[0]


def test_modality_grouped_batches_hold_one_modality():
    lengths = [10 + i for i in range(24)] + [-(5 + i) for i in range(10)]
    order = modality_length_grouped_indices(lengths, batch_size=4, world_size=2, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    full = (24 // 8) * 8 + (10 // 8) * 8
    for start in range(0, full, 4):
        signs = {lengths[i] > 0 for i in order[start:start + 4]}
        assert len(signs) == 1


def test_upstream_flag_names_still_parse():
    _, _, t = parse_arguments(["--output_dir", "/tmp/unused", "--evaluation_strategy", "no", "--warmup_ratio", "0.03",
                               "--use_cpu", "True"])
    assert t.eval_strategy == "no" and t.warmup_steps == 0.03 and t.remove_unused_columns is False
    with pytest.raises(ValueError, match="data_error_policy"):
        DataArguments(data_error_policy="ignore")
