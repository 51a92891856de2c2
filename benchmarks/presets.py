"""Benchmark configurations: model shapes and measurement settings, one preset per machine size."""

from __future__ import annotations

import dataclasses

SELECT_LAYER = -2  # mm_vision_select_layer of LLaVA-1.5: patch features of CLIP's second-to-last layer
OUTPUT_GRIDS = (12, 8)  # compressed grids: 24→12 (144 tokens) and 24→8 (64), or 16→12 and 16→8

# Language-model shapes (LlamaConfig fields).
VICUNA_7B = {  # lmsys/vicuna-7b-v1.5, the LLM of LLaVA-1.5-7B
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}
TINYLLAMA_1B = {  # TinyLlama/TinyLlama-1.1B (grouped-query attention, 4 KV heads)
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}
TINY_LLM = {
    "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}
MICRO_LLM = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
}

# CLIP reductions (CLIPVisionConfig fields over the real config); image and patch size stay real,
# so the token grid (24×24 or 16×16) and every token count are the real ones.
TINY_CLIP = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_hidden_layers": 4}
MICRO_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}

# LLaVA-1.6 (anyres): liuhaotian/llava-v1.6-vicuna-7b's image_grid_pinpoints, as [width, height].
LLAVA_16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# (width, height) of the measured images: landscape (2×1 crops, unpadded), portrait (1×3, unpadded), a large
# square (2×2, the most crops: 5 tiles with the base image) and a panorama at a pinpoint (3×1, no padding).
ANYRES_IMAGE_SIZES = ((400, 300), (300, 700), (1000, 1000), (1008, 336))


@dataclasses.dataclass(frozen=True)
class Anyres:
    """LLaVA-1.6's image handling: the images measured and the config fields the fork reads.

    Args:
        image_sizes: (width, height) of each measured image; one row per size and compression level.
        grid_pinpoints: ``image_grid_pinpoints`` ([width, height] canvases anyres chooses from).
        merge_type: ``mm_patch_merge_type`` (``spatial_unpad``: crops unpadded, ``image_newline`` per row).
    """

    image_sizes: tuple[tuple[int, int], ...] = ANYRES_IMAGE_SIZES
    grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_16_PINPOINTS
    merge_type: str = "spatial_unpad"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model shapes and measurement settings of one benchmark configuration.

    Args:
        description: One line for the report.
        llm: LlamaConfig fields of the language model.
        clip_overrides: CLIPVisionConfig fields replacing the real tower's (empty: the real shape).
        batch_sizes: Images (and prompts) per batch; one run per batch size.
        prompt_len: Text tokens around the image (half before it, half after).
        decode_tokens: Tokens generated after the first one, for decode ms/token.
        warmup: Rounds discarded before measuring.
        repeats: Measured rounds (medians and quartiles over these).
        micro_clip_overrides: CLIP reductions for the microbenchmark (empty: real ViT-L shape).
        micro_repeats: Rounds of the compressor-vs-convolution timing.
        micro_tower_repeats: Rounds of the vision-tower timing in the microbenchmark.
        threads: torch intra-op threads (None: torch's default). One thread keeps CPU timings stable on
            a shared machine, where a busy core stalls every multi-threaded op at its barrier.
        anyres: LLaVA-1.6 images through the fork's ``prepare_inputs_labels_for_multimodal`` (None:
            LLaVA-1.5's single 336×336 image and the reducer variants). Anyres presets time TTFT only:
            no decode, peak memory or microbenchmark (the ``decode_tokens`` and ``micro_*`` fields are unused).
    """

    description: str
    llm: dict
    clip_overrides: dict
    batch_sizes: tuple[int, ...]
    prompt_len: int
    decode_tokens: int
    warmup: int
    repeats: int
    micro_clip_overrides: dict
    micro_repeats: int
    micro_tower_repeats: int
    threads: int | None = None
    anyres: Anyres | None = None


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Measurement settings of one run: the preset's, with those given on the command line in their place.

    Args:
        batch_sizes: Images (and prompts) per batch; one run per batch size.
        prompt_len: Text tokens around the image.
        decode_tokens: Tokens generated after the first one.
        warmup: Rounds discarded before measuring.
        repeats: Measured rounds.
    """

    batch_sizes: tuple[int, ...]
    prompt_len: int
    decode_tokens: int
    warmup: int
    repeats: int


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "test-sized: CLIP hidden 32 / 2 layers, Llama hidden 64 / 2 layers (plumbing only)",
        MICRO_LLM, MICRO_CLIP, (1,), 16, 2, 1, 2, MICRO_CLIP, 3, 2, threads=1,
    ),
    "peers-micro": Preset(
        "test-sized, for --compare-peers: CLIP hidden 32 / 2 layers, Llama hidden 64 / 17 layers (room for FastV's "
        "K=2, PyramidDrop's stages and SparseVLM's drop after layer 15; plumbing only)",
        {**MICRO_LLM, "num_hidden_layers": 17}, MICRO_CLIP, (1,), 16, 2, 1, 2, MICRO_CLIP, 0, 0, threads=1,
    ),
    "tiny": Preset(
        "CPU-sized: CLIP at the real grid with hidden 256 (real 1024) and 4 layers (real 24); "
        "Llama hidden 512, 4 layers; microbenchmark at the real ViT-L/14-336 shape; one thread",
        TINY_LLM, TINY_CLIP, (1,), 64, 8, 1, 5, {}, 15, 3, threads=1,
    ),
    "tiny-deep": Preset(
        "tiny with LLaVA-1.5's LLM depth: CLIP as in tiny; Llama hidden 512 with 32 layers (Vicuna-7B's count), "
        "so FastV's K=2, PyramidDrop's stages (8/16/24) and SparseVLM's (after 2/6/15) sit where they do at 7B; "
        "one thread",
        {**TINY_LLM, "num_hidden_layers": 32}, TINY_CLIP, (1,), 64, 8, 1, 11, {}, 15, 3, threads=1,
    ),
    "small": Preset(
        "real CLIP ViT-L/14-336 with a TinyLlama-1.1B-shaped LLM: a workstation CPU (minutes) or a small GPU",
        TINYLLAMA_1B, {}, (1,), 64, 16, 1, 5, {}, 20, 3,
    ),
    "llava-1.5-7b": Preset(
        "LLaVA-1.5-7B shape: real CLIP ViT-L/14-336, mlp2x_gelu, Vicuna-7B-shaped Llama (for a GPU)",
        VICUNA_7B, {}, (8,), 64, 32, 3, 10, {}, 50, 10,
    ),
    "anyres-micro": Preset(
        "test-sized LLaVA-1.6 (anyres): CLIP hidden 32 / 2 layers, Llama hidden 64 / 2 layers (plumbing only)",
        {**MICRO_LLM, "max_position_embeddings": 4096}, MICRO_CLIP, (1,), 16, 1, 1, 2, {}, 0, 0, threads=1,
        anyres=Anyres(),
    ),
    "peers-anyres-micro": Preset(
        "test-sized LLaVA-1.6 (anyres), for --compare-peers: CLIP hidden 32 / 2 layers, Llama hidden 64 / 4 layers",
        {**MICRO_LLM, "num_hidden_layers": 4, "max_position_embeddings": 4096}, MICRO_CLIP, (1,), 16, 2, 1, 2, {}, 0,
        0, threads=1, anyres=Anyres(),
    ),
    "anyres-tiny": Preset(
        "CPU-sized LLaVA-1.6 (anyres, spatial_unpad, LLaVA-1.6's pinpoints): CLIP at the real grid with hidden "
        "256 (real 1024) and 4 layers (real 24); Llama hidden 512, 4 layers; one thread",
        TINY_LLM, TINY_CLIP, (1,), 64, 1, 1, 7, {}, 0, 0, threads=1, anyres=Anyres(),
    ),
    "anyres-tiny-deep": Preset(
        "anyres-tiny with LLaVA-1.6-7B's LLM depth: Llama hidden 512 with 32 layers, so FastV's K=2 and PyramidDrop's "
        "stages sit where they do at 7B (for --compare-peers; slow on a CPU: pick one --image-sizes); one thread",
        {**TINY_LLM, "num_hidden_layers": 32}, TINY_CLIP, (1,), 64, 8, 1, 5, {}, 0, 0, threads=1, anyres=Anyres(),
    ),
    "llava-v1.6-vicuna-7b": Preset(
        "LLaVA-1.6-Vicuna-7B shape: real CLIP ViT-L/14-336, mlp2x_gelu, Vicuna-7B-shaped Llama, anyres with "
        "spatial_unpad and LLaVA-1.6's pinpoints (for a GPU)",
        VICUNA_7B, {}, (1,), 64, 1, 3, 10, {}, 0, 0, anyres=Anyres(),
    ),
}
