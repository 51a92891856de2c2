"""Tiny random llava-hf-format LLaVA-1.5 and LLaVA-NeXT, for tests and demos of the llava-hf path of ``toconv-convert-to-hf``.

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


def _tiny_text_config(tokenizer, hidden_size: int, num_hidden_layers: int):
    from transformers import LlamaConfig

    from ..standins import BOS_ID, EOS_ID
    from .vocab import vocab_rows

    return LlamaConfig(
        vocab_size=vocab_rows(len(tokenizer), 0), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=tokenizer.pad_token_id,
    )


def _save_hf_checkpoint(out_dir: Path, config, model_class, processor, seed: int, vision_tower_path) -> object:
    """A random ``model_class`` with the stand-in CLIP's weights, saved beside ``config`` and ``processor``."""
    import torch
    from transformers import CLIPVisionModel

    from .layout import hub_state_dict
    from .writer import write_weights

    torch.manual_seed(seed)
    model = model_class(config)
    model.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(vision_tower_path).state_dict())
    config.save_pretrained(out_dir)
    write_weights(hub_state_dict(model.state_dict()), out_dir)
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)  # preprocessor_config.json, as the Hub's llava-hf repos have
    return model


def build_tiny_llava_hf(
    out_dir: str | os.PathLike,
    vision_tower_path: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Build and save a random tiny llava-hf LLaVA whose CLIP tower is ``vision_tower_path``'s; returns ``out_dir``."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from ..model.multimodal_encoder.clip_encoder import CLIPImageProcessor
    from ..standins import build_tokenizer
    from .vocab import add_image_token

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(out_dir))
    image_token_id = add_image_token(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(vision_tower_path),
        text_config=_tiny_text_config(tokenizer, hidden_size, num_hidden_layers),
        image_token_index=image_token_id, architectures=["LlavaForConditionalGeneration"],
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(vision_tower_path), tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_HF_CHAT_TEMPLATE,
    )
    _save_hf_checkpoint(out_dir, config, LlavaForConditionalGeneration, processor, seed, vision_tower_path)
    return out_dir


def build_tiny_llava_next_hf(
    out_dir: str | os.PathLike,
    vision_tower_path: str | os.PathLike,
    *,
    image_grid_pinpoints: list[list[int]] | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    seed: int = 0,
):
    """A random tiny llava-hf LLaVA-NeXT (the layout of ``llava-hf/llava-v1.6-vicuna-7b-hf``); returns the model.

    ``image_grid_pinpoints``: [height, width] pairs; default LLaVA-1.6's five. Saved to ``out_dir``.
    """
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )

    from ..model.multimodal_encoder.clip_encoder import CLIPImageProcessor
    from ..standins import build_tokenizer
    from .convert import next_image_processor
    from .vocab import add_image_token

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(out_dir))
    image_token_id = add_image_token(tokenizer)
    pinpoints = image_grid_pinpoints or [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig.from_pretrained(vision_tower_path),
        text_config=_tiny_text_config(tokenizer, hidden_size, num_hidden_layers), image_token_index=image_token_id,
        image_grid_pinpoints=pinpoints, architectures=["LlavaNextForConditionalGeneration"],
    )
    processor = LlavaNextProcessor(
        image_processor=next_image_processor(CLIPImageProcessor.from_pretrained(vision_tower_path), pinpoints),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_HF_CHAT_TEMPLATE,
    )
    return _save_hf_checkpoint(out_dir, config, LlavaNextForConditionalGeneration, processor, seed, vision_tower_path)
