"""Constants shared by LLaVA's model, data and serving code (upstream names and values), and config defaults."""

# Serving (controller / model worker heartbeat, log folder).
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
LOGDIR = "."

# Label value the loss ignores: image positions, prompts, padding.
IGNORE_INDEX = -100
# Placeholder id that tokenizer_image_token puts where an image's embeddings go.
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

# Files a LLaVA checkpoint may hold beside the Hugging Face weights.
MM_PROJECTOR_FILE = "mm_projector.bin"  # projector-only pretraining (and the compressor trained with it)
NON_LORA_FILE = "non_lora_trainables.bin"  # LoRA: projector, compressor, ... outside the adapter
TOKEN_COMPRESSOR_FILE = "token_compressor.safetensors"  # the compressor alone, with its metadata

# ---- Defaults of LLaVA's config fields, kept here once ---------------------------------------------
# A config saved by another LLaVA version, or an args object a script builds by hand, may lack a
# field: read such fields with config_value(obj, name), which falls back to the default here. The
# training flags (llava.train.arguments) default to the same values. The fields the vision tower reads
# (mm_vision_select_feature, unfreeze_mm_vision_tower, s2, s2_scales and the compression fields) have
# their defaults in llava/model/multimodal_encoder/clip_encoder.py instead: forks copy that file alone,
# and the rest of llava/ imports them from there.
CONFIG_DEFAULTS = {
    "mm_projector_type": "linear",
    "mm_patch_merge_type": "flat",
    "image_aspect_ratio": "square",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": True,
    "tune_mm_mlp_adapter": False,
    "tokenizer_padding_side": "right",
    "max_sequence_length": 2048,  # the context length load_pretrained_model reports
    # Training arguments that LLaVATrainer reads when its caller's arguments carry them.
    "use_im_start_end": False,
    "group_by_modality_length": False,
}


def config_value(config, name: str):
    """``config.<name>``, or the field's default (``CONFIG_DEFAULTS``) when ``config`` lacks it."""
    return getattr(config, name, CONFIG_DEFAULTS[name])
