"""CLIP vision towers for LLaVA, with optional ToConv token compression.

Drop-in compatible with upstream LLaVA 1.2.x (``CLIPVisionTower``, ``CLIPVisionTowerS2``, same
constructor, properties and forward contract) and with transformers 4.37 to 5.x. Compression is
switched on by fields of the ``args`` object LLaVA already passes in:

- ``use_token_compression`` (default False)
- ``compression_input_size`` (default: the tower's own patch grid)
- ``compression_output_size`` (default 12)
- ``pretrain_token_compressor`` (optional path of a compressor checkpoint)

Those fields are checked once, at construction, by ``vision_token_compression.CompressionSettings``
(with compression off, valid sizes or a path are ignored with one warning); ``mm_vision_select_layer``
and the tower's path by the functions under "Settings" below. LLaVA's loader and command-line tools
reuse the same checks.
CLIP stops at the selected layer (``CLIPEarlyStop``, the speed-up of this file, with its measured gain).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from types import SimpleNamespace

import torch
import transformers
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

try:
    from vision_token_compression import CompressionSettings, build_compressor, grid_side, load_compressor_into
    from vision_token_compression import parse_bool_setting as parse_bool_setting
except ImportError as err:  # this file travels into forks with the library beside it
    raise ImportError(
        "clip_encoder.py needs the vision_token_compression package (its compression settings and compressor): "
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

# transformers 5 makes CLIPImageProcessor depend on torchvision; its PIL twin is what 4.x called
# CLIPImageProcessor and preprocesses exactly as upstream LLaVA was trained.
CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


# ---- The early stop: CLIP runs only the layers the selected feature needs ----------------------


class CLIPEarlyStop:
    """Runs a CLIP vision model only up to the hidden state LLaVA selects; the features are bit-identical.

    LLaVA reads ``hidden_states[-2]``, so a full forward computes a last layer whose output it throws
    away. Measured gain (docs/benchmarks.md; ViT-L/14-336 at its real shape, one CPU,
    ``mm_vision_select_layer=-2``): 23 of 24 layers run, 4.2% fewer FLOPs (366.0 vs 381.9 GFLOP) and
    6.4% less time (2493 vs 2664 ms).

    How: the model's own forward runs with the encoder's layer list swapped, for that one call, for a
    list holding only its first layers.

    + The model's own code still does everything else (embeddings, pre-norm, masks, attention
      implementation, outputs), so features are bit-identical and nothing version-specific is
      re-implemented. The one assumption is a ModuleList named ``*encoder.layers`` with
      ``num_hidden_layers`` entries: ``vision_model.encoder.layers`` in transformers 4.x,
      ``encoder.layers`` in 5.x; any other layout runs every layer (logged once).
    + Outside the call nothing changes: every layer stays registered, so parameters, state_dict keys,
      hooks and checkpoints are those of the full model.
    - During the call the swap is visible to other threads, so swapped calls hold a process-wide lock
      (a lock attribute of the tower would stop it from being deep-copied or pickled); a thread that
      calls the CLIP model directly at that moment would see the short list. Alternatives rejected: a
      forward hook that raises to stop early skips the post-forward hooks DeepSpeed ZeRO-3 and
      accelerate offloading rely on; re-implementing the encoder loop depends on each version's layer
      signature and mask code.

    Args:
        name: The tower's name or path, for the one warning about an unknown layout.
    """

    _swap_lock = threading.Lock()  # a class attribute: one for the process, never copied with a tower

    def __init__(self, name: str) -> None:
        self.name = name
        # (model, (parent, attribute, layers) or None, {needed: first layers}) for the last model seen. A
        # tuple held by a plain object: nothing here is registered, so state_dict and .to() never see it.
        self._found = None

    @staticmethod
    def layers_needed(select_layer: int, num_layers: int) -> int | None:
        """Encoder layers ``hidden_states[select_layer]`` needs (23 of 24 for -2); None when all are needed."""
        if not -(num_layers + 1) <= select_layer <= num_layers:
            return None  # out of range: the full run lets the caller's indexing raise its IndexError
        needed = select_layer % (num_layers + 1)  # hidden_states[i] is the output of layer i (0: embeddings)
        return needed if needed < num_layers else None

    def __call__(self, model: nn.Module, pixels: torch.Tensor, select_layer: int):
        """``model``'s outputs for ``pixels`` as LLaVA's ``feature_select`` reads them.

        ``hidden_states`` is indexed as in the full run; the entries of layers that did not run are None.
        """
        num_layers = model.config.num_hidden_layers
        needed = self.layers_needed(select_layer, num_layers)
        if needed is None:
            return model(pixels, output_hidden_states=True)
        with self._swap_lock:
            # Looked up under the lock too: during another thread's call the model holds the short list,
            # which the lookup would take for an unknown layout.
            swap = self._swap_for(model, needed, select_layer)
            if swap is not None:
                parent, attribute, layers, head = swap
                setattr(parent, attribute, head)
                try:
                    selected = model(pixels, return_dict=True).last_hidden_state  # (B, 1 + N, C)
                finally:
                    setattr(parent, attribute, layers)
        if swap is None:
            return model(pixels, output_hidden_states=True)
        return SimpleNamespace(hidden_states=(None,) * needed + (selected,) + (None,) * (num_layers - needed))

    def _swap_for(self, model: nn.Module, needed: int, select_layer: int):
        """``(parent, attribute, all layers, first `needed` layers)`` of ``model``; None for an unknown layout.

        Looked up once per model (and again if its layer list was replaced); an unknown layout is
        logged once and then runs every layer.
        """
        found = self._found
        stale = found is None or found[0] is not model
        if not stale and found[1] is not None:
            parent, attribute, layers = found[1]
            stale = getattr(parent, attribute) is not layers
        if stale:
            layout = self._find_layers(model, model.config.num_hidden_layers)
            if layout is None:
                logger.warning(
                    "%s: no unique '*encoder.layers' list of %d layers in %s; running every layer instead of "
                    "stopping at mm_vision_select_layer=%d.", self.name, model.config.num_hidden_layers,
                    type(model).__name__, select_layer,
                )
            found = self._found = (model, layout, {})
        _, layout, heads = found
        if layout is None:
            return None
        parent, attribute, layers = layout
        if needed not in heads:
            heads[needed] = nn.ModuleList(list(layers)[:needed])
        return parent, attribute, layers, heads[needed]

    @staticmethod
    def _find_layers(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList] | None:
        """``(parent, attribute, layers)`` of the one ``*encoder.layers`` list of ``num_layers`` layers, else None."""
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


# ---- Settings: the select layer and the tower path, checked once (compression: the library's CompressionSettings)


def check_select_layer(layer, num_layers: int, tower: str) -> int:
    """``mm_vision_select_layer`` as an index into CLIP's ``hidden_states`` (``num_layers`` + 1 entries)."""
    if isinstance(layer, bool) or not isinstance(layer, int):  # a ValueError like every other bad setting
        raise ValueError(  # noqa: TRY004
            f"mm_vision_select_layer must be an int (e.g. -2, as LLaVA-1.5), got {layer!r} ({type(layer).__name__})."
        )
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(
            f"mm_vision_select_layer={layer} is out of range: {tower} has {num_layers} layers, so use "
            f"{-(num_layers + 1)}..{num_layers} (0 is the embeddings, -1 the last layer, -2 LLaVA-1.5's choice)."
        )
    return layer


# A Hugging Face Hub repo id: "name" or "namespace/name", each part of letters, digits, "-", "_", ".",
# not starting or ending with "-" or ".", without "--" or "..".
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?/)?[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?$")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repo id (it may still not exist)."""
    return len(name) <= 96 * 2 + 1 and bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name


def not_found_error(name, what: str, fix: str, cause: BaseException | None = None) -> FileNotFoundError:
    """The error for a model path that is neither a local folder nor a loadable Hub repo."""
    name = os.fspath(name)
    where = os.path.abspath(os.path.expanduser(name))
    detail = f"there is no local file or folder {where}"
    if name.startswith("~") and os.path.exists(where):
        detail = f"'~' is not expanded here: pass {where}"
    elif not is_repo_id(name):
        detail += ", and it is not a Hugging Face Hub repo id (namespace/name) either"
    elif cause is not None:
        detail += f", and loading it as a Hugging Face Hub repo failed: {str(cause).strip().splitlines()[0]}"
    return FileNotFoundError(f"{what} {name!r} not found: {detail}. {fix}")


def require_pretrained(name, what: str, fix: str) -> None:
    """Refuse, without any network access, a path that exists neither locally nor as a possible Hub repo id."""
    path = os.fspath(name)
    if not os.path.exists(path) and not is_repo_id(path):
        raise not_found_error(path, what, fix)


_TOWER_FIX = (
    "Pass the folder of a CLIP vision model (with config.json) or a Hub name such as "
    "openai/clip-vit-large-patch14-336 as mm_vision_tower (config) / vision_tower (model args)."
)


def load_tower_config(vision_tower: str) -> CLIPVisionConfig:
    """The CLIP vision config of ``vision_tower``; a ``FileNotFoundError`` naming it when it cannot be found."""
    require_pretrained(vision_tower, "Vision tower", _TOWER_FIX)
    try:
        return CLIPVisionConfig.from_pretrained(vision_tower)
    except (OSError, ValueError) as err:
        if os.path.exists(vision_tower):
            raise
        raise not_found_error(vision_tower, "Vision tower", _TOWER_FIX, err) from err


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
        self.early_stop = CLIPEarlyStop(vision_tower)
        self.select_feature = getattr(args, "mm_vision_select_feature", DEFAULT_MM_VISION_SELECT_FEATURE)
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"Unexpected mm_vision_select_feature: {self.select_feature!r}; use 'patch' or 'cls_patch'.")
        self._configure(args)
        # Every setting is checked against the tower's config before any weights load.
        self.cfg_only = load_tower_config(self.vision_tower_name)
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
        image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            image_features = image_features[:, 1:]
        return image_features

    def _tower_trainable(self) -> bool:
        # requires_grad_ is toggled on the whole tower, so the first parameter speaks for all.
        return next(self.vision_tower.parameters()).requires_grad

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Selected CLIP features (B, N, C) in the tower's dtype; no graph unless CLIP is unfrozen.

        CLIP stops at the selected layer (``CLIPEarlyStop``): with ``mm_vision_select_layer=-2`` it runs
        23 of its 24 layers, and the features are bit-identical to the full run's.
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
