"""The web demo's optional dependencies, imported with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

SERVE_EXTRA = "pip install 'toconv-llava[serve]'  (or: pip install -e '.[serve]' in a checkout)"


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``; an ``ImportError`` naming the serve extra when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{feature} needs {module!r}, which is not installed: {SERVE_EXTRA}. ({err})") from err
