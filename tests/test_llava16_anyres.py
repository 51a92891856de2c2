"""LLaVA-1.6 (anyres, spatial_unpad, LLaVA-1.6's five grid pinpoints) with ToConv, through every entry point.

The image tokens the LLM receives depend on the image's size; with a 24→12 compressor per tile
a 400×300, 300×700 and 1000×1000 image take 348, 508 and 744 (1,368, 1,976 and 2,928 without).
Each test checks those per-image counts where a caller reaches the model: the answering modules
(``model_vqa``, ``_loader``, ``_science``, ``_mmbench``, ``run_llava``, ``serve.cli``) with
compression switched on by flag, lmms-eval's ``llava`` calling sequence on the checkpoint variant
``toconv-compress-llava`` writes (lmms-eval takes no compression flags), and the model worker's
measured ``image_tokens``. Batched answers must equal one-at-a-time ones. Then the bad inputs:
pinpoints in LLaVA-NeXT's ``"(1x1),...,(3x3)"`` form, pinpoints off the tile size, empty and
oversized images.
"""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
import torch
from PIL import Image

from llava.eval import model_vqa, model_vqa_loader, model_vqa_mmbench, model_vqa_science, run_llava
from llava.mm_utils import get_anyres_image_grid_shape, parse_grid_pinpoints, process_images
from llava.model.llava_arch import LlavaMetaForCausalLM
from llava.serve import cli as serve_cli
from llava.standins import LLAVA_16_PINPOINTS, build_tiny_llava, create_tiny_llava, make_images, save_images

LLAVA_16 = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
            "image_grid_pinpoints": LLAVA_16_PINPOINTS}
SIZES = [(400, 300), (300, 700), (1000, 1000)]
# Image tokens per size: uncompressed, 24→12, 24→8 (scripts/anyres_token_counts.py prints the same).
TABLE = {
    (400, 300): (1368, 348, 152),
    (300, 700): (1976, 508, 226),
    (1000, 1000): (2928, 744, 336),
    (20, 20): (1176, 300, 136),
    (2000, 1500): (2340, 594, 268),
}
COMPRESSED = [TABLE[size][1] for size in SIZES]
COMPRESS = ["--use-token-compression", "--compression-output-size", "12"]
QUESTIONS = ["What is in the image?", "Describe the image in detail.", "What color is the shape?"]


@pytest.fixture(scope="module")
def llava16(tmp_path_factory, tiny_tower_336):
    """A LLaVA-1.6 stand-in trained without compression (the name clients dispatch on says v1.6)."""
    return build_tiny_llava(tmp_path_factory.mktemp("ckpt16") / "llava-v1.6-vicuna-tiny", tiny_tower_336,
                            seed=4, **LLAVA_16)


@pytest.fixture(scope="module")
def llava16_variant(llava16, tmp_path_factory):
    """What users run in harnesses without compression flags: ``toconv-compress-llava``'s 24→12 variant."""
    from llava.model.compress_checkpoint import compress_checkpoint

    return compress_checkpoint(llava16, tmp_path_factory.mktemp("variant16") / "llava-v1.6-vicuna-tiny-toconv12", 12)


@pytest.fixture(scope="module")
def images16():
    return make_images(len(SIZES), size=SIZES, seed=6)


@pytest.fixture(scope="module")
def image_folder16(tmp_path_factory, images16):
    folder = tmp_path_factory.mktemp("images16")
    return folder, save_images(images16, folder)


@pytest.fixture
def per_image(monkeypatch) -> list[int]:
    """Embeddings per image that ``prepare_inputs_labels_for_multimodal`` splices into the prompt, in order."""
    counts: list[int] = []
    embeddings = LlavaMetaForCausalLM.image_embeddings

    def counting(self, images, image_sizes=None):
        features = embeddings(self, images, image_sizes)
        counts.extend(f.shape[0] for f in features)
        return features

    monkeypatch.setattr(LlavaMetaForCausalLM, "image_embeddings", counting)
    return counts


def common(path, *extra) -> list[str]:
    return ["--model-path", str(path), "--device", "cpu", "--temperature", "0", "--conv-mode", "vicuna_v1", *extra]


def read_texts(path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


# ---- The arithmetic --------------------------------------------------------------------------------


@pytest.mark.parametrize("column, output_size", [(0, None), (1, 12), (2, 8)])
def test_counts_per_image_size_match_the_arithmetic(tiny_tower_336, tokenizer16, column, output_size):
    """What the LLM gets, measured, equals ``image_token_count`` (the worker's count before the tower runs)."""
    model = create_tiny_llava(tiny_tower_336, tokenizer16, compression_output_size=output_size, **LLAVA_16).eval()
    processor = model.get_vision_tower().image_processor
    for size, expected in TABLE.items():
        image = make_images(1, size=size, seed=1)[0]
        with torch.inference_mode():
            measured = model.image_embeddings(process_images([image], processor, model.config), [size])[0].shape[0]
        assert (measured, model.image_token_count(size)) == (expected[column], expected[column]), size


@pytest.fixture(scope="module")
def tokenizer16(tmp_path_factory):
    from transformers import AutoTokenizer

    from llava.standins import build_tokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok16")))


# ---- The answering modules, compression switched on by flag ------------------------------------------


@pytest.fixture
def questions16(tmp_path, image_folder16):
    _, names = image_folder16
    path = tmp_path / "questions.jsonl"
    with path.open("w") as f:
        for i, (name, text) in enumerate(zip(names, QUESTIONS)):
            f.write(json.dumps({"question_id": i, "image": name, "text": text}) + "\n")
    return path


@pytest.mark.parametrize("module, extra", [(model_vqa, []), (model_vqa_loader, ["--num-workers", "0"])])
def test_model_vqa_batched_equals_single_with_anyres_counts(module, extra, llava16, image_folder16, questions16,
                                                            tmp_path, per_image):
    folder, _ = image_folder16
    texts = {}
    for batch_size in (1, 3):
        answers = tmp_path / f"answers-{batch_size}.jsonl"
        module.main(common(llava16, *COMPRESS, *extra, "--image-folder", str(folder), "--question-file",
                           str(questions16), "--answers-file", str(answers), "--max_new_tokens", "4",
                           "--batch-size", str(batch_size)))
        texts[batch_size] = read_texts(answers)
    assert texts[3] == texts[1] and len(texts[1]) == 3
    assert per_image == COMPRESSED * 2  # one at a time, then one batch of three images of three sizes


def test_model_vqa_science_mixed_batch_with_anyres_counts(llava16, image_folder16, tmp_path, per_image):
    folder, names = image_folder16
    items = []
    for i, image in enumerate([names[0], None, names[1], names[2]]):
        item = {"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if image else "")
                                                 + f"Which shape is {i}?\n(A) red (B) blue"}]}
        if image:
            item["image"] = image
        items.append(item)
    questions = tmp_path / "llava_test_CQM-A.json"
    questions.write_text(json.dumps(items))
    texts = {}
    for batch_size in (1, 4):
        answers = tmp_path / f"sqa-{batch_size}.jsonl"
        model_vqa_science.main(common(llava16, *COMPRESS, "--image-folder", str(folder), "--question-file",
                                      str(questions), "--answers-file", str(answers), "--single-pred-prompt",
                                      "--max_new_tokens", "4", "--batch-size", str(batch_size)))
        texts[batch_size] = read_texts(answers)
    assert texts[4] == texts[1]
    assert per_image == COMPRESSED * 2  # the text-only question consumes no image


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_model_vqa_mmbench_batched_equals_single_with_anyres_counts(llava16, images16, tmp_path, per_image):
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    with tsv.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "question", "hint", "A", "B", "answer", "category", "split", "image"])
        for i, image in enumerate(images16):
            writer.writerow([100 + i, f"Which colour is shape {i}?", "", "red", "blue", "A", "attribute", "dev",
                             _b64(image)])
    texts = {}
    for batch_size in (1, 3):
        answers = tmp_path / f"mmbench-{batch_size}.jsonl"
        model_vqa_mmbench.main(common(llava16, *COMPRESS, "--question-file", str(tsv), "--answers-file",
                                      str(answers), "--single-pred-prompt", "--max_new_tokens", "4",
                                      "--batch-size", str(batch_size)))
        texts[batch_size] = read_texts(answers)
    assert texts[3] == texts[1]
    assert per_image == COMPRESSED * 2


def test_run_llava_and_cli_pass_image_sizes(llava16, image_folder16, per_image, monkeypatch, capsys):
    folder, names = image_folder16
    for name in names:
        run_llava.main(common(llava16, *COMPRESS, "--image-file", str(folder / name), "--query", "What is it?",
                              "--max_new_tokens", "3"))
    assert per_image == COMPRESSED
    per_image.clear()
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this?\n"))
    serve_cli.main(common(llava16, *COMPRESS, "--image-file", str(folder / names[1]), "--max-new-tokens", "3"))
    assert per_image == [COMPRESSED[1]]
    capsys.readouterr()


# ---- lmms-eval's llava model ------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, column", [("llava16", 0), ("llava16_variant", 1)])
def test_lmms_eval_llava_gets_the_anyres_counts(request, fixture, column, images16, per_image):
    """lmms-eval's calling sequence (``conv_template="vicuna_v1"``, ``image_sizes`` from the visuals).

    Compression reaches lmms-eval the way users switch it on for a harness: the checkpoint variant.
    """
    from test_harness_clients import LmmsEvalLlava

    client = LmmsEvalLlava(str(request.getfixturevalue(fixture)), batch_size=3, conv_template="vicuna_v1")
    assert client.model.config.image_aspect_ratio == "anyres"
    requests = [(question, [image]) for question, image in zip(QUESTIONS, images16)]
    batched = client.generate_until(requests, max_new_tokens=3)
    client.batch_size = 1
    single = client.generate_until(requests, max_new_tokens=3)
    assert batched == single
    assert per_image == [TABLE[size][column] for size in SIZES] * 2


# ---- The web demo's model worker --------------------------------------------------------------------


def test_model_worker_measures_anyres_counts_per_image_size(llava16, images16, monkeypatch):
    """A 1.6 worker with --use-token-compression: two image sizes, two measured counts, as the arithmetic says.

    An image over PIL's pixel limit (here lowered below the worker's own) is refused with the fix, not a crash.
    """
    pytest.importorskip("fastapi")
    from llava.eval.vqa_common import parse_args
    from llava.serve import model_worker
    from llava.serve.validation import BadRequest

    argv = ["--model-path", str(llava16), "--device", "cpu", "--no-register", *COMPRESS]
    worker = model_worker.load_worker(parse_args(model_worker.build_parser(), argv, model_worker.check_args))
    prompt = "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nWhat? ASSISTANT:"

    def ask(image) -> list[dict]:
        body = {"model": worker.model_name, "prompt": prompt, "temperature": 0, "top_p": 1.0, "max_new_tokens": 3,
                "stop": "</s>", "images": [_b64(image)]}
        return [json.loads(raw.rstrip(b"\0")) for raw in worker.stream(worker.parse(body), worker.admit())]

    measured = []
    for image in images16[:2]:
        chunks = ask(image)
        assert all(chunk["error_code"] == 0 for chunk in chunks), chunks[-1]
        measured.append(chunks[-1]["image_tokens"])
    assert measured == COMPRESSED[:2]
    assert [worker.image_token_count(image.size) for image in images16[:2]] == COMPRESSED[:2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    refused = r"images\[0\]: Image 0 is 400×300 = 120000 pixels, over the limit of 100000"
    # PIL's own warning as the worker reads the header; the refusal comes before admission, nothing decoded.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(BadRequest, match=refused):
        ask(images16[0])


# ---- Bad input --------------------------------------------------------------------------------------


def test_llava_next_tile_grid_pinpoints_parse_as_upstream():
    """LLaVA-NeXT: first and last (COLSxROWS) are a range's corners, each times the tile size."""
    grids = parse_grid_pinpoints("(1x1),...,(3x3)", 336)
    assert len(grids) == 9 and grids[0] == (336, 336) and grids[-1] == (1008, 1008) and (336, 1008) in grids
    assert parse_grid_pinpoints("(1x2),(2x2)", 384) == [(384, 768), (768, 768)]
    assert get_anyres_image_grid_shape((1000, 300), "(1x1),...,(3x3)", 336) == (3, 1)
    with pytest.raises(ValueError, match=r"counts tiles; the tile size .* is needed"):
        parse_grid_pinpoints("(1x1),...,(3x3)")
    with pytest.raises(ValueError, match=r"reads only the first and last entries.*\(5x5\) would be ignored"):
        parse_grid_pinpoints("(1x1),(5x5),(2x2)", 336)


@pytest.mark.parametrize("pinpoints, message", [
    ([[336, 672], [500, 672]], r"\[\[500, 672\]\] \(\[width, height\]\) are not multiples of the tile size 336"),
    ([], r"image_grid_pinpoints is empty"),
    ([[336, 0]], r"entry \[336, 0\] is not a \[width, height\] pair of positive integers"),
    ("[[336, 672", r"'\[\[336, 672' cannot be read"),
])
def test_bad_pinpoints_are_refused_by_value_with_the_fix(pinpoints, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_grid_pinpoints(pinpoints, 336)
    assert "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]" in str(err.value)


def _rewrite_config(path, tmp_path, **fields):
    import shutil

    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(fields)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_load_resolves_tile_grids_and_refuses_bad_pinpoints_before_the_weights(llava16, tmp_path, monkeypatch):
    from llava.model import builder

    grids = _rewrite_config(llava16, tmp_path / "grids", image_grid_pinpoints="(1x1),...,(2x2)")
    _, model, _, _ = builder.load_pretrained_model(str(grids), None, grids.name, device="cpu")
    assert model.config.image_grid_pinpoints == [[336, 336], [336, 672], [672, 336], [672, 672]]

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad config was refused")

    monkeypatch.setattr(builder, "_load_llava", no_weights)
    bad = _rewrite_config(llava16, tmp_path / "bad", image_grid_pinpoints="(2x2),(1x1)")
    with pytest.raises(ValueError, match=r"bad/llava-v1.6-vicuna-tiny/config.json: image_grid_pinpoints '\(2x2\),\(1x1\)'"):
        builder.load_pretrained_model(str(bad), None, bad.name, device="cpu")
    unset = _rewrite_config(llava16, tmp_path / "unset", image_grid_pinpoints=None)
    with pytest.raises(ValueError, match=r"config.json: image_aspect_ratio is 'anyres' but image_grid_pinpoints"):
        builder.load_pretrained_model(str(unset), None, unset.name, device="cpu")


def test_off_tile_pinpoints_are_refused_once_the_tower_is_known(llava16, tmp_path):
    from llava.model import builder

    off = _rewrite_config(llava16, tmp_path / "off", image_grid_pinpoints=[[336, 672], [700, 336]])
    with pytest.raises(ValueError, match=r"config.json: image_grid_pinpoints \[\[700, 336\]\] \(\[width, height\]\) are "
                                         r"not multiples of the tile size 336"):
        builder.load_pretrained_model(str(off), None, off.name, device="cpu")


@pytest.mark.parametrize("size, message", [
    ((0, 300), r"Image 1 is 0×300 pixels: an image needs a non-zero width and height"),
    ((300, 0), r"Image 1 is 300×0 pixels"),
])
def test_empty_images_are_refused_before_the_tower(size, message, tiny_tower_336, tokenizer16):
    model = create_tiny_llava(tiny_tower_336, tokenizer16, compression_output_size=12, **LLAVA_16)
    processor = model.get_vision_tower().image_processor
    with pytest.raises(ValueError, match=message):
        process_images([make_images(1, size=(20, 20))[0], Image.new("RGB", size)], processor, model.config)


def test_images_over_the_pixel_limit_are_refused_with_the_fix(tiny_tower_336, tokenizer16, monkeypatch):
    model = create_tiny_llava(tiny_tower_336, tokenizer16, compression_output_size=12, **LLAVA_16)
    processor = model.get_vision_tower().image_processor
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    image = Image.new("RGB", (2000, 1500))
    with pytest.raises(ValueError, match=r"Image 0 is 2000×1500 = 3000000 pixels, over the limit of 1000000 "
                                         r"\(PIL.Image.MAX_IMAGE_PIXELS\): downscale it first"):
        process_images([image], processor, model.config)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)
    assert process_images([image], processor, model.config).shape[1] == 5  # base + 2×2 crops
