"""Tiny, locally built LLaVA pieces for tests, demos and benchmarks on machines without downloads.

Everything here has real structure and random weights: a byte-level BPE tokenizer with Llama's
special tokens, a tiny Llama or Mistral LLaVA assembled through ``initialize_vision_modules``
(the path training takes), a CLIP stand-in with the real 336px / patch-14 geometry (24×24 grid), a
SigLIP one with so400m's 384px / patch-14 geometry (27×27 grid, no CLS token),
and generated images. Outputs are meaningless; shapes, token counts and code paths are real.

Typical use::

    clip = build_tiny_clip(tmp / "clip")
    model_path = build_tiny_llava(tmp / "llava-tiny", clip, compression_output_size=12)
    tokenizer, model, processor, _ = load_pretrained_model(str(model_path), None, "llava-tiny", device="cpu")
    images = make_images(2, size=(400, 300), seed=0)
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

from .constants import CONFIG_DEFAULTS

logger = logging.getLogger(__name__)

# Llama's special tokens, in Llama's id order (unk 0, bos 1, eos 2) plus a pad token.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# LLaVA-1.6's image_grid_pinpoints (its config.json): 1×2, 2×1, 2×2, 3×1 and 1×3 tiles of 336 pixels.
LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

_CORPUS = [
    (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    ),
    (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions."
    ),
    "USER: ASSISTANT: Human: Assistant: [INST] [/INST] <<SYS>> <</SYS>> <|im_start|>system user assistant <|im_end|>",
    "What is in the image? Describe the image in detail. What color is the shape? How many shapes are there?",
    "Answer the question using a single word or phrase. Is there a circle? Yes. No.",
    "The image shows a red circle, a green square and a blue triangle on a white background.",
    " ".join(f"{c} {s}" for c in COLORS for s in SHAPES),
    "one two three four five six seven eight nine ten left right top bottom middle small large",
]


def _tower_default(name: str):
    """A default of the vision tower's fields, from clip_encoder (imported when used: it needs torch)."""
    from .model.multimodal_encoder import clip_encoder

    return getattr(clip_encoder, name)


@dataclass
class VisionModelArgs:
    """The model arguments ``initialize_vision_modules`` and ``initialize_vision_tokenizer`` read.

    Field names follow LLaVA's ``ModelArguments`` (``llava.train``), plus compression; the defaults are
    LLaVA-1.5's recipe (select layer -2, ``mlp2x_gelu``, no ``<im_patch>`` token) where it differs from
    the config defaults.
    """

    vision_tower: str
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = field(default_factory=lambda: _tower_default("DEFAULT_MM_VISION_SELECT_FEATURE"))
    mm_projector_type: str = "mlp2x_gelu"
    mm_patch_merge_type: str = CONFIG_DEFAULTS["mm_patch_merge_type"]
    pretrain_mm_mlp_adapter: str | None = None
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    tune_mm_mlp_adapter: bool = False
    use_token_compression: bool = False
    compression_input_size: int | None = None
    compression_output_size: int | None = None
    pretrain_token_compressor: str | None = None


def build_tokenizer(out_dir: str | os.PathLike, *, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on a small built-in corpus and save it as a transformers tokenizer.

    It adds ``<s>`` in front of every text (as Llama's does), knows ``<unk>``, ``</s>`` and
    ``<pad>``, and decodes back to the exact text. Reuses a tokenizer already saved in ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=2048,
    )
    wrapped.save_pretrained(out_dir)
    logger.info("Built a %d-token BPE stand-in tokenizer at %s", len(wrapped), out_dir)
    return out_dir


def build_tiny_clip(out_dir: str | os.PathLike, *, hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0) -> Path:
    """A random CLIP ViT-L/14-336 stand-in shrunk to ``hidden_size`` channels: 336px, patch 14, a 24×24 grid."""
    from vision_token_compression.testing import build_clip_standin

    return build_clip_standin(
        "openai/clip-vit-large-patch14-336", out_dir, num_hidden_layers=num_hidden_layers, seed=seed,
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=2,
    )


def build_tiny_siglip(out_dir: str | os.PathLike, *, hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0) -> Path:
    """A random SigLIP so400m-384 stand-in shrunk to ``hidden_size`` channels: 384px, patch 14, a 27×27 grid, no CLS.

    Pass a folder whose name contains ``siglip``, or any folder: ``build_vision_tower`` also reads its
    config.json, so a LLaVA built on it gets a ``SigLipVisionTower``.
    """
    from vision_token_compression.testing import build_siglip_standin

    return build_siglip_standin(
        "google/siglip-so400m-patch14-384", out_dir, num_hidden_layers=num_hidden_layers, seed=seed,
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=2,
    )


def tiny_language_config(
    language_model: Literal["llama", "mistral"] = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
):
    """A ``LlavaConfig`` / ``LlavaMistralConfig`` for a tiny decoder with the stand-in tokenizer's special ids."""
    from .model import LlavaConfig, LlavaMistralConfig

    config_cls = {"llama": LlavaConfig, "mistral": LlavaMistralConfig}.get(language_model)
    if config_cls is None:
        raise ValueError(f"language_model must be 'llama' or 'mistral', got {language_model!r}.")
    return config_cls(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size, max_position_embeddings=4096,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def build_tiny_language_model(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """A plain tiny Llama (``tiny_language_config``'s shape) and the BPE stand-in tokenizer, saved to ``out_dir``.

    What LLaVA's stage 1 starts from (``--model_name_or_path``), in place of Vicuna: a language model
    that knows nothing of images.
    """
    import torch
    import transformers

    out_dir = Path(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(build_tokenizer(out_dir))
    tiny = tiny_language_config(vocab_size=len(tokenizer)).to_dict()
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: tiny[k] for k in fields})).save_pretrained(out_dir)
    return out_dir


def create_tiny_llava(
    vision_tower_path: str | os.PathLike,
    tokenizer,
    *,
    compression_output_size: int | None = None,
    compression_input_size: int | None = None,
    mm_projector_type: str = "mlp2x_gelu",
    image_aspect_ratio: str = "pad",
    mm_patch_merge_type: str = CONFIG_DEFAULTS["mm_patch_merge_type"],
    image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
    language_model: Literal["llama", "mistral"] = "llama",
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    seed: int = 0,
):
    """A random tiny LLaVA in memory, assembled the way training does; see ``build_tiny_llava`` for the arguments.

    The decoder is created from a tiny config, then ``initialize_vision_modules`` adds the vision
    tower, the projector and, with ``compression_output_size`` set, the ToConv compressor (average
    init); the config gets the fields LLaVA's training sets (``image_aspect_ratio``,
    ``image_grid_pinpoints``, tokenizer padding side and length).
    """
    import torch

    from .model import LlavaLlamaForCausalLM, LlavaMistralForCausalLM

    config = tiny_language_config(
        language_model, vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers
    )
    torch.manual_seed(seed)
    model_cls = LlavaLlamaForCausalLM if language_model == "llama" else LlavaMistralForCausalLM
    model = model_cls(config)
    # A local tower by absolute path: the checkpoint then loads from any working directory.
    tower = Path(vision_tower_path)
    model_args = VisionModelArgs(
        vision_tower=str(tower.resolve()) if tower.exists() else str(vision_tower_path),
        mm_projector_type=mm_projector_type,
        mm_patch_merge_type=mm_patch_merge_type,
        use_token_compression=compression_output_size is not None,
        compression_input_size=compression_input_size,
        compression_output_size=compression_output_size,
    )
    model.get_model().initialize_vision_modules(model_args)
    model.initialize_vision_tokenizer(model_args, tokenizer)
    tower_size = model.get_vision_tower().config.image_size
    config = model.config
    config.image_aspect_ratio = image_aspect_ratio
    if image_aspect_ratio == "anyres":
        config.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints] if image_grid_pinpoints else [
            [tower_size, 2 * tower_size], [2 * tower_size, tower_size], [2 * tower_size, 2 * tower_size]
        ]
    config.mm_use_im_start_end = model_args.mm_use_im_start_end
    config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    config.tokenizer_padding_side = tokenizer.padding_side
    config.tokenizer_model_max_length = tokenizer.model_max_length
    return model


def build_tiny_llava(
    out_dir: str | os.PathLike,
    vision_tower_path: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    **options,
) -> Path:
    """Build a random tiny LLaVA with ``create_tiny_llava`` and save it (model + tokenizer) to ``out_dir``.

    Args:
        out_dir: Folder to save to (``save_pretrained`` layout, loadable by ``load_pretrained_model``).
        vision_tower_path: A CLIP or SigLIP vision model folder, e.g. from ``build_tiny_clip`` / ``build_tiny_siglip``.
        tokenizer_path: An existing tokenizer folder; None builds the BPE stand-in in ``out_dir``.
        **options: ``create_tiny_llava`` options:
            compression_output_size (compressed grid side: 12 → 144 tokens, 8 → 64; None: no compression),
            compression_input_size (None: the tower's grid), mm_projector_type (``linear``,
            ``mlpNx_gelu``, ``identity``), image_aspect_ratio (``pad``, ``anyres``, ``square``),
            mm_patch_merge_type (``flat``, ``spatial``, ``spatial_unpad``), image_grid_pinpoints
            (anyres canvases as [width, height]; default 1×2, 2×1 and 2×2 tower crops),
            language_model (``llama`` or ``mistral``), hidden_size, num_hidden_layers, seed.
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or build_tokenizer(out_dir))
    model = create_tiny_llava(vision_tower_path, tokenizer, **options)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("Built a tiny LLaVA at %s (%s)", out_dir, options)
    return out_dir


def make_images(
    n: int,
    size: tuple[int, int] | Sequence[tuple[int, int]] = (336, 336),
    seed: int = 0,
) -> list[Image.Image]:
    """``n`` RGB images of coloured shapes on a plain background, reproducible from ``seed``.

    ``size`` is one (width, height) for all images or one per image.
    """
    sizes = [tuple(size)] * n if isinstance(size[0], int) else [tuple(s) for s in size]
    if len(sizes) != n:
        raise ValueError(f"Got {len(sizes)} sizes for {n} images; pass one (width, height) or one per image.")
    rng = random.Random(seed)
    images = []
    for width, height in sizes:
        image = Image.new("RGB", (width, height), rng.choice(list(COLORS.values())))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            color = rng.choice(list(COLORS.values()))
            side = rng.randint(max(4, min(width, height) // 8), max(5, min(width, height) // 2))
            x, y = rng.randint(0, max(0, width - side)), rng.randint(0, max(0, height - side))
            shape = rng.choice(SHAPES)
            if shape == "circle":
                draw.ellipse((x, y, x + side, y + side), fill=color)
            elif shape == "square":
                draw.rectangle((x, y, x + side, y + side), fill=color)
            else:
                draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=color)
        images.append(image)
    return images


def save_images(images: Sequence[Image.Image], folder: str | os.PathLike, prefix: str = "image") -> list[str]:
    """Save ``images`` as PNG files in ``folder``; returns their file names (relative to ``folder``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(images):
        name = f"{prefix}_{i:04d}.png"
        image.save(folder / name)
        names.append(name)
    return names


def write_question_file(
    path: str | os.PathLike, image_names: Sequence[str], questions: Sequence[str] | None = None
) -> Path:
    """A ``model_vqa_loader`` question file: one JSON line per image with ``question_id``, ``image``, ``text``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    questions = questions or ["What is in the image?", "What color is the shape?", "How many shapes are there?"]
    with path.open("w") as f:
        for i, name in enumerate(image_names):
            record = {"question_id": i, "image": name, "text": questions[i % len(questions)]}
            f.write(json.dumps(record) + "\n")
    return path


_SHAPE_COLORS = ("red circle", "green square", "blue triangle", "yellow circle")


def write_training_data(folder: str | os.PathLike, image_names: Sequence[str]) -> tuple[Path, Path]:
    """LLaVA training files for ``image_names``: ``pretrain.json`` (captions, stage 1) and ``finetune.json``.

    Both in LLaVA's conversation format (``id``, ``image``, ``conversations`` of ``from``/``value``);
    the fine-tuning file has a two-turn chat per image and one text-only sample, as LLaVA's mix does.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = [
        {"id": f"cap-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"The image shows a {_SHAPE_COLORS[i % 4]} on a white background."}]}
        for i, name in enumerate(image_names)
    ]
    chats = [
        {"id": f"chat-{i}", "image": name, "conversations": [
            {"from": "human", "value": "What is in the image?\n<image>"},
            {"from": "gpt", "value": f"A {_SHAPE_COLORS[i % 4]}."},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": "one"}]}
        for i, name in enumerate(image_names)
    ]
    chats.append({"id": "text-0", "conversations": [
        {"from": "human", "value": "What color is the shape?"}, {"from": "gpt", "value": "red"}]})
    pretrain, finetune = folder / "pretrain.json", folder / "finetune.json"
    pretrain.write_text(json.dumps(captions))
    finetune.write_text(json.dumps(chats))
    return pretrain, finetune
