"""LLaVA training's files and folders that appear complete or not at all.

The primitives (write a file beside its target, flush, rename; publish a folder) are the compressor
library's, ``vision_token_compression.atomic_write`` and friends: one implementation for compressor
checkpoints, the compressor trainer and LLaVA. This module keeps the names LLaVA's training code
calls (``atomic_file``, ``write_text``, ...) and adds what only LLaVA's outputs need: ``torch.save``
files, ``save_pretrained`` output staged in a hidden folder, checkpoint folders deleted at once, and
clearing what a killed run left.

A training process killed while it writes (SIGKILL, out of memory, preemption) leaves only a hidden
temporary beside the target, never a truncated target. Temporaries are named ``.<name>.<random>.tmp``
(files) and ``.<name>.partial`` (folders), so nothing that looks for ``checkpoint-*``,
``mm_projector.bin`` or ``*.safetensors`` sees them; ``remove_stale(folder)`` clears what a killed
run left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vision_token_compression import atomic_write, atomic_write_text, publish_file, publish_folder

TMP_SUFFIX = ".tmp"  # what atomic_write names its temporaries with
PARTIAL_SUFFIX = ".partial"

atomic_file = atomic_write
write_text = atomic_write_text
__all__ = [
    "PARTIAL_SUFFIX", "TMP_SUFFIX", "atomic_file", "publish_files", "publish_folder", "remove_stale", "remove_tree",
    "staged_files", "staging_folder", "torch_save", "write_text",
]


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def staging_folder(final: str | os.PathLike) -> Path:
    """The hidden folder ``final`` is assembled in before ``publish_folder`` renames it."""
    final = Path(final)
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def publish_files(staged: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Move every file of the folder ``staged`` into ``dest`` (same relative paths), each atomically.

    For outputs that share ``dest`` with other files (the run's output folder holds the
    checkpoints too), so the folder itself cannot be swapped. ``staged`` is removed afterwards.
    """
    staged, dest = Path(staged), Path(dest)
    moved = []
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        target = dest / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        publish_file(path, target)
        moved.append(target)
    shutil.rmtree(staged, ignore_errors=True)
    return moved


@contextlib.contextmanager
def staged_files(dest: str | os.PathLike, name: str = "staged") -> Iterator[Path]:
    """Yield the hidden folder ``dest/.<name>.partial`` to write into; on success ``publish_files`` it.

    For writers that only take a folder (``save_pretrained``). Every process of a distributed run
    gets the same path; only the ones that write should call this.
    """
    dest = Path(dest)
    staged = dest / f".{name}{PARTIAL_SUFFIX}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish_files(staged, dest)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` so that it vanishes at once: rename it to a hidden name, then delete.

    A kill while deleting leaves a hidden ``.<name>.partial`` folder, never a half-deleted one
    under the original name.
    """
    path = Path(path)
    if not path.exists():
        return
    doomed = path if _is_temporary(path) else path.with_name(f".{path.name}.deleting{PARTIAL_SUFFIX}")
    if doomed != path:
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith((TMP_SUFFIX, PARTIAL_SUFFIX))


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed run left directly in ``folder``; return what was deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if _is_temporary(p))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
