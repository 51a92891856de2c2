"""Files and folders that appear complete or not at all: written beside the target, flushed, then renamed.

A process killed while it writes (SIGKILL, out of memory, preemption) leaves at most a hidden
temporary beside the target (``.<name>.<random>.tmp`` for files), never a truncated target. Data is
flushed to disk (fsync) before the rename, and the rename itself after it, so a rename never
publishes bytes that are still only in the page cache.

The one home of this pattern: compressor checkpoints, the trainer's outputs and checkpoint folders,
and LLaVA's training outputs (through ``llava.train.atomic``) all go through these functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


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


def publish_file(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the complete file ``staged`` to ``final`` (same file system), replacing what was there.

    ``staged`` is flushed to disk first and the folder entry after, so ``final`` is at every moment
    the old file, absent, or the complete new one.
    """
    staged, final = Path(staged), Path(final)
    _fsync(staged)
    os.replace(staged, final)
    _fsync(final.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without error, it becomes ``path``.

    On an error the temporary is removed and ``path`` keeps what it held before (or stays absent).
    The file gets the permissions of any new file (the umask's), not the temporary's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        publish_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def publish_folder(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the complete folder ``staged`` to ``final``, replacing a folder already there.

    Every file in ``staged`` is flushed first. A folder already at ``final`` is renamed aside to a
    hidden ``.<name>.old.partial`` and deleted afterwards, so at every moment ``final`` is the old
    complete folder, absent, or the new complete folder.
    """
    staged, final = Path(staged), Path(final)
    for path in staged.rglob("*"):
        if not path.is_symlink():
            _fsync(path)
    _fsync(staged)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old.partial")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
