"""The pipeline's models: a CLIP tower on a random-weight stand-in, the projector and a random-weight Llama."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.presets import SELECT_LAYER
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from llava.model.multimodal_projector.builder import build_vision_projector
from vision_token_compression.testing import CLIP_VISION_CONFIGS, build_clip_standin

CLIP_TOWERS = tuple(sorted(CLIP_VISION_CONFIGS))  # the CLIP shapes a stand-in can take


def real_clip_config(tower: str) -> dict:
    """The published ``CLIPVisionConfig`` fields of ``tower``: what the presets' reductions replace."""
    return CLIP_VISION_CONFIGS[tower]


def default_cache_dir() -> Path:
    """Where CLIP stand-ins are saved and reused: ``$XDG_CACHE_HOME/toconv-llava/bench-standins``."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "toconv-llava" / "bench-standins"


def standin_dir(cache_dir: Path, tower: str, overrides: dict) -> Path:
    """Directory of the stand-in for ``tower`` with ``overrides`` (one per distinct shape)."""
    # e.g. hidden_size=256, num_hidden_layers=4 -> "-hs256-nhl4"
    tag = "".join(f"-{''.join(word[0] for word in k.split('_'))}{v}" for k, v in sorted(overrides.items()))
    return cache_dir / (tower.split("/")[-1] + tag)


def load_tower(
    cache_dir: Path, tower: str, overrides: dict, device: torch.device, dtype: torch.dtype,
) -> CLIPVisionTower:
    """A ``CLIPVisionTower`` (patch features of layer -2, no compression) on a random-weight stand-in."""
    path = build_clip_standin(tower, standin_dir(cache_dir, tower, overrides), **overrides)
    args = SimpleNamespace(mm_vision_select_layer=SELECT_LAYER, mm_vision_select_feature="patch")
    return CLIPVisionTower(str(path), args).to(device=device, dtype=dtype).eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llm(fields: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random-weight ``LlamaForCausalLM``, created directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**fields)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def build_projector(tower_hidden: int, llm_hidden: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """LLaVA-1.5's ``mlp2x_gelu`` projector from the tower's width to the LLM's, random weights."""
    config = SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=tower_hidden, hidden_size=llm_hidden)
    return build_vision_projector(config).to(device=device, dtype=dtype).eval()
