"""vLLM plugin: serve LLaVA checkpoints with ToConv token compression on an unpatched vLLM.

Installing this project registers :func:`register` under vLLM's ``vllm.general_plugins`` entry
point (``pyproject.toml``), which vLLM calls in every process it starts (API server, engine core,
workers) before it reads a model's config. After that, ``vllm serve PATH`` and ``vllm.LLM(PATH)``
load a checkpoint converted by ``toconv-convert-to-hf`` like any other vLLM model: LLaVA-1.5
(``model_type: toconv_llava``, ``architectures: [ToConvLlavaForConditionalGeneration]``) or LLaVA-1.6
(``toconv_llava_next``, ``[ToConvLlavaNextForConditionalGeneration]``).

What :func:`register` does:

- imports ``llava.hf``, which registers the ``toconv_llava`` / ``toconv_llava_next`` configs and processors with
  transformers' Auto classes, so vLLM's ``AutoConfig`` / ``AutoProcessor`` calls resolve without
  ``trust_remote_code`` (the config checks its grid sizes against the vision tower as it loads);
- adds both architectures to vLLM's ``ModelRegistry`` in their lazy string form: vLLM imports
  ``llava.vllm_plugin.model`` / ``model_next`` (and with it vLLM's model code) only when such a
  model is loaded.

Nothing in vLLM is patched. The model (``model.py``) is vLLM's own LLaVA with the compressor between
CLIP's selected features and the projector; the processing info (``processing.py``) counts the
compressed placeholders, so prompts, memory profiling and the scheduler's encoder budget all see
out² tokens per image. LLaVA-1.6 (``model_next.py``, ``processing_next.py``) is vLLM's LLaVA-NeXT
with the compressor on every tile, packing and counting on the compressed grid
(``llava.hf.anyres.anyres_token_count`` tokens for an image of any size).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "ToConvLlavaForConditionalGeneration"
MODEL_CLASS = f"{__name__}.model:{ARCHITECTURE}"
NEXT_ARCHITECTURE = "ToConvLlavaNextForConditionalGeneration"
NEXT_MODEL_CLASS = f"{__name__}.model_next:{NEXT_ARCHITECTURE}"
# architecture name in config.json → vLLM's lazy "module:class" form
MODELS = {ARCHITECTURE: MODEL_CLASS, NEXT_ARCHITECTURE: NEXT_MODEL_CLASS}

__all__ = ["ARCHITECTURE", "MODELS", "MODEL_CLASS", "NEXT_ARCHITECTURE", "NEXT_MODEL_CLASS", "register"]


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point; safe to call more than once, in any process."""
    from vllm import ModelRegistry

    import llava.hf  # noqa: F401  (registers toconv_llava with transformers' Auto classes)

    supported = ModelRegistry.get_supported_archs()
    for architecture, model_class in MODELS.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, model_class)
            logger.debug("Registered %s with vLLM's ModelRegistry as %s", architecture, model_class)
