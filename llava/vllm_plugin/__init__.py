"""vLLM plugin: serve LLaVA checkpoints with ToConv token compression on an unpatched vLLM.

Installing this project registers :func:`register` under vLLM's ``vllm.general_plugins`` entry
point (``pyproject.toml``), which vLLM calls in every process it starts (API server, engine core,
workers) before it reads a model's config. After that, ``vllm serve PATH`` and ``vllm.LLM(PATH)``
load a checkpoint converted by ``toconv-convert-to-hf`` (``model_type: toconv_llava``,
``architectures: [ToConvLlavaForConditionalGeneration]``) like any other vLLM model.

What :func:`register` does:

- imports ``llava.hf``, which registers the ``toconv_llava`` config and processor with
  transformers' Auto classes, so vLLM's ``AutoConfig`` / ``AutoProcessor`` calls resolve without
  ``trust_remote_code`` (the config checks its grid sizes against the vision tower as it loads);
- adds ``ToConvLlavaForConditionalGeneration`` to vLLM's ``ModelRegistry`` in its lazy string
  form: vLLM imports ``llava.vllm_plugin.model`` (and with it vLLM's model code) only when such a
  model is loaded.

Nothing in vLLM is patched. The model (``model.py``) is vLLM's own LLaVA with the compressor between
CLIP's selected features and the projector; the processing info (``processing.py``) counts the
compressed placeholders, so prompts, memory profiling and the scheduler's encoder budget all see
out² tokens per image.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "ToConvLlavaForConditionalGeneration"
MODEL_CLASS = f"{__name__}.model:{ARCHITECTURE}"

__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point; safe to call more than once, in any process."""
    from vllm import ModelRegistry

    import llava.hf  # noqa: F401  (registers toconv_llava with transformers' Auto classes)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
        logger.debug("Registered %s with vLLM's ModelRegistry as %s", ARCHITECTURE, MODEL_CLASS)
