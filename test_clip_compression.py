"""Acceptance script: CLIPVisionTower with ToConv token compression.

Reproduces the three tests of the integration spec (a 224 tower without compression, a 336 tower
compressed 24x24 → 12x12 and 24x24 → 8x8), then checks 16x16 → 12x12, 16x16 → 8x8 and the
multi-scale S2 tower with compression. Every shape and count is asserted; a failure exits non-zero.

Real CLIP weights are used when given (``--vision-tower``, ``--vision-tower-224``) or found in
the Hugging Face cache. Otherwise the script builds random-weight stand-ins with the real configs
of openai/clip-vit-large-patch14(-336) and says so: their shapes are real, their features are not.

    python test_clip_compression.py
    python test_clip_compression.py --vision-tower /path/to/clip-vit-large-patch14-336

It also runs under pytest (``pytest test_clip_compression.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

TOWER_224 = "openai/clip-vit-large-patch14"
TOWER_336 = "openai/clip-vit-large-patch14-336"
SEPARATOR = "=" * 60
BATCH_SIZE = 2

# The spec's expected output (CLIP_TOCONV_INTEGRATION.md). The script prints more than this
# (stand-in notice, tests 4-6), but these lines must all appear, in this order.
SEED_EXPECTED_OUTPUT = """\
Testing CLIPVisionTower with ToConv compression integration

============================================================
Test 1: CLIPVisionTower WITHOUT compression
============================================================
Input shape: torch.Size([2, 3, 224, 224])
Output shape: torch.Size([2, 256, 1024])
Expected patches: 256 (16x16)
Hidden size: 1024
✓ Test passed!

============================================================
Test 2: CLIPVisionTower WITH compression (24x24 → 12x12)
============================================================
TokenCompressor [24to12]: 24×24 → 12×12
  Architecture: PartialConv(k=3, s=2, p=1)
  Theoretical RF: 3×3
ToConv Token Compression enabled: 24x24 → 12x12
Input shape: torch.Size([2, 3, 336, 336])
Output shape: torch.Size([2, 144, 1024])
Expected patches: 144 (12x12)
Hidden size: 1024
✓ Test passed!

============================================================
Test 3: CLIPVisionTower WITH compression (24x24 → 8x8)
============================================================
TokenCompressor [24to8]: 24×24 → 8×8
  Architecture: PartialConv(k=3, s=3, p=0)
  Theoretical RF: 3×3
ToConv Token Compression enabled: 24x24 → 8x8
Input shape: torch.Size([2, 3, 336, 336])
Output shape: torch.Size([2, 64, 1024])
Expected patches: 64 (8x8)
Hidden size: 1024
✓ Test passed!

============================================================
All tests passed successfully!
============================================================
"""


class CheckFailed(AssertionError):
    """A checked property of the tower did not hold."""


def check(condition: bool, message: str) -> None:
    """Raise ``CheckFailed`` with ``message`` unless ``condition`` (kept under ``python -O``)."""
    if not condition:
        raise CheckFailed(message)


@dataclass(frozen=True)
class TowerSource:
    """Where a tower's weights come from."""

    name: str
    path: Path
    real: bool


def default_standin_dir() -> Path:
    """``$TOCONV_STANDIN_DIR``, else ``~/.cache/toconv-llava/standins`` (under ``$XDG_CACHE_HOME`` if set)."""
    if os.environ.get("TOCONV_STANDIN_DIR"):
        return Path(os.environ["TOCONV_STANDIN_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "toconv-llava" / "standins"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the acceptance script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision-tower", "--vision-tower-336", dest="vision_tower_336", default=None, metavar="PATH",
                        help=f"Local path of real {TOWER_336} weights (24x24 grid).")
    parser.add_argument("--vision-tower-224", dest="vision_tower_224", default=None, metavar="PATH",
                        help=f"Local path of real {TOWER_224} weights (16x16 grid).")
    parser.add_argument("--standin-dir", type=Path, default=None, metavar="DIR",
                        help="Where random-weight stand-ins are built and reused "
                             "(default: $TOCONV_STANDIN_DIR or ~/.cache/toconv-llava/standins).")
    parser.add_argument("--standin-layers", type=int, default=2,
                        help="Transformer layers of a stand-in (the real towers have 24; fewer runs faster).")
    parser.add_argument("--standins-only", action="store_true",
                        help="Use stand-ins even when real weights are in the Hugging Face cache.")
    args = parser.parse_args(argv)
    if args.standin_layers < 2:
        parser.error(f"--standin-layers must be at least 2 (LLaVA selects layer -2), got {args.standin_layers}.")
    for option, value in (("--vision-tower", args.vision_tower_336), ("--vision-tower-224", args.vision_tower_224)):
        if value is not None and not (Path(value) / "config.json").is_file():
            parser.error(f"{option} {value} is not a directory with a config.json of a CLIP model.")
    return args


def _is_standin(path: Path) -> bool:
    """A stand-in passed by path (or copied into a cache) is still a stand-in: its config says so."""
    return "standin_of" in json.loads((path / "config.json").read_text())


def resolve_tower(name: str, given: str | None, args: argparse.Namespace) -> TowerSource:
    """Real weights if given or cached, else a random-weight stand-in built under ``--standin-dir``."""
    from vision_token_compression.testing import build_clip_standin, find_local_tower

    if given is not None:
        return TowerSource(name, Path(given), real=not _is_standin(Path(given)))
    if not args.standins_only:
        local = find_local_tower(name)
        if local is not None:
            return TowerSource(name, local, real=not _is_standin(local))
    root = args.standin_dir or default_standin_dir()
    out_dir = root / f"{name.replace('/', '--')}-layers{args.standin_layers}"
    path = build_clip_standin(name, out_dir, num_hidden_layers=args.standin_layers)
    return TowerSource(name, path, real=False)


def describe(source: TowerSource) -> str:
    """One line saying whether ``source`` holds real weights or a random-weight stand-in."""
    if source.real:
        return f"{source.name}: real weights from {source.path}"
    layers = json.loads((source.path / "config.json").read_text())["num_hidden_layers"]
    return (f"{source.name}: RANDOM-WEIGHT STAND-IN (real config, {layers} of 24 layers) at {source.path} "
            f"— shapes are real, features are not")


def tower_args(**compression) -> SimpleNamespace:
    """The args object LLaVA passes to the tower, as in the spec's examples."""
    return SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch", **compression)


def header(title: str) -> None:
    print()
    print(SEPARATOR)
    print(title)
    print(SEPARATOR)


def run_tower_test(tower, image_size: int, grid: int, hidden_size: int) -> None:
    """Forward a batch through ``tower``; check shape, token count, hidden size and finiteness."""
    images = torch.randn(BATCH_SIZE, 3, image_size, image_size)
    with torch.no_grad():
        features = tower(images)
    print(f"Input shape: {images.shape}")
    print(f"Output shape: {features.shape}")
    print(f"Expected patches: {grid * grid} ({grid}x{grid})")
    print(f"Hidden size: {tower.hidden_size}")
    expected = (BATCH_SIZE, grid * grid, hidden_size)
    check(tuple(features.shape) == expected, f"output shape {tuple(features.shape)} != expected {expected}")
    check(tower.num_patches == grid * grid, f"tower.num_patches {tower.num_patches} != {grid * grid}")
    check(tower.num_patches_per_side == grid, f"tower.num_patches_per_side {tower.num_patches_per_side} != {grid}")
    check(tower.hidden_size == hidden_size, f"tower.hidden_size {tower.hidden_size} != {hidden_size}")
    check(bool(torch.isfinite(features).all()), "output holds NaN or Inf")
    print("✓ Test passed!")


def compression_test(number: int, source: TowerSource, image_size: int, grid_in: int, grid_out: int) -> None:
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    header(f"Test {number}: CLIPVisionTower WITH compression ({grid_in}x{grid_in} → {grid_out}x{grid_out})")
    args = tower_args(use_token_compression=True, compression_input_size=grid_in, compression_output_size=grid_out)
    tower = CLIPVisionTower(str(source.path), args)
    check(tower.token_compressor is not None, "compression is on but the tower has no token compressor")
    run_tower_test(tower, image_size, grid_out, hidden_size=1024)


def s2_test(number: int, source: TowerSource) -> None:
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTowerS2

    scales = "336,672"
    header(f"Test {number}: CLIPVisionTowerS2 WITH compression (scales {scales}, 24x24 → 12x12)")
    if importlib.util.find_spec("s2wrapper") is None:
        print("SKIPPED: S2 needs the PyPI package 'scaling-on-scales' (pip install scaling-on-scales).")
        return
    args = tower_args(use_token_compression=True, compression_input_size=24, compression_output_size=12, s2_scales=scales)
    tower = CLIPVisionTowerS2(str(source.path), args)
    check(tower.image_processor.crop_size["height"] == 672, "S2 image processor is not set to the largest scale")
    run_tower_test(tower, image_size=672, grid=12, hidden_size=1024 * 2)


def run_all(args: argparse.Namespace) -> None:
    """Print the header, resolve the towers and run every test; raises ``CheckFailed`` on a failure."""
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    print("Testing CLIPVisionTower with ToConv compression integration")
    tower_224 = resolve_tower(TOWER_224, args.vision_tower_224, args)
    tower_336 = resolve_tower(TOWER_336, args.vision_tower_336, args)
    for source in (tower_224, tower_336):
        print(describe(source))
    torch.manual_seed(0)

    header("Test 1: CLIPVisionTower WITHOUT compression")
    tower = CLIPVisionTower(str(tower_224.path), tower_args(use_token_compression=False))
    check(tower.token_compressor is None, "compression is off but the tower has a token compressor")
    run_tower_test(tower, image_size=224, grid=16, hidden_size=1024)
    del tower

    compression_test(2, tower_336, image_size=336, grid_in=24, grid_out=12)
    compression_test(3, tower_336, image_size=336, grid_in=24, grid_out=8)
    compression_test(4, tower_224, image_size=224, grid_in=16, grid_out=12)
    compression_test(5, tower_224, image_size=224, grid_in=16, grid_out=8)
    s2_test(6, tower_336)

    header("All tests passed successfully!")


@contextlib.contextmanager
def script_logging():
    """Library INFO logs to stdout as bare messages; transformers' own noise silenced. Undone on exit."""
    import transformers

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = root.level
    old_verbosity = transformers.utils.logging.get_verbosity()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        transformers.utils.logging.set_verbosity(old_verbosity)
        transformers.utils.logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the acceptance tests; 0 when all pass, 1 when a check fails or a tower is refused."""
    args = parse_args(argv)
    with script_logging():
        try:
            run_all(args)
        except (CheckFailed, ValueError) as err:  # ValueError: the library refused a tower or setting
            print(f"✗ Test failed: {err}")
            return 1
    return 0


# ---- pytest entry points ---------------------------------------------------------------------

def _lines_in_order(expected: str, output: str) -> list[str]:
    """Expected non-empty lines missing from ``output`` (matched whole, in order)."""
    lines = iter(output.splitlines())
    missing = []
    for want in filter(None, expected.splitlines()):
        if not any(line == want for line in lines):
            missing.append(want)
            lines = iter(output.splitlines())  # keep reporting the rest
    return missing


def _standin_dir(tmp_path_factory) -> Path:
    """One stand-in directory per pytest session, shared by the tests below."""
    root = tmp_path_factory.getbasetemp() / "acceptance-standins"
    root.mkdir(exist_ok=True)
    return root


def test_seed_acceptance(tmp_path_factory, capsys) -> None:
    """The script passes and prints the spec's expected output, line for line and in order."""
    assert main(["--standins-only", "--standin-dir", str(_standin_dir(tmp_path_factory))]) == 0
    output = capsys.readouterr().out
    assert _lines_in_order(SEED_EXPECTED_OUTPUT, output) == [], output
    assert "RANDOM-WEIGHT STAND-IN" in output
    for line in ("Test 4: CLIPVisionTower WITH compression (16x16 → 12x12)",
                 "TokenCompressor [16to12]: 16×16 → 12×12", "  Architecture: PartialConv(k=5, s=1, p=0)",
                 "Output shape: torch.Size([2, 144, 1024])", "Output shape: torch.Size([2, 64, 1024])",
                 "Output shape: torch.Size([2, 144, 2048])", "Hidden size: 2048"):
        assert line in output.splitlines(), line
    assert output.rstrip().endswith(f"All tests passed successfully!\n{SEPARATOR}")


def test_failed_check_exits_nonzero(tmp_path_factory, capsys, monkeypatch) -> None:
    """A tower that reports the wrong patch count fails the script with exit status 1."""
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    monkeypatch.setattr(CLIPVisionTower, "num_patches", property(lambda self: 577))
    assert main(["--standins-only", "--standin-dir", str(_standin_dir(tmp_path_factory))]) == 1
    output = capsys.readouterr().out
    assert "✗ Test failed: tower.num_patches 577 != 256" in output
    assert "All tests passed successfully!" not in output


def test_a_standin_given_by_path_is_still_called_a_standin(tmp_path_factory, capsys) -> None:
    """Passing a stand-in directory as --vision-tower must not make it look like real weights."""
    root = _standin_dir(tmp_path_factory)
    args = parse_args(["--standins-only", "--standin-dir", str(root)])
    standin = resolve_tower(TOWER_336, None, args)
    source = resolve_tower(TOWER_336, str(standin.path), args)
    assert not source.real
    assert "RANDOM-WEIGHT STAND-IN" in describe(source)


def test_bad_tower_path_is_a_usage_error(tmp_path, capsys) -> None:
    """A --vision-tower that is not a model directory stops with a usage error, not a stack trace."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["--vision-tower", str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert "config.json" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(main())
