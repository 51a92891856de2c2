"""A LLaVA checkpoint with ToConv token compression (model_type ``toconv_llava`` or ``toconv_llava_next``).

Its classes come with the ``toconv-llava`` package, not with transformers::

    pip install toconv-llava

then, before ``from_pretrained``::

    import llava.hf  # registers toconv_llava with transformers' Auto classes; no trust_remote_code needed

This file is copied into every converted checkpoint (as ``toconv_llava_loader.py``) and named by
``auto_map`` in its config, so that transformers without ``llava.hf`` says "custom code" instead of
"unknown model type, upgrade transformers", and ``trust_remote_code=True`` finds these instructions
(or, with the package installed, the classes themselves). It holds no model code.
"""

try:
    from llava.hf import (  # noqa: F401
        ToConvLlavaConfig,
        ToConvLlavaForConditionalGeneration,
        ToConvLlavaModel,
        ToConvLlavaNextConfig,
        ToConvLlavaNextForConditionalGeneration,
        ToConvLlavaNextModel,
        ToConvLlavaNextProcessor,
        ToConvLlavaProcessor,
    )
except ImportError as err:
    raise ImportError(
        "This checkpoint is a LLaVA model with ToConv token compression (model_type 'toconv_llava' or 'toconv_llava_next'); its classes "
        "come with the toconv-llava package. Install it (pip install toconv-llava), then `import llava.hf` before "
        "from_pretrained (no trust_remote_code needed)."
    ) from err
