"""Constants shared by LLaVA's model, data and serving code (upstream names and values)."""

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
