"""LLaVA models. The classes load on first use, so importing a submodule (e.g. the vision encoder) stays light.

``from llava.model import LlavaLlamaForCausalLM`` works as upstream; importing a model class also
registers its config with transformers' Auto classes.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LlavaConfig": ".language_model.llava_llama",
    "LlavaLlamaModel": ".language_model.llava_llama",
    "LlavaLlamaForCausalLM": ".language_model.llava_llama",
    "LlavaMistralConfig": ".language_model.llava_mistral",
    "LlavaMistralModel": ".language_model.llava_mistral",
    "LlavaMistralForCausalLM": ".language_model.llava_mistral",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
