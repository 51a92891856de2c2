"""What LLaVA training saves, and how it reads parameters that DeepSpeed ZeRO-3 partitions.

Under ZeRO-3 each rank holds a shard of every parameter (``param.ds_id`` is set and the local
tensor is empty). Reading one for saving, or writing one when loading, must gather it first with
``deepspeed.zero.GatheredParameters``; every rank has to take part. Without DeepSpeed, or for
parameters that are not partitioned, these helpers are plain copies.

Projector-only pretraining saves ``mm_projector.bin``: the projector's parameters **and** the token
compressor's, under their full parameter names (``model.mm_projector.0.weight``,
``model.vision_tower.token_compressor.conv.weight``), so ``--pretrain_mm_mlp_adapter`` restores both.
``mm_projector.bin`` and LoRA's ``non_lora_trainables.bin`` also hold the compressor's grid-size
record (``...token_compressor.grid_sizes``, an int64 buffer ``[in, out]``, under the prefix of its
weights), so every loader refuses them for a compressor of other grid sizes.

Every file is written atomically (``llava.train.atomic``), and reading one back checks it: an empty
or truncated file (a run killed while writing it, with an older version of this code) is a
``CheckpointError`` that names the file and the fix, never a bare ``EOFError``. The reader and its
error live in ``llava.model.weights_io``, shared with inference (``llava.model`` never imports
``llava.train``); they are importable from here too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from vision_token_compression import GRID_SIZES_KEY, TokenCompressor, check_compressor_tensors

from ..constants import MM_PROJECTOR_FILE, NON_LORA_FILE, TOKEN_COMPRESSOR_FILE
from ..model.compressor_layout import COMPRESSOR_ATTRIBUTE, CompressorLayout, module_prefix
from ..model.weights_io import (
    CheckpointError,
    load_weights_file,
)
from . import atomic

logger = logging.getLogger(__name__)

# Substrings of the parameter names that stage 1 trains and saves.
PROJECTOR_KEYS = ("mm_projector", "vision_resampler")
COMPRESSOR_KEYS = (COMPRESSOR_ATTRIBUTE,)
IM_START_END_KEYS = ("embed_tokens", "embed_in")
# Name ending of the compressor's grid-size record, saved beside its weights.
GRID_SIZES_SUFFIX = f"{COMPRESSOR_KEYS[0]}.{GRID_SIZES_KEY}"
# Written last into every checkpoint-N by the Trainer; a folder without it was not finished.
TRAINER_STATE_FILE = "trainer_state.json"


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


def _is_non_lora_trainable(name: str, param: torch.Tensor, require_grad_only: bool = True) -> bool:
    return "lora_" not in name and (
        param.requires_grad or not require_grad_only or matches(name, PROJECTOR_KEYS + COMPRESSOR_KEYS)
    )


def get_peft_state_non_lora_maybe_zero_3(
    named_params: Iterable[tuple[str, torch.Tensor]], require_grad_only: bool = True
) -> dict[str, torch.Tensor]:
    """Parameters that are not LoRA weights: the trainable ones, plus the projector and token compressor
    even when frozen (gathered).

    A LoRA checkpoint loads on top of the base LLM, which has neither; a projector or compressor
    frozen in stage 2 (``freeze_mm_mlp_adapter``, ``freeze_token_compressor``) and left out here
    would come back random or as the average init instead of its stage-1 weights.
    """
    return gather_state((n, p) for n, p in named_params if _is_non_lora_trainable(n, p, require_grad_only))


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` (a ``checkpoint-N``) cannot be resumed from, or None when it is complete.

    This code writes checkpoints under a temporary name and renames them when complete; the check
    catches folders cut short by older code or by hand (the Trainer writes ``trainer_state.json`` last).
    """
    state = Path(folder) / TRAINER_STATE_FILE
    if not state.is_file():
        return f"it has no {TRAINER_STATE_FILE}"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as err:
        return f"its {TRAINER_STATE_FILE} cannot be read ({err})"
    return None


def is_grid_size_record(name: str) -> bool:
    return name.endswith(GRID_SIZES_SUFFIX)


def grid_size_records(model: nn.Module) -> dict[str, torch.Tensor]:
    """The token compressor's grid-size record, keyed by its full buffer name (the prefix of its weights).

    E.g. ``model.vision_tower.token_compressor.grid_sizes``, or under peft
    ``base_model.model.model.vision_tower.token_compressor.grid_sizes``. A buffer, not a parameter:
    it never trains and is not counted among the trainable parameters. Copied as it is (int64,
    never cast to a float dtype); empty without a compressor.
    """
    return {n: b.detach().to("cpu").clone() for n, b in model.named_buffers() if is_grid_size_record(n)}


def check_compressor_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Check the tensors ``state`` (keys as ``model`` names them) holds for each token compressor, before they load.

    The library's check (``vision_token_compression.check_compressor_tensors``): a grid-size record of
    other sizes is a ``GridSizeMismatchError`` naming both geometries and ``source``; weights without
    a record (files saved before it existed) load, with a warning that their grid sizes cannot be
    checked; another width is refused; non-finite values are warned about.
    """
    for name, module in model.named_modules():
        if not isinstance(module, TokenCompressor):
            continue
        # The layout of this file is the model's own names: under peft, NON_LORA's prefix.
        tensors = CompressorLayout(source, f"{name}." if name else "").extract(state)
        if tensors:
            check_compressor_tensors(module, tensors, source, fix="Resume with the model flags (vision tower, "
                                     "compression) of the run that wrote it.")


def mm_adapter_state(model: nn.Module, use_im_start_end: bool = False) -> dict[str, torch.Tensor]:
    """What ``mm_projector.bin`` holds: projector and compressor parameters (gathered) and the grid-size record."""
    state = get_mm_adapter_state_maybe_zero_3(model.named_parameters(), adapter_keys(use_im_start_end))
    state.update(grid_size_records(model))
    return state


def non_lora_trainables_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``non_lora_trainables.bin`` holds: ``get_peft_state_non_lora_maybe_zero_3`` plus the grid-size record."""
    state = get_peft_state_non_lora_maybe_zero_3(model.named_parameters())
    state.update(grid_size_records(model))
    return state


def load_non_lora_trainables(model: nn.Module, checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``checkpoint/non_lora_trainables.bin`` (projector, compressor, ...) into the peft ``model``.

    Every parameter that ``get_peft_state_non_lora_maybe_zero_3`` saves must be in the file, and
    nothing else but the compressor's grid-size record: a LoRA resume that restored the adapter but
    not these would continue the optimizer with the projector and compressor of stage 1. The record
    is checked before anything loads (``check_compressor_weights``); files written before it existed
    load with a warning.
    """
    path = Path(checkpoint) / NON_LORA_FILE
    fix = (
        f"A LoRA checkpoint needs it to restore the projector, the token compressor and the other non-LoRA "
        f"weights. Resume from an earlier checkpoint-N with --resume_from_checkpoint, or move {Path(checkpoint).name} "
        f"out of the output folder to resume from the one before it."
    )
    state = load_weights_file(path, fix)
    params = dict(model.named_parameters())
    records = grid_size_records(model)
    expected = {n for n, p in params.items() if _is_non_lora_trainable(n, p)}
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - set(params) - set(records))
    if missing or unknown:
        raise CheckpointError(
            f"{path} does not match the model: missing {missing or 'nothing'}, not in the model "
            f"{unknown or 'nothing'}. Resume with the model flags (vision tower, compression, LoRA) of the run "
            f"that wrote it."
        )
    check_compressor_weights(model, state, str(path))
    with torch.no_grad():
        for name, tensor in state.items():
            if name in records:
                continue  # checked: it holds this model's own grid sizes
            with gathered([params[name]], modifier_rank=0):
                params[name].copy_(tensor)
    logger.info("Restored %s (%d tensors: %s) from %s", NON_LORA_FILE, len(state), describe(state), checkpoint)
    return state


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
    """Write ``mm_projector.bin`` (projector + token compressor + its grid-size record) and ``config.json`` to
    ``output_dir``, each atomically.

    Call it on every rank (ZeRO-3 gathers are collective); only ``should_save`` ranks write. Also
    writes the compressor alone as ``token_compressor.safetensors`` with its metadata, the
    portable format that ``--pretrain_token_compressor`` and the eval scripts read.
    """
    state = mm_adapter_state(model, use_im_start_end)
    if not any(matches(n, PROJECTOR_KEYS) for n in state):
        raise RuntimeError("The model has no mm_projector parameters to save; was initialize_vision_modules called?")
    if not should_save:
        return state
    output_dir = Path(output_dir)
    with atomic.staged_files(output_dir, "config") as staged:
        model.config.save_pretrained(staged)
    atomic.torch_save(state, output_dir / MM_PROJECTOR_FILE)
    compressor_state = {n: t for n, t in state.items() if matches(n, COMPRESSOR_KEYS)}
    if compressor_state:
        _save_compressor_file(model, compressor_state, output_dir / TOKEN_COMPRESSOR_FILE)
    logger.info("Saved %s (%d tensors: %s) to %s", MM_PROJECTOR_FILE, len(state), describe(state), output_dir)
    return state


def _save_compressor_file(model: nn.Module, compressor_state: dict[str, torch.Tensor], path: Path) -> None:
    """The compressor as a safetensors checkpoint with metadata (weights from the gathered state)."""
    from vision_token_compression import save_compressor

    tower = model.get_vision_tower()
    compressor = tower.token_compressor
    if any(is_partitioned(p) for p in compressor.parameters()):
        # Under ZeRO-3 the live module holds only a shard: save a twin holding the gathered weights.
        layout = CompressorLayout(MM_PROJECTOR_FILE, module_prefix(next(iter(compressor_state))))
        twin = type(compressor)(compressor.input_grid_size, compressor.output_grid_size, compressor.hidden_dim)
        twin.load_state_dict({
            n: t.float() if t.is_floating_point() else t for n, t in layout.extract(compressor_state).items()
        })
        compressor = twin
    save_compressor(
        compressor, path, vision_tower=tower.vision_tower_name,
        select_layer=tower.select_layer, select_feature=tower.select_feature,
    )


def describe(state: dict[str, torch.Tensor]) -> str:
    """``"grid_sizes: 1, mm_projector: 4, token_compressor: 2"``: how many tensors of each part a state holds.

    The compressor's grid-size record counts apart from its weights.
    """
    parts: dict[str, int] = {}
    for name in state:
        if is_grid_size_record(name):
            key = GRID_SIZES_KEY
        else:
            key = next((k for k in PROJECTOR_KEYS + COMPRESSOR_KEYS + IM_START_END_KEYS if k in name), "other")
        parts[key] = parts.get(key, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(parts.items()))


def load_state_maybe_zero_3(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """``module.load_state_dict(state)``, gathering ZeRO-3 partitions so rank 0's copy reaches every rank."""
    params = list(module.parameters())
    with gathered(params, modifier_rank=0):
        return module.load_state_dict(state, strict=strict)
