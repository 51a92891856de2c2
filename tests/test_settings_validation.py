"""Settings that used to be silently wrong, and command-line values that used to be refused late (issue 10, items 5, 6).

Every bad input here must stop with a clear error, at the boundary, before a model loads:

- the tower (``CLIPVisionTower``, model args or config): a bool given as a string ("false" is off),
  compression sizes or a compressor path while compression is off, ``mm_vision_select_layer`` out of
  range or not an int, an empty image batch, a tower path that does not exist;
- ``load_pretrained_model``: the same compression rules for its arguments and for config.json, and a
  model path or model base that does not exist;
- the command-line tools (``llava.eval.run_llava``, ``llava.serve.cli``, ``llava.eval.model_vqa*``):
  generation flags out of range, an unknown ``--conv-mode``, compression flags without
  ``--use-token-compression``, missing files, broken question lines.

Only public entry points are used, so the same tests run against an older tree to show what it missed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llava.eval import model_vqa, model_vqa_loader, run_llava, vqa_common
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from llava.serve import cli as serve_cli
from llava.standins import VisionModelArgs, build_tokenizer, create_tiny_llava, make_images, save_images
from vision_token_compression import TokenCompressor, save_compressor

TINY_LAYERS = 2  # the conftest stand-ins have 2 CLIP layers: hidden_states has 3 entries


@pytest.fixture(scope="module")
def compressor_file(tmp_path_factory) -> Path:
    """A valid 24→12 compressor checkpoint for the tiny tower (hidden 32)."""
    return save_compressor(TokenCompressor(24, 12, 32), tmp_path_factory.mktemp("compressor") / "c.safetensors")


def _tower(path, args, delay_load=True):
    return CLIPVisionTower(str(path), args, delay_load=delay_load)


# ---- item 5: the tower -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, on", [
    ("false", False), ("False", False), ("0", False), ("no", False), (0, False),
    ("true", True), ("TRUE", True), ("1", True), (1, True),
])
def test_bool_setting_given_as_a_string_means_what_it_says(tiny_tower_336, make_args, value, on):
    tower = _tower(tiny_tower_336, make_args(use_token_compression=value))
    assert (tower.token_compressor is not None) is on
    assert tower.num_patches == (144 if on else 576)


@pytest.mark.parametrize("value", ["maybe", "off", "", 2, 0.5])
def test_bool_setting_that_is_not_a_boolean_is_refused(tiny_tower_336, make_args, value):
    with pytest.raises(ValueError) as exc:
        _tower(tiny_tower_336, make_args(use_token_compression=value))
    assert f"use_token_compression={value!r}" in str(exc.value)


def test_builder_reads_s2_false_as_off(tiny_tower_336, make_args):
    tower = build_vision_tower(make_args(mm_vision_tower=str(tiny_tower_336), s2="false"), delay_load=True)
    assert type(tower) is CLIPVisionTower


OFF_WITH_EXTRAS = [
    (dict(compression_output_size=8), ["compression_output_size=8"]),
    (dict(use_token_compression=False, compression_input_size=24), ["compression_input_size=24"]),
    (dict(use_token_compression="false", compression_output_size=8), ["compression_output_size=8"]),
    (dict(use_token_compression=None, compression_input_size=24, compression_output_size=8),
     ["compression_input_size=24", "compression_output_size=8"]),
    ("CHECKPOINT", ["pretrain_token_compressor="]),
]


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]


@pytest.mark.parametrize("fields, names", OFF_WITH_EXTRAS)
def test_valid_sizes_or_a_compressor_while_compression_is_off_are_ignored_with_one_warning(
        tiny_tower_336, make_args, compressor_file, caplog, fields, names):
    if fields == "CHECKPOINT":
        fields = dict(pretrain_token_compressor=str(compressor_file))
    tower = _tower(tiny_tower_336, make_args(**fields), delay_load=False)
    assert tower.token_compressor is None and tower.num_patches == 576
    (message,) = _warnings(caplog)  # once per tower ...
    assert all(name in message for name in names) and "ignored" in message, message
    assert "use_token_compression=True" in message  # the fix
    caplog.clear()
    assert tower(torch.zeros(2, 3, 336, 336)).shape == (2, 576, 32)
    assert not _warnings(caplog)  # ... not per forward


@pytest.mark.parametrize("fields, fragment", [
    (dict(compression_output_size=0), "compression_output_size=0 is out of range"),
    (dict(compression_output_size=-3), "compression_output_size=-3 is out of range"),
    (dict(compression_output_size=24), "compression_output_size=24 is out of range for a 24×24"),
    (dict(use_token_compression=False, compression_input_size=16), "compression_input_size=16 but"),
    (dict(use_token_compression="false", compression_input_size=0), "compression_input_size=0 is out of range"),
    (dict(use_token_compression=False, compression_output_size="12"), "'12'"),
    (dict(use_token_compression=False, compression_output_size=12.0), "12.0"),
    (dict(use_token_compression="off", compression_output_size=12), "use_token_compression='off'"),
    (dict(pretrain_token_compressor=12), "pretrain_token_compressor must be a path"),
])
def test_invalid_values_while_compression_is_off_are_still_refused(tiny_tower_336, make_args, fields, fragment):
    with pytest.raises(ValueError, match=fragment):
        _tower(tiny_tower_336, make_args(**fields))


@pytest.mark.parametrize("fields", [
    {},  # upstream LLaVA's args and configs have none of the compression keys
    dict(use_token_compression=False, compression_input_size=None, compression_output_size=None),  # our saved config
    dict(use_token_compression=False, compression_output_size=12),  # training args: the default output size
])
def test_compression_off_without_real_extras_still_builds(tiny_tower_336, make_args, fields):
    tower = _tower(tiny_tower_336, make_args(**fields))
    assert tower.token_compressor is None and tower.num_patches == 576


@pytest.mark.parametrize("field, value", [
    ("compression_output_size", "12"), ("compression_output_size", 12.0), ("compression_output_size", True),
    ("compression_input_size", "24"), ("compression_input_size", 24.0),
])
def test_grid_sizes_must_be_ints(tiny_tower_336, make_args, field, value):
    with pytest.raises(ValueError) as exc:
        _tower(tiny_tower_336, make_args(use_token_compression=True, **{field: value}))
    assert field in str(exc.value) and repr(value) in str(exc.value)


@pytest.mark.parametrize("delay_load", [True, False])
@pytest.mark.parametrize("layer", [TINY_LAYERS + 1, -(TINY_LAYERS + 2), 100, "-2", -2.0, True, None])
def test_select_layer_out_of_range_or_not_an_int_is_refused_at_construction(
        tiny_tower_336, make_args, layer, delay_load):
    with pytest.raises(ValueError) as exc:
        _tower(tiny_tower_336, make_args(mm_vision_select_layer=layer), delay_load=delay_load)
    message = str(exc.value)
    assert f"mm_vision_select_layer={layer!r}" in message or repr(layer) in message, message
    if isinstance(layer, int) and not isinstance(layer, bool):
        assert f"{TINY_LAYERS} layers" in message


@pytest.mark.parametrize("layer", [0, TINY_LAYERS, -1, -(TINY_LAYERS + 1)])
def test_select_layers_in_range_work(tiny_tower_336, make_args, layer):
    tower = _tower(tiny_tower_336, make_args(mm_vision_select_layer=layer), delay_load=False)
    assert tower(torch.zeros(1, 3, 336, 336)).shape == (1, 576, 32)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("images", [torch.zeros(0, 3, 336, 336), []], ids=["tensor", "list"])
def test_empty_image_batch_is_a_clear_error_before_clip(tiny_tower_336, make_args, compress, images):
    tower = _tower(tiny_tower_336, make_args(use_token_compression=compress), delay_load=False)

    def clip_called(*args, **kwargs):
        raise AssertionError("CLIP ran on an empty batch")

    tower.vision_tower.forward = clip_called
    with pytest.raises(ValueError, match="no images"):
        tower(images)


@pytest.mark.parametrize("name", ["/nonexistent/clip-vit", "./nonexistent-clip", "~/nonexistent-clip-xyz",
                                  "nonexistent/a/b", "../nonexistent"])
def test_missing_tower_path_says_not_found(make_args, name):
    with pytest.raises(FileNotFoundError) as exc:
        CLIPVisionTower(name, make_args(), delay_load=True)
    message = str(exc.value)
    assert "not found" in message and repr(name) in message and "mm_vision_tower" in message, message


# ---- item 5: load_pretrained_model ---------------------------------------------------------------

def _load(path, **kwargs):
    return load_pretrained_model(str(path), None, "llava-tiny", device="cpu", **kwargs)


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading weights fail loudly: the errors under test must come first."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(LlavaLlamaForCausalLM, "from_pretrained", loaded)


@pytest.mark.parametrize("kwargs, names", [
    (dict(use_token_compression=False, compression_output_size=8), ["compression_output_size=8"]),
    (dict(use_token_compression=False, compression_input_size=24), ["compression_input_size=24"]),
    (dict(use_token_compression="false", compression_output_size=8), ["compression_output_size=8"]),
    (dict(use_token_compression=False, token_compressor_path="CHECKPOINT"), ["token_compressor_path="]),
    (dict(compression_output_size=12), ["compression_output_size=12", "not given, so that of"]),
])
def test_load_time_extras_while_compression_is_off_are_ignored_with_a_warning(tiny_llava, compressor_file, caplog,
                                                                            kwargs, names):
    if kwargs.get("token_compressor_path") == "CHECKPOINT":
        kwargs = {**kwargs, "token_compressor_path": str(compressor_file)}
    _, model, _, _ = _load(tiny_llava, **kwargs)
    assert model.get_vision_tower().token_compressor is None and model.get_vision_tower().num_patches == 576
    (message,) = [m for m in _warnings(caplog) if "ignored" in m]
    assert all(name in message for name in names) and "use_token_compression=True" in message, message


def test_load_time_switch_given_as_the_string_false_is_off(tiny_llava):
    _, model, _, _ = _load(tiny_llava, use_token_compression="false")
    assert model.get_vision_tower().token_compressor is None
    assert model.config.use_token_compression is False


def test_compressed_checkpoint_loads_with_compression_switched_off(tiny_llava_compressed):
    _, model, _, _ = _load(tiny_llava_compressed, use_token_compression=False)
    tower = model.get_vision_tower()
    assert tower.token_compressor is None and tower.num_patches == 576


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(use_token_compression=True, compression_output_size=0), "compression_output_size=0"),
    (dict(use_token_compression=True, compression_output_size="8"), "'8'"),
    (dict(use_token_compression=True, compression_input_size=12, compression_output_size=12),
     "compression_output_size=12"),
    (dict(use_token_compression="maybe"), "'maybe'"),
])
def test_load_time_values_of_the_wrong_type_or_range_are_refused_before_loading(tiny_llava, no_model_load,
                                                                                  kwargs, fragment):
    with pytest.raises(ValueError) as exc:
        _load(tiny_llava, **kwargs)
    assert fragment in str(exc.value)


def test_missing_compressor_path_is_refused_before_loading(tiny_llava, tmp_path, no_model_load):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as exc:
        _load(tiny_llava, use_token_compression=True, token_compressor_path=str(missing))
    assert str(missing) in str(exc.value)


def _edited_copy(src: Path, dst: Path, **edits) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in edits.items():
        if value is KeyError:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_config_json_with_use_token_compression_false_as_a_string_loads_without_compression(tiny_llava, tmp_path):
    path = _edited_copy(tiny_llava, tmp_path / "ckpt", use_token_compression="false")
    _, model, _, _ = _load(path)
    assert model.get_vision_tower().token_compressor is None
    assert model.config.use_token_compression is False


def test_upstream_config_without_compression_keys_loads(tiny_llava, tmp_path):
    path = _edited_copy(tiny_llava, tmp_path / "ckpt", use_token_compression=KeyError,
                        compression_input_size=KeyError, compression_output_size=KeyError)
    _, model, _, _ = _load(path)
    assert model.get_vision_tower().num_patches == 576


@pytest.mark.parametrize("edits, names", [
    (dict(compression_output_size=8), ["compression_output_size=8"]),
    (dict(use_token_compression="false", compression_input_size=24), ["compression_input_size=24"]),
])
def test_config_json_with_sizes_while_off_loads_uncompressed_with_one_warning(tiny_llava, tmp_path, caplog, edits,
                                                                              names):
    path = _edited_copy(tiny_llava, tmp_path / "ckpt", **edits)
    _, model, _, _ = _load(path)
    assert model.get_vision_tower().num_patches == 576
    (message,) = [m for m in _warnings(caplog) if "ignored" in m]
    assert all(name in message for name in names), message


@pytest.mark.parametrize("edits, fragments", [
    (dict(compression_output_size=0), ["config.json", "compression_output_size=0"]),
    (dict(use_token_compression="false", compression_input_size="24"), ["config.json", "compression_input_size"]),
    (dict(mm_vision_select_layer="-2"), ["mm_vision_select_layer", "'-2'"]),
    (dict(mm_vision_select_layer=-30), ["mm_vision_select_layer=-30", f"{TINY_LAYERS} layers"]),
])
def test_config_json_with_invalid_settings_is_refused(tiny_llava, tmp_path, edits,
                                                                                 fragments):
    path = _edited_copy(tiny_llava, tmp_path / "ckpt", **edits)
    with pytest.raises(ValueError) as exc:
        _load(path)
    assert all(fragment in str(exc.value) for fragment in fragments), str(exc.value)


@pytest.mark.parametrize("name", ["/nonexistent/llava-v1.5-7b", "./nonexistent-llava", "~/nonexistent-llava-xyz",
                                  "checkpoints/nonexistent/llava"])
def test_missing_model_path_says_not_found(name):
    with pytest.raises(FileNotFoundError) as exc:
        load_pretrained_model(name, None, "llava", device="cpu")
    message = str(exc.value)
    assert "not found" in message and repr(name) in message and "--model-path" in message, message


def test_missing_model_base_says_not_found(tiny_llava):
    with pytest.raises(FileNotFoundError) as exc:
        load_pretrained_model(str(tiny_llava), "/nonexistent/vicuna-7b", "llava", device="cpu")
    assert "not found" in str(exc.value) and "'/nonexistent/vicuna-7b'" in str(exc.value)


@pytest.mark.slow
def test_repo_ids_missing_from_the_offline_cache_say_not_found(tmp_path):
    """A Hub name that is not in the cache, offline: "not found", naming it (subprocess: offline is read at import)."""
    code = textwrap.dedent("""
        from types import SimpleNamespace
        from llava.model.builder import load_pretrained_model
        from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
        for call in (lambda: CLIPVisionTower("nonexistent-org/nonexistent-clip",
                                             SimpleNamespace(mm_vision_select_layer=-2), delay_load=True),
                     lambda: load_pretrained_model("nonexistent-org/nonexistent-llava", None, "x", device="cpu")):
            try:
                call()
            except Exception as err:
                print(type(err).__name__, "|", str(err).replace("\\n", " "))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout + result.stderr[-2000:]
    for line, name in zip(lines, ["nonexistent-org/nonexistent-clip", "nonexistent-org/nonexistent-llava"]):
        kind, message = line.split(" | ", 1)
        assert kind == "FileNotFoundError" and "not found" in message and repr(name) in message, line


# ---- item 5: initialize_vision_modules on a model that already has a tower --------------------------

def test_compressor_path_while_off_is_ignored_with_a_warning_for_an_existing_tower(tiny_tower_336, compressor_file,
                                                                                  tmp_path, caplog):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    from transformers import AutoTokenizer

    model = create_tiny_llava(tiny_tower_336, AutoTokenizer.from_pretrained(tokenizer))
    args = VisionModelArgs(vision_tower=str(tiny_tower_336), pretrain_token_compressor=str(compressor_file))
    caplog.clear()
    model.get_model().initialize_vision_modules(args)
    assert model.get_vision_tower().token_compressor is None
    (message,) = [m for m in _warnings(caplog) if "ignored" in m]
    assert "pretrain_token_compressor=" in message and "use_token_compression=True" in message


# ---- item 6: command-line tools --------------------------------------------------------------------

@pytest.fixture
def files(tmp_path, monkeypatch):
    """An image, a question file, and the working directory at tmp_path."""
    monkeypatch.chdir(tmp_path)
    (image,) = save_images(make_images(1, size=[(64, 48)], seed=0), tmp_path)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "image": image, "text": "Hi?"}) + "\n")
    return tmp_path / image, questions


@pytest.fixture
def never_load(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    for module in (run_llava, serve_cli, vqa_common):
        monkeypatch.setattr(module, "load_pretrained_model", loaded)


# (flags, fragments of the message); "MISSING" stands for a file that does not exist.
COMPRESSION_FLAG_CASES = [
    (["--compression-output-size", "0"], ["--compression-output-size=0", "out of range"]),
    (["--compression-input-size", "1"], ["--compression-input-size=1", "out of range"]),
    (["--compression-input-size", "24", "--compression-output-size", "30"], ["--compression-output-size=30"]),
    (["--use-token-compression", "--compression-output-size", "0"], ["--compression-output-size=0"]),
    (["--use-token-compression", "--compression-input-size", "24", "--compression-output-size", "24"],
     ["--compression-output-size=24"]),
    (["--use-token-compression", "--token-compressor-path", "MISSING.safetensors"], ["MISSING.safetensors"]),
]
RUN_LLAVA_CASES = [
    (["--num_beams", "0"], ["--num_beams", "got 0"]),
    (["--temperature", "-0.5"], ["--temperature", "-0.5"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--top_p", "5"], ["--top_p", "got 5"]),
    (["--top_p", "0"], ["--top_p", "got 0"]),
    (["--top_p", "-1"], ["--top_p", "got -1"]),
    (["--max_new_tokens", "0"], ["--max_new_tokens", "got 0"]),
    (["--conv-mode", "vicuna_v9"], ["'vicuna_v9'", "llava_v1"]),
    (["--image-file", "MISSING.png"], ["--image-file", "'MISSING.png'"]),
    *COMPRESSION_FLAG_CASES,
]
SERVE_CLI_CASES = [
    (["--temperature", "-1"], ["--temperature", "-1"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "got 0"]),
    (["--conv-mode", "vicuna_v9"], ["'vicuna_v9'", "llava_v1"]),
    (["--image-file", "MISSING.png"], ["--image-file", "'MISSING.png'"]),
    *COMPRESSION_FLAG_CASES,
]
VQA_CASES = [
    (["--top_p", "5"], ["--top_p", "got 5"]),
    (["--top_p", "0"], ["--top_p", "got 0"]),
    (["--num_beams", "0"], ["--num_beams", "got 0"]),
    (["--num-chunks", "0"], ["--num-chunks", "got 0"]),
    (["--num-chunks", "2", "--chunk-idx", "2"], ["--chunk-idx 2", "0..1"]),
    (["--temperature", "-1"], ["--temperature", "-1"]),
    (["--conv-mode", "vicuna_v9"], ["'vicuna_v9'"]),
    (["--answers-file", "questions.jsonl"], ["is the same file as --question-file"]),
    *COMPRESSION_FLAG_CASES,
]


def _exit_message(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flags, fragments", RUN_LLAVA_CASES)
def test_run_llava_refuses_bad_flags_before_loading(files, never_load, capsys, flags, fragments):
    image, _ = files
    argv = ["--model-path", "nowhere", "--image-file", str(image), "--query", "Hi?", *flags]
    err = _exit_message(run_llava.main, argv, capsys)
    assert all(fragment in err for fragment in fragments), err


@pytest.mark.parametrize("flags, fragments", SERVE_CLI_CASES)
def test_serve_cli_refuses_bad_flags_before_loading(files, never_load, capsys, flags, fragments):
    image, _ = files
    err = _exit_message(serve_cli.main, ["--model-path", "nowhere", "--image-file", str(image), *flags], capsys)
    assert all(fragment in err for fragment in fragments), err


@pytest.mark.parametrize("module", [model_vqa, model_vqa_loader])
@pytest.mark.parametrize("flags, fragments", VQA_CASES)
def test_eval_scripts_refuse_bad_flags_before_loading(files, never_load, capsys, module, flags, fragments):
    _, questions = files
    argv = ["--model-path", "nowhere", "--question-file", str(questions), "--answers-file", "answers.jsonl", *flags]
    err = _exit_message(module.main, argv, capsys)
    assert all(fragment in err for fragment in fragments), err
    assert not Path("answers.jsonl").exists()


def test_run_llava_checks_an_upstream_style_args_object_before_loading(files, never_load):
    image, _ = files
    args = type("Args", (), {"model_path": "nowhere", "model_base": None, "query": "Hi?", "conv_mode": None,
                             "image_file": str(image), "sep": ",", "temperature": 0, "top_p": 5,
                             "num_beams": 1, "max_new_tokens": 8})()
    with pytest.raises(ValueError, match="--top_p"):
        run_llava.eval_model(args)


@pytest.mark.parametrize("module", [model_vqa, model_vqa_loader])
@pytest.mark.parametrize("content, fragment", [
    ('{"question_id": 0, "image": "a.png", "text": "Hi?"}\n{"question_id": 1, "image": "a.png", "text": \n',
     "line 2"),
    ('{"question_id": 0, "image": "a.png", "text": "Hi?"}\n\n[1, 2]\n', "line 3"),
    ('{"question_id": 0, "text": "Hi?"}\n', "line 1"),
])
def test_broken_question_lines_name_the_file_and_line(files, never_load, module, content, fragment):
    _, questions = files
    questions.write_text(content)
    with pytest.raises(SystemExit) as exc:
        module.main(["--model-path", "nowhere", "--question-file", str(questions), "--answers-file", "a.jsonl"])
    assert str(questions) in exc.value.code and fragment in exc.value.code, exc.value.code
