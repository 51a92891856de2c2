"""Reading a checkpoint in this fork's format (upstream LLaVA 1.2's: ``LlavaLlamaForCausalLM``) for conversion.

The weights map onto llava-hf's modules as transformers' own ``convert_llava_weights_to_hf.py`` maps
them; the CLIP tower comes from ``mm_vision_tower`` (LLaVA ignores a copy saved in the checkpoint
unless ``unfreeze_mm_vision_tower`` is set), the image processor from the tower too, and settings
llava-hf's ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` cannot express are
refused before anything is written. LLaVA-1.6 (anyres, spatial_unpad) keeps ``model.image_newline``,
and its ``image_grid_pinpoints`` turn from the fork's [width, height] into transformers' [height, width].
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vision_token_compression import (
    CompressionSettings,
    check_checkpoint_safetensors,
    load_pretrained_config,
    parse_bool_setting,
    tower_family,
)

from ..constants import CONFIG_DEFAULTS
from ..model.compressor_layout import FORK
from ..model.multimodal_encoder.clip_encoder import (
    DEFAULT_MM_VISION_SELECT_FEATURE,
    CLIPImageProcessor,
)
from .chat_template import chat_template
from .source import SourceParts, refuse_siglip
from .weight_files import read_weights

logger = logging.getLogger(__name__)

# Checkpoint name prefix → transformers 5 module prefix (checked in this order).
_RENAMES = (
    ("lm_head.", "lm_head."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
)
TOWER_PREFIX = "model.vision_tower.vision_tower."
NEWLINE = "model.image_newline"  # LLaVA-1.6's row separator; the same name in transformers' LlavaNextModel
# Saved by LLaVA but unused by a flat-merge LLaVA-1.5 (image_newline), and rotary caches of old transformers.
_UNUSED = (NEWLINE,)
_UNUSED_SUFFIXES = (".rotary_emb.inv_freq",)

# Config keys that are LLaVA's, not the language model's.
_LLAVA_KEY_PREFIXES = (
    "mm_", "image_", "tune_", "freeze_", "unfreeze_", "pretrain_", "compression_", "tokenizer_", "s2",
)
_LLAVA_KEYS = {"use_token_compression", "use_mm_proj", "architectures", "model_type", "_name_or_path", "auto_map",
               "transformers_version"}
_LANGUAGE_MODELS = {"llava_llama": "llama", "llava_mistral": "mistral", "llava": "llama"}


def _setting(config: dict, name: str):
    """A LLaVA config field, or its default when the config predates it (``llava.constants.CONFIG_DEFAULTS``)."""
    return config.get(name, CONFIG_DEFAULTS[name])


def _refuse(folder: Path, setting: str, why: str) -> ValueError:
    return ValueError(f"{folder}: {setting} cannot be converted: {why}")


def is_anyres(config: dict) -> bool:
    """Whether the checkpoint is LLaVA-1.6 (``image_aspect_ratio: anyres``): converted to ``toconv_llava_next``."""
    return _setting(config, "image_aspect_ratio") == "anyres"


def _check_merge(config: dict, folder: Path) -> None:
    """LLaVA-1.5 (flat merge) or LLaVA-1.6 (anyres + spatial_unpad, llava_next); other merges refused by name."""
    aspect, merge = _setting(config, "image_aspect_ratio"), _setting(config, "mm_patch_merge_type")
    if (aspect == "anyres" and merge == "spatial_unpad") or (not str(aspect).startswith("anyres") and merge == "flat"):
        return
    setting = f"image_aspect_ratio={aspect!r}, mm_patch_merge_type={merge!r}"
    if str(aspect).startswith("anyres_max") or "anyres_max" in str(merge):
        why = ("anyres_max_* (LLaVA-OneVision's capped tiling) has no transformers model with the same packing; "
               "LLaVA-1.6 checkpoints (anyres with spatial_unpad) and LLaVA-1.5 ones (flat) convert.")
    elif aspect == "anyres":
        why = (f"transformers' llava_next packs LLaVA-1.6 tiles with spatial_unpad only (unpadded, one image_newline "
               f"per row); {merge!r} lays them out otherwise. Only anyres with mm_patch_merge_type='spatial_unpad' "
               f"converts.")
    else:
        why = (f"mm_patch_merge_type={merge!r} needs image_aspect_ratio='anyres' tiles (LLaVA-1.6); LLaVA-1.5 "
               f"checkpoints (pad or square images) use 'flat'.")
    raise _refuse(folder, setting, why)


def check_settings(config: dict, folder: Path) -> None:
    """Refuse what llava-hf's LLaVA (1.5: flat) or LLaVA-NeXT (1.6: anyres, spatial_unpad) cannot run the same way."""
    projector = _setting(config, "mm_projector_type")
    if projector != "mlp2x_gelu":
        raise _refuse(folder, f"mm_projector_type={projector!r}", (
            "llava-hf's projector is linear → GELU → linear, LLaVA's mlp2x_gelu (LLaVA-1.5's). Only mlp2x_gelu "
            "checkpoints convert."))
    feature = config.get("mm_vision_select_feature", DEFAULT_MM_VISION_SELECT_FEATURE)
    if feature != "patch":
        raise _refuse(folder, f"mm_vision_select_feature={feature!r}", (
            "the compressor takes the patch tokens alone (vision_feature_select_strategy='default'); only 'patch' "
            "checkpoints convert."))
    _check_merge(config, folder)
    for flag in ("mm_use_im_start_end", "s2"):
        if parse_bool_setting(config.get(flag, False), flag):
            raise _refuse(folder, f"{flag}=true", "llava-hf's LLaVA has neither <im_start>/<im_end> tokens nor S2.")
    layer = config.get("mm_vision_select_layer")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise _refuse(folder, f"mm_vision_select_layer={layer!r}", (
            "LLaVA reads CLIP's features at this int layer (-2 for LLaVA-1.5); the config must give it."))


def text_config_of(config: dict, folder: Path):
    """The language model's config (llama or mistral) from a LLaVA config, without LLaVA's own fields."""
    from transformers import CONFIG_MAPPING

    language_model = _LANGUAGE_MODELS.get(config.get("model_type"))
    if language_model is None:
        raise _refuse(folder, f"model_type={config.get('model_type')!r}", (
            "only LLaVA on Llama/Vicuna (llava_llama) or Mistral (llava_mistral) converts."))
    fields = {
        key: value for key, value in config.items()
        if key not in _LLAVA_KEYS and not key.startswith(_LLAVA_KEY_PREFIXES)
    }
    return CONFIG_MAPPING[language_model](**fields)


def _split_weights(tensors: dict[str, torch.Tensor], folder: Path, anyres: bool = False):
    """(weights in module names, compressor weights in its own names, saved tower weights in CLIPVisionModel names)."""
    weights, tower, unknown = {}, {}, []
    compressor, tensors = FORK.split(tensors)
    for key, tensor in tensors.items():
        if anyres and key == NEWLINE:
            weights[NEWLINE] = tensor
        elif key.startswith(TOWER_PREFIX):
            tower[key[len(TOWER_PREFIX):].removeprefix("vision_model.")] = tensor  # transformers 4 kept vision_model.
        elif key in _UNUSED or key.endswith(_UNUSED_SUFFIXES):
            continue
        else:
            new = next((new + key[len(old):] for old, new in _RENAMES if key.startswith(old)), None)
            if new is None:
                unknown.append(key)
            else:
                weights[new] = tensor
    if unknown:
        raise ValueError(
            f"{folder} holds weights a LLaVA-1.5 checkpoint does not: {', '.join(sorted(unknown)[:8])}"
            f"{' ...' if len(unknown) > 8 else ''}. Only LLaVA-1.5 (Llama/Mistral, mlp2x_gelu, flat) converts."
        )
    if anyres and NEWLINE not in weights:
        raise ValueError(f"{folder} is LLaVA-1.6 (anyres, spatial_unpad) but holds no {NEWLINE}: the checkpoint is "
                         f"incomplete.")
    if "lm_head.weight" not in weights and "model.language_model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]  # tied embeddings
    return weights, compressor, tower


def _tower_weights(config: dict, saved: dict[str, torch.Tensor], tower_name: str, folder: Path, notes: list[str]):
    """CLIP's weights as LLaVA runs it: from the checkpoint when the tower was unfrozen, else from mm_vision_tower."""
    from transformers import CLIPVisionModel

    if parse_bool_setting(config.get("unfreeze_mm_vision_tower"), "unfreeze_mm_vision_tower"):
        if not saved:
            raise ValueError(
                f"{folder} sets unfreeze_mm_vision_tower but holds no {TOWER_PREFIX}* weights: the trained tower is "
                f"missing from the checkpoint."
            )
        notes.append("vision tower: the checkpoint's own (unfreeze_mm_vision_tower)")
        return saved
    if saved:
        notes.append(f"vision tower: {tower_name} (the checkpoint's copy is ignored, as LLaVA ignores it)")
    else:
        notes.append(f"vision tower: {tower_name}")
    check_checkpoint_safetensors(tower_name, f"Download or copy the vision tower {tower_name} again.")
    return CLIPVisionModel.from_pretrained(tower_name).state_dict()


def _load_tower_config(tower_name: str):
    """The tower's CLIPVisionConfig; "not found" (locally or in the Hub cache), or its damaged config.json, named."""
    from transformers import CLIPVisionConfig

    return load_pretrained_config(
        CLIPVisionConfig, tower_name, "The vision tower (mm_vision_tower, or --vision-tower)",
        f"The converted checkpoint needs its weights, config and image processor: pass --vision-tower with a local "
        f"copy of it, or download it (hf download {tower_name}).",
    )


def _check_tower_fits(weights: dict[str, torch.Tensor], config: dict, vision_config, tower_name: str) -> None:
    width = weights["model.multi_modal_projector.linear_1.weight"].shape[1]
    if width != vision_config.hidden_size:
        raise ValueError(
            f"The projector takes {width}-wide features (mm_hidden_size={config.get('mm_hidden_size')}) but the vision "
            f"tower {tower_name} is {vision_config.hidden_size} wide: it is not the tower this checkpoint was trained "
            f"with. Pass the right one as --vision-tower."
        )


def _pinpoints(config: dict, vision_config, folder: Path) -> list[list[int]]:
    """The fork's ``image_grid_pinpoints`` ([width, height], a list or its repr) as transformers' [height, width]."""
    from ..mm_utils import parse_grid_pinpoints

    try:
        pairs = parse_grid_pinpoints(config.get("image_grid_pinpoints") or [], vision_config.image_size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / 'config.json'}: {err}") from err
    return [[height, width] for width, height in pairs]


def read_llava_checkpoint(
    folder: Path, config: dict, *, vision_tower: str | None = None, conv_mode: str | None = "llava_v1",
) -> SourceParts:
    """The parts of a checkpoint in upstream LLaVA's format; ``vision_tower`` overrides its ``mm_vision_tower``."""
    from transformers import AutoTokenizer, GenerationConfig

    check_settings(config, folder)
    text_config = text_config_of(config, folder)
    tower_name = vision_tower or config["mm_vision_tower"]
    refuse_siglip(tower_family(tower_name).name, f"{folder}'s vision tower {tower_name!r} (mm_vision_tower)")
    vision_config = _load_tower_config(tower_name)
    anyres = is_anyres(config)
    pinpoints = _pinpoints(config, vision_config, folder) if anyres else None  # checked before the weights load
    weights, compressor, saved_tower = _split_weights(read_weights(folder), folder, anyres)
    _check_tower_fits(weights, config, vision_config, tower_name)
    notes: list[str] = []
    dtype = weights["lm_head.weight"].dtype
    tower = _tower_weights(config, saved_tower, tower_name, folder, notes)
    weights.update({f"model.vision_tower.{key}": value.to(dtype) for key, value in tower.items()})

    sizes = None
    settings = CompressionSettings.from_config(config, where=f"{folder / 'config.json'}: ")
    if settings.enabled:
        if not compressor:
            raise ValueError(f"{folder} sets use_token_compression but holds no {FORK.prefix}* weights.")
        sizes = (settings.input_size, settings.output_size)
    generation_file = folder / "generation_config.json"
    return SourceParts(
        folder=folder, kind="llava", text_config=text_config, vision_config=vision_config,
        select_layer=config["mm_vision_select_layer"], tower_name=tower_name, weights=weights,
        tokenizer=AutoTokenizer.from_pretrained(folder, config=text_config),  # config: llava_llama is not registered
        image_processor=CLIPImageProcessor.from_pretrained(tower_name),  # PIL's, as LLaVA's tower loads it
        pad_to_square=_setting(config, "image_aspect_ratio") == "pad", image_grid_pinpoints=pinpoints,
        compressor_weights=compressor if sizes else None, compressor_sizes=sizes,
        chat_template=chat_template(conv_mode) if conv_mode else None,
        generation_config=GenerationConfig.from_pretrained(folder) if generation_file.is_file() else None,
        notes=notes,
    )
