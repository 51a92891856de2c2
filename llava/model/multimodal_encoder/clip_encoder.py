"""CLIP vision towers for LLaVA, with optional ToConv token compression, and the base every ViT tower shares.

Drop-in compatible with upstream LLaVA 1.2.x (``CLIPVisionTower``, ``CLIPVisionTowerS2``, same
constructor, properties and forward contract) and with transformers 4.37 to 5.x. Copy this file with
``vision_token_compression/`` beside ``llava/``: the library does what is not LLaVA's (the tower
families, select layer and feature, the early exit, the compressor). Compression is switched on by
fields of the ``args`` object LLaVA already passes in:

- ``use_token_compression`` (default False)
- ``compression_input_size`` (default: the tower's own patch grid)
- ``compression_output_size`` (default 12)
- ``pretrain_token_compressor`` (optional path of a compressor checkpoint)

Those fields are checked once, at construction, by ``vision_token_compression.CompressionSettings``
(with compression off, valid sizes or a path are ignored with one warning); ``mm_vision_select_layer``
and the tower's path by the checks below. LLaVA's loader and command-line tools reuse the same checks.
The tower stops at the selected layer (``vision_token_compression.EarlyExit``; ``CLIPEarlyStop`` is
its old name here).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

try:
    from vision_token_compression import (
        CompressionSettings,
        build_compressor,
        check_checkpoint_safetensors,
        grid_side,
        load_compressor_into,
        load_pretrained_config,
        parse_bool_setting,
        towers,
    )
    from vision_token_compression.towers import EarlyExit, TowerFamily, check_select_layer
except ImportError as err:  # a fork that copied this file without the library
    raise ImportError(
        "clip_encoder.py needs the vision_token_compression package (its settings, tower rules and compressor): "
        "install this project (pip install -e .) or copy vision_token_compression/ beside llava/."
    ) from err

logger = logging.getLogger(__name__)

# Defaults of the tower fields LLaVA's args/config objects may lack, kept here once (llava/ imports them
# from here; llava/constants.py keeps those of LLaVA's other config fields). The compression fields'
# defaults and checks are the library's (vision_token_compression.CompressionSettings).
DEFAULT_MM_VISION_SELECT_FEATURE = "patch"
DEFAULT_UNFREEZE_MM_VISION_TOWER = False
DEFAULT_S2 = False
DEFAULT_S2_SCALES = "336,672,1008"


# The PIL twin on transformers 5, where the default needs torchvision: what upstream LLaVA was trained on.
CLIPImageProcessor = towers.CLIP.image_processor_type()

CLIPEarlyStop = EarlyExit  # its name before it moved to the library, where SigLIP towers use it too


# ---- The tower path, checked once (the select layer and compression settings: the library's checks)


def _tower_fix(family: TowerFamily) -> str:
    return (
        f"Pass the folder of a {family.name} vision model (with config.json) or a Hub name such as "
        f"{family.example} as mm_vision_tower (config) / vision_tower (model args)."
    )


def load_tower_config(vision_tower: str, family: TowerFamily = towers.CLIP):
    """The vision config of ``vision_tower``; a ``FileNotFoundError`` naming it when it cannot be found."""
    return load_pretrained_config(family.config_type(), vision_tower, "Vision tower", _tower_fix(family))


class ViTVisionTower(nn.Module):
    """A ViT vision encoder returning LLaVA's selected features, optionally compressed: the base of every tower.

    A subclass names its ``family`` (``vision_token_compression.towers.CLIP`` or ``SIGLIP``): the
    transformers classes that load it and whether it has a CLS token. Everything else (the settings
    checks, the early exit, the compressor, the forward contract) is shared.

    Args:
        vision_tower: Hub name or local path of a vision model of the class's family.
        args: LLaVA's model args or config; reads ``mm_vision_select_layer``,
            ``mm_vision_select_feature``, ``unfreeze_mm_vision_tower`` and the compression fields.
        delay_load: Read only the config now and load weights in ``load_model()``. The token
            compressor is built here either way, so ``from_pretrained`` can restore its weights.
    """

    family: TowerFamily = towers.CLIP

    def __init__(self, vision_tower: str, args, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.early_stop = EarlyExit(vision_tower)
        self.select_feature = towers.check_select_feature(
            getattr(args, "mm_vision_select_feature", DEFAULT_MM_VISION_SELECT_FEATURE), self.family, vision_tower
        )
        self._configure(args)
        # Every setting is checked against the tower's config before any weights load.
        self.cfg_only = load_tower_config(self.vision_tower_name, self.family)
        self.select_layer = check_select_layer(
            args.mm_vision_select_layer, self.cfg_only.num_hidden_layers, self.vision_tower_name
        )
        settings = CompressionSettings.from_args(
            args, grid=grid_side(self.cfg_only), tower=f"{self.vision_tower_name} (image_size "
            f"{self.cfg_only.image_size} / patch_size {self.cfg_only.patch_size})",
        )
        settings.warn_ignored(logger)
        self.compression = settings.resolved(grid_side(self.cfg_only))
        self.use_token_compression = settings.enabled
        self.compression_input_size = self.compression.input_size
        self.compression_output_size = self.compression.output_size

        if not delay_load or parse_bool_setting(
            getattr(args, "unfreeze_mm_vision_tower", DEFAULT_UNFREEZE_MM_VISION_TOWER), "unfreeze_mm_vision_tower"
        ):
            self.load_model()
        self._build_compressor(settings.checkpoint)

    def _configure(self, args) -> None:
        """Read subclass settings before anything loads (S2 needs its scales in ``load_model``)."""

    def load_model(self, device_map=None) -> None:
        """Load the image processor and the tower's weights; the token compressor is left untouched."""
        if self.is_loaded:
            logger.info("%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name)
            return
        self.image_processor = self.family.image_processor_type().from_pretrained(self.vision_tower_name)
        model_class = self.family.model_type()
        if torch.empty(0).device.type == "meta":
            # Built inside an empty-weights context (a LLaVA checkpoint's from_pretrained, e.g. with
            # unfreeze_mm_vision_tower): the checkpoint holds the tower's weights and fills them in;
            # loading the original weights here is refused by transformers and would be overwritten.
            self.vision_tower = model_class(self.family.config_type().from_pretrained(self.vision_tower_name))
        else:
            check_checkpoint_safetensors(  # a truncated file is named, not a bare SafetensorError
                self.vision_tower_name, f"Download or copy the vision tower {self.vision_tower_name} again.")
            self.vision_tower = model_class.from_pretrained(self.vision_tower_name, device_map=device_map)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    @property
    def tower_grid_size(self) -> int:
        """Side of the tower's own patch grid (24 for CLIP ViT-L/14-336, 27 for SigLIP-so400m-384)."""
        return grid_side(self.config)

    def _build_compressor(self, checkpoint: str | None) -> None:
        """Build ``token_compressor`` (None with compression off), loading ``checkpoint`` into it when given."""
        self.token_compressor = None
        if not self.use_token_compression:
            return
        grid, out = self.compression_input_size, self.compression_output_size
        self.token_compressor = build_compressor(grid, out, self.config.hidden_size)
        if checkpoint:
            self.load_token_compressor(checkpoint)
        logger.info("ToConv Token Compression enabled: %dx%d → %dx%d", grid, grid, out, out)

    def load_token_compressor(self, checkpoint: str | os.PathLike) -> None:
        """Load a compressor checkpoint (safetensors) into this tower's ``token_compressor``.

        The one place a tower's compressor reads a checkpoint: ``pretrain_token_compressor`` at
        construction, and LLaVA's loaders when given one. Its metadata is checked against the tower
        first: other grid sizes or hidden size are a ``ValueError`` naming what differs, another tower
        or select layer/feature a warning.
        """
        if self.token_compressor is None:
            raise ValueError(
                f"{os.fspath(checkpoint)!r} is a token compressor checkpoint, but {self.vision_tower_name} was built "
                f"with use_token_compression off: set use_token_compression=True to use it."
            )
        load_compressor_into(
            self.token_compressor, checkpoint, vision_tower=self.vision_tower_name,
            select_layer=self.select_layer, select_feature=self.select_feature,
        )

    def record_compression(self, config) -> None:
        """Write this tower's compression fields into a model config (object or dict).

        ``use_token_compression``, ``compression_input_size`` and ``compression_output_size`` (sizes None
        with compression off), so that a saved checkpoint rebuilds the same tower.
        """
        self.compression.write_config(config)

    def feature_select(self, image_forward_outs) -> torch.Tensor:
        """The selected tokens of ``hidden_states[select_layer]`` (the CLS token dropped under ``patch``)."""
        hidden = image_forward_outs.hidden_states[self.select_layer]
        return towers.select_features(hidden, self.select_feature, self.family.has_cls_token)

    def _tower_trainable(self) -> bool:
        # requires_grad_ is toggled on the whole tower, so the first parameter speaks for all.
        return next(self.vision_tower.parameters()).requires_grad

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Selected features (B, N, C) in the tower's dtype; no graph unless the tower is unfrozen.

        The tower stops at the selected layer (``EarlyExit``): with ``mm_vision_select_layer=-2`` CLIP
        ViT-L runs 23 of its 24 layers, and the features are bit-identical to the full run's.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._tower_trainable()):
            pixels = images.to(device=self.device, dtype=self.dtype)
            return self.feature_select(self.early_stop(self.vision_tower, pixels, self.select_layer))

    def compress(self, features: torch.Tensor) -> torch.Tensor:
        """Compress selected features; with ``cls_patch`` the CLS token stays in front, uncompressed."""
        if self.token_compressor is None:
            return features
        features = features.to(self.token_compressor.dtype)
        if self.select_feature == "cls_patch":
            return torch.cat([features[:, :1], self.token_compressor(features[:, 1:])], dim=1)
        return self.token_compressor(features)

    def _forward_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self.compress(self._encode(images)).to(images.dtype)

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """(B, 3, H, W) images → (B, num_patches, hidden_size) features; a list maps image by image."""
        if isinstance(images, list) and not images or torch.is_tensor(images) and images.shape[:1] == (0,):
            shape = "an empty list" if isinstance(images, list) else f"a tensor of shape {tuple(images.shape)}"
            raise ValueError(
                f"{type(self).__name__} got no images ({shape}): pass at least one (B ≥ 1, 3, H, W) image, "
                f"or no images at all (images=None) for a text-only input."
            )
        if isinstance(images, list):
            return [self._forward_batch(image.unsqueeze(0)) for image in images]
        return self._forward_batch(images)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self):
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_patches_per_side(self) -> int:
        """The grid side LLaVA sees: the compressed grid when compression is on."""
        if self.token_compressor is not None:
            return self.compression_output_size
        return self.tower_grid_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


class CLIPVisionTower(ViTVisionTower):
    """CLIP vision encoder returning LLaVA's selected features, optionally compressed (see ``ViTVisionTower``)."""

    family = towers.CLIP


class CLIPVisionTowerS2(CLIPVisionTower):
    """Multi-scale (S2) CLIP tower: each scale is split into tower-sized crops, encoded, merged.

    With compression each crop is compressed before the crops and scales are merged, so the
    output has the compressed grid and ``hidden_size * len(s2_scales)`` channels. Needs the
    ``scaling-on-scales`` package (``pip install 'toconv-llava[s2]'``).
    """

    def _configure(self, args) -> None:
        try:
            from s2wrapper import forward as multiscale_forward
        except ImportError as err:
            raise ImportError(
                "CLIPVisionTowerS2 needs s2wrapper from the PyPI package 'scaling-on-scales': "
                "pip install scaling-on-scales (or this project's [s2] extra)."
            ) from err
        self.multiscale_forward = multiscale_forward
        scales = getattr(args, "s2_scales", None) or DEFAULT_S2_SCALES
        try:
            self.s2_scales = sorted(int(s) for s in str(scales).split(","))
        except ValueError as err:
            raise ValueError(f"s2_scales must be comma-separated ints such as '336,672,1008', got {scales!r}.") from err
        self.s2_split_size = self.s2_scales[0]
        self.s2_image_size = self.s2_scales[-1]

    def _build_compressor(self, checkpoint: str | None) -> None:
        if self.s2_split_size != self.config.image_size:
            raise ValueError(
                f"The smallest S2 scale ({self.s2_split_size}) must equal {self.vision_tower_name}'s image size "
                f"({self.config.image_size}): each crop goes through the tower at that size. "
                f"Got s2_scales={self.s2_scales}."
            )
        super()._build_compressor(checkpoint)

    def load_model(self, device_map=None) -> None:
        if self.is_loaded:
            logger.info("%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name)
            return
        super().load_model(device_map=device_map)
        # Images are preprocessed at the largest scale; S2 resizes them down for the others.
        self.image_processor.size["shortest_edge"] = self.s2_image_size
        self.image_processor.crop_size["height"] = self.image_processor.crop_size["width"] = self.s2_image_size

    def forward_feature(self, images: torch.Tensor) -> torch.Tensor:
        """Features of one batch of tower-sized crops, compressed when compression is on."""
        return self.compress(self._encode(images))

    def _forward_batch(self, images: torch.Tensor) -> torch.Tensor:
        features = self.multiscale_forward(
            self.forward_feature, images, img_sizes=self.s2_scales, max_split_size=self.s2_split_size,
            num_prefix_token=1 if self.select_feature == "cls_patch" else 0,
        )
        return features.to(images.dtype)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size * len(self.s2_scales)
