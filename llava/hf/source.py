"""What the converter reads from a source checkpoint, whichever its format: ``SourceParts``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vision_token_compression import grid_side, read_json_object

CONFIG_NAME = "config.json"


@dataclass
class SourceParts:
    """A LLaVA-1.5 model read from a checkpoint, in transformers 5's module names, before compression is added.

    Args:
        folder: The checkpoint folder.
        kind: ``"llava"`` (this fork's / upstream LLaVA's format) or ``"llava-hf"``.
        text_config / vision_config: The language model's and the CLIP tower's configs.
        select_layer: CLIP hidden state fed to the projector (``vision_feature_layer``).
        tower_name: The tower's name or path (compared with a compressor checkpoint's); None when unknown.
        weights: Every tensor but the compressor's: ``lm_head.*``, ``model.language_model.*``,
            ``model.vision_tower.*``, ``model.multi_modal_projector.linear_{1,2}.*``.
        compressor_weights: The source's trained compressor (its own names: ``conv.weight``, ...),
            with ``compressor_sizes`` (input, output) from its config; None when it has none.
        tokenizer / image_processor: As the source's model saw text and images.
        image_token_id: Id of ``<image>``; None while the tokenizer lacks it (upstream LLaVA).
        pad_to_square: Whether images are padded to squares first (LLaVA's ``image_aspect_ratio='pad'``).
        chat_template: A Jinja chat template, or None.
        generation_config: The source's ``GenerationConfig``, or None.
        projector: ``LlavaConfig``'s projector fields (activation, bias).
        num_additional_image_tokens: ``LlavaProcessor``'s setting of the same name (llava-hf: 1, the CLS).
        image_grid_pinpoints: LLaVA-1.6's anyres canvases as [height, width] (transformers' order), each a
            multiple of the tile; None for LLaVA-1.5. Set, the weights hold ``model.image_newline`` and the
            converted checkpoint is ``toconv_llava_next``.
        notes: What the reader decided, for the converter's log.
    """

    folder: Path
    kind: str
    text_config: object
    vision_config: object
    select_layer: int
    tower_name: str | None
    weights: dict[str, torch.Tensor]
    tokenizer: object
    image_processor: object
    pad_to_square: bool
    compressor_weights: dict[str, torch.Tensor] | None = None
    compressor_sizes: tuple[int, int] | None = None
    image_token_id: int | None = None
    chat_template: str | None = None
    generation_config: object | None = None
    projector: dict = field(default_factory=lambda: {"projector_hidden_act": "gelu", "multimodal_projector_bias": True})
    num_additional_image_tokens: int = 1
    image_grid_pinpoints: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def grid(self) -> int:
        """Side of the tower's patch grid."""
        return grid_side(self.vision_config)

    @property
    def dtype(self) -> torch.dtype:
        """The language model's weight dtype: the converted checkpoint keeps it throughout."""
        return self.weights["lm_head.weight"].dtype


def read_config(folder: Path) -> dict:
    """``folder``'s config.json; refused, naming the file, when it is missing, empty, not JSON or not an object."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a model checkpoint: it has no {CONFIG_NAME}.")
    return read_json_object(path, "Restore the checkpoint's config.json (download or copy it again), then convert.")


def source_kind(config: dict, folder: Path) -> str:
    """``"llava"`` (upstream LLaVA's format: ``mm_vision_tower`` in the config) or ``"llava-hf"`` (model_type llava)."""
    model_type = config.get("model_type")
    if model_type in ("toconv_llava", "toconv_llava_next"):
        raise ValueError(
            f"{folder} is converted already (model_type {model_type}, compression "
            f"{config.get('compression_input_size')}→{config.get('compression_output_size')}). Load it as it is; for "
            f"another output size, convert the checkpoint it was made from."
        )
    if config.get("mm_vision_tower"):
        return "llava"
    if model_type in ("llava", "llava_next"):
        return "llava-hf"
    raise ValueError(
        f"{folder} is neither a LLaVA checkpoint in upstream LLaVA's format (its {CONFIG_NAME} has no "
        f"mm_vision_tower) nor a Hugging Face-format LLaVA (model_type llava or llava_next); model_type is "
        f"{model_type!r}. Other architectures are not converted."
    )


def refuse_siglip(family: str, what: str) -> None:
    """Refuse a SigLIP tower (``family`` is a tower family's name or a vision config's model_type).

    The HF-native and vLLM models are LLaVA-1.5's (CLIP, with a CLS token to drop); SigLIP towers
    run in the fork only, for now.
    """
    if family.startswith("siglip"):
        raise ValueError(
            f"{what} is a SigLIP tower: toconv-convert-to-hf converts LLaVA models with CLIP towers only; "
            f"Hugging Face-native and vLLM serving of SigLIP models are later work. Run this model with the fork "
            f"itself (llava.model.builder.load_pretrained_model, llava.eval.*, llava.serve.*), compression included."
        )
