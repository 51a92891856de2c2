"""LLaVA on Llama / Vicuna: ``LlavaConfig`` (model_type ``llava_llama``) and its models, registered with the Auto classes."""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel

from ..llava_arch import LlavaCausalLMMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaConfig(LlamaConfig):
    """A Llama config that also carries LLaVA's vision fields (``mm_vision_tower``, compression, ...)."""

    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    """Llama decoder plus LLaVA's vision tower, projector and ``image_newline``."""

    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)


class LlavaLlamaForCausalLM(LlavaCausalLMMixin, LlamaForCausalLM, LlavaMetaForCausalLM):
    """Llama causal LM that takes ``images`` (and ``image_sizes`` for anyres) in ``forward`` and ``generate``."""

    config_class = LlavaConfig
    # Without unfreeze_mm_vision_tower the tower loads from mm_vision_tower, not from the checkpoint.
    _keys_to_ignore_on_load_unexpected = [r"model\.vision_tower\.vision_tower\."]

    def __init__(self, config: LlamaConfig) -> None:
        # Skip LlamaForCausalLM.__init__, which would build a plain LlamaModel.
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaLlamaModel:
        return self.model


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
