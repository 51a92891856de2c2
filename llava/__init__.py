"""LLaVA fork with ToConv token compression; API-compatible with upstream LLaVA 1.2.x.

``from llava import LlavaLlamaForCausalLM`` works as upstream; the model classes load on first use.
"""

from __future__ import annotations

_MODEL_EXPORTS = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")

__all__ = list(_MODEL_EXPORTS)


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
