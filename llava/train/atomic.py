"""Files and folders that appear complete or not at all: write under a temporary name, then rename.

A training process killed while it writes (SIGKILL, out of memory, preemption) leaves only a hidden
temporary beside the target, never a truncated target. Temporaries are named ``.<name>.<random>.tmp``
(files) and ``.<name>.partial`` (folders), so nothing that looks for ``checkpoint-*``,
``mm_projector.bin`` or ``*.safetensors`` sees them; ``remove_stale(folder)`` clears what a killed
run left. Written data is flushed to disk (fsync) before the rename, so the rename never
publishes a file whose bytes are still only in the page cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
PARTIAL_SUFFIX = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; folders that cannot be synced are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems refuse fsync on a folder
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if not path.is_symlink():
            _fsync(path)
    _fsync(folder)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, it becomes ``path``.

    On an error the temporary is removed and ``path`` keeps what it held before (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is 0600; give it a new file's permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def staging_folder(final: str | os.PathLike) -> Path:
    """The hidden folder ``final`` is assembled in before ``publish_folder`` renames it."""
    final = Path(final)
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def publish_folder(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the complete folder ``staged`` to ``final``, replacing a folder already there.

    A folder already at ``final`` is first renamed aside (hidden), so at every moment ``final`` is
    either the old complete folder, absent, or the new complete folder.
    """
    staged, final = Path(staged), Path(final)
    _fsync_tree(staged)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old{PARTIAL_SUFFIX}")
        remove_tree(old)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_files(staged: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Move every file of the folder ``staged`` into ``dest`` (same relative paths), each atomically.

    For outputs that share ``dest`` with other files (the run's output folder holds the
    checkpoints too), so the folder itself cannot be swapped. ``staged`` is removed afterwards.
    """
    staged, dest = Path(staged), Path(dest)
    moved = []
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        _fsync(path)
        target = dest / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    _fsync(dest)
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
