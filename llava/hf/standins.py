"""A tiny random llava-hf-format LLaVA-1.5, for tests and demos of the llava-hf path of ``toconv-convert-to-hf``.

It has the structure of ``llava-hf/llava-1.5-7b-hf`` (``LlavaForConditionalGeneration``, ``<image>`` in the
tokenizer, ``LlavaProcessor``, weights in the Hub's key layout), shrunk: the CLIP stand-in of
``llava.standins.build_tiny_clip`` and a 2-layer Llama. Outputs are meaningless; shapes are real.
"""

from __future__ import annotations

import os
from pathlib import Path

# llava-1.5-7b-hf's chat template (its generation markers left out): no system prompt, images first.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_llava_hf(
    out_dir: str | os.PathLike,
    vision_tower_path: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Build and save a random tiny llava-hf LLaVA whose CLIP tower is ``vision_tower_path``'s; returns ``out_dir``."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from ..model.multimodal_encoder.clip_encoder import CLIPImageProcessor
    from ..standins import BOS_ID, EOS_ID, build_tokenizer
    from .layout import hub_state_dict
    from .vocab import add_image_token, vocab_rows
    from .writer import write_weights

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(out_dir))
    image_token_id = add_image_token(tokenizer)
    text_config = LlamaConfig(
        vocab_size=vocab_rows(len(tokenizer), 0), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(vision_tower_path), text_config=text_config,
        image_token_index=image_token_id, architectures=["LlavaForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(vision_tower_path).state_dict())
    config.save_pretrained(out_dir)
    write_weights(hub_state_dict(model.state_dict()), out_dir)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(vision_tower_path), tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_HF_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)  # preprocessor_config.json, as the Hub's llava-hf repos have
    return out_dir
