"""What the library needs to know of a ViT vision tower, for any host (LLaVA's towers, the trainer).

- ``grid_side``: the patch grid (``image_size // patch_size``).
- ``TowerFamily`` / ``tower_family``: CLIP (a CLS token in front) or SigLIP (no CLS token, an
  attention-pooling head), with the transformers classes that load each.
- ``check_select_layer`` / ``check_select_feature`` / ``select_features``: which hidden state and
  which of its tokens a host feeds on.
- ``EarlyExit``: runs a tower only up to the selected hidden state, skipping any pooling head.

transformers is imported only inside the functions that load something, and only API that
transformers 4.37 already had is used, so hosts on either major version share this code.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

logger = logging.getLogger(__name__)

SELECT_FEATURES = ("patch", "cls_patch")


def grid_side(config) -> int:
    """Side of a ViT tower's patch grid, ``image_size // patch_size`` (24 for CLIP ViT-L/14-336, 27 for SigLIP-384/14).

    ``config`` is any object with ``image_size`` and ``patch_size`` (a transformers vision config, or a
    dict-like namespace). A patch size that does not divide the image leaves the remainder unused, as the
    towers' patch embedding (a strided convolution without padding) does.
    """
    try:
        image_size, patch_size = config.image_size, config.patch_size
    except AttributeError as err:
        raise ValueError(
            f"{type(config).__name__} has no image_size/patch_size: pass a ViT vision config (e.g. CLIPVisionConfig, "
            f"SiglipVisionConfig) to get its patch grid."
        ) from err
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name}={value!r}: a vision config needs a positive int here.")
    if patch_size > image_size:
        raise ValueError(
            f"{type(config).__name__} has patch_size {patch_size} > image_size {image_size}: no patch grid."
        )
    return image_size // patch_size


# ---- Tower families ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TowerFamily:
    """A kind of ViT tower: the transformers classes that load it and whether it has a CLS token.

    Classes are named, not imported, so that this module imports without transformers.
    """

    name: str
    config_class: str
    model_class: str
    image_processor_class: str
    has_cls_token: bool
    example: str

    def config_type(self) -> type:
        """The transformers vision config class (it also reads a full two-tower config's vision part)."""
        import transformers

        return getattr(transformers, self.config_class)

    def model_type(self) -> type:
        """The transformers vision model class."""
        import transformers

        return getattr(transformers, self.model_class)

    def image_processor_type(self) -> type:
        """The image processor class, its PIL variant where transformers has one.

        transformers 5 makes the default processors depend on torchvision; their ``*Pil`` twins
        preprocess as 4.x did, which is how LLaVA's towers were trained.
        """
        import transformers

        return getattr(transformers, f"{self.image_processor_class}Pil", None) or getattr(
            transformers, self.image_processor_class
        )


CLIP = TowerFamily("clip", "CLIPVisionConfig", "CLIPVisionModel", "CLIPImageProcessor", True,
                   "openai/clip-vit-large-patch14-336")
SIGLIP = TowerFamily("siglip", "SiglipVisionConfig", "SiglipVisionModel", "SiglipImageProcessor", False,
                     "google/siglip-so400m-patch14-384")


def tower_family(tower: str | os.PathLike) -> TowerFamily:
    """SigLIP when the tower's name or path contains ``siglip`` (LLaVA-NeXT's rule) or its local
    config.json is a SigLIP (not SigLIP 2) config; CLIP otherwise."""
    name = os.fspath(tower)
    if "siglip" in name.lower():
        return SIGLIP
    return SIGLIP if _local_model_type(name) in ("siglip", "siglip_vision_model") else CLIP


def _local_model_type(folder: str) -> str | None:
    """``model_type`` of ``folder``/config.json; None without a readable one (the config loader reports that)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def load_image_processor(tower: str | os.PathLike, family: TowerFamily | None = None):
    """The image processor saved with ``tower`` (Hub name or local path), of its family's class."""
    family = family or tower_family(tower)
    return family.image_processor_type().from_pretrained(os.fspath(tower))


# ---- Which hidden state, which tokens --------------------------------------------------------------


def check_select_layer(layer, num_layers: int, tower: str, name: str = "mm_vision_select_layer") -> int:
    """``layer`` as an index into a tower's ``hidden_states`` (``num_layers`` + 1 entries: embeddings, then each layer).

    ``name`` is how the caller spells the setting in the error (a model arg, a CLI flag).
    """
    if isinstance(layer, bool) or not isinstance(layer, int):  # a ValueError like every other bad setting
        raise ValueError(  # noqa: TRY004
            f"{name} must be an int (e.g. -2, as LLaVA-1.5), got {layer!r} ({type(layer).__name__})."
        )
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(
            f"{name}={layer} is out of range: {tower} has {num_layers} layers, so use {-(num_layers + 1)}..{num_layers} "
            f"(0 is the embeddings, -1 the last layer, -2 LLaVA-1.5's choice); got {layer}."
        )
    return layer


def check_select_feature(feature, family: TowerFamily, tower: str, name: str = "mm_vision_select_feature") -> str:
    """``feature`` if the tower can give it: ``patch`` (grid tokens only) or ``cls_patch`` (CLS token in front)."""
    if feature not in SELECT_FEATURES:
        raise ValueError(f"Unexpected {name}: {feature!r}; use 'patch' or 'cls_patch'.")
    if feature == "cls_patch" and not family.has_cls_token:
        raise ValueError(
            f"{name}='cls_patch' keeps a CLS token, but {tower} is a {family.name} tower, which has none: "
            f"set {name}='patch' (every token of its grid)."
        )
    return feature


def select_features(hidden: torch.Tensor, feature: str, has_cls_token: bool) -> torch.Tensor:
    """The tokens of a selected hidden state (B, T, C) a host feeds on: the grid alone for ``patch``."""
    return hidden[:, 1:] if feature == "patch" and has_cls_token else hidden


def grid_tokens(features: torch.Tensor, feature: str) -> torch.Tensor:
    """The grid tokens of ``select_features``' output: drops the CLS token kept by ``cls_patch``."""
    return features[:, 1:] if feature == "cls_patch" else features


# ---- The early exit: run only the layers the selected hidden state needs ----------------------------


class _SkippedHead(nn.Module):
    """Stands in for a pooling head during an early exit: the pooled output is never read."""

    def forward(self, *args, **kwargs) -> None:
        return None


@dataclass
class _Layout:
    """Where a model keeps what an early exit swaps: its encoder, the encoder's layer list, a pooling head."""

    encoder: nn.Module  # holds the layer list as ``layers_attribute``; its output is the selected state
    layers_attribute: str
    layers: nn.ModuleList
    head_owner: nn.Module | None  # the module holding a ``head`` beside the encoder (SigLIP), else None
    prefixes: dict  # {layers run: ModuleList of the first layers}, built once per count

    def first(self, count: int) -> nn.ModuleList:
        if count not in self.prefixes:
            self.prefixes[count] = nn.ModuleList(list(self.layers)[:count])
        return self.prefixes[count]


class EarlyExit:
    """Runs a ViT tower only up to the hidden state a host selects; the features are bit-identical.

    LLaVA reads ``hidden_states[-2]``, so a full forward computes a last layer whose output it throws
    away, and SigLIP adds a final norm and an attention-pooling head on top. Measured gain (CLIP
    ViT-L/14-336 at its real shape, one CPU, select layer -2; docs/benchmarks.md): 23 of 24 layers,
    4.2% fewer FLOPs and 6.4% less time. SigLIP-so400m at -2: 26 of 27 layers and no pooling head.

    How: the model's own forward runs with its encoder's layer list swapped, for that one call, for a
    list of its first layers, and a pooling head named ``head`` beside the encoder (SigLIP's) swapped
    for a stub. The selected hidden state is the encoder's own output, read by a forward hook on the
    encoder: not the model's ``last_hidden_state``, which SigLIP passes through ``post_layernorm``.

    + The model's own code still does everything else (embeddings, CLIP's pre-norm, masks, attention
      implementation), so nothing version-specific is re-implemented. The one assumption is a
      ModuleList named ``*encoder.layers`` with ``num_hidden_layers`` entries, as CLIP and SigLIP keep
      it in transformers 4.x and 5.x; any other layout runs every layer (logged once).
    + Outside the call nothing changes: parameters, state_dict keys, hooks and checkpoints are those
      of the full model.
    - During the call the swap is visible to other threads, so swapped calls hold a process-wide lock
      (a lock attribute would stop a tower from being deep-copied or pickled). Rejected: a hook that
      raises to stop early skips the post-forward hooks DeepSpeed ZeRO-3 and accelerate rely on;
      re-implementing the encoder loop depends on each version's layer signature and mask code.

    Args:
        name: The tower's name or path, for the one warning about an unknown layout.
    """

    _swap_lock = threading.Lock()  # a class attribute: one for the process, never copied with a tower
    _skipped_head = _SkippedHead()

    def __init__(self, name: str) -> None:
        self.name = name
        # (model, _Layout or None) for the last model seen; a plain tuple, so state_dict and .to() never see it.
        self._found: tuple[nn.Module, _Layout | None] | None = None

    @staticmethod
    def layers_needed(select_layer: int, num_layers: int) -> int | None:
        """Encoder layers ``hidden_states[select_layer]`` needs (23 of 24 for -2); None when all are needed."""
        if not -(num_layers + 1) <= select_layer <= num_layers:
            return None  # out of range: the full run lets the caller's indexing raise its IndexError
        needed = select_layer % (num_layers + 1)  # hidden_states[i] is the output of layer i (0: embeddings)
        return needed if needed < num_layers else None

    def __call__(self, model: nn.Module, pixels: torch.Tensor, select_layer: int) -> SimpleNamespace:
        """``model``'s outputs for ``pixels`` as a host's ``feature_select`` reads them.

        ``hidden_states`` is indexed as in a full run; every entry but the selected one is None.
        """
        num_layers = model.config.num_hidden_layers
        selected = self.selected(model, pixels, select_layer)
        states = [None] * (num_layers + 1)
        states[select_layer] = selected
        return SimpleNamespace(hidden_states=tuple(states))

    def selected(self, model: nn.Module, pixels: torch.Tensor, select_layer: int) -> torch.Tensor:
        """``hidden_states[select_layer]`` of ``model`` for ``pixels`` (B, T, C), running only the layers it needs."""
        num_layers = model.config.num_hidden_layers
        if -(num_layers + 1) <= select_layer <= num_layers:
            count = self.layers_needed(select_layer, num_layers)
            count = num_layers if count is None else count
            with self._swap_lock:
                # Looked up under the lock too: during another thread's call the model holds the short list.
                layout = self._layout_for(model, select_layer)
                if layout is not None:
                    return self._run_first(model, layout, pixels, count)
        return model(pixels, output_hidden_states=True).hidden_states[select_layer]

    def _run_first(self, model: nn.Module, layout: _Layout, pixels: torch.Tensor, count: int) -> torch.Tensor:
        """The encoder's output after its first ``count`` layers, the pooling head skipped."""
        captured = []
        hook = layout.encoder.register_forward_hook(lambda module, args, output: captured.append(output))
        setattr(layout.encoder, layout.layers_attribute, layout.first(count))
        if layout.head_owner is not None:
            head = layout.head_owner.head
            layout.head_owner.head = self._skipped_head
        try:
            model(pixels, return_dict=True)
        finally:
            hook.remove()
            setattr(layout.encoder, layout.layers_attribute, layout.layers)
            if layout.head_owner is not None:
                layout.head_owner.head = head
        output = captured[-1]
        return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _layout_for(self, model: nn.Module, select_layer: int) -> _Layout | None:
        """``model``'s layout, looked up once per model (again if its layer list was replaced); None if unknown."""
        found = self._found
        stale = found is None or found[0] is not model
        if not stale and found[1] is not None:
            layout = found[1]
            stale = getattr(layout.encoder, layout.layers_attribute) is not layout.layers
        if stale:
            layout = _find_layout(model, model.config.num_hidden_layers)
            if layout is None:
                logger.warning(
                    "%s: no unique '*encoder.layers' list of %d layers in %s; running every layer instead of "
                    "stopping at select layer %d.", self.name, model.config.num_hidden_layers,
                    type(model).__name__, select_layer,
                )
            found = self._found = (model, layout)
        return found[1]


def _find_layout(model: nn.Module, num_layers: int) -> _Layout | None:
    """The layout of the one ``*encoder.layers`` list of ``num_layers`` layers in ``model``, else None."""
    names = [
        name for name, module in model.named_modules()
        if (name == "encoder.layers" or name.endswith(".encoder.layers"))
        and isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(names) != 1:
        return None
    encoder_name, _, attribute = names[0].rpartition(".")
    encoder = model.get_submodule(encoder_name)
    encoder_owner = model.get_submodule(encoder_name.rpartition(".")[0])
    has_head = isinstance(getattr(encoder_owner, "head", None), nn.Module)
    return _Layout(encoder, attribute, getattr(encoder, attribute), encoder_owner if has_head else None, {})
