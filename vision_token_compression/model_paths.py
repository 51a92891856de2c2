"""Where a model is: a local folder or a Hugging Face Hub repo id, and the "not found" error that names it.

A path that exists neither locally nor as a possible Hub repo id (``/models/clip``, ``./clip``,
``~/clip``) is refused without any network access, as "not found", rather than with huggingface_hub's
"Repo id must be in the form ..." message; a name of the Hub's form that cannot be loaded is "not
found" too, with the Hub's reason. Every host (LLaVA's towers and loader, the converters, the
compressor trainer) reads model configs through ``load_pretrained_config``.
"""

from __future__ import annotations

import os
import re

from .checkpoint_files import read_json_object

# A Hugging Face Hub repo id: "name" or "namespace/name", each part of letters, digits, "-", "_", ".",
# not starting or ending with "-" or ".", without "--" or "..".
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?/)?[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?$")
CONFIG_NAME = "config.json"


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repo id (it may still not exist)."""
    return len(name) <= 96 * 2 + 1 and bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name


def not_found_error(name: str | os.PathLike, what: str, fix: str, cause: BaseException | None = None) -> FileNotFoundError:
    """The error for a model path that is neither a local file or folder nor a loadable Hub repo.

    ``what`` names the setting ("Vision tower", "Model path"); ``fix`` says what to pass instead.
    """
    name = os.fspath(name)
    where = os.path.abspath(os.path.expanduser(name))
    detail = f"there is no local file or folder {where}"
    if name.startswith("~") and os.path.exists(where):
        detail = f"'~' is not expanded here: pass {where}"
    elif not is_repo_id(name):
        detail += ", and it is not a Hugging Face Hub repo id (namespace/name) either"
    elif cause is not None:
        detail += f", and loading it as a Hugging Face Hub repo failed: {str(cause).strip().splitlines()[0]}"
    return FileNotFoundError(f"{what} {name!r} not found: {detail}. {fix}")


def require_pretrained(name: str | os.PathLike, what: str, fix: str) -> None:
    """Refuse, without any network access, a path that exists neither locally nor as a possible Hub repo id."""
    path = os.fspath(name)
    if not os.path.exists(path) and not is_repo_id(path):
        raise not_found_error(path, what, fix)


def load_pretrained_config(config_class: type, name: str | os.PathLike, what: str, fix: str, **kwargs):
    """``config_class.from_pretrained(name, **kwargs)``, with errors that name ``name`` and ``fix``.

    Not found (locally, or on the Hub for a repo id) is a ``FileNotFoundError`` saying "not found";
    a local folder whose config.json is missing, empty or not JSON is refused naming that file.
    """
    name = os.fspath(name)
    require_pretrained(name, what, fix)
    if os.path.isdir(name):
        path = os.path.join(name, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {name!r} has no {CONFIG_NAME}: it is not a model folder. {fix}")
        read_json_object(path, fix)  # names the file when it is empty, truncated or not JSON
    try:
        return config_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.exists(name):
            raise
        raise not_found_error(name, what, fix, err) from err
