"""Load a LLaVA checkpoint for inference: upstream's ``load_pretrained_model``, plus compression switches.

The checkpoint kind is read from the files, not the name:

- LoRA (``adapter_config.json`` in ``model_path``): the LLM from ``model_base``, then
  ``non_lora_trainables.bin`` (projector, compressor, ...) and the merged LoRA weights;
- projector only (``model_base`` given, no adapter): the LLM from ``model_base``, the config and
  ``mm_projector.bin`` (projector and, when trained, the token compressor) from ``model_path``;
- full: everything from ``model_path``.

Compression can be switched on for a checkpoint trained without it; the compressor then starts as
the window average or is read from ``token_compressor_path``, never random.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers.utils import cached_file

from vision_token_compression import (
    GRID_SIZES_KEY,
    CompressionSettings,
    SettingNames,
    check_checkpoint_safetensors,
    check_weights_in_place,
    not_found_error,
    require_pretrained,
)

from ..constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    MM_PROJECTOR_FILE,
    NON_LORA_FILE,
    config_value,
)
from ..mm_utils import parse_grid_pinpoints
from .compressor_layout import FORK
from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from .llava_arch import check_compressor_weights, load_adapter_weights
from .load_report import quiet_compressor_report
from .weights_io import load_weights_file

logger = logging.getLogger(__name__)


# load_pretrained_model's compression arguments, as its messages name them.
LOADER_NAMES = SettingNames(
    checkpoint="token_compressor_path",
    switch_on="pass use_token_compression=True (--use-token-compression)",
)
_MODEL_PATH_FIX = (
    "Pass a LLaVA (or language model) checkpoint folder with a config.json, or a Hub name such as "
    "liuhaotian/llava-v1.5-7b, as model_path (--model-path)."
)
_MODEL_BASE_FIX = (
    "Pass the language model the checkpoint was trained on, as a folder or a Hub name such as "
    "lmsys/vicuna-7b-v1.5, as model_base (--model-base)."
)


def _check_weight_files(folder: str) -> None:
    """Refuse a local checkpoint whose safetensors files are truncated, naming the file and its size.

    transformers would stop on them with a bare ``SafetensorError``; a Hub id is left to it.
    """
    check_checkpoint_safetensors(folder, f"Download or copy {folder} again; a copy or download that stopped early "
                                 f"leaves such a file.")


def read_config_dict(model_path: str) -> dict:
    """``model_path``'s config.json as a dict; a ``FileNotFoundError`` naming the path when it is not found."""
    require_pretrained(model_path, "Model path", _MODEL_PATH_FIX)
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(model_path)
    except (OSError, ValueError) as err:
        if os.path.exists(model_path):
            raise
        raise not_found_error(model_path, "Model path", _MODEL_PATH_FIX, err) from err
    return config_dict


def _find_file(model_path: str, filename: str) -> str | None:
    """Local or cached path of ``filename`` in a folder or Hub repo, or None if it has none."""
    local = os.path.join(model_path, filename)
    if os.path.isdir(model_path):
        return local if os.path.isfile(local) else None
    return cached_file(model_path, filename, _raise_exceptions_for_missing_entries=False)


def _classes_for(config_dict: dict) -> tuple[type, type]:
    """(config class, model class) for a LLaVA config dict, by its model_type / architectures."""
    names = [config_dict.get("model_type") or "", *(config_dict.get("architectures") or [])]
    if any("mistral" in name.lower() for name in names):
        return LlavaMistralConfig, LlavaMistralForCausalLM
    return LlavaConfig, LlavaLlamaForCausalLM


def _is_llava(config_dict: dict) -> bool:
    names = [config_dict.get("model_type") or "", *(config_dict.get("architectures") or [])]
    return bool(config_dict.get("mm_vision_tower")) or any(name.lower().startswith("llava") for name in names)


def apply_compression_settings(
    config,
    use_token_compression: bool | None = None,
    compression_input_size: int | None = None,
    compression_output_size: int | None = None,
    token_compressor_path: str | None = None,
    source: str = "the checkpoint's config",
) -> bool:
    """Apply load-time compression switches to a LLaVA config; True if compression is switched on here.

    ``use_token_compression=None`` keeps the checkpoint's setting. Both the config's fields and the
    switches go through the library's one check (``CompressionSettings``): a string "false" is off,
    sizes or a compressor path while compression stays off are ignored with a warning, and sizes
    that contradict a checkpoint trained with compression are an error (its compressor has fixed
    shapes). ``source`` names the config in messages (e.g. its config.json).
    """
    # The tower warns about the config's own ignored sizes when it is built from it.
    trained = CompressionSettings.from_args(config, checkpoint_field=None, where=f"{source}: ")
    if hasattr(config, "use_token_compression"):
        config.use_token_compression = trained.enabled  # a string "false" in config.json becomes False
    names = LOADER_NAMES
    if use_token_compression is None:
        use_token_compression = trained.enabled
        names = replace(names, use_token_compression=f"use_token_compression (not given, so that of {source})")
    asked = CompressionSettings.check(
        use_token_compression, compression_input_size, compression_output_size, token_compressor_path, names=names,
    )
    asked.warn_ignored(logger)
    if not asked.enabled:
        if trained.enabled:
            logger.warning(
                "The checkpoint was trained with token compression (%s→%s); loading it without compression as asked.",
                getattr(config, "compression_input_size", None), getattr(config, "compression_output_size", None),
            )
            config.use_token_compression = False
            config.compression_input_size = config.compression_output_size = None
        return False
    if trained.enabled:
        for name, value in (("compression_input_size", compression_input_size),
                            ("compression_output_size", compression_output_size)):
            saved = getattr(config, name, None)
            if value is not None and saved is not None and value != saved:
                raise ValueError(
                    f"The checkpoint was trained with {name}={saved}, but {name}={value} was asked for: its "
                    f"compressor only fits {saved}. Drop the setting, or load a checkpoint trained for {value}."
                )
        return False
    config.use_token_compression = True
    if compression_input_size is not None:
        config.compression_input_size = compression_input_size
    if compression_output_size is not None:
        config.compression_output_size = compression_output_size
    return True


def _load_non_lora_trainables(model_path: str) -> dict[str, torch.Tensor]:
    path = _find_file(model_path, NON_LORA_FILE)
    if path is None:
        raise FileNotFoundError(f"{model_path} is a LoRA checkpoint without non_lora_trainables.bin (projector weights).")
    weights = load_weights_file(
        path,
        fix=f"It holds the projector and token compressor of the LoRA checkpoint {model_path}: load the latest "
        f"complete checkpoint-N/ of that run instead (each holds its own {NON_LORA_FILE}), or retrain.",
    )
    # Saved from the PEFT-wrapped model: "base_model.model.model.mm_projector..." → "model.mm_projector...".
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("base_model.")
        if key.startswith(("model.model.", "model.lm_head.")):
            key = key[len("model."):]
        out[key] = value
    return out


def _load_extra_weights(model, weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Load named weights (projector, compressor, ...) into ``model``; names it does not have are an error.

    The one exception: compressor weights for a model loaded with compression switched off (as
    asked, and warned about in ``_compression_switch``) are left out. Compressor weights are
    checked first (``check_compressor_weights``). Returns the weights loaded, with the
    compressor's grid-size record when it was found beside the file.
    """
    compressor = model.get_vision_tower().token_compressor
    own, weights = FORK.split(weights)  # both files name the compressor as the model does
    if compressor is not None and own:
        weights.update(FORK.place(check_compressor_weights(compressor, own, source)))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"{source} holds weights this model does not have: {result.unexpected_keys[:8]}. Is the config in "
            f"model_path the one these weights were trained with?"
        )
    return weights


def _finish_compressor(model, switched_on: bool, token_compressor_path: str | None, missing: list[str],
                       source: str, checked: bool) -> None:
    """Give the compressor its weights: the given checkpoint, the loaded ones, or the average init.

    ``missing`` holds the compressor's state-dict keys that no loaded file had; ``checked`` says
    whether its weights came from an extra file, checked on their way in (``check_compressor_weights``).
    Weights from ``from_pretrained`` are checked here: transformers 5 sets them without the
    torch-level hook that checks them in ``load_state_dict``.
    """
    tower = model.get_vision_tower()
    compressor = tower.token_compressor
    tower.record_compression(model.config)
    if compressor is None:
        return
    record_missing = FORK.key(GRID_SIZES_KEY) in missing
    loaded = len(missing) == int(record_missing)  # every weight came from a file (the record may not have)
    if token_compressor_path:
        tower.load_token_compressor(token_compressor_path)
        source = token_compressor_path
    elif loaded and checked:
        source = "the checkpoint"
    elif loaded:  # from_pretrained wrote them into the module itself
        check_weights_in_place(compressor, source, recorded=not record_missing)
        source = "the checkpoint"
    else:
        if not switched_on:
            logger.warning(
                "The checkpoint has use_token_compression=True but no token compressor weights: using the "
                "average init (each token is the mean of its window)."
            )
        compressor.reset_parameters()
        source = "average init (window mean)"
    compressor.restore_weight_layout()  # from_pretrained materialised its weights in the default layout
    logger.info(
        "Token compression%s: %d×%d → %d×%d, compressor from %s",
        " switched on at load time" if switched_on else "", compressor.input_grid_size, compressor.input_grid_size,
        compressor.output_grid_size, compressor.output_grid_size, source,
    )


_PLACEMENT_LOGGED = False


def _resolve_device_map(device_map, device: str):
    """The ``device_map`` for ``from_pretrained``: upstream's rule, plus "auto" meaning the CPU without a GPU."""
    global _PLACEMENT_LOGGED
    if device != "cuda":
        device_map = {"": device}
    if torch.cuda.is_available():
        return device_map
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    if any(isinstance(v, int) or str(v).startswith("cuda") for v in values):
        raise ValueError(
            f"device={device!r}, device_map={device_map!r} put the model on a GPU, but CUDA is not available on "
            f"this machine: pass device_map='auto' or 'cpu' (or device='cpu', --device cpu)."
        )
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential", None):
        if not _PLACEMENT_LOGGED:
            logger.info("No GPU available: device_map=%r places the model on the CPU.", device_map)
            _PLACEMENT_LOGGED = True
        return {"": "cpu"}
    return device_map


def _on_cpu(device_map) -> bool:
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    return all(str(v) in ("cpu", "disk") for v in values)


def _from_pretrained_kwargs(device_map, device: str, load_8bit: bool, load_4bit: bool, use_flash_attn: bool,
                            kwargs: dict) -> dict:
    """``from_pretrained`` keyword arguments: placement, dtype, quantisation and attention as upstream sets them.

    A given ``torch_dtype``/``dtype`` is honoured; otherwise float16 (upstream's choice) unless the
    whole model sits on the CPU, where float32 is the dtype CPU kernels are fast and exact in.
    """
    kwargs = dict(kwargs)
    kwargs["device_map"] = _resolve_device_map(device_map, device)
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if kwargs.pop("use_flash_attention_2", False) or use_flash_attn:
        kwargs["attn_implementation"] = "flash_attention_2"
    if load_8bit or load_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_8bit, load_in_4bit=load_4bit and not load_8bit,
            bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
        )
        kwargs.setdefault("dtype", torch.float16)
    elif "dtype" not in kwargs:
        kwargs["dtype"] = torch.float32 if _on_cpu(kwargs["device_map"]) else torch.float16
    return kwargs


def load_pretrained_model(
    model_path: str,
    model_base: str | None,
    model_name: str,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map="auto",
    device: str = "cuda",
    use_flash_attn: bool = False,
    *,
    use_token_compression: bool | None = None,
    compression_input_size: int | None = None,
    compression_output_size: int | None = None,
    token_compressor_path: str | None = None,
    **kwargs,
):
    """Load a LLaVA (or plain LLM) checkpoint; returns ``(tokenizer, model, image_processor, context_len)``.

    Args:
        model_path: Checkpoint folder or Hub name (full, projector-only or LoRA).
        model_base: The LLM a projector-only or LoRA checkpoint was trained on; None for full checkpoints.
        model_name: Name used in log messages (upstream dispatched on it; here the files decide).
        load_8bit / load_4bit / use_flash_attn: Quantise the LLM with bitsandbytes; use FlashAttention-2.
        device_map: Where ``from_pretrained`` puts the weights when ``device`` is ``"cuda"``
            (``"auto"``, ``"cpu"``, ``"cuda:0"``, a dict, ...). Without a GPU, ``"auto"`` means the CPU.
        device: ``"cuda"`` (the default) lets ``device_map`` decide; anything else (``"cpu"``,
            ``"cuda:1"``, ``"mps"``) pins the whole model there, as upstream does.
        use_token_compression: None keeps the checkpoint's setting; True switches ToConv on for a
            checkpoint trained without it; False switches it off.
        compression_input_size / compression_output_size: Grid sides when switching compression on
            (default: the tower's grid → 12).
        token_compressor_path: A compressor checkpoint (safetensors) to use instead of the average init.
        **kwargs: Passed to ``from_pretrained``: ``torch_dtype``/``dtype`` (default float16 on a GPU,
            float32 on the CPU), ``attn_implementation``, ... ``multimodal`` is refused with a
            ``TypeError``, as upstream LLaVA does (lmms-eval relies on it).
    """
    if "multimodal" in kwargs:
        # lmms-eval tries this first and retries without it on TypeError, as upstream LLaVA raises.
        raise TypeError("load_pretrained_model() got an unexpected keyword argument 'multimodal'")
    kwargs = _from_pretrained_kwargs(device_map, device, load_8bit, load_4bit, use_flash_attn, kwargs)

    config_dict = read_config_dict(model_path)
    lora = _is_lora_checkpoint(model_path, model_base)
    if not _is_llava(config_dict):
        return _load_language_model(model_path, model_base, lora, kwargs)

    config_cls, model_cls = _classes_for(config_dict)
    config = config_cls.from_pretrained(model_path)
    switched_on = apply_compression_settings(
        config, use_token_compression, compression_input_size, compression_output_size, token_compressor_path,
        source=f"{model_path}/config.json",
    )
    _anyres_pinpoints(config, 1, f"{model_path}/config.json")  # its form, before the weights load
    with quiet_compressor_report(switched_on):  # our own line says the compressor starts from its init
        tokenizer, model, info, extra = _load_llava(model_cls, config, model_path, model_base, model_name, lora, kwargs)
    compressor_missing = _check_missing_weights(info["missing_keys"], extra, model_path)
    _finish_compressor(model, switched_on, token_compressor_path, compressor_missing, model_path,
                       checked=bool(FORK.keys_in(extra)))
    _add_image_tokens(tokenizer, model)
    image_processor = _load_vision_tower(model, kwargs["device_map"], f"{model_path}/config.json")
    return tokenizer, model, image_processor, config_value(model.config, "max_sequence_length")


def _is_lora_checkpoint(model_path: str, model_base: str | None) -> bool:
    """Whether ``model_path`` is a LoRA checkpoint (``adapter_config.json``), which needs ``model_base``."""
    if model_base is not None:
        require_pretrained(model_base, "Model base", _MODEL_BASE_FIX)
    lora = _find_file(model_path, "adapter_config.json") is not None
    if lora and model_base is None:
        raise ValueError(
            f"{model_path} is a LoRA checkpoint (it has adapter_config.json): pass model_base, the LLM it was "
            f"trained on (--model-base, e.g. lmsys/vicuna-7b-v1.5)."
        )
    return lora


def _load_llava(model_cls, config, model_path: str, model_base: str | None, model_name: str, lora: bool,
                kwargs: dict):
    """``(tokenizer, model, loading info, weights loaded from an extra file)`` for each kind of checkpoint.

    LoRA: the LLM from ``model_base``, ``non_lora_trainables.bin``, then the merged adapter;
    projector only: the LLM from ``model_base``, then ``mm_projector.bin``; full: ``model_path`` alone.
    """
    if lora:
        logger.info("Loading LLaVA %s: LoRA weights from %s on %s", model_name, model_path, model_base)
    elif model_base is not None:
        logger.info("Loading LLaVA %s: projector from %s on %s", model_name, model_path, model_base)
    else:
        logger.info("Loading LLaVA %s from %s", model_name, model_path)
    weights_from = model_path if model_base is None else model_base
    _check_weight_files(weights_from)
    tokenizer = AutoTokenizer.from_pretrained(weights_from)
    model, info = model_cls.from_pretrained(weights_from, config=config, output_loading_info=True, **kwargs)
    extra: dict[str, torch.Tensor] = {}
    if lora:
        extra = _load_non_lora_trainables(model_path)
        extra = _load_extra_weights(model, extra, f"{model_path}/non_lora_trainables.bin")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
    elif model_base is not None:
        projector_file = _find_file(model_path, MM_PROJECTOR_FILE)
        if projector_file is None:
            raise FileNotFoundError(
                f"{model_path} has no mm_projector.bin. With model_base set, model_path must be a projector-only "
                f"or LoRA checkpoint; for a full checkpoint, leave model_base unset."
            )
        extra = _load_extra_weights(model, load_adapter_weights(projector_file), projector_file)
    return tokenizer, model, info, extra


def _check_missing_weights(missing_keys: list[str], extra: dict[str, torch.Tensor], model_path: str) -> list[str]:
    """Refuse a projector that no file held (it would be random); returns the compressor's missing keys."""
    projector_missing = [k for k in missing_keys if "mm_projector." in k and k not in extra]
    if projector_missing:
        raise ValueError(
            f"No weights for the projector ({projector_missing[:4]}) in {model_path}: it would be random. A "
            f"projector-only checkpoint needs mm_projector.bin, a LoRA one non_lora_trainables.bin with the "
            f"projector in it (re-save it with this fork's training, which keeps a frozen projector there)."
        )
    return [k for k in FORK.keys_in(missing_keys) if k not in extra]


def _add_image_tokens(tokenizer, model) -> None:
    """Add the ``<im_patch>`` / ``<im_start>``, ``<im_end>`` tokens the config asks for, resizing embeddings."""
    if config_value(model.config, "mm_use_im_patch_token"):
        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if config_value(model.config, "mm_use_im_start_end"):
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def _anyres_pinpoints(config, tile: int, source: str) -> list[tuple[int, int]] | None:
    """An anyres config's ``image_grid_pinpoints`` in pixels (None when not anyres); ``ValueError`` naming ``source``."""
    if config_value(config, "image_aspect_ratio") != "anyres":
        return None
    raw = getattr(config, "image_grid_pinpoints", None)
    if raw is None:
        raise ValueError(f"{source}: image_aspect_ratio is 'anyres' but image_grid_pinpoints is not set; add the "
                         f"resolutions the model was trained with, e.g. LLaVA-1.6's "
                         f"[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]].")
    try:
        return parse_grid_pinpoints(raw, tile)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


def _resolve_grid_pinpoints(config, tile: int, source: str) -> None:
    """Check ``image_grid_pinpoints`` against the tower's tile size once, at load, and store pixel pairs.

    LLaVA-NeXT's ``"(1x1),...,(3x3)"`` becomes the list it stands for (tiles times ``tile``), so every
    forward and every client (``process_images(..., model.config)``) reads a plain list.
    """
    resolutions = _anyres_pinpoints(config, tile, source)
    if resolutions is None:
        return
    raw = config.image_grid_pinpoints
    if isinstance(raw, str):
        logger.info("image_grid_pinpoints %r from %s: %d resolutions of %d-pixel tiles.", raw, source,
                    len(resolutions), tile)
    config.image_grid_pinpoints = [list(r) for r in resolutions]


def _load_vision_tower(model, device_map, source: str):
    """Load CLIP's weights unless the checkpoint held them, on the model's device and dtype; its image processor.

    With the tower's tile size known, anyres pinpoints from ``source`` are checked against it and resolved.
    """
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model(device_map=device_map)
    vision_tower.to(device=model.device, dtype=model.dtype)
    _resolve_grid_pinpoints(model.config, vision_tower.config.image_size, source)
    return vision_tower.image_processor


def _load_language_model(model_path: str, model_base: str | None, lora: bool, kwargs: dict):
    """A plain LLM (no vision tower), optionally with merged LoRA weights; image_processor is None."""
    _check_weight_files(model_path if model_base is None else model_base)
    if lora:
        from peft import PeftModel

        tokenizer = AutoTokenizer.from_pretrained(model_base)
        model = AutoModelForCausalLM.from_pretrained(model_base, **kwargs)
        model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
    else:
        if model_base is not None:
            logger.warning("model_base=%s is ignored: %s is a full language model checkpoint.", model_base, model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    context_len = config_value(model.config, "max_sequence_length")
    return tokenizer, model, None, context_len
