"""Reading a Hugging Face-format LLaVA checkpoint (``llava-hf/*``, model_type ``llava`` or ``llava_next``) for conversion.

transformers loads it (any of its weight layouts); the converter adds the compressor. Its processor,
tokenizer (which has ``<image>`` already) and chat template are kept; llava-hf's processor does not
pad images to squares, and neither does the converted one unless ``--image-aspect-ratio pad``.
"""

from __future__ import annotations

from pathlib import Path

from vision_token_compression import check_checkpoint_safetensors

from .anyres import check_pinpoints
from .source import SourceParts, read_config, refuse_siglip


def _check_config(config, folder: Path) -> None:
    if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"{folder}: vision_feature_select_strategy={config.vision_feature_select_strategy!r} with "
            f"vision_feature_layer={config.vision_feature_layer!r} cannot be converted: the compressor takes the "
            f"patch tokens of one layer ('default' strategy, an int layer)."
        )
    vision = config.vision_config
    refuse_siglip(str(getattr(vision, "model_type", "")), f"{folder}'s vision_config")
    if vision.image_size % vision.patch_size:
        raise ValueError(
            f"{folder}: the vision tower's image_size {vision.image_size} is not a multiple of its patch_size "
            f"{vision.patch_size}, so its patches form no square grid to compress."
        )


def _classes(folder: Path) -> tuple[type, type, bool]:
    """(config class, model class, is LLaVA-NeXT) for the llava-hf checkpoint in ``folder``, by its model_type."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    if read_config(folder).get("model_type") == "llava_next":
        return LlavaNextConfig, LlavaNextForConditionalGeneration, True
    return LlavaConfig, LlavaForConditionalGeneration, False


def read_llava_hf_checkpoint(folder: Path) -> SourceParts:
    """The parts of a llava-hf checkpoint (LLaVA or LLaVA-NeXT), its weights under transformers 5's module names."""
    from transformers import AutoProcessor, GenerationConfig

    config_class, model_class, next_ = _classes(folder)
    config = config_class.from_pretrained(folder)
    _check_config(config, folder)
    pinpoints = None
    if next_:
        pinpoints = check_pinpoints(config.image_grid_pinpoints, config.vision_config.image_size,
                                    f"{folder / 'config.json'}: ")
    check_checkpoint_safetensors(folder, "Download or copy the checkpoint again (or re-save it), then convert it.")
    model = model_class.from_pretrained(folder, dtype="auto")
    processor = AutoProcessor.from_pretrained(folder)
    generation_file = folder / "generation_config.json"
    return SourceParts(
        folder=folder, kind="llava-hf", text_config=config.text_config, vision_config=config.vision_config,
        select_layer=config.vision_feature_layer, tower_name=None, weights=dict(model.state_dict()),
        tokenizer=processor.tokenizer, image_processor=processor.image_processor, pad_to_square=False,
        image_token_id=config.image_token_id, chat_template=getattr(processor, "chat_template", None),
        generation_config=GenerationConfig.from_pretrained(folder) if generation_file.is_file() else None,
        projector={"projector_hidden_act": config.projector_hidden_act,
                   "multimodal_projector_bias": config.multimodal_projector_bias},
        num_additional_image_tokens=getattr(processor, "num_additional_image_tokens", 0), image_grid_pinpoints=pinpoints,
        notes=["vision tower, projector, language model, tokenizer and chat template: the source's"],
    )
