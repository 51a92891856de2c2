"""Geometry of the compressing convolution: the documented table and every grid pair up to 64."""

from __future__ import annotations

import pytest
import torch

from vision_token_compression import TokenCompressor, choose_geometry

# DESIGN.md's table: (in, out) → (kernel, stride, padding); the first four are the seed's.
DOCUMENTED = {
    (24, 12): (3, 2, 1),
    (24, 8): (3, 3, 0),
    (16, 12): (5, 1, 0),
    (16, 8): (3, 2, 1),
    (24, 10): (7, 2, 1),
}

ALL_PAIRS = [(i, o) for i in range(2, 65) for o in range(1, i)]


def _covered_rows(geometry) -> set[int]:
    """Input rows that at least one output window reads (recomputed here from k, s, p)."""
    g = geometry
    rows = set()
    for index in range(g.output_size):
        start = index * g.stride - g.padding
        rows.update(r for r in range(start, start + g.kernel_size) if 0 <= r < g.input_size)
    return rows


@pytest.mark.parametrize(("grid_in", "grid_out"), sorted(DOCUMENTED))
def test_documented_geometries(grid_in, grid_out):
    g = choose_geometry(grid_in, grid_out)
    assert (g.kernel_size, g.stride, g.padding) == DOCUMENTED[grid_in, grid_out]
    assert g.receptive_field == g.kernel_size


@pytest.mark.parametrize(("grid_in", "grid_out"), sorted(DOCUMENTED))
def test_documented_geometries_match_the_module_and_its_log(grid_in, grid_out, caplog):
    k, s, p = DOCUMENTED[grid_in, grid_out]
    with caplog.at_level("INFO", logger="vision_token_compression"):
        compressor = TokenCompressor(grid_in, grid_out, hidden_dim=4)
    conv = compressor.conv
    assert (conv.kernel_size, conv.stride, conv.padding) == ((k, k), (s, s), (p, p))
    assert caplog.messages[-1] == (
        f"TokenCompressor [{grid_in}to{grid_out}]: {grid_in}×{grid_in} → {grid_out}×{grid_out}\n"
        f"  Architecture: PartialConv(k={k}, s={s}, p={p})\n"
        f"  Theoretical RF: {k}×{k}"
    )


def test_every_pair_up_to_64_gives_exact_output_and_full_coverage():
    for grid_in, grid_out in ALL_PAIRS:
        g = choose_geometry(grid_in, grid_out)
        assert (grid_in + 2 * g.padding - g.kernel_size) // g.stride + 1 == grid_out, (grid_in, grid_out, g)
        assert 0 <= g.padding <= (g.kernel_size - 1) // 2, g
        assert 1 <= g.stride <= g.kernel_size <= grid_in, g
        assert _covered_rows(g) == set(range(grid_in)), (grid_in, grid_out, g)
        # Every window reads at least one real row (no all-padding output).
        for index in range(grid_out):
            lo, hi = g.window(index)
            assert lo < hi, (g, index)


@pytest.mark.parametrize(
    ("grid_in", "grid_out"),
    [*sorted(DOCUMENTED), (2, 1), (7, 3), (9, 4), (13, 6), (32, 5), (37, 11), (64, 1), (64, 7), (64, 63)],
)
def test_forward_gives_out_squared_tokens_and_every_input_reaches_an_output(grid_in, grid_out):
    compressor = TokenCompressor(grid_in, grid_out, hidden_dim=2)
    x = torch.randn(3, grid_in**2, 2, requires_grad=True)
    y = compressor(x)
    assert y.shape == (3, grid_out**2, 2)
    y.sum().backward()
    # With the average init every weight on the diagonal is positive, so an input token has a
    # non-zero gradient exactly when some window covers it.
    reached = (x.grad != 0).all(dim=-1)  # (B, in²)
    assert bool(reached.all()), f"{int((~reached[0]).sum())} input tokens reach no output for {grid_in}→{grid_out}"


@pytest.mark.parametrize(
    ("grid_in", "grid_out", "fragment"),
    [(24, 24, "(24)"), (12, 24, "(12)"), (24, 0, "got 0"), (24, -3, "got -3")],
)
def test_invalid_grid_pairs_name_the_numbers(grid_in, grid_out, fragment):
    with pytest.raises(ValueError, match="output_grid_size") as exc:
        choose_geometry(grid_in, grid_out)
    assert fragment in str(exc.value)
    with pytest.raises(ValueError):
        TokenCompressor(grid_in, grid_out, hidden_dim=4)


def test_non_int_grid_sizes_are_rejected():
    with pytest.raises(ValueError, match="int"):
        choose_geometry(24.0, 12)
    with pytest.raises(ValueError, match="int"):
        choose_geometry(24, True)
