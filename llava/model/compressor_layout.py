"""Where each of LLaVA's weight layouts keeps the token compressor's tensors: the one table every host reads.

The compressor's own names are ``conv.weight``, ``conv.bias`` and its grid-size record
``grid_sizes`` (``vision_token_compression.GRID_SIZES_KEY``); each layout puts them under one prefix:

===================  ==================================================  ======================================
layout               prefix                                              written by
===================  ==================================================  ======================================
``FORK``             ``model.vision_tower.token_compressor.``            this fork's models (``save_pretrained``,
                                                                         ``toconv-compress-llava``)
``MM_PROJECTOR``     ``model.vision_tower.token_compressor.``            stage 1's ``mm_projector.bin``
``NON_LORA``         ``base_model.model.model.vision_tower.``            LoRA's ``non_lora_trainables.bin``
                     ``token_compressor.``                               (names of the peft-wrapped model)
``HF_HUB``           ``token_compressor.``                               ``toconv-convert-to-hf`` (on disk)
``HF_MODULE``        ``model.multi_modal_projector.token_compressor.``   ``llava.hf``'s modules (transformers 5)
``VLLM``             ``token_compressor.``                               the vLLM plugin's model
===================  ==================================================  ======================================

Some layouts read other prefixes too (``aliases``): vLLM reads the folders transformers 5's
``save_pretrained`` writes, ``mm_projector.bin`` the one a peft-wrapped model would write. Checking
the tensors is the library's (``vision_token_compression.load_compressor_tensors``); this module
only says where they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# The attribute every host gives its compressor (the tower's, the projector's, the vLLM model's).
COMPRESSOR_ATTRIBUTE = "token_compressor"
_MARKER = f"{COMPRESSOR_ATTRIBUTE}."


@dataclass(frozen=True)
class CompressorLayout:
    """One layout: the prefix it writes the compressor's tensors under, and any others it reads."""

    name: str
    prefix: str
    aliases: tuple[str, ...] = ()

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Every prefix this layout reads, the one it writes first."""
        return (self.prefix, *self.aliases)

    def key(self, name: str) -> str:
        """``conv.weight`` → this layout's full key, e.g. ``model.vision_tower.token_compressor.conv.weight``."""
        return self.prefix + name

    def owns(self, key: str) -> bool:
        """Whether ``key`` names one of the compressor's tensors in this layout."""
        return key.startswith(self.prefixes)

    def compressor_name(self, key: str) -> str | None:
        """The compressor's own name of ``key`` (``conv.weight``), or None when ``key`` is not the compressor's."""
        prefix = next((p for p in self.prefixes if key.startswith(p)), None)
        return None if prefix is None else key[len(prefix):]

    def split(self, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(compressor's tensors under its own names, everything else as it is)``."""
        compressor, rest = {}, {}
        for key, tensor in state.items():
            name = self.compressor_name(key)
            if name is None:
                rest[key] = tensor
            else:
                compressor[name] = tensor
        return compressor, rest

    def extract(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compressor's tensors of ``state``, under its own names (``conv.weight``, ``grid_sizes``)."""
        return self.split(state)[0]

    def place(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compressor's ``tensors`` (its own names) under this layout's prefix."""
        return {self.prefix + name: tensor for name, tensor in tensors.items()}

    def keys_in(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` that are the compressor's in this layout."""
        return [key for key in keys if self.owns(key)]


FORK = CompressorLayout("fork", f"model.vision_tower.{_MARKER}")
MM_PROJECTOR = CompressorLayout("mm_projector.bin", FORK.prefix, aliases=(f"base_model.model.{FORK.prefix}",))
NON_LORA = CompressorLayout("non_lora_trainables.bin", f"base_model.model.{FORK.prefix}")
HF_HUB = CompressorLayout("hf-hub", _MARKER)
HF_MODULE = CompressorLayout("hf-module", f"model.multi_modal_projector.{_MARKER}")
VLLM = CompressorLayout("vllm", _MARKER, aliases=(f"multi_modal_projector.{_MARKER}", HF_MODULE.prefix))

LAYOUTS = {layout.name: layout for layout in (FORK, MM_PROJECTOR, NON_LORA, HF_HUB, HF_MODULE, VLLM)}


def is_compressor_key(key: str) -> bool:
    """Whether ``key`` names a compressor tensor in any layout (``...token_compressor.conv.weight``)."""
    return _MARKER in key


def module_prefix(key: str) -> str:
    """Everything up to and including ``token_compressor.`` in ``key``: the prefix of a compressor found by name."""
    return key[: key.index(_MARKER) + len(_MARKER)]
