"""What every LLaVA language model shares: the vision modules and the merge of image and text.

``LlavaMetaModel`` is mixed into the decoder (``LlamaModel``, ``MistralModel``): it owns the vision
tower (with its optional ToConv token compressor), the projector and, for LLaVA-1.6's
``spatial_unpad``, the ``image_newline`` embedding. ``LlavaMetaForCausalLM`` is mixed into the causal
LM: it encodes images and splices their embeddings into the text embeddings
(``prepare_inputs_labels_for_multimodal``). ``LlavaCausalLMMixin`` supplies the ``forward`` and
``generate`` that route images through it.

Names and signatures follow upstream LLaVA 1.2.x. Differences: compression fields travel through
the config; rows may be left-padded (batched generation); missing compressor weights are
initialised to the window average, never randomly.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from abc import ABC, abstractmethod

import torch
from torch import nn
from transformers import initialization as hf_init

from vision_token_compression import (
    GRID_SIZES_KEY,
    CompressionSettings,
    TokenCompressor,
    check_compressor_tensors,
    read_metadata,
)

from ..constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TOKEN_COMPRESSOR_FILE,
    config_value,
)
from ..mm_utils import get_anyres_image_grid_shape, unpadded_bounds
from .compressor_layout import MM_PROJECTOR
from .multimodal_encoder.builder import build_vision_tower
from .multimodal_encoder.clip_encoder import DEFAULT_MM_VISION_SELECT_FEATURE
from .multimodal_projector.builder import build_vision_projector
from .weights_io import load_weights_file

logger = logging.getLogger(__name__)

# Vision-tower fields that initialize_vision_modules copies into the model config, so that a saved
# checkpoint rebuilds the same tower (S2 fields only when the model args have them).
S2_CONFIG_FIELDS = ("s2", "s2_scales")


def load_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an ``mm_projector.bin`` (``torch.save``, read with ``weights_only``) or ``.safetensors`` file.

    A missing file is a ``WeightsFileNotFoundError`` (a ``FileNotFoundError``), an empty or truncated
    one a ``CheckpointError``; both name the file and the fix.
    """
    return load_weights_file(
        path,
        fix="Use the mm_projector.bin of a finished projector pretraining (stage 1) or of its latest checkpoint-N/, "
        "or rerun stage 1.",
    )


def select_weights(weights: dict[str, torch.Tensor], module_name: str) -> dict[str, torch.Tensor]:
    """Entries of ``weights`` under ``module_name``, with everything up to it stripped from the keys.

    ``model.mm_projector.0.weight`` → ``0.weight`` for ``module_name="mm_projector"``.
    """
    marker = module_name + "."
    return {key.split(marker, 1)[1]: value for key, value in weights.items() if marker in key}


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Crop the (C, H, W) feature grid of a padded image back to the image's own aspect ratio."""
    top, bottom, left, right = unpadded_bounds(tensor.shape[1], tensor.shape[2], original_size)
    return tensor[:, top:bottom, left:right]


def arrange_crops(crops: torch.Tensor, crop_grid: tuple[int, int], image_size: tuple[int, int] | None,
                  newline: torch.Tensor | None) -> torch.Tensor:
    """(rows·cols, side², D) crop features, row by row → (tokens, D) in raster order over the crops' canvas.

    ``crop_grid`` is (columns, rows). With ``newline`` (``spatial_unpad``) the canvas is cropped to
    ``image_size`` (width, height) and every row ends with ``newline`` (D,); without it (``spatial``)
    the whole canvas is kept.
    """
    cols, rows = crop_grid
    side = math.isqrt(crops.shape[1])
    grid = crops.view(rows, cols, side, side, -1)  # (rows, cols, h, w, D)
    if newline is None:
        return grid.permute(0, 2, 1, 3, 4).flatten(0, 3)  # (rows*h*cols*w, D)
    grid = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, rows*h, cols*w)
    grid = unpad_image(grid, image_size)
    column = newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid)
    grid = torch.cat([grid, column], dim=-1)  # (D, H, W + 1)
    return grid.flatten(1, 2).transpose(0, 1)  # (H * (W + 1), D)


def _new_image_newline(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Initial ``image_newline``: normal with std 1/sqrt(hidden_size), like the token embeddings' scale."""
    return torch.randn(hidden_size, dtype=dtype) / math.sqrt(hidden_size)


class LlavaMetaModel:
    """Vision modules of a LLaVA decoder; mix in before the HF decoder class (``LlamaModel``)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in config_value(config, "mm_patch_merge_type"):
                self.image_newline = nn.Parameter(_new_image_newline(config.hidden_size, self.dtype))

    def get_vision_tower(self):
        """The vision tower, or None before ``initialize_vision_modules`` (FSDP keeps it in a list)."""
        vision_tower = getattr(self, "vision_tower", None)
        if isinstance(vision_tower, list):
            vision_tower = vision_tower[0]
        return vision_tower

    def _init_weights(self, module: nn.Module) -> None:
        """HF init, plus: a token compressor gets its own init (the window average), ``image_newline`` a small normal.

        ``from_pretrained`` calls this for each module holding weights the checkpoint lacks (the
        compressor: its grid-size record), e.g. when compression is switched on for a checkpoint
        trained without it, or for a checkpoint saved before the record existed.
        """
        super()._init_weights(module)
        if isinstance(module, TokenCompressor):
            # hf_init.copy_ skips the tensors from_pretrained loaded: only what the checkpoint lacked is set.
            module.reset_parameters(copy=hf_init.copy_)
        if module is self and isinstance(getattr(self, "image_newline", None), nn.Parameter):
            hf_init.normal_(self.image_newline, mean=0.0, std=1.0 / math.sqrt(self.config.hidden_size))

    def initialize_vision_modules(self, model_args, fsdp=None) -> None:
        """Build (or load) the vision tower and projector from training ``model_args``; record them in the config.

        Reads ``vision_tower``, ``mm_vision_select_layer``, ``mm_vision_select_feature``,
        ``mm_projector_type``, ``mm_patch_merge_type``, ``pretrain_mm_mlp_adapter``, the compression
        fields (``use_token_compression``, ``compression_input_size``, ``compression_output_size``,
        ``pretrain_token_compressor``) and, when present, ``s2``/``s2_scales``. The adapter file may
        hold the token compressor too (under ``...token_compressor.``); both are loaded.
        """
        # Checked before the config is touched, also when the tower already exists (a new tower checks
        # them again against its grid, and warns once about sizes ignored while compression is off).
        settings = CompressionSettings.from_args(model_args)
        config = self.config
        config.mm_vision_tower = model_args.vision_tower
        config.mm_vision_select_layer = model_args.mm_vision_select_layer
        config.mm_vision_select_feature = getattr(model_args, "mm_vision_select_feature", DEFAULT_MM_VISION_SELECT_FEATURE)
        config.mm_patch_merge_type = config_value(model_args, "mm_patch_merge_type")
        for field in S2_CONFIG_FIELDS:
            if hasattr(model_args, field):
                setattr(config, field, getattr(model_args, field))

        vision_tower = self.get_vision_tower()
        if vision_tower is None:
            vision_tower = build_vision_tower(model_args)
            self.vision_tower = [vision_tower] if fsdp else vision_tower
        else:
            settings.warn_ignored(logger)
            self._check_tower_matches(vision_tower, settings.enabled, getattr(model_args, "compression_output_size", None))
            vision_tower.load_model()
            if settings.checkpoint:  # given only with compression on, which the tower then has
                vision_tower.load_token_compressor(settings.checkpoint)
        # The tower resolves the compression defaults; the config records what it built.
        vision_tower.record_compression(config)
        compressed = vision_tower.token_compressor is not None

        config.use_mm_proj = True
        config.mm_projector_type = config_value(model_args, "mm_projector_type")
        config.mm_hidden_size = vision_tower.hidden_size

        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(config)
            if "unpad" in config.mm_patch_merge_type:
                self.image_newline = nn.Parameter(_new_image_newline(config.hidden_size, self.dtype))
        else:
            # LoRA may have frozen them; the compressor trains with the projector (setup_vision
            # applies freeze_token_compressor afterwards).
            self.mm_projector.requires_grad_(True)
            if compressed:
                vision_tower.token_compressor.requires_grad_(True)

        adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
        if adapter:
            self.load_mm_adapter(adapter)

    @staticmethod
    def _check_tower_matches(vision_tower, wanted: bool, out: int | None) -> None:
        has = vision_tower.token_compressor is not None
        if wanted != has or (has and out is not None and out != vision_tower.compression_output_size):
            raise ValueError(
                f"The model already has a vision tower with use_token_compression={has}"
                f"{f', compression_output_size={vision_tower.compression_output_size}' if has else ''}, but the model "
                f"args ask for use_token_compression={wanted}, compression_output_size={out}. Load a checkpoint "
                f"built with these settings, or start from the language model alone."
            )

    def load_mm_adapter(self, path: str | os.PathLike) -> None:
        """Load a pretrained projector file: the projector, and the token compressor / image_newline if it holds them.

        Compressor weights are checked before anything loads: weights trained for other grid sizes
        (their ``grid_sizes`` record, or for a file saved without one the ``token_compressor.safetensors``
        that pretraining writes beside it) are refused; non-finite values are logged as a warning.
        """
        weights = load_adapter_weights(path)
        projector = select_weights(weights, "mm_projector")
        if not projector:
            raise ValueError(f"{path} holds no mm_projector weights (keys: {sorted(weights)[:8]}...).")
        compressor_weights = MM_PROJECTOR.extract(weights)
        compressor = self.get_vision_tower().token_compressor
        if compressor_weights:
            if compressor is None:
                raise ValueError(
                    f"{path} holds token compressor weights, so its projector was trained on compressed tokens, "
                    f"but this model has use_token_compression=False. Set use_token_compression=True with the "
                    f"compression_output_size it was trained with."
                )
            compressor_weights = check_compressor_weights(compressor, compressor_weights, os.fspath(path))
        self.mm_projector.load_state_dict(projector)
        if compressor_weights:
            compressor.load_state_dict(compressor_weights)
            logger.info("Loaded the token compressor from %s", path)
        elif compressor is not None:
            logger.info("%s holds no token compressor: it keeps its initialisation.", path)
        newline = {k: v for k, v in weights.items() if k.split(".")[-1] == "image_newline"}
        if newline and isinstance(getattr(self, "image_newline", None), nn.Parameter):
            with torch.no_grad():
                self.image_newline.copy_(next(iter(newline.values())))
        logger.info("Loaded the projector from %s", path)


def sibling_grid_sizes(path: str | os.PathLike) -> tuple[tuple[int, int], str] | None:
    """``((input, output), file)``: the grid sizes of the compressor checkpoint saved beside a weights file.

    Projector-only pretraining writes ``token_compressor.safetensors`` (with its grid sizes in the
    metadata) beside ``mm_projector.bin``, whose tensors are parameters only. None when there is none.
    """
    sibling = os.path.join(os.path.dirname(os.fspath(path)), TOKEN_COMPRESSOR_FILE)
    if not os.path.isfile(sibling):
        return None
    meta = read_metadata(sibling)
    return (meta.input_grid_size, meta.output_grid_size), sibling


def check_compressor_weights(
    compressor: TokenCompressor, weights: dict[str, torch.Tensor], source: str,
) -> dict[str, torch.Tensor]:
    """Check compressor ``weights`` (its own key names) from ``source`` before they load; returns them.

    The library's check (``vision_token_compression.check_compressor_tensors``). Without a grid-size
    record of their own, the one in ``token_compressor.safetensors`` beside ``source`` is used and
    added to the returned weights; with neither, the geometry cannot be checked (logged once).
    """
    beside = None if GRID_SIZES_KEY in weights else sibling_grid_sizes(source)  # the file's own record decides
    recorded, sibling = beside if beside else (None, None)
    return check_compressor_tensors(
        compressor, weights, source, recorded_grid_sizes=recorded, record_source=sibling,
        fix="Load weights trained with this model's vision tower and compression settings.",
    )


class LlavaMetaForCausalLM(ABC):
    """Image encoding and image/text merging for a LLaVA causal LM."""

    @abstractmethod
    def get_model(self) -> LlavaMetaModel:
        """The decoder that holds the vision modules."""

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images → (N, num_patches, hidden_size) embeddings in the LLM's space and dtype.

        Pixels may come in any floating dtype (harnesses hand float16 to float32 models): they are
        cast to the tower's, its features to the projector's, the embeddings to the LLM's.
        """
        model = self.get_model()
        tower = model.get_vision_tower()
        image_features = tower(images.to(device=tower.device, dtype=tower.dtype))
        projector = model.mm_projector
        llm_dtype = model.embed_tokens.weight.dtype
        projector_dtype = next((p.dtype for p in projector.parameters()), llm_dtype)
        return projector(image_features.to(projector_dtype)).to(llm_dtype)

    def _merge_crops(self, features: torch.Tensor, image_size: tuple[int, int] | None) -> torch.Tensor:
        """(1 + crops, P, D) features of one anyres image → (tokens, D), per ``mm_patch_merge_type``."""
        config = self.config
        merge_type = config_value(config, "mm_patch_merge_type")
        newline = getattr(self.get_model(), "image_newline", None)
        if features.shape[0] == 1:
            single = features[0]
            if "unpad" in merge_type:
                single = torch.cat([single, newline[None].to(single)], dim=0)
            return single
        tower = self.get_vision_tower()
        side = tower.num_patches_per_side  # the compressed grid when compression is on
        base, crops = features[0], features[1:]
        if base.shape[0] != side * side:
            raise ValueError(
                f"spatial merging needs {side}×{side}={side * side} tokens per crop, got {base.shape[0]} "
                f"(mm_vision_select_feature must be 'patch')."
            )
        if config_value(config, "image_aspect_ratio") != "anyres":
            raise NotImplementedError(
                f"{features.shape[0]} crops per image need image_aspect_ratio='anyres', "
                f"got {config.image_aspect_ratio!r}."
            )
        if image_size is None:
            raise ValueError("anyres images need image_sizes=[(width, height), ...] passed with them.")
        cols, rows = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, tower.config.image_size)
        if rows * cols != crops.shape[0]:
            raise ValueError(
                f"An image of size {image_size} splits into {cols}×{rows} crops under image_grid_pinpoints, but "
                f"{crops.shape[0]} crops were given: process images with the model's image_grid_pinpoints."
            )
        crop_tokens = arrange_crops(crops, (cols, rows), image_size, newline if "unpad" in merge_type else None)
        return torch.cat([base, crop_tokens], dim=0)

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """Embeddings the LLM receives for one image of ``image_size`` (width, height), without running the tower.

        The same arithmetic as ``image_embeddings``: one tile of ``num_patches`` for ``pad`` and
        square images; for anyres the base tile plus the crops, which ``spatial_unpad`` trims to the
        image's aspect ratio and ends row by row with ``image_newline``.
        """
        config = self.config
        tower = self.get_vision_tower()
        per_tile = tower.num_patches  # the compressed grid when compression is on
        if config_value(config, "image_aspect_ratio") != "anyres":
            return per_tile
        cols, rows = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, tower.config.image_size)
        merge_type = config_value(config, "mm_patch_merge_type")
        if "unpad" not in merge_type:
            return per_tile * (1 + cols * rows)
        side = tower.num_patches_per_side
        top, bottom, left, right = unpadded_bounds(rows * side, cols * side, image_size)
        return per_tile + (bottom - top) * (right - left + 1)

    def image_embeddings(self, images, image_sizes=None) -> list[torch.Tensor]:
        """One (tokens, D) embedding sequence per image.

        ``images``: a (N, 3, H, W) tensor, a (N, crops, 3, H, W) tensor or a list of (3, H, W) /
        (crops, 3, H, W) tensors (anyres).
        """
        if not (isinstance(images, list) or images.ndim == 5):
            return list(self.encode_images(images))
        images = [image.unsqueeze(0) if image.ndim == 3 else image for image in images]
        features = self.encode_images(torch.cat(list(images), dim=0))
        per_image = torch.split(features, [image.shape[0] for image in images], dim=0)
        merge_type = config_value(self.config, "mm_patch_merge_type")
        if merge_type == "flat":
            return [f.flatten(0, 1) for f in per_image]
        if not merge_type.startswith("spatial"):
            raise ValueError(f"Unexpected mm_patch_merge_type {merge_type!r}; use 'flat', 'spatial' or 'spatial_unpad'.")
        sizes = image_sizes if image_sizes is not None else [None] * len(per_image)
        return [self._merge_crops(f, size) for f, size in zip(per_image, sizes)]

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images,
        image_sizes=None,
        padding_side: str | None = None,
    ):
        """Replace each ``IMAGE_TOKEN_INDEX`` in ``input_ids`` by its image's embeddings.

        Returns ``(None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)``; image
        positions get ``IGNORE_INDEX`` labels. Rows are truncated to ``config.tokenizer_model_max_length``
        and re-padded on ``padding_side`` (default ``config.tokenizer_padding_side``, 'right';
        ``generate`` uses 'left'). A row without an image token either consumes no image or, when one
        image per such row was passed (LLaVA's dummy image for text-only samples), consumes it with no
        tokens. Without images, or for one-token decoding steps, the inputs come back unchanged.
        """
        vision_tower = self.get_vision_tower()
        if vision_tower is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if config_value(self.config, "tune_mm_mlp_adapter") and config_value(self.config, "mm_use_im_start_end"):
            raise NotImplementedError("tune_mm_mlp_adapter with mm_use_im_start_end is not supported.")

        image_features = self.image_embeddings(images, image_sizes)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        row_labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        new_embeds, new_labels = self._splice_images(
            [ids[m] for ids, m in zip(input_ids, mask)], [lab[m] for lab, m in zip(row_labels, mask)], image_features
        )
        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        if max_length is not None:
            new_embeds = [e[:max_length] for e in new_embeds]
            new_labels = [lab[:max_length] for lab in new_labels]

        side = padding_side or config_value(self.config, "tokenizer_padding_side")
        embeds, labels_out, attention_out, positions = _pad_rows(new_embeds, new_labels, side)
        attention_out, positions = _mask_and_positions(attention_out, positions, side, attention_mask, position_ids)
        labels_out = None if labels is None else labels_out
        return None, positions, attention_out, past_key_values, embeds, labels_out

    def _splice_images(
        self, rows_ids: list[torch.Tensor], rows_labels: list[torch.Tensor], image_features: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each row's embeddings with its images' embeddings in place of its image tokens, and its labels.

        Images are taken in order, one per image token; a row without an image token takes one (with
        no tokens) when every such row came with a dummy image (``_images_for_text_only_rows``).
        """
        tokens_per_row = [int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in rows_ids]
        dummy_per_textonly = self._images_for_text_only_rows(tokens_per_row, len(image_features))
        embed_tokens = self.get_model().embed_tokens
        images = iter(image_features)
        new_embeds, new_labels = [], []
        for ids, lab, n_images in zip(rows_ids, rows_labels, tokens_per_row):
            if n_images == 0:
                embeds = embed_tokens(ids)
                if dummy_per_textonly:
                    # Keep the unused image in the graph (zero tokens), as ZeRO-3 expects every parameter used.
                    embeds = torch.cat([embeds, next(images)[0:0].to(embeds)], dim=0)
                new_embeds.append(embeds)
                new_labels.append(lab)
                continue
            embeds, lab = _splice_row(ids, lab, [next(images) for _ in range(n_images)], embed_tokens)
            new_embeds.append(embeds)
            new_labels.append(lab)
        return new_embeds, new_labels

    @staticmethod
    def _images_for_text_only_rows(tokens_per_row: list[int], num_images: int) -> bool:
        """Whether rows without an image token each came with a (dummy) image; checks the image count."""
        with_tokens = sum(tokens_per_row)
        with_dummies = with_tokens + sum(1 for n in tokens_per_row if n == 0)
        if num_images == with_tokens:
            return False
        if num_images == with_dummies:
            return True
        raise ValueError(
            f"The prompts hold {with_tokens} image tokens in {len(tokens_per_row)} rows, but {num_images} images "
            f"were given. Pass one image per <image> token (plus, optionally, one per row without one)."
        )

    def initialize_vision_tokenizer(self, model_args, tokenizer) -> None:
        """Add ``<im_patch>`` / ``<im_start>``, ``<im_end>`` tokens as the model args ask, resizing embeddings.

        New rows start at the mean of the existing embeddings; with ``pretrain_mm_mlp_adapter`` the
        start/end rows come from the adapter's ``model.embed_tokens.weight``.
        """
        if model_args.mm_use_im_patch_token:
            tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
            self.resize_token_embeddings(len(tokenizer))

        if model_args.mm_use_im_start_end:
            num_new = tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
            self.resize_token_embeddings(len(tokenizer))
            if num_new > 0:
                inputs = self.get_input_embeddings().weight.data
                outputs = self.get_output_embeddings().weight.data
                inputs[-num_new:] = inputs[:-num_new].mean(dim=0, keepdim=True)
                outputs[-num_new:] = outputs[:-num_new].mean(dim=0, keepdim=True)
            if model_args.tune_mm_mlp_adapter:
                self.get_input_embeddings().requires_grad_(True)
                self.get_output_embeddings().requires_grad_(False)
            adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
            if adapter:
                saved = load_adapter_weights(adapter).get("model.embed_tokens.weight")
                if saved is None:
                    raise ValueError(f"{adapter} holds no model.embed_tokens.weight for the <im_start>/<im_end> tokens.")
                inputs = self.get_input_embeddings().weight.data
                if saved.shape == inputs.shape:
                    inputs[-num_new:] = saved[-num_new:]
                elif saved.shape[0] == num_new:
                    inputs[-num_new:] = saved
                else:
                    raise ValueError(
                        f"Unexpected model.embed_tokens.weight in {adapter}: shape {tuple(saved.shape)}, model "
                        f"{tuple(inputs.shape)}, new tokens {num_new}."
                    )
        elif model_args.mm_use_im_patch_token and model_args.tune_mm_mlp_adapter:
            self.get_input_embeddings().requires_grad_(False)
            self.get_output_embeddings().requires_grad_(False)


def _splice_row(
    ids: torch.Tensor, labels: torch.Tensor, features: list[torch.Tensor], embed_tokens: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row: text embeddings with ``features[i]`` in place of its i-th image token; image labels ignored."""
    cuts = [-1, *torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist(), ids.shape[0]]
    text_ids = [ids[cuts[i] + 1:cuts[i + 1]] for i in range(len(cuts) - 1)]
    text_labels = [labels[cuts[i] + 1:cuts[i + 1]] for i in range(len(cuts) - 1)]
    text_embeds = torch.split(embed_tokens(torch.cat(text_ids)), [len(t) for t in text_ids], dim=0)
    pieces, piece_labels = [], []
    for i, (emb, tl) in enumerate(zip(text_embeds, text_labels)):
        pieces.append(emb)
        piece_labels.append(tl)
        if i < len(features):
            feature = features[i].to(emb)
            pieces.append(feature)
            piece_labels.append(torch.full((feature.shape[0],), IGNORE_INDEX, device=labels.device, dtype=labels.dtype))
    return torch.cat(pieces), torch.cat(piece_labels)


def _pad_rows(
    embeds: list[torch.Tensor], labels: list[torch.Tensor], side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack variable-length rows, padding on ``side``: (embeds, labels, bool mask, position ids)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}.")
    batch, length = len(embeds), max(e.shape[0] for e in embeds)
    first = embeds[0]
    out_embeds = first.new_zeros(batch, length, first.shape[1])
    out_labels = torch.full((batch, length), IGNORE_INDEX, dtype=labels[0].dtype, device=labels[0].device)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=first.device)
    positions = torch.zeros(batch, length, dtype=torch.long, device=first.device)
    for i, (emb, lab) in enumerate(zip(embeds, labels)):
        n = emb.shape[0]
        span = slice(length - n, length) if side == "left" else slice(0, n)
        out_embeds[i, span] = emb
        out_labels[i, span] = lab
        mask[i, span] = True
        positions[i, span] = torch.arange(n, device=first.device)
    return out_embeds, out_labels, mask, positions


def _mask_and_positions(
    mask: torch.Tensor, positions: torch.Tensor, side: str, given_mask: torch.Tensor | None,
    given_positions: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The attention mask and position ids to hand the LLM for padded rows (``_pad_rows``' bool mask and positions).

    The mask keeps the given mask's dtype; without one it is needed (as int64) only where rows were
    padded. Positions count real tokens only; right padding (or none) gives the default 0..L-1, so
    they are needed only when given or for left-padded rows.
    """
    padded = bool((~mask).any())
    if given_mask is not None:
        mask = mask.to(given_mask.dtype)
    elif padded:
        mask = mask.long()
    else:
        mask = None
    if given_positions is None and not (padded and side == "left"):
        positions = None
    return mask, positions


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """The keyword the HF causal LM under ``model_class`` takes the KV cache by in ``forward``.

    transformers renamed it from ``past_key_values`` to ``cache`` in 5.24. Under the wrong name the
    cache vanishes into ``**kwargs`` on 5.16-5.23, so each decoding step starts from an empty cache;
    on 5.24 ``past_key_values`` is a deprecated alias (until 5.40).
    """
    hf_forward = super(LlavaCausalLMMixin, model_class).forward
    return "cache" if "cache" in inspect.signature(hf_forward).parameters else "past_key_values"


class LlavaCausalLMMixin:
    """``forward`` and ``generate`` that take images; mix in before the HF causal LM class."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        images=None,
        image_sizes=None,
        return_dict=None,
        cache=None,
        **kwargs,
    ):
        """The HF causal LM forward; ``images`` are spliced in where ``input_ids`` hold ``IMAGE_TOKEN_INDEX``.

        The KV cache comes as ``cache`` or ``past_key_values`` (transformers' name before 5.24) and goes
        on under the name the HF class takes.
        """
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            input_ids, position_ids, attention_mask, cache, inputs_embeds, labels = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, cache, labels, images, image_sizes
                )
            )
        for name, value in (
            ("output_attentions", output_attentions),
            ("output_hidden_states", output_hidden_states),
            ("return_dict", return_dict),
        ):
            if value is not None:
                kwargs[name] = value
        kwargs[_cache_keyword(type(self))] = cache
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
        """Generate from token ids holding image tokens; rows may be left-padded (pass ``attention_mask``).

        The image embeddings are spliced in once and generation runs from ``inputs_embeds``, so the
        returned ids hold only the new tokens.
        """
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("Pass token ids (with IMAGE_TOKEN_INDEX for images), not inputs_embeds.")
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if images is not None:
            _, position_ids, attention_mask, _, inputs_embeds, _ = self.prepare_inputs_labels_for_multimodal(
                inputs, position_ids, attention_mask, None, None, images, image_sizes=image_sizes, padding_side="left"
            )
        else:
            inputs_embeds = self.get_model().embed_tokens(inputs)
        return super().generate(
            position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )

    def prepare_inputs_for_generation(
        self, input_ids, *args, inputs_embeds=None, images=None, image_sizes=None, **kwargs
    ):
        """HF's preparation; ``images`` / ``image_sizes`` handed to ``generate``'s kwargs ride along."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        if images is not None:
            inputs["images"] = images
        if image_sizes is not None:
            inputs["image_sizes"] = image_sizes
        return inputs
