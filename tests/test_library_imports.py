"""The compressor library stands alone: torch and safetensors are all it imports, never its trainer or fixtures.

Checked in fresh interpreters, so nothing another test imported hides a dependency.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Each test starts a fresh interpreter (the only way to see what an import loads), 3 s of CPU apiece.
pytestmark = pytest.mark.slow

LIBRARY_MODULES = {
    "vision_token_compression",
    "vision_token_compression.atomic",
    "vision_token_compression.checkpoint",
    "vision_token_compression.checkpoint_files",
    "vision_token_compression.grid",
    "vision_token_compression.images",
    "vision_token_compression.model_paths",
    "vision_token_compression.models",
    "vision_token_compression.models.geometry",
    "vision_token_compression.models.partial_conv",
    "vision_token_compression.models.token_compressor",
    "vision_token_compression.notices",
    "vision_token_compression.settings",
    "vision_token_compression.towers",
    "vision_token_compression.weights",
}


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_the_library_loads_no_trainer_fixture_or_other_package():
    out = _run("""
        import json, sys
        import safetensors.torch, torch
        before = set(sys.modules)
        import vision_token_compression
        added = sorted(set(sys.modules) - before)
        print(json.dumps([m for m in added if m.split(".")[0] not in sys.stdlib_module_names]))
    """)
    added = set(json.loads(out))
    assert added == LIBRARY_MODULES, sorted(added ^ LIBRARY_MODULES)  # no training, testing, train, evaluate


def test_the_library_works_without_pillow_transformers_or_tqdm(tmp_path):
    out = _run(f"""
        import sys
        for name in ("PIL", "transformers", "tqdm"):
            sys.modules[name] = None  # importing them now fails
        import torch
        import vision_token_compression as vtc
        compressor = vtc.build_compressor(24, 12, 8)
        path = vtc.save_compressor(compressor, {str(tmp_path / "c.safetensors")!r})
        loaded = vtc.build_compressor(24, 12, 8, path)
        x = torch.randn(1, 576, 8)
        assert torch.equal(loaded(x), compressor(x))
        print(tuple(loaded(x).shape))
    """)
    assert out.strip() == "(1, 144, 8)"
