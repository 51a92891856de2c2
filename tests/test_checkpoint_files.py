"""The library's checkpoint-file readers and a tool's staging folders, on damaged files and intruding users.

``vision_token_compression.checkpoint_files``: a safetensors file cut anywhere, emptied, appended to
or with a garbage header is refused from its header with its path and size (never a bare
``SafetensorError``); a JSON file that is empty, cut, binary or not an object is refused by path.
``vision_token_compression.atomic``: a tool's staging folder is published only where nothing is (a
file that appeared at the target meanwhile survives); what a killed run left is removed by the next
one, and only that; a killed writer's temporaries are removed for the targets named, and only those.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vision_token_compression import (
    CheckpointFileError,
    check_checkpoint_safetensors,
    load_safetensors,
    make_staging_folder,
    open_safetensors,
    publish_new_folder,
    read_json_object,
    read_safetensors_header,
    remove_stale_staging,
    remove_stale_temporaries,
)
from vision_token_compression.atomic import STAGING_MARKER

# ---- safetensors files ------------------------------------------------------------------------------


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 5)}, str(path), metadata={"format": "pt"})
    return path


def _header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# (damage, expected message); each cut names the file and its size in bytes.
DAMAGE = {
    "empty": (lambda data, end: b"", r"\(0 bytes\) is empty"),
    "4 bytes": (lambda data, end: data[:4], r"\(4 bytes\) is truncated: too short"),
    "inside the header": (lambda data, end: data[: end - 3], r"is truncated: its \d+-byte header alone needs"),
    "header only": (lambda data, end: data[:end], r"is truncated: its header describes \d+ bytes, \d+ more"),
    "half": (lambda data, end: data[: len(data) // 2], r"is truncated: its header describes"),
    "last byte missing": (lambda data, end: data[:-1], r"is truncated: its header describes \d+ bytes, 1 more"),
    "bytes appended": (lambda data, end: data + b"junk", r"is damaged: .* 4 bytes follow them"),
    "garbage length": (lambda data, end: b"\xff" * 8 + data[8:], r"is not a safetensors file: its first 8 bytes"),
    "garbage header": (lambda data, end: data[:8] + b"{" * (end - 8) + data[end:], r"its header is not the JSON"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_safetensors_file_is_named_with_its_size(weights, damage):
    cut, message = DAMAGE[damage]
    weights.write_bytes(cut(weights.read_bytes(), _header_end(weights)))
    size = weights.stat().st_size
    for reader in (read_safetensors_header, load_safetensors):
        with pytest.raises(CheckpointFileError, match=message) as err:
            reader(weights, "Fetch it again.")
        assert f"{weights} ({size} bytes)" in str(err.value) and str(err.value).endswith("Fetch it again.")
    with pytest.raises(CheckpointFileError, match=message), open_safetensors(weights):
        pass


def test_a_complete_file_reads_as_safetensors_does(weights):
    assert set(read_safetensors_header(weights)) == {"__metadata__", "a", "b"}
    assert torch.equal(load_safetensors(weights)["a"], torch.arange(64, dtype=torch.float32))
    with open_safetensors(weights) as f:
        assert f.get_slice("b").get_shape() == [3, 5]


def test_a_checkpoint_folder_is_checked_file_by_file(tmp_path, weights):
    assert check_checkpoint_safetensors(weights.parent) == [weights]
    assert check_checkpoint_safetensors(tmp_path / "not-a-folder") == []  # a Hub id: left to the loader
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("s1.safetensors", "s2.safetensors"):
        save_file({name: torch.zeros(16)}, str(sharded / name))
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"s1.safetensors": "s1.safetensors", "s2.safetensors": "s2.safetensors"}}))
    assert [p.name for p in check_checkpoint_safetensors(sharded)] == ["s1.safetensors", "s2.safetensors"]
    (sharded / "s2.safetensors").write_bytes((sharded / "s2.safetensors").read_bytes()[:-10])
    with pytest.raises(CheckpointFileError, match=r"s2\.safetensors \(\d+ bytes\) is truncated"):
        check_checkpoint_safetensors(sharded)
    (sharded / "s2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"index.json names shards that are missing: s2\.safetensors"):
        check_checkpoint_safetensors(sharded)
    index.write_text(json.dumps({"weight_map": ["s1.safetensors"]}))
    with pytest.raises(CheckpointFileError, match=r"index.json \(\d+ bytes\) has no weight_map"):
        check_checkpoint_safetensors(sharded)


@pytest.mark.parametrize("content, message", [
    (b"", r"\(0 bytes\) is empty"),
    (b'{"model_type": "llava", "hidden', r"is not valid JSON \(Unterminated string.*: line 1, column 25\)"),
    (b"[1, 2]", r"holds a JSON list, not the object"),
    (b"\xff\xfe\x00", r"is not UTF-8 text"),
])
def test_a_damaged_json_file_is_named(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointFileError, match=message) as err:
        read_json_object(path, "Restore it.")
    assert str(err.value).startswith(f"{path} (") and str(err.value).endswith("Restore it.")
    path.unlink()
    path.mkdir()
    with pytest.raises(FileNotFoundError, match="it is a folder"):
        read_json_object(path)


# ---- a tool's staging folders ---------------------------------------------------------------------


def _staged(final: Path) -> Path:
    staging = make_staging_folder(final, "test-tool")
    (staging / "weights.bin").write_bytes(b"x" * 100)
    return staging


@pytest.mark.parametrize("intrusion", ["file in the empty output", "folder with a file", "a file at the output"])
def test_what_appears_at_the_output_meanwhile_is_kept(tmp_path, intrusion):
    final = tmp_path / "out"
    if intrusion == "file in the empty output":
        final.mkdir()
    staging = _staged(final)
    if intrusion == "a file at the output":
        final.write_text("mine")
    else:
        final.mkdir(exist_ok=True)
        (final / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"{final} appeared while the output was being written"):
        publish_new_folder(staging, final)
    kept = final if intrusion == "a file at the output" else final / "notes.txt"
    assert kept.read_text() == "mine"
    assert not staging.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_or_absent_output_gets_the_folder_without_the_marker(tmp_path):
    for final in (tmp_path / "absent", tmp_path / "empty"):
        if final.name == "empty":
            final.mkdir()
        staging = _staged(final)
        assert staging.name.startswith(f".{final.name}.") and staging.name.endswith(".partial")
        publish_new_folder(staging, final)
        assert [p.name for p in final.iterdir()] == ["weights.bin"]  # the marker is gone


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _leftover(final: Path, name: str, **marker) -> Path:
    folder = final.parent / f".{final.name}.{name}.partial"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x" * 1000)
    if marker:
        marker = {"tool": "test-tool", "output": final.name, "pid": _dead_pid(), "host": socket.gethostname(), **marker}
        (folder / STAGING_MARKER).write_text(json.dumps(marker))
    return folder


@pytest.mark.parametrize("name", ["out", "run[1]*"])  # glob characters in the name are plain text
def test_a_killed_runs_staging_folder_is_removed_and_said(tmp_path, caplog, name):
    final = tmp_path / name
    killed = _leftover(final, "killed1", tool="toconv-convert-to-hf")
    live = _leftover(final, "live", pid=os.getpid())
    elsewhere = _leftover(final, "remote", host="another-host")
    other_output = _leftover(final, "other", output="out2")
    users = _leftover(final, "mine")  # no marker: not a tool's
    with caplog.at_level(logging.WARNING, logger="vision_token_compression.atomic"):
        assert remove_stale_staging(final) == [killed]
    assert not killed.exists() and all(p.is_dir() for p in (live, elsewhere, other_output, users))
    assert f"Removed {killed} (0.0 MB), the unfinished output of a killed toconv-convert-to-hf run" in caplog.text
    assert f"Leaving {live}" in caplog.text and f"Leaving {elsewhere}" in caplog.text and "ran on another-host" in caplog.text


# ---- a killed writer's temporaries ---------------------------------------------------------------


def test_only_the_named_targets_temporaries_are_removed(tmp_path, caplog):
    stale = [".config.json.abc12345.tmp", ".compressor_24to12.safetensors.k2j3_4g5.tmp"]
    kept = [".notes.txt.abc12345.tmp", ".mine.tmp", "config.json.abc12345.tmp", ".config.json.short.tmp", "config.json"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    with caplog.at_level(logging.WARNING, logger="vision_token_compression.atomic"):
        removed = remove_stale_temporaries(tmp_path, ["config.json", "compressor_*.safetensors"])
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert "a temporary file a killed run left while writing config.json" in caplog.text
