"""Load a LLaVA projector (``mm_projector``) without importing ``llava``, for evaluation.

Upstream LLaVA saves the projector in ``mm_projector.bin`` (projector-only pretraining) or inside
the model's safetensors shards, under ``model.mm_projector.*``. Its types are ``linear``
(one ``nn.Linear``: keys ``weight``/``bias``) and ``mlp{N}x_gelu`` (``nn.Sequential`` of N
linears with GELUs between them: keys ``0.*``, ``2.*``, ...). The type is read off the keys.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

logger = logging.getLogger(__name__)

_KEY = "mm_projector."


def _projector_tensors(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    found = {key.split(_KEY, 1)[1]: value for key, value in state.items() if _KEY in key}
    if not found:
        raise ValueError(
            f"No mm_projector weights in {source} (looked for keys containing {_KEY!r}; found e.g. "
            f"{sorted(state)[:5]}). Pass a LLaVA mm_projector.bin, a LLaVA checkpoint folder, or a "
            f"safetensors file holding model.mm_projector.* tensors."
        )
    return found


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_projector_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Projector tensors (keys relative to ``mm_projector.``) from a file or a LLaVA checkpoint folder."""
    path = Path(path)
    if path.is_file():
        return _projector_tensors(_read_state(path), path)
    if not path.is_dir():
        raise FileNotFoundError(f"Projector checkpoint not found: {path}")
    if (path / "mm_projector.bin").is_file():
        return _projector_tensors(_read_state(path / "mm_projector.bin"), path)
    shards: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            shards = sorted({path / name for key, name in weight_map.items() if _KEY in key})
            break
    else:
        shards = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update({k: v for k, v in _read_state(shard).items() if _KEY in k})
    return _projector_tensors(state, path)


def build_projector(state: dict[str, torch.Tensor]) -> nn.Module:
    """A ``linear`` or ``mlp{N}x_gelu`` projector holding ``state`` (keys as in upstream LLaVA)."""
    if set(state) <= {"weight", "bias"}:
        layer = nn.Linear(state["weight"].shape[1], state["weight"].shape[0], bias="bias" in state)
        layer.load_state_dict(state)
        return layer
    indices = sorted({int(key.split(".")[0]) for key in state})
    if indices != list(range(0, 2 * len(indices), 2)):
        raise ValueError(
            f"Projector keys {sorted(state)} are neither 'linear' (weight, bias) nor 'mlpNx_gelu' "
            f"(linears at 0, 2, 4, ...)."
        )
    layers: list[nn.Module] = []
    for position, index in enumerate(indices):
        if position:
            layers.append(nn.GELU())
        weight = state[f"{index}.weight"]
        layers.append(nn.Linear(weight.shape[1], weight.shape[0], bias=f"{index}.bias" in state))
    projector = nn.Sequential(*layers)
    projector.load_state_dict(state)
    return projector


def load_projector(path: str | os.PathLike) -> nn.Module:
    """The LLaVA projector stored at ``path``, in float32 and eval mode."""
    projector = build_projector({k: v.float() for k, v in read_projector_state(path).items()})
    kind = "linear" if isinstance(projector, nn.Linear) else f"mlp{len(projector) // 2 + 1}x_gelu"
    logger.info("Loaded %s projector from %s", kind, path)
    return projector.eval().requires_grad_(False)
