"""What LLaVA training saves, and how it reads parameters that DeepSpeed ZeRO-3 partitions.

Under ZeRO-3 each rank holds a shard of every parameter (``param.ds_id`` is set and the local
tensor is empty). Reading one for saving, or writing one when loading, must gather it first with
``deepspeed.zero.GatheredParameters``; every rank has to take part. Without DeepSpeed, or for
parameters that are not partitioned, these helpers are plain copies.

Projector-only pretraining saves ``mm_projector.bin``: the projector's parameters **and** the token
compressor's, under their full parameter names (``model.mm_projector.0.weight``,
``model.vision_tower.token_compressor.conv.weight``), so ``--pretrain_mm_mlp_adapter`` restores both.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..constants import MM_PROJECTOR_FILE, TOKEN_COMPRESSOR_FILE

logger = logging.getLogger(__name__)

# Substrings of the parameter names that stage 1 trains and saves.
PROJECTOR_KEYS = ("mm_projector", "vision_resampler")
COMPRESSOR_KEYS = ("token_compressor",)
IM_START_END_KEYS = ("embed_tokens", "embed_in")


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 has partitioned across ranks."""
    return hasattr(param, "ds_id")


def _deepspeed_zero():
    try:
        from deepspeed import zero
    except ImportError as err:
        raise ImportError(
            "These parameters are partitioned by DeepSpeed ZeRO-3 but deepspeed cannot be imported; "
            "install it with pip install 'toconv-llava[train]' (or pip install deepspeed)."
        ) from err
    return zero


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3-partitioned ``params`` whole inside the block (no-op for ordinary tensors).

    With ``modifier_rank`` set, changes that rank makes inside the block are scattered back to
    every rank when it ends (use it to load weights). All ranks must enter the block.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    zero = _deepspeed_zero()
    with zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def gather_state(named_params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``named_params``, gathered one at a time under ZeRO-3."""
    state = {}
    for name, param in named_params:
        with gathered([param]):
            state[name] = param.detach().to("cpu").clone()
    return state


def matches(name: str, keys: Iterable[str]) -> bool:
    return any(key in name for key in keys)


def adapter_keys(use_im_start_end: bool = False) -> tuple[str, ...]:
    """Name substrings of what projector-only pretraining saves into ``mm_projector.bin``."""
    keys = PROJECTOR_KEYS + COMPRESSOR_KEYS
    return keys + IM_START_END_KEYS if use_im_start_end else keys


def get_mm_adapter_state_maybe_zero_3(
    named_params: Iterable[tuple[str, torch.Tensor]], keys_to_match: Iterable[str]
) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters whose names contain one of ``keys_to_match`` (gathered under ZeRO-3)."""
    keys = tuple(keys_to_match)
    return gather_state((n, p) for n, p in named_params if matches(n, keys))


def get_peft_state_maybe_zero_3(named_params: Iterable[tuple[str, torch.Tensor]], bias: str) -> dict[str, torch.Tensor]:
    """The LoRA weights to save with ``save_pretrained``: ``lora_`` parameters plus biases per ``bias``.

    ``bias``: ``"none"`` (LoRA weights only), ``"all"`` (every bias too) or ``"lora_only"`` (biases
    of the layers that carry LoRA weights).
    """
    named = list(named_params)
    if bias == "none":
        chosen = [(n, p) for n, p in named if "lora_" in n]
    elif bias == "all":
        chosen = [(n, p) for n, p in named if "lora_" in n or "bias" in n]
    elif bias == "lora_only":
        lora_layers = {n.split("lora_")[0] for n, _ in named if "lora_" in n}
        chosen = [
            (n, p) for n, p in named
            if "lora_" in n or (n.endswith("bias") and n[: -len("bias")] in lora_layers)
        ]
    else:
        raise ValueError(f"lora_bias must be 'none', 'all' or 'lora_only', got {bias!r}.")
    return gather_state(chosen)


def get_peft_state_non_lora_maybe_zero_3(
    named_params: Iterable[tuple[str, torch.Tensor]], require_grad_only: bool = True
) -> dict[str, torch.Tensor]:
    """Parameters that are not LoRA weights: the trainable ones, plus the projector and token compressor
    even when frozen (gathered).

    A LoRA checkpoint loads on top of the base LLM, which has neither; a projector or compressor
    frozen in stage 2 (``freeze_mm_mlp_adapter``, ``freeze_token_compressor``) and left out here
    would come back random or as the average init instead of its stage-1 weights.
    """
    always = PROJECTOR_KEYS + COMPRESSOR_KEYS
    return gather_state(
        (n, p) for n, p in named_params
        if "lora_" not in n and (p.requires_grad or not require_grad_only or matches(n, always))
    )


def find_all_linear_names(model: nn.Module) -> list[str]:
    """Full module names of the LLM's linear layers for LoRA; vision tower, projector and ``lm_head`` left out.

    Full names, not upstream's short ones: peft matches a short name such as ``q_proj`` against
    every module ending in it, CLIP's attention included when the tower is already loaded.
    """
    skip = ("mm_projector", "vision_tower", "vision_resampler")
    return sorted(
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not matches(name, skip) and name.rsplit(".", 1)[-1] != "lm_head"
    )


def save_mm_adapter(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    use_im_start_end: bool = False,
    should_save: bool = True,
) -> dict[str, torch.Tensor]:
    """Write ``mm_projector.bin`` (projector + token compressor) and ``config.json`` to ``output_dir``.

    Call it on every rank (ZeRO-3 gathers are collective); only ``should_save`` ranks write. Also
    writes the compressor alone as ``token_compressor.safetensors`` with its metadata, the
    portable format that ``--pretrain_token_compressor`` and the eval scripts read.
    """
    state = get_mm_adapter_state_maybe_zero_3(model.named_parameters(), adapter_keys(use_im_start_end))
    if not any(matches(n, PROJECTOR_KEYS) for n in state):
        raise RuntimeError("The model has no mm_projector parameters to save; was initialize_vision_modules called?")
    if not should_save:
        return state
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(output_dir)
    torch.save(state, output_dir / MM_PROJECTOR_FILE)
    compressor_state = {n: t for n, t in state.items() if matches(n, COMPRESSOR_KEYS)}
    if compressor_state:
        _save_compressor_file(model, compressor_state, output_dir / TOKEN_COMPRESSOR_FILE)
    logger.info("Saved %s (%d tensors: %s) to %s", MM_PROJECTOR_FILE, len(state), describe(state), output_dir)
    return state


def _save_compressor_file(model: nn.Module, compressor_state: dict[str, torch.Tensor], path: Path) -> None:
    """The compressor as a safetensors checkpoint with metadata (weights from the gathered state)."""
    from vision_token_compression.checkpoint import save_compressor

    tower = model.get_vision_tower()
    compressor = tower.token_compressor
    if any(is_partitioned(p) for p in compressor.parameters()):
        # Under ZeRO-3 the live module holds only a shard: save a twin holding the gathered weights.
        prefix = os.path.commonprefix(list(compressor_state))
        prefix = prefix[: prefix.rfind("token_compressor.") + len("token_compressor.")]
        twin = type(compressor)(compressor.input_grid_size, compressor.output_grid_size, compressor.hidden_dim)
        twin.load_state_dict({n[len(prefix):]: t.float() for n, t in compressor_state.items()})
        compressor = twin
    save_compressor(
        compressor, path, vision_tower=tower.vision_tower_name,
        select_layer=tower.select_layer, select_feature=tower.select_feature,
    )


def describe(state: dict[str, torch.Tensor]) -> str:
    """``"mm_projector: 4, token_compressor: 2"``: how many tensors of each part a state holds."""
    parts: dict[str, int] = {}
    for name in state:
        key = next((k for k in PROJECTOR_KEYS + COMPRESSOR_KEYS + IM_START_END_KEYS if k in name), "other")
        parts[key] = parts.get(key, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(parts.items()))


def load_state_maybe_zero_3(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """``module.load_state_dict(state)``, gathering ZeRO-3 partitions so rank 0's copy reaches every rank."""
    params = list(module.parameters())
    with gathered(params, modifier_rank=0):
        return module.load_state_dict(state, strict=strict)
