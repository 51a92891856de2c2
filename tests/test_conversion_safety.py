"""The converters and loaders on damaged sources and intruding users, on tiny stand-ins.

``toconv-convert-to-hf`` and ``toconv-compress-llava``: a file that appears in OUTPUT while they run
is kept (the run fails, naming it); what a killed run left beside OUTPUT (a hidden, marked
``.OUTPUT.*.partial`` copy of the weights) is removed by the next run, which says so; a malformed
config.json or a truncated, empty or appended-to weight file is refused naming the file, before
anything is written. Loading a truncated safetensors file names the file and its size in the fork
(``load_pretrained_model``, the vision tower, ``token_compressor_path``) and in Hugging Face-native
loading (``from_pretrained``); the vLLM plugin calls the same check
(``check_checkpoint_safetensors``, tested in ``test_checkpoint_files``).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import llava.hf  # noqa: F401  (registers toconv_llava)
from llava.hf import writer
from llava.hf.convert import convert
from llava.model import compress_checkpoint as cc
from llava.model.builder import load_pretrained_model
from llava.model.weights_io import CheckpointError
from vision_token_compression import CheckpointFileError, TokenCompressor, make_staging_folder, save_compressor
from vision_token_compression.atomic import STAGING_MARKER

NAME = "llava-v1.5-tiny"
TOOLS = ("convert", "compress")
DAMAGE_ERRORS = (CheckpointError, CheckpointFileError)


def run_tool(tool: str, source: Path, output: Path) -> Path:
    return convert(source, output) if tool == "convert" else cc.compress_checkpoint(source, output)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "src" / folder.name))


def truncate(path: Path, keep: int | None = None) -> int:
    """Cut ``path`` to ``keep`` bytes (default: half); returns the new size."""
    size = path.stat().st_size // 2 if keep is None else keep
    with path.open("r+b") as f:
        f.truncate(size)
    return size


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- the output: what appears there meanwhile is kept, what a killed run left is removed -------------


@pytest.fixture
def intrude_during(monkeypatch):
    """``intrude_during(tool, action)``: run ``action`` once, in the middle of the tool's writing."""

    def arm(tool: str, action) -> None:
        module, name = (writer, "write_weights") if tool == "convert" else (cc, "_link")
        original = getattr(module, name)
        done = []

        def patched(*args, **kwargs):
            result = original(*args, **kwargs)
            if not done:
                done.append(action())
            return result

        monkeypatch.setattr(module, name, patched)

    return arm


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("intrusion", ["a file in the empty OUTPUT", "OUTPUT appears with a file", "OUTPUT appears as a file"])
def test_what_appears_in_output_while_the_tool_runs_is_kept(tmp_path, tiny_llava, intrude_during, tool, intrusion):
    output = tmp_path / "out"
    if intrusion == "a file in the empty OUTPUT":
        output.mkdir()
    users = output if intrusion == "OUTPUT appears as a file" else output / "notes.txt"

    def intrude():
        users.parent.mkdir(exist_ok=True)
        users.write_text("mine")

    intrude_during(tool, intrude)
    with pytest.raises(FileExistsError, match=rf"{output} appeared while the output was being written.*left as it is"):
        run_tool(tool, tiny_llava, output)
    assert users.read_text() == "mine"
    assert not hidden_entries(tmp_path)  # the unfinished copy is gone, nothing renamed aside


KILL = """
import os, signal, sys
from llava.hf import writer
from llava.model import compress_checkpoint as cc
module, name = (writer, "write_weights") if sys.argv[1] == "convert" else (cc, "_link")
original = getattr(module, name)
def killed(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(module, name, killed)
from llava.hf.convert import convert
(convert if sys.argv[1] == "convert" else cc.compress_checkpoint)(sys.argv[2], sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_a_killed_runs_hidden_copy_is_removed_by_the_next_run(tmp_path, tiny_llava, tool, caplog):
    output = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL), tool, str(tiny_llava), str(output)],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    [leftover] = [tmp_path / name for name in hidden_entries(tmp_path)]
    assert leftover.name.startswith(".out.") and leftover.name.endswith(".partial") and not output.exists()
    users = tmp_path / ".out.mine.partial"  # looks like one, but holds no marker: not the tool's
    users.mkdir()
    with caplog.at_level(logging.WARNING):
        run_tool(tool, tiny_llava, output)
    assert hidden_entries(tmp_path) == [users.name] and (output / "config.json").is_file()
    assert f"Removed {leftover}" in caplog.text and "the unfinished output of a killed" in caplog.text


@pytest.mark.parametrize("tool", TOOLS)
def test_a_dead_runs_marked_copy_is_removed_first_and_said(tmp_path, tiny_llava, tool, caplog):
    """The quick twin of the test above: a staging folder whose marker names a process that is gone."""
    output = tmp_path / "out"
    leftover = make_staging_folder(output, f"toconv-{tool}")
    marker = leftover / STAGING_MARKER
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "pid": int(finished.stdout)}))
    with caplog.at_level(logging.WARNING):
        run_tool(tool, tiny_llava, output)
    assert not leftover.exists() and not hidden_entries(tmp_path)
    assert f"Removed {leftover}" in caplog.text


# ---- damaged sources are refused by name before anything is written ---------------------------------


CONFIG_DAMAGE = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "a JSON list": lambda text: "[1, 2]",
}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_a_malformed_config_is_refused_naming_it(tmp_path, tiny_llava, tool, damage):
    source = copy_of(tiny_llava, tmp_path)
    config = source / "config.json"
    config.write_text(CONFIG_DAMAGE[damage](config.read_text()))
    with pytest.raises(CheckpointFileError, match=rf"{config} \(\d+ bytes\)"):
        run_tool(tool, source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not hidden_entries(tmp_path)


def _damage_weights(source: Path, damage: str) -> Path:
    """Damage ``source``'s weights as ``damage`` says; returns the file damaged."""
    weights = source / "model.safetensors"
    if damage == "a truncated shard":
        tensors = load_file(weights)
        weights.unlink()
        keys = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
        for shard, names in shards.items():
            save_file({k: tensors[k] for k in names}, str(source / shard), metadata={"format": "pt"})
        index = {"weight_map": {k: shard for shard, names in shards.items() for k in names}}
        (source / "model.safetensors.index.json").write_text(json.dumps(index))
        weights = source / "model-00002-of-00002.safetensors"
        truncate(weights)
    elif damage == "bytes appended":
        with weights.open("ab") as f:
            f.write(b"junk")
    else:
        truncate(weights, 0 if damage == "empty" else None)
    return weights


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("damage", ["truncated", "empty", "bytes appended", "a truncated shard"])
def test_damaged_source_weights_are_refused_naming_the_file_and_size(tmp_path, tiny_llava, tool, damage):
    source = copy_of(tiny_llava, tmp_path)
    weights = _damage_weights(source, damage)
    with pytest.raises(DAMAGE_ERRORS, match=rf"{weights}.*\b{weights.stat().st_size} bytes\b"):
        run_tool(tool, source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not hidden_entries(tmp_path)


def test_the_command_lines_exit_with_the_message(tmp_path, tiny_llava, capsys):
    from llava.hf.convert import main as convert_main

    source = copy_of(tiny_llava, tmp_path)
    size = truncate(source / "model.safetensors")
    expected = rf"{source / 'model.safetensors'} \({size} bytes\) is truncated"
    with pytest.raises(SystemExit, match=rf"^toconv-convert-to-hf: error: {expected}"):
        convert_main([str(source), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=rf"^compress_checkpoint: error: {expected}"):
        cc.main(["--model-path", str(source), "--save-path", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_truncated_projector_file_is_refused_by_compress(tmp_path, tiny_llava):
    import torch

    source = tmp_path / "projector-only"
    source.mkdir()
    shutil.copy(tiny_llava / "config.json", source)
    projector = {k: v for k, v in load_file(tiny_llava / "model.safetensors").items() if "mm_projector" in k}
    torch.save(projector, source / "mm_projector.bin")
    size = truncate(source / "mm_projector.bin")
    with pytest.raises(CheckpointError, match=rf"mm_projector.bin \({size} bytes\) cannot be read"):
        cc.compress_checkpoint(source, tmp_path / "out")


def test_a_truncated_llava_hf_source_is_refused_naming_the_file(tmp_path, tiny_tower_336):
    from llava.hf.standins import build_tiny_llava_hf

    source = build_tiny_llava_hf(tmp_path / "llava-hf", tiny_tower_336)
    size = truncate(source / "model.safetensors")
    with pytest.raises(CheckpointFileError, match=rf"llava-hf/model.safetensors \({size} bytes\) is truncated"):
        convert(source, tmp_path / "out")


# ---- loading: a truncated file names itself and its size, in every host --------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "a truncated shard"])
def test_the_fork_names_a_damaged_weights_file(tmp_path, tiny_llava, damage):
    source = copy_of(tiny_llava, tmp_path)
    weights = _damage_weights(source, damage)
    with pytest.raises(CheckpointFileError, match=rf"{weights} \({weights.stat().st_size} bytes\)"):
        load_pretrained_model(str(source), None, NAME, device="cpu")


def test_the_fork_names_a_truncated_tower_and_compressor_checkpoint(tmp_path, tiny_llava, tiny_tower_336):
    tower = Path(shutil.copytree(tiny_tower_336, tmp_path / "tower"))
    size = truncate(tower / "model.safetensors")
    source = copy_of(tiny_llava, tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tower)}))
    with pytest.raises(CheckpointFileError, match=rf"tower/model.safetensors \({size} bytes\) is truncated"):
        load_pretrained_model(str(source), None, NAME, device="cpu")

    path = save_compressor(TokenCompressor(24, 12, 32), tmp_path / "c.safetensors")
    size = truncate(path)
    with pytest.raises(CheckpointFileError, match=rf"c.safetensors \({size} bytes\) is truncated"):
        load_pretrained_model(str(tiny_llava), None, NAME, device="cpu", use_token_compression=True,
                              token_compressor_path=str(path))


@pytest.fixture(scope="module")
def converted_sharded(tmp_path_factory, tiny_llava) -> Path:
    return convert(tiny_llava, tmp_path_factory.mktemp("hf") / "sharded", max_shard_bytes=200_000)


@pytest.mark.parametrize("damage", ["truncated", "empty", "bytes appended"])
def test_hf_native_loading_names_a_damaged_weights_file(tmp_path, converted_sharded, damage):
    source = copy_of(converted_sharded, tmp_path)
    shard = sorted(source.glob("model-*.safetensors"))[-1]
    if damage == "bytes appended":
        with shard.open("ab") as f:
            f.write(b"junk")
    else:
        truncate(shard, 0 if damage == "empty" else None)
    with pytest.raises(CheckpointFileError, match=rf"{shard} \({shard.stat().st_size} bytes\)"):
        AutoModelForImageTextToText.from_pretrained(source)
