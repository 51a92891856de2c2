"""LLaVA with ToConv compression as a native Hugging Face transformers model (``model_type: toconv_llava``).

``toconv_llava_next`` is LLaVA-1.6 (anyres) with the compressor on every tile. Importing this package
registers the classes with transformers' Auto classes, so a checkpoint written
by ``toconv-convert-to-hf`` loads like any llava-hf model, without ``trust_remote_code``::

    import llava.hf  # noqa: F401  (registers toconv_llava and toconv_llava_next)
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
from .configuration_next import NEXT_MODEL_TYPE, ToConvLlavaNextConfig
from .layout import hub_state_dict, weight_renamings
from .modeling import ToConvLlavaForConditionalGeneration, ToConvLlavaModel, ToConvLlavaMultiModalProjector
from .modeling_next import (
    ToConvLlavaNextForConditionalGeneration,
    ToConvLlavaNextModel,
    ToConvLlavaNextMultiModalProjector,
)
from .processing import ToConvLlavaProcessor
from .processing_next import ToConvLlavaNextProcessor

__all__ = [
    "MODEL_TYPE",
    "NEXT_MODEL_TYPE",
    "ToConvLlavaConfig",
    "ToConvLlavaForConditionalGeneration",
    "ToConvLlavaModel",
    "ToConvLlavaMultiModalProjector",
    "ToConvLlavaNextConfig",
    "ToConvLlavaNextForConditionalGeneration",
    "ToConvLlavaNextModel",
    "ToConvLlavaNextMultiModalProjector",
    "ToConvLlavaNextProcessor",
    "ToConvLlavaProcessor",
    "hub_state_dict",
]


_CLASSES = (  # model_type, config, base model, model with LM head, processor
    (MODEL_TYPE, ToConvLlavaConfig, ToConvLlavaModel, ToConvLlavaForConditionalGeneration, ToConvLlavaProcessor),
    (NEXT_MODEL_TYPE, ToConvLlavaNextConfig, ToConvLlavaNextModel, ToConvLlavaNextForConditionalGeneration,
     ToConvLlavaNextProcessor),
)


def _register() -> None:
    for model_type, config, model, generation_model, processor in _CLASSES:
        AutoConfig.register(model_type, config, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoModelForImageTextToText.register(config, generation_model, exist_ok=True)
        AutoProcessor.register(config, processor, exist_ok=True)
        # The Hub layout on disk (llava-hf's names, token_compressor.*) → transformers 5's module names.
        register_checkpoint_conversion_mapping(model_type, weight_renamings(), overwrite=True)


_register()
