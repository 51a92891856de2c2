"""CLIP vision towers for LLaVA, with optional ToConv token compression.

Drop-in compatible with upstream LLaVA 1.2.x (``CLIPVisionTower``, ``CLIPVisionTowerS2``, same
constructor, properties and forward contract) and with transformers 4.37 to 5.x. Compression is
switched on by fields of the ``args`` object LLaVA already passes in:

- ``use_token_compression`` (default False)
- ``compression_input_size`` (default: the tower's own patch grid)
- ``compression_output_size`` (default 12)
- ``pretrain_token_compressor`` (optional path of a compressor checkpoint)
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import torch
import transformers
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

logger = logging.getLogger(__name__)

# Defaults of the compression fields, kept here once: LLaVA's args/config objects may lack them.
DEFAULT_USE_TOKEN_COMPRESSION = False
DEFAULT_COMPRESSION_OUTPUT_SIZE = 12
DEFAULT_S2_SCALES = "336,672,1008"

# transformers 5 makes CLIPImageProcessor depend on torchvision; its PIL twin is what 4.x called
# CLIPImageProcessor and preprocesses exactly as upstream LLaVA was trained.
CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor

# Stopping CLIP at the selected layer. LLaVA reads hidden_states[-2], so the full forward computes
# a last layer whose output it throws away. CLIPVisionTower._encode runs the model's own forward
# with the encoder's layer list swapped, for that one call, for a list holding only the first layers.
# + The model's own code still does everything else (embeddings, pre-norm, masks, attention
#   implementation, outputs), so features are bit-identical and nothing version-specific is
#   re-implemented. The one assumption is a ModuleList named '*encoder.layers' with
#   num_hidden_layers entries: 'vision_model.encoder.layers' in transformers 4.x, 'encoder.layers'
#   in 5.x; any other layout runs every layer (logged once).
# + Outside the call nothing changes: every layer stays registered, so parameters, state_dict keys,
#   hooks and checkpoints are those of the full model.
# - During the call the swap is visible to other threads, so swapped calls hold this process-wide lock
#   (a lock attribute would stop towers from being deep-copied or pickled); a thread that calls the
#   CLIP model directly at that moment would see the short list. Alternatives rejected: a forward hook
#   that raises to stop early skips the post-forward hooks DeepSpeed ZeRO-3 and accelerate offloading
#   rely on; re-implementing the encoder loop depends on each version's layer signature and mask code.
_LAYER_SWAP_LOCK = threading.Lock()


def _find_encoder_layers(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList] | None:
    """``(parent, attribute, layers)`` of the one ``*encoder.layers`` ModuleList of ``num_layers`` layers, else None."""
    names = [
        name for name, module in model.named_modules()
        if (name == "encoder.layers" or name.endswith(".encoder.layers"))
        and isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(names) != 1:
        return None
    parent_name, _, attribute = names[0].rpartition(".")
    parent = model.get_submodule(parent_name)
    return parent, attribute, getattr(parent, attribute)


class CLIPVisionTower(nn.Module):
    """CLIP vision encoder returning LLaVA's selected features, optionally compressed.

    Args:
        vision_tower: Hub name or local path of a CLIP vision model.
        args: LLaVA's model args or config; reads ``mm_vision_select_layer``,
            ``mm_vision_select_feature``, ``unfreeze_mm_vision_tower`` and the compression fields.
        delay_load: Read only the config now and load weights in ``load_model()``. The token
            compressor is built here either way, so ``from_pretrained`` can restore its weights.
    """

    def __init__(self, vision_tower: str, args, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"Unexpected mm_vision_select_feature: {self.select_feature!r}; use 'patch' or 'cls_patch'.")
        self.use_token_compression = bool(getattr(args, "use_token_compression", DEFAULT_USE_TOKEN_COMPRESSION))
        self.compression_input_size = getattr(args, "compression_input_size", None)
        # `is None`, not `or`: an explicit 0 must reach the compressor's check, not become the default.
        output_size = getattr(args, "compression_output_size", None)
        self.compression_output_size = DEFAULT_COMPRESSION_OUTPUT_SIZE if output_size is None else output_size
        self._configure(args)

        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        else:
            self.cfg_only = CLIPVisionConfig.from_pretrained(self.vision_tower_name)
        self.token_compressor = self._build_compressor(getattr(args, "pretrain_token_compressor", None))

    def _configure(self, args) -> None:
        """Read subclass settings before anything loads (S2 needs its scales in ``load_model``)."""

    def load_model(self, device_map=None) -> None:
        """Load the image processor and CLIP weights; the token compressor is left untouched."""
        if self.is_loaded:
            logger.info("%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name)
            return
        self.image_processor = CLIPImageProcessor.from_pretrained(self.vision_tower_name)
        if torch.empty(0).device.type == "meta":
            # Built inside an empty-weights context (a LLaVA checkpoint's from_pretrained, e.g. with
            # unfreeze_mm_vision_tower): the checkpoint holds the tower's weights and fills them in;
            # loading the original weights here is refused by transformers and would be overwritten.
            config = CLIPVisionConfig.from_pretrained(self.vision_tower_name)
            self.vision_tower = CLIPVisionModel(config)
        else:
            self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name, device_map=device_map)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    @property
    def tower_grid_size(self) -> int:
        """Side of CLIP's own patch grid (24 for ViT-L/14-336)."""
        return self.config.image_size // self.config.patch_size

    def _build_compressor(self, checkpoint: str | None) -> nn.Module | None:
        if not self.use_token_compression:
            return None
        grid = self.tower_grid_size
        if self.compression_input_size is None:
            self.compression_input_size = grid
        elif self.compression_input_size != grid:
            raise ValueError(
                f"compression_input_size={self.compression_input_size} but {self.vision_tower_name} produces a "
                f"{grid}×{grid} patch grid (image_size {self.config.image_size} / patch_size "
                f"{self.config.patch_size}). Set compression_input_size={grid} or leave it unset."
            )
        try:
            from vision_token_compression.checkpoint import load_compressor_into
            from vision_token_compression.models.token_compressor import TokenCompressor
        except ImportError as err:
            raise ImportError(
                "use_token_compression=True needs the vision_token_compression package: install this project "
                "(pip install -e .) or copy vision_token_compression/ beside llava/."
            ) from err
        compressor = TokenCompressor(grid, self.compression_output_size, self.config.hidden_size)
        if checkpoint:
            load_compressor_into(
                compressor, checkpoint, vision_tower=self.vision_tower_name,
                select_layer=self.select_layer, select_feature=self.select_feature,
            )
        out = self.compression_output_size
        logger.info("ToConv Token Compression enabled: %dx%d → %dx%d", grid, grid, out, out)
        return compressor

    def feature_select(self, image_forward_outs) -> torch.Tensor:
        image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            image_features = image_features[:, 1:]
        return image_features

    def _tower_trainable(self) -> bool:
        # requires_grad_ is toggled on the whole tower, so the first parameter speaks for all.
        return next(self.vision_tower.parameters()).requires_grad

    def _layers_needed(self) -> int | None:
        """Encoder layers the selected feature needs (23 of 24 for layer -2); None when all are needed."""
        total = self.config.num_hidden_layers
        if not -(total + 1) <= self.select_layer <= total:
            return None  # out of range: the full run lets feature_select raise its IndexError
        needed = self.select_layer % (total + 1)  # hidden_states[i] is the output of layer i (0: embeddings)
        return needed if needed < total else None

    def _encoder_head(self, needed: int) -> tuple[nn.Module, str, nn.ModuleList, nn.ModuleList] | None:
        """``(parent, attribute, all layers, first `needed` layers)`` of the loaded CLIP; None for an unknown layout.

        Looked up once per loaded model (and again if its layer list was replaced); an unknown
        layout is logged once and then runs every layer.
        """
        cache = getattr(self, "_encoder_layers_cache", None)
        stale = cache is None or cache[0] is not self.vision_tower
        if not stale and cache[1] is not None:
            parent, attribute, layers = cache[1]
            stale = getattr(parent, attribute) is not layers
        if stale:
            found = _find_encoder_layers(self.vision_tower, self.config.num_hidden_layers)
            if found is None:
                logger.warning(
                    "%s: no unique '*encoder.layers' list of %d layers in %s; running every layer instead of "
                    "stopping at mm_vision_select_layer=%d.", self.vision_tower_name, self.config.num_hidden_layers,
                    type(self.vision_tower).__name__, self.select_layer,
                )
            # A tuple, not attributes: nothing here is registered, so state_dict and .to() never see it.
            cache = (self.vision_tower, found, {})
            self._encoder_layers_cache = cache
        _, found, heads = cache
        if found is None:
            return None
        parent, attribute, layers = found
        if needed not in heads:
            heads[needed] = nn.ModuleList(list(layers)[:needed])
        return parent, attribute, layers, heads[needed]

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Selected CLIP features (B, N, C) in the tower's dtype; no graph unless CLIP is unfrozen.

        CLIP stops at the selected layer: with ``mm_vision_select_layer=-2`` it runs 23 of its 24
        layers. The model's own forward runs with its layer list swapped, for this one call, for a
        list of its first layers (see ``_LAYER_SWAP_LOCK`` for the trade-off); the features are
        bit-identical to the full run's.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._tower_trainable()):
            pixels = images.to(device=self.device, dtype=self.dtype)
            needed = self._layers_needed()
            swap = None if needed is None else self._encoder_head(needed)
            if swap is None:
                return self.feature_select(self.vision_tower(pixels, output_hidden_states=True))
            parent, attribute, layers, head = swap
            with _LAYER_SWAP_LOCK:
                setattr(parent, attribute, head)
                try:
                    selected = self.vision_tower(pixels, return_dict=True).last_hidden_state  # (B, 1 + N, C)
                finally:
                    setattr(parent, attribute, layers)
            # hidden_states indexed as in the full run; the layers that did not run have none.
            hidden_states = (None,) * needed + (selected,) + (None,) * (self.config.num_hidden_layers - needed)
            return self.feature_select(SimpleNamespace(hidden_states=hidden_states))

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
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        if self.token_compressor is not None:
            return self.compression_output_size
        return self.tower_grid_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


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

    def _build_compressor(self, checkpoint: str | None) -> nn.Module | None:
        if self.s2_split_size != self.config.image_size:
            raise ValueError(
                f"The smallest S2 scale ({self.s2_split_size}) must equal {self.vision_tower_name}'s image size "
                f"({self.config.image_size}): each crop goes through the tower at that size. "
                f"Got s2_scales={self.s2_scales}."
            )
        return super()._build_compressor(checkpoint)

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
