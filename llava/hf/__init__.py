"""LLaVA with ToConv compression as a native Hugging Face transformers model (``model_type: toconv_llava``).

Importing this package registers the classes with transformers' Auto classes, so a checkpoint written
by ``toconv-convert-to-hf`` loads like any llava-hf model, without ``trust_remote_code``::

    import llava.hf  # noqa: F401  (registers toconv_llava)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained("llava-v1.5-7b-toconv12-hf")
    processor = AutoProcessor.from_pretrained("llava-v1.5-7b-toconv12-hf")

``import llava`` does not import this package (it would add transformers' LLaVA modules and torch to
every ``llava.*`` import); a converted checkpoint loaded with ``trust_remote_code=True`` imports it
through the stub the converter puts beside the weights.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

from .configuration import MODEL_TYPE, ToConvLlavaConfig
from .layout import hub_state_dict, weight_renamings
from .modeling import ToConvLlavaForConditionalGeneration, ToConvLlavaModel, ToConvLlavaMultiModalProjector
from .processing import ToConvLlavaProcessor

__all__ = [
    "MODEL_TYPE",
    "ToConvLlavaConfig",
    "ToConvLlavaForConditionalGeneration",
    "ToConvLlavaModel",
    "ToConvLlavaMultiModalProjector",
    "ToConvLlavaProcessor",
    "hub_state_dict",
]


def _register() -> None:
    AutoConfig.register(MODEL_TYPE, ToConvLlavaConfig, exist_ok=True)
    AutoModel.register(ToConvLlavaConfig, ToConvLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(ToConvLlavaConfig, ToConvLlavaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(ToConvLlavaConfig, ToConvLlavaProcessor, exist_ok=True)
    # The Hub layout on disk (llava-hf's names, token_compressor.*) → transformers 5's module names.
    register_checkpoint_conversion_mapping(MODEL_TYPE, weight_renamings(), overwrite=True)


_register()
