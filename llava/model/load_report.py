"""Transformers' LOAD REPORT, quiet where the only weights it lists are a compressor meant to start from its init.

Switching compression on at load (``load_pretrained_model(..., use_token_compression=True)``) adds a
compressor that the checkpoint cannot hold; the loader gives it the window-average init and says so
in its own log line. Transformers would also print a LOAD REPORT calling those weights "MISSING ...
newly initialized ... consider training", which is alarming and, for the average init, untrue. The
filter drops exactly that report: one whose every row is a compressor weight. A report that lists
anything else (a decoder weight, an unexpected key, a size mismatch) is kept whole.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

from .compressor_layout import FORK

# The logger transformers' from_pretrained reports through (transformers.utils.loading_report).
_TRANSFORMERS_LOADER = "transformers.modeling_utils"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _report_keys(message: str) -> list[str]:
    """The first column of a LOAD REPORT's table rows (header and rule lines skipped, colours removed)."""
    keys = []
    for line in message.splitlines():
        if "|" not in line:
            continue
        key = _ANSI.sub("", line.split("|", 1)[0]).strip()
        if key and key != "Key" and not set(key) <= {"-", "+"}:
            keys.append(key)
    return keys


class _CompressorOnlyReport(logging.Filter):
    """Drops a LOAD REPORT whose rows are all the compressor's weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        keys = _report_keys(message)
        return not keys or not all(FORK.owns(key) for key in keys)


@contextlib.contextmanager
def quiet_compressor_report(active: bool = True) -> Iterator[None]:
    """While active, transformers' LOAD REPORT is dropped when it lists only compressor weights."""
    if not active:
        yield
        return
    loader, report_filter = logging.getLogger(_TRANSFORMERS_LOADER), _CompressorOnlyReport()
    loader.addFilter(report_filter)
    try:
        yield
    finally:
        loader.removeFilter(report_filter)
