"""Command-line arguments of LLaVA training: upstream LLaVA 1.2.x names plus token compression.

Three dataclasses, parsed together by ``transformers.HfArgumentParser``:

- ``ModelArguments``: which LLM, vision tower, projector and compressor to build and what to train;
- ``DataArguments``: where the conversations and images are and how to preprocess them;
- ``TrainingArguments``: Hugging Face ``TrainingArguments`` plus LLaVA's extras (LoRA, quantisation,
  projector learning rate, modality-grouped batches).

Every default lives here, once; fields that a LLaVA config also holds take theirs from the config
defaults (``llava.constants.CONFIG_DEFAULTS``, and ``clip_encoder``'s for the vision tower's fields).
Flags that upstream LLaVA's scripts pass but transformers 5 renamed (``--evaluation_strategy``,
``--warmup_ratio``) are still accepted and mapped to the new names, so the published launch scripts
run unchanged.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import transformers

from llava.constants import CONFIG_DEFAULTS
from llava.model.multimodal_encoder.clip_encoder import (
    DEFAULT_MM_VISION_SELECT_FEATURE,
    DEFAULT_S2,
    DEFAULT_S2_SCALES,
    DEFAULT_UNFREEZE_MM_VISION_TOWER,
)
from vision_token_compression import DEFAULT_COMPRESSION_OUTPUT_SIZE, DEFAULT_USE_TOKEN_COMPRESSION

logger = logging.getLogger(__name__)

DATA_ERROR_POLICIES = ("raise", "skip")


@dataclass
class ModelArguments:
    """What to build and which of its parts to train."""

    model_name_or_path: str | None = field(
        default="facebook/opt-125m", metadata={"help": "LLM (or LLaVA checkpoint) to start from: hub name or local path."}
    )
    version: str = field(
        default="v0",
        metadata={"help": "Conversation template: 'plain' for projector pretraining, 'v1' for Vicuna fine-tuning."},
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM's transformer."})
    tune_mm_mlp_adapter: bool = field(
        default=CONFIG_DEFAULTS["tune_mm_mlp_adapter"],
        metadata={"help": "Stage 1: train only the projector (and the token compressor) and save mm_projector.bin."},
    )
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP vision tower: hub name or local path."})
    mm_vision_select_layer: int = field(default=-1, metadata={"help": "CLIP hidden layer whose features are used."})
    pretrain_mm_mlp_adapter: str | None = field(
        default=None,
        metadata={"help": "mm_projector.bin from stage 1; loads the projector and, if present, the token compressor."},
    )
    mm_projector_type: str = field(
        default=CONFIG_DEFAULTS["mm_projector_type"], metadata={"help": "'linear', 'mlp2x_gelu' or 'identity'."}
    )
    mm_use_im_start_end: bool = field(
        default=CONFIG_DEFAULTS["mm_use_im_start_end"], metadata={"help": "Wrap image features in <im_start>/<im_end>."}
    )
    mm_use_im_patch_token: bool = field(
        default=CONFIG_DEFAULTS["mm_use_im_patch_token"], metadata={"help": "Add the <im_patch> token to the tokenizer."}
    )
    mm_patch_merge_type: str = field(
        default=CONFIG_DEFAULTS["mm_patch_merge_type"], metadata={"help": "'flat' or 'spatial_unpad' (LLaVA-1.6 anyres)."}
    )
    mm_vision_select_feature: str = field(
        default=DEFAULT_MM_VISION_SELECT_FEATURE, metadata={"help": "'patch' or 'cls_patch'."}
    )
    unfreeze_mm_vision_tower: bool = field(
        default=DEFAULT_UNFREEZE_MM_VISION_TOWER, metadata={"help": "Train CLIP itself too."}
    )
    s2: bool = field(default=DEFAULT_S2, metadata={"help": "Use the multi-scale (S2) CLIP tower."})
    s2_scales: str = field(default=DEFAULT_S2_SCALES, metadata={"help": "S2 image sizes, comma-separated."})
    # ToConv token compression.
    use_token_compression: bool = field(
        default=DEFAULT_USE_TOKEN_COMPRESSION, metadata={"help": "Compress CLIP's patch grid with a partial convolution."}
    )
    compression_input_size: int | None = field(
        default=None, metadata={"help": "Side of CLIP's patch grid (24 for ViT-L/14-336); default: read from the tower."}
    )
    # None ("not given"): the settings fill in 12 only with compression on, so flipping use_token_compression
    # alone switches compression either way.
    compression_output_size: int | None = field(
        default=None, metadata={"help": f"Side of the compressed grid: 12 → 144 tokens, 8 → 64 (default "
                                        f"{DEFAULT_COMPRESSION_OUTPUT_SIZE} with compression on)."}
    )
    pretrain_token_compressor: str | None = field(
        default=None, metadata={"help": "A token compressor checkpoint (.safetensors with metadata) to start from."}
    )
    freeze_token_compressor: bool = field(
        default=False, metadata={"help": "Keep the token compressor fixed (it trains with the projector by default)."}
    )

    def __post_init__(self) -> None:
        if self.freeze_token_compressor and not self.use_token_compression:
            logger.warning("freeze_token_compressor has no effect without use_token_compression.")
        if self.unfreeze_mm_vision_tower and self.tune_mm_mlp_adapter:
            raise ValueError(
                "unfreeze_mm_vision_tower=True trains CLIP, but tune_mm_mlp_adapter=True saves only mm_projector.bin "
                "(projector + token compressor), so CLIP's training would be lost. Unfreeze CLIP in stage 2 instead."
            )
        if self.pretrain_token_compressor and not self.use_token_compression:
            raise ValueError(
                f"pretrain_token_compressor={self.pretrain_token_compressor!r} needs use_token_compression=True."
            )


@dataclass
class DataArguments:
    """Where the training data is and how it is turned into tensors."""

    data_path: str | None = field(default=None, metadata={"help": "LLaVA-format conversation JSON (a list of samples)."})
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Accepted for compatibility: samples are always tokenised when fetched."}
    )
    is_multimodal: bool = field(default=False, metadata={"help": "Set by training when a vision tower is used."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder that sample 'image' paths are relative to."})
    image_aspect_ratio: str = field(
        default=CONFIG_DEFAULTS["image_aspect_ratio"], metadata={"help": "'square' (processor's crop), 'pad' (pad to square first) or 'anyres'."}
    )
    image_grid_pinpoints: str | None = field(default=None, metadata={"help": "anyres resolutions, e.g. '[[336,672],...]'."})
    data_error_policy: str = field(
        default="raise",
        metadata={
            "help": "What a broken sample does: malformed fields (not an object; 'image' or 'conversations' of "
            "the wrong type; turns that are malformed, do not alternate or hold no answer; empty values or answers; "
            "lone surrogates), an image that is missing, outside --image_folder, unreadable or over Pillow's "
            "decompression-bomb limit, an image-token or tokenisation mismatch, nothing left to learn after "
            "truncation. 'raise' stops with a message naming file, index, id and fault; 'skip' logs it, counts it "
            "and uses the next sample. A data file that cannot be read (DataFileError) always stops.",
            "choices": list(DATA_ERROR_POLICIES),
        },
    )
    max_skipped_fraction: float = field(
        default=0.01,
        metadata={"help": "With data_error_policy=skip, stop once more than this share of fetched samples was skipped."},
    )

    def __post_init__(self) -> None:
        if self.data_error_policy not in DATA_ERROR_POLICIES:
            raise ValueError(f"data_error_policy must be one of {DATA_ERROR_POLICIES}, got {self.data_error_policy!r}.")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}.")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """Hugging Face ``TrainingArguments`` plus LLaVA's training options."""

    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache folder for model downloads."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (see transformers' OptimizerNames)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the batch carries images."})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Keep the projector fixed."})
    mpt_attn_impl: str | None = field(default="triton", metadata={"help": "Accepted for compatibility; unused."})
    model_max_length: int = field(
        default=512, metadata={"help": "Maximum sequence length; longer sequences are truncated (right side)."}
    )
    double_quant: bool = field(default=True, metadata={"help": "bitsandbytes double quantisation (bits 4/8)."})
    quant_type: str = field(default="nf4", metadata={"help": "bitsandbytes 4-bit type: 'nf4' or 'fp4'."})
    bits: int = field(default=16, metadata={"help": "16 (no quantisation), 8 or 4 (QLoRA; needs bitsandbytes)."})
    lora_enable: bool = field(default=False, metadata={"help": "Fine-tune the LLM with LoRA adapters (peft)."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_weight_path: str = field(default="", metadata={"help": "Accepted for compatibility; unused."})
    lora_bias: str = field(default="none", metadata={"help": "'none', 'all' or 'lora_only'."})
    mm_projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector and token compressor (default: learning_rate)."}
    )
    mm_vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of CLIP when unfreeze_mm_vision_tower (default: learning_rate)."}
    )
    group_by_modality_length: bool = field(
        default=CONFIG_DEFAULTS["group_by_modality_length"], metadata={"help": "Batch image and text-only samples separately, grouped by length."}
    )
    # transformers 5.24's name for gradient_checkpointing (the old one is its deprecated alias), declared here
    # so that our launchers' flag parses on 5.16-5.23 too; on 5.24 this restates its own field.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (= gradient_checkpointing).",
                  "nargs": "?", "const": True},
    )
    # Names transformers 5 dropped; upstream LLaVA scripts still pass them.
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of eval_strategy."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Old name of a fractional warmup_steps."})

    def __post_init__(self) -> None:
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
            self.evaluation_strategy = None
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise ValueError(
                    f"Both warmup_ratio={self.warmup_ratio} and warmup_steps={self.warmup_steps} are set; pass one."
                )
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
            self.warmup_steps = self.warmup_ratio
            self.warmup_ratio = None
        if self.bits not in (4, 8, 16):
            raise ValueError(f"bits must be 4, 8 or 16, got {self.bits}.")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora_bias must be 'none', 'all' or 'lora_only', got {self.lora_bias!r}.")
        if self.remove_unused_columns:
            warnings.warn("remove_unused_columns=True would drop the images from each batch; using False.", stacklevel=2)
            self.remove_unused_columns = False
        if self.activation_checkpointing is not None:
            self.gradient_checkpointing = self.activation_checkpointing
        super().__post_init__()
        self.activation_checkpointing = self.gradient_checkpointing


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into the three argument groups; unknown flags are an error."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args
