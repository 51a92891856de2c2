"""Compression settings: the fields any host reads, their defaults, and the one check of them.

A host (a vision tower, a model loader, a command line, a converter) hands its raw values to
``CompressionSettings.check`` (or ``from_args`` / ``from_config``) and gets them back checked, with the
defaults filled in. The rule for the switch: compression off means off. Valid sizes or a compressor
path given while it is off are ignored and listed in ``ignored`` (the host logs them once with
``warn_ignored``), so flipping ``use_token_compression`` alone switches compression without other
edits; invalid values (wrong type, out of range, a boolean that is not one) are errors either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_USE_TOKEN_COMPRESSION = False
DEFAULT_COMPRESSION_OUTPUT_SIZE = 12  # 144 tokens from CLIP ViT-L/14-336's 24×24 grid

_TRUE_STRINGS = ("true", "1", "yes")
_FALSE_STRINGS = ("false", "0", "no")


def parse_bool_setting(value: Any, name: str) -> bool:
    """A bool setting, also when a hand-edited config or YAML file gives it as a string.

    ``None`` (a missing field) is False; the unambiguous strings ``"true"``/``"false"``, ``"1"``/``"0"``,
    ``"yes"``/``"no"`` (any case) and the ints 1/0 are converted; anything else is a ``ValueError``,
    so ``"false"`` can never switch a feature on.
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS + _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    raise ValueError(
        f"{name}={value!r} is not a boolean: use true or false (the strings 'true'/'false', '1'/'0' and "
        f"'yes'/'no' are accepted too)."
    )


@dataclass(frozen=True)
class SettingNames:
    """How a host spells the settings in its messages (model args, function arguments, CLI flags)."""

    use_token_compression: str = "use_token_compression"
    input_size: str = "compression_input_size"
    output_size: str = "compression_output_size"
    checkpoint: str = "pretrain_token_compressor"
    switch_on: str = "set use_token_compression=True"


# The fields as model args and model configs spell them (the seed's three, plus the compressor path).
MODEL_ARG_NAMES = SettingNames()


def _check_grid_side(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(
            f"{name} must be an int (a grid side such as 12 or 8), got {value!r} ({type(value).__name__})."
        )


def _check_sizes(input_size: int | None, output_size: int | None, grid: int | None, tower: str,
                 names: SettingNames, where: str) -> None:
    """``input_size`` is the tower's ``grid`` (when both are known); ``1 <= output_size < input`` when given."""
    if input_size is not None and input_size < 2:
        raise ValueError(
            f"{where}{names.input_size}={input_size} is out of range: a patch grid side is at least 2 (24 for "
            f"CLIP ViT-L/14-336); leave it unset to take the tower's own grid."
        )
    if grid is not None and input_size is not None and input_size != grid:
        raise ValueError(
            f"{where}{names.input_size}={input_size} but {tower} produces a {grid}×{grid} patch grid. "
            f"Set {names.input_size}={grid} or leave it unset."
        )
    side = grid if grid is not None else input_size
    if output_size is not None and (output_size < 1 or (side is not None and output_size >= side)):
        allowed = f"1..{side - 1}" if side is not None else "at least 1"
        raise ValueError(
            f"{where}{names.output_size}={output_size} is out of range"
            f"{f' for a {side}×{side} input grid' if side is not None else ''}: use {allowed} "
            f"(12 gives 144 tokens from a 24×24 grid, 8 gives 64)."
        )


def _check_checkpoint(checkpoint: Any, enabled: bool, names: SettingNames, where: str) -> str | None:
    if not checkpoint:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(
            f"{where}{names.checkpoint} must be a path, got {checkpoint!r} ({type(checkpoint).__name__})."
        )
    checkpoint = os.fspath(checkpoint)
    if enabled and not os.path.isfile(checkpoint):  # unused while off, so not looked for then
        raise FileNotFoundError(
            f"{where}{names.checkpoint}={checkpoint!r} not found (no such file). Pass a token compressor "
            f"checkpoint (.safetensors, written by vision_token_compression's save_compressor or trainer)."
        )
    return checkpoint


@dataclass(frozen=True)
class CompressionSettings:
    """Checked compression settings.

    Attributes:
        enabled: Whether the tower compresses.
        input_size: The input grid side; None while off, or when left to the tower's own grid.
        output_size: The output grid side (``DEFAULT_COMPRESSION_OUTPUT_SIZE`` unless given); None while off.
        checkpoint: A compressor checkpoint to load; None while off.
        ignored: ``name=value`` of each valid setting that was given but is ignored because compression is off.
        where: Prefix of messages, naming where the settings came from.
        names: How the host spells the settings.
    """

    enabled: bool = False
    input_size: int | None = None
    output_size: int | None = None
    checkpoint: str | None = None
    ignored: tuple[str, ...] = ()
    where: str = ""
    names: SettingNames = MODEL_ARG_NAMES

    @classmethod
    def check(
        cls,
        use_token_compression: Any = DEFAULT_USE_TOKEN_COMPRESSION,
        input_size: Any = None,
        output_size: Any = None,
        checkpoint: Any = None,
        *,
        grid: int | None = None,
        tower: str = "the vision tower",
        names: SettingNames = MODEL_ARG_NAMES,
        where: str = "",
    ) -> CompressionSettings:
        """Check raw settings and fill in the defaults.

        Args:
            use_token_compression: A bool, or a string/int that ``parse_bool_setting`` accepts.
            input_size / output_size: Grid sides (ints; None = not given). ``1 <= output_size < input``,
                and ``input_size`` equals ``grid`` when that is known, whether compression is on or off.
            checkpoint: Path of a compressor checkpoint; with compression on it must be an existing file.
            grid: The tower's own patch grid side, when known; ``tower`` names it in messages.
            names: How the host spells the settings; ``where`` prefixes every message.

        Raises:
            ValueError: a value of the wrong type or out of range.
            FileNotFoundError: compression is on and the checkpoint does not exist.
        """
        enabled = parse_bool_setting(use_token_compression, f"{where}{names.use_token_compression}")
        _check_grid_side(input_size, f"{where}{names.input_size}")
        _check_grid_side(output_size, f"{where}{names.output_size}")
        if enabled and output_size is None:
            output_size = DEFAULT_COMPRESSION_OUTPUT_SIZE  # checked too: a 12×12 tower cannot take it
        _check_sizes(input_size, output_size, grid, tower, names, where)
        checkpoint = _check_checkpoint(checkpoint, enabled, names, where)
        if enabled:
            return cls(True, input_size, output_size, checkpoint, where=where, names=names)
        given = ((names.input_size, input_size), (names.output_size, output_size), (names.checkpoint, checkpoint))
        ignored = tuple(f"{name}={value!r}" for name, value in given if value is not None)
        return cls(False, ignored=ignored, where=where, names=names)

    @classmethod
    def from_args(cls, args: Any, *, checkpoint_field: str | None = "pretrain_token_compressor", **kwargs: Any
                  ) -> CompressionSettings:
        """Check the settings an args or config object carries (missing fields take their defaults).

        ``checkpoint_field`` names the compressor-path field (None: the object has none, e.g. a model
        config); ``where`` defaults to the object's class name; the other keywords are ``check``'s.
        """
        kwargs.setdefault("where", f"{type(args).__name__}: ")
        return cls.check(
            getattr(args, "use_token_compression", DEFAULT_USE_TOKEN_COMPRESSION),
            getattr(args, "compression_input_size", None), getattr(args, "compression_output_size", None),
            getattr(args, checkpoint_field, None) if checkpoint_field else None, **kwargs,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> CompressionSettings:
        """Check the settings of a config dict (a config.json), keywords as ``check``'s."""
        return cls.check(
            config.get("use_token_compression", DEFAULT_USE_TOKEN_COMPRESSION),
            config.get("compression_input_size"), config.get("compression_output_size"), **kwargs,
        )

    def warn_ignored(self, log: logging.Logger = logger) -> None:
        """Log one warning naming the settings that compression, being off, ignores (nothing if none)."""
        if not self.ignored:
            return
        one = len(self.ignored) == 1
        log.warning(
            "%s%s %s ignored: %s is off, so no compressor is built and the tower keeps its full token count. %s "
            "to compress, or remove %s to silence this warning.", self.where, ", ".join(self.ignored),
            "is" if one else "are", self.names.use_token_compression, self.names.switch_on[:1].upper() + self.names.switch_on[1:],
            "it" if one else "them",
        )

    def resolved(self, grid: int) -> CompressionSettings:
        """These settings for a tower whose grid side is ``grid`` (the input size filled in when on)."""
        if not self.enabled:
            return self
        return CompressionSettings(True, grid, self.output_size, self.checkpoint, where=self.where, names=self.names)

    def config_fields(self) -> dict[str, Any]:
        """The fields a model config records so that a saved checkpoint rebuilds the same tower (sizes None while off)."""
        return {
            "use_token_compression": self.enabled,
            "compression_input_size": self.input_size if self.enabled else None,
            "compression_output_size": self.output_size if self.enabled else None,
        }

    def write_config(self, config: Any) -> None:
        """Write ``config_fields`` into a config object or a config dict."""
        for name, value in self.config_fields().items():
            if isinstance(config, MutableMapping):
                config[name] = value
            else:
                setattr(config, name, value)
