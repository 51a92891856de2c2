"""Shared fixtures: tiny random-weight CLIP stand-ins, built once per test session.

The tiny towers keep the real patch geometry (image 336 / patch 14 → a 24×24 grid, 224 → 16×16)
with hidden size 32 and 2 layers, so tower logic runs in milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from serve_cluster import pytest_runtest_makereport  # noqa: F401 (services' logs in failing tests' reports)

# The training tests' workspace (fixtures ws and stage1), shared by test_train_e2e, _reliability, _deepspeed.
pytest_plugins = ["train_workspace"]

TINY_HIDDEN = 32
TINY_CLIP = {"hidden_size": TINY_HIDDEN, "intermediate_size": 64, "num_attention_heads": 4, "projection_dim": 16}


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    """Keep transformers' progress bars and load reports out of the test logs."""
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="session")
def tiny_tower_336(tmp_path_factory) -> Path:
    """Tiny stand-in with openai/clip-vit-large-patch14-336's patch geometry (24×24 grid, hidden 32)."""
    from vision_token_compression.testing import build_clip_standin

    out = tmp_path_factory.mktemp("tiny-clip-336")
    return build_clip_standin("openai/clip-vit-large-patch14-336", out, num_hidden_layers=2, **TINY_CLIP)


@pytest.fixture(scope="session")
def tiny_tower_224(tmp_path_factory) -> Path:
    """Tiny stand-in with openai/clip-vit-large-patch14's patch geometry (16×16 grid, hidden 32)."""
    from vision_token_compression.testing import build_clip_standin

    out = tmp_path_factory.mktemp("tiny-clip-224")
    return build_clip_standin("openai/clip-vit-large-patch14", out, num_hidden_layers=2, **TINY_CLIP)


@pytest.fixture
def make_args():
    """Factory for the args object LLaVA hands to a vision tower (patch features, layer -2)."""

    def make(**fields) -> SimpleNamespace:
        defaults = {"mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
        return SimpleNamespace(**{**defaults, **fields})

    return make


@pytest.fixture
def image_tokens(monkeypatch) -> list[int]:
    """Image tokens per image of each ``encode_images`` call: what the LLM is fed, call by call."""
    from llava.model.llava_arch import LlavaMetaForCausalLM

    counts: list[int] = []
    encode = LlavaMetaForCausalLM.encode_images

    def counting(self, images):
        features = encode(self, images)
        counts.append(features.shape[1])
        return features

    monkeypatch.setattr(LlavaMetaForCausalLM, "encode_images", counting)
    return counts


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory, tiny_tower_336) -> Path:
    """Stand-in LLaVA-1.5 checkpoint trained without compression (576 image tokens), random weights.

    The folder name contains "llava-v1.5" so name-based clients pick LLaVA-1.5's defaults.
    """
    from llava.standins import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny", tiny_tower_336)


@pytest.fixture(scope="session")
def tiny_llava_compressed(tmp_path_factory, tiny_tower_336) -> Path:
    """Stand-in LLaVA-1.5 checkpoint trained with 24→12 compression (144 image tokens), random weights."""
    from llava.standins import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny-toconv12", tiny_tower_336,
                            compression_output_size=12, seed=1)
