"""The checkpoint key layout: the Hub's ``llava-hf`` names on disk, transformers 5's module names in memory.

``llava-hf/llava-1.5-7b-hf`` and vLLM's LLaVA loader name the weights as transformers 4 did
(``language_model.model.*``, ``vision_tower.vision_model.*``); transformers 5 modules are
``model.language_model.*``, ``model.vision_tower.*``. Converted checkpoints are written in the Hub
layout, plus ``token_compressor.*`` beside ``multi_modal_projector.*``, so that they load in both;
transformers 5 renames them on load through the mapping registered from ``HUB_TO_MODULE``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..model.compressor_layout import HF_HUB, HF_MODULE

# (Hub prefix, transformers 5 module prefix). transformers applies the renamings in this order on load
# and reversed on save: with the compressor's after the projector's, save_pretrained writes
# token_compressor.* (tested on 5.16 and 5.24). module_to_hub_key sorts by itself.
HUB_TO_MODULE = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    (HF_HUB.prefix, HF_MODULE.prefix),
    ("image_newline", "model.image_newline"),  # LLaVA-NeXT's row separator
)
# What transformers 5's save_pretrained writes for the same modules (loaded too).
SAVED_BY_TRANSFORMERS_5 = (("vision_tower.", "model.vision_tower."),)


def _swap_prefix(key: str, pairs, *, reverse: bool = False) -> str:
    for hub, module in pairs:
        old, new = (module, hub) if reverse else (hub, module)
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(key)


def module_to_hub_key(key: str) -> str:
    """``model.vision_tower.embeddings.patch_embedding.weight`` → ``vision_tower.vision_model.embeddings...``."""
    ordered = sorted(HUB_TO_MODULE, key=lambda pair: -len(pair[1]))  # the compressor before the projector
    try:
        return _swap_prefix(key, ordered, reverse=True)
    except KeyError:
        raise KeyError(f"{key!r} is not a parameter of a ToConv LLaVA model: no Hub name for it.") from None


def hub_to_module_key(key: str) -> str:
    """The inverse of ``module_to_hub_key``."""
    try:
        return _swap_prefix(key, HUB_TO_MODULE)
    except KeyError:
        raise KeyError(f"{key!r} is not a weight name of the llava-hf layout.") from None


def hub_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ToConv LLaVA model's state dict under the Hub's names, each tensor contiguous (safetensors needs it)."""
    return {module_to_hub_key(key): tensor.detach().contiguous() for key, tensor in state_dict.items()}


def weight_renamings():
    """transformers' ``WeightRenaming`` list that loads the Hub layout (and transformers 5's own) into the modules."""
    from transformers.core_model_loading import WeightRenaming

    pairs = [*HUB_TO_MODULE, *SAVED_BY_TRANSFORMERS_5]
    return [WeightRenaming(source_patterns=f"^{hub}", target_patterns=module) for hub, module in pairs]
