"""Files and folders that appear complete or not at all: written beside the target, flushed, then renamed.

A process killed while it writes (SIGKILL, out of memory, preemption) leaves at most a hidden
temporary beside the target (``.<name>.<random>.tmp`` for files), never a truncated target. Data is
flushed to disk (fsync) before the rename, and the rename itself after it, so a rename never
publishes bytes that are still only in the page cache.

The one home of this pattern: compressor checkpoints, the trainer's outputs and checkpoint folders,
and LLaVA's training outputs (through ``llava.train.atomic``) all go through these functions.

A tool that writes a whole new folder the user named (the checkpoint converters) stages it with
``make_staging_folder``: a hidden ``.<name>.<random>.partial`` beside it, holding a marker that names
the tool, its process and host, so that ``remove_stale_staging`` removes exactly the folders a killed
run of a tool left there, never a folder someone else made. ``publish_new_folder`` then renames it
into place only where nothing is: a folder or file that appeared at the target meanwhile is kept.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
# atomic_write's temporaries: "." + the target's name + "." + mkstemp's 8 random characters + ".tmp".
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
PARTIAL_SUFFIX = ".partial"
# The marker a staging folder holds while a tool fills it: {"tool", "output", "pid", "host"}.
STAGING_MARKER = ".toconv-staging.json"


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


def remove_stale_temporaries(folder: str | os.PathLike, targets: Iterable[str]) -> list[Path]:
    """Delete the temporaries ``atomic_write`` left in ``folder`` for files named like ``targets`` (fnmatch patterns).

    What a run killed while writing leaves (``.<name>.<random>.tmp``); only the temporaries of the
    given targets go, so a user's own hidden files stay. Each removal is logged. Call it when the
    writer starts, before it writes again. Returns the files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    targets = list(targets)
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and any(fnmatch.fnmatchcase(match["target"], t) for t in targets):
            path.unlink(missing_ok=True)
            logger.warning("Removed %s, a temporary file a killed run left while writing %s.", path, match["target"])
            removed.append(path)
    return removed


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


# ---- new folders a tool stages beside their final name ---------------------------------------------


def make_staging_folder(final: str | os.PathLike, tool: str) -> Path:
    """A new hidden folder ``.<name>.<random>.partial`` beside ``final``, marked as ``tool``'s (this process, this host).

    Fill it, then ``publish_new_folder`` it. The marker lets a later run recognise it if this one is
    killed (``remove_stale_staging``); permissions are those of any new folder (the umask's).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=PARTIAL_SUFFIX, dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())
    marker = {"tool": tool, "output": final.name, "pid": os.getpid(), "host": socket.gethostname()}
    (staging / STAGING_MARKER).write_text(json.dumps(marker) + "\n")
    return staging


def _staging_marker(folder: Path, final_name: str) -> dict | None:
    """The marker of a staging folder made for ``final_name``, or None when ``folder`` is not one."""
    try:
        marker = json.loads((folder / STAGING_MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and marker.get("output") == final_name and isinstance(marker.get("pid"), int)
    return marker if ok else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def remove_stale_staging(final: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of ``final`` that a killed run left (``make_staging_folder``'s, and only those).

    A folder is removed when its marker names ``final`` and a process of this host that no longer
    runs; each removal is logged with its size. One whose process still runs, or that another host
    made, is left and logged; hidden folders without the marker are not a tool's and are not touched.
    Returns the folders removed.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    host = socket.gethostname()
    prefix = f".{final.name}."  # compared as text: a name may hold glob characters ("run[1]")
    for folder in sorted(final.parent.iterdir()):
        if not (folder.name.startswith(prefix) and folder.name.endswith(PARTIAL_SUFFIX)):
            continue
        marker = _staging_marker(folder, final.name) if folder.is_dir() and not folder.is_symlink() else None
        if marker is None:
            continue
        tool = marker.get("tool", "a tool")
        if marker.get("host") != host or _process_alive(marker["pid"]):
            where = "still runs" if marker.get("host") == host else f"ran on {marker.get('host')}"
            logger.warning("Leaving %s: %s (process %s, which %s) may still be writing it; remove it yourself if not.",
                           folder, tool, marker["pid"], where)
            continue
        size = _size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("Removed %s (%.1f MB), the unfinished output of a killed %s run (process %s) for %s.",
                       folder, size / 1e6, tool, marker["pid"], final)
        removed.append(folder)
    return removed


def publish_new_folder(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the complete staging folder ``staged`` to ``final``, where there is nothing, or an empty folder.

    Every file is flushed first. The rename replaces at most an empty folder (``rename(2)`` refuses a
    non-empty one), so whatever appeared at ``final`` while the tool ran stays as it is: then
    ``FileExistsError`` names it, and ``staged`` is removed. The marker goes last, after the rename.
    """
    staged, final = Path(staged), Path(final)
    for path in staged.rglob("*"):
        if not path.is_symlink():
            _fsync(path)
    _fsync(staged)
    try:
        os.rename(staged, final)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        shutil.rmtree(staged, ignore_errors=True)
        what = "a folder with files in it" if final.is_dir() else "a file"
        raise FileExistsError(
            f"{final} appeared while the output was being written ({what} now): it was left as it is and nothing "
            f"was written there. Pass a new output folder, or remove {final} and run again."
        ) from err
    (final / STAGING_MARKER).unlink(missing_ok=True)
    _fsync(final)
    _fsync(final.parent)
