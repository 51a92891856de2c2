"""LLaVA on Mistral: ``LlavaMistralConfig`` (model_type ``llava_mistral``) and its models, registered with the Auto classes."""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM, MistralModel

from ..llava_arch import LlavaCausalLMMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaMistralConfig(MistralConfig):
    """A Mistral config that also carries LLaVA's vision fields."""

    model_type = "llava_mistral"


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    """Mistral decoder plus LLaVA's vision tower, projector and ``image_newline``."""

    config_class = LlavaMistralConfig

    def __init__(self, config: MistralConfig) -> None:
        super().__init__(config)


class LlavaMistralForCausalLM(LlavaCausalLMMixin, MistralForCausalLM, LlavaMetaForCausalLM):
    """Mistral causal LM that takes ``images`` (and ``image_sizes`` for anyres) in ``forward`` and ``generate``."""

    config_class = LlavaMistralConfig
    _keys_to_ignore_on_load_unexpected = [r"model\.vision_tower\.vision_tower\."]

    def __init__(self, config: MistralConfig) -> None:
        # Skip MistralForCausalLM.__init__, which would build a plain MistralModel.
        super(MistralForCausalLM, self).__init__(config)
        self.model = LlavaMistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaMistralModel:
        return self.model


AutoConfig.register("llava_mistral", LlavaMistralConfig)
AutoModelForCausalLM.register(LlavaMistralConfig, LlavaMistralForCausalLM)
