"""TokenCompressor and PartialConv2d: the average property, masks, input checks, layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vision_token_compression import PartialConv2d, TokenCompressor


def _grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side², C) → (B, C, side, side), as a reference independent of the module."""
    return tokens.reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C)."""
    return grid.flatten(2).transpose(1, 2)


def _brute_force_window_mean(tokens: torch.Tensor, side: int, kernel: int, stride: int, padding: int,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the valid inputs under each window, by loops; (B, side², C) → (B, out², C).

    ``mask`` (side, side) marks valid inputs with 1; a window with none of them gives 0.
    """
    grid = _grid(tokens, side)
    out_side = (side + 2 * padding - kernel) // stride + 1
    out = torch.zeros(tokens.shape[0], tokens.shape[-1], out_side, out_side, dtype=tokens.dtype)
    for i in range(out_side):
        for j in range(out_side):
            r0, c0 = i * stride - padding, j * stride - padding
            rows = [r for r in range(r0, r0 + kernel) if 0 <= r < side]
            cols = [c for c in range(c0, c0 + kernel) if 0 <= c < side]
            cells = [(r, c) for r in rows for c in cols if mask is None or mask[r, c]]
            if cells:
                out[:, :, i, j] = torch.stack([grid[:, :, r, c] for r, c in cells]).mean(0)
    return _tokens(out)


# ---- init="average" is the window mean -------------------------------------------------------

def test_average_24_to_12_equals_avg_pool_without_padding():
    compressor = TokenCompressor(24, 12, hidden_dim=16)
    x = torch.randn(2, 576, 16)
    expected = F.avg_pool2d(_grid(x, 24), kernel_size=3, stride=2, padding=1, count_include_pad=False)
    torch.testing.assert_close(compressor(x), _tokens(expected), rtol=0, atol=1e-5)


def test_average_24_to_8_equals_avg_pool_3x3():
    compressor = TokenCompressor(24, 8, hidden_dim=16)
    x = torch.randn(2, 576, 16)
    expected = F.avg_pool2d(_grid(x, 24), kernel_size=3, stride=3)
    torch.testing.assert_close(compressor(x), _tokens(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("grid_in", "grid_out"), [(16, 12), (16, 8), (24, 10), (7, 3), (13, 6), (10, 1)])
def test_average_equals_brute_force_window_mean(grid_in, grid_out):
    compressor = TokenCompressor(grid_in, grid_out, hidden_dim=5)
    x = torch.randn(2, grid_in**2, 5)
    g = compressor.geometry
    expected = _brute_force_window_mean(x, grid_in, g.kernel_size, g.stride, g.padding)
    torch.testing.assert_close(compressor(x), expected, rtol=0, atol=1e-5)


def test_average_of_a_constant_grid_is_that_constant():
    """Border windows are renormalised: padding never dilutes the mean."""
    compressor = TokenCompressor(24, 10, hidden_dim=3)  # k7 s2 p1: every border window is partial
    x = torch.full((1, 576, 3), 2.5)
    torch.testing.assert_close(compressor(x), torch.full((1, 100, 3), 2.5), rtol=0, atol=1e-6)


def test_random_init_is_not_the_mean_and_reset_parameters_restores_average():
    torch.manual_seed(0)
    x = torch.randn(2, 576, 16)
    average = TokenCompressor(24, 12, hidden_dim=16)(x)
    random = TokenCompressor(24, 12, hidden_dim=16, init="random")
    assert (random(x) - average).abs().max() > 1e-2
    random.init = "average"
    random.reset_parameters()
    torch.testing.assert_close(random(x), average, rtol=0, atol=1e-6)


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="'xavier'"):
        TokenCompressor(24, 12, hidden_dim=4, init="xavier")


def test_nothing_follows_the_convolution():
    compressor = TokenCompressor(24, 12, hidden_dim=4)
    assert [name for name, _ in compressor.named_children()] == ["conv"]
    assert sorted(name for name, _ in compressor.named_parameters()) == ["conv.bias", "conv.weight"]


# ---- PartialConv2d -----------------------------------------------------------------------------

def _average_partial_conv(channels: int, kernel: int, stride: int, padding: int) -> PartialConv2d:
    conv = PartialConv2d(channels, channels, kernel, stride, padding)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[range(channels), range(channels)] = 1.0 / kernel**2
        conv.bias.zero_()
    return conv


def test_partial_conv_mask_excludes_holes_from_the_mean():
    torch.manual_seed(0)
    side, channels = 9, 4
    conv = _average_partial_conv(channels, kernel=3, stride=2, padding=1)
    x = torch.randn(2, channels, side, side)
    mask = (torch.rand(side, side) > 0.4).float()
    mask[:3, :3] = 0  # a window with no valid input at all
    out = conv(x, mask[None, None])
    expected = _brute_force_window_mean(_tokens(x), side, 3, 2, 1, mask=mask)
    torch.testing.assert_close(_tokens(out), expected, rtol=0, atol=1e-5)
    # Changing what sits under the holes changes nothing.
    x_holes = torch.where(mask.bool(), x, torch.full_like(x, 1e3))
    torch.testing.assert_close(conv(x_holes, mask[None, None]), out, rtol=0, atol=1e-4)


def test_partial_conv_output_mask_marks_windows_that_saw_a_valid_input():
    conv = _average_partial_conv(1, kernel=3, stride=2, padding=1)
    mask = torch.ones(1, 1, 9, 9)
    mask[..., :3, :3] = 0
    out_mask = conv.output_mask(mask)
    assert out_mask.shape == (1, 1, 5, 5)
    assert out_mask[0, 0, 0, 0] == 0  # rows/cols -1..1 of the input: all padding or holes
    assert out_mask.sum() == 24
    # The masked forward zeroes that position, bias included.
    with torch.no_grad():
        conv.bias.fill_(1.0)
    assert conv(torch.randn(1, 1, 9, 9), mask)[0, 0, 0, 0] == 0


def test_partial_conv_all_ones_mask_equals_unmasked_path():
    torch.manual_seed(0)
    conv = PartialConv2d(3, 5, kernel_size=7, stride=2, padding=1)
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(conv(x, torch.ones(1, 1, 24, 24)), conv(x), rtol=1e-5, atol=1e-5)


def test_partial_conv_rejects_a_mask_of_the_wrong_shape():
    conv = PartialConv2d(2, 2, 3, 2, 1)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        conv(torch.randn(1, 2, 8, 8), torch.ones(1, 1, 7, 7))


def test_partial_conv_renorm_map_is_cached_and_follows_dtype():
    conv = PartialConv2d(2, 2, 3, 2, 1)
    x = torch.randn(1, 2, 8, 8)
    conv(x)
    assert len(conv._renorm_cache) == 1
    conv(x)
    assert len(conv._renorm_cache) == 1  # computed once per input size, not per forward
    conv.to(torch.float64)
    assert conv._renorm_cache == {}
    assert conv(x.double()).dtype == torch.float64


# ---- input checks at the boundary ----------------------------------------------------------------

def test_token_count_that_is_not_the_grid_is_rejected_with_the_numbers():
    compressor = TokenCompressor(24, 12, hidden_dim=8)
    with pytest.raises(ValueError, match="576") as exc:
        compressor(torch.randn(1, 577, 8))  # CLS token left in
    assert "577" in str(exc.value) and "CLS" in str(exc.value)
    with pytest.raises(ValueError, match="500"):
        compressor(torch.randn(1, 500, 8))


def test_wrong_hidden_dim_is_rejected_with_the_numbers():
    compressor = TokenCompressor(24, 12, hidden_dim=8)
    with pytest.raises(ValueError, match="hidden_dim=8") as exc:
        compressor(torch.randn(1, 576, 16))
    assert "16" in str(exc.value)


def test_wrong_rank_is_rejected():
    compressor = TokenCompressor(24, 12, hidden_dim=8)
    with pytest.raises(ValueError, match="4-D"):
        compressor(torch.randn(1, 8, 24, 24))


def test_wrong_dtype_is_rejected_with_both_dtypes():
    compressor = TokenCompressor(24, 12, hidden_dim=8)
    with pytest.raises(ValueError, match="torch.float32") as exc:
        compressor(torch.randn(1, 576, 8, dtype=torch.float64))
    assert "torch.float64" in str(exc.value)


@pytest.mark.parametrize("hidden_dim", [0, -1, 8.0, True])
def test_bad_hidden_dim_is_rejected(hidden_dim):
    with pytest.raises(ValueError, match="hidden_dim"):
        TokenCompressor(24, 12, hidden_dim=hidden_dim)


# ---- layouts: no copy between tokens and grid ------------------------------------------------------

def test_grid_given_to_the_conv_is_a_view_of_the_tokens_and_output_is_contiguous():
    compressor = TokenCompressor(24, 12, hidden_dim=8)
    x = torch.randn(2, 576, 8)
    seen = {}

    def capture(module, args):
        seen["grid"] = args[0]

    handle = compressor.conv.register_forward_pre_hook(capture)
    try:
        y = compressor(x)
    finally:
        handle.remove()
    grid = seen["grid"]
    assert grid.shape == (2, 8, 24, 24)
    assert grid.data_ptr() == x.data_ptr()  # same storage: no copy on the way in
    assert grid.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (2, 144, 8)
    assert y.is_contiguous()  # the conv's channels-last output is already token-major


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_after_to(dtype):
    compressor = TokenCompressor(24, 12, hidden_dim=8)
    x = torch.randn(2, 576, 8)
    reference = compressor(x)
    compressor.to(dtype)
    y = compressor(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), reference, rtol=0, atol=5e-2)


def test_gradient_reaches_every_parameter():
    compressor = TokenCompressor(24, 12, hidden_dim=8, init="random")
    compressor(torch.randn(2, 576, 8)).square().sum().backward()
    for name, param in compressor.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


@pytest.mark.parametrize(("grid_in", "grid_out"), [(24, 12), (24, 8), (16, 12), (16, 8)])
def test_real_size_shapes_of_the_seed_configurations(grid_in, grid_out):
    """CLIP ViT-L's hidden size 1024: (B, in², 1024) → (B, out², 1024), C→C weights."""
    compressor = TokenCompressor(grid_in, grid_out, hidden_dim=1024)
    k = compressor.kernel_size
    assert compressor.conv.weight.shape == (1024, 1024, k, k)
    with torch.no_grad():
        y = compressor(torch.randn(2, grid_in**2, 1024))
    assert y.shape == (2, grid_out**2, 1024)


def test_weight_is_channels_last_like_the_grid_it_reads():
    # forward hands the conv a channels-last view of the tokens; a weight in another layout would
    # be converted on every call (measured: 54 vs 35 ms at the ViT-L/14-336 shape on one CPU thread).
    compressor = TokenCompressor(24, 12, 16)
    assert compressor.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert compressor.to(torch.float64).conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_state_dict_is_contiguous_for_safetensors():
    # The live weight is channels-last; what a saver sees must be contiguous (safetensors refuses
    # anything else, and transformers 4.x save_pretrained writes the state dict as is).
    compressor = TokenCompressor(24, 12, 16)
    state = compressor.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    assert torch.equal(state["conv.weight"], compressor.conv.weight)
    restored = TokenCompressor(24, 12, 16, init="random")
    restored.load_state_dict(state)
    assert torch.equal(restored.conv.weight, compressor.conv.weight)
    assert restored.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_restore_weight_layout_after_a_loader_that_replaced_the_weight():
    # transformers' from_pretrained materialises a new, contiguous Parameter: the host calls
    # restore_weight_layout once after it; the outputs are the same in either layout.
    compressor = TokenCompressor(24, 12, 16, init="random")
    x = torch.randn(2, 576, 16)
    expected = compressor(x)
    compressor.conv.weight = torch.nn.Parameter(compressor.conv.weight.detach().contiguous())
    assert not compressor.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compressor(x), expected)
    compressor.restore_weight_layout()
    assert compressor.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compressor(x), expected)


def test_keep_weight_contiguous_sticks_through_restore_weight_layout():
    compressor = TokenCompressor(24, 12, 16)
    compressor.keep_weight_contiguous()  # what a DeepSpeed host asks for
    assert compressor.conv.weight.is_contiguous()
    compressor.restore_weight_layout()
    assert compressor.conv.weight.is_contiguous()
    torch.testing.assert_close(compressor(torch.ones(1, 576, 16)), torch.ones(1, 144, 16))


@pytest.mark.parametrize("init", ["average", "random"])
def test_reset_parameters_writes_through_the_given_copy(init):
    # A host's loader passes a copy that skips what it loaded (transformers' initialization.copy_).
    compressor = TokenCompressor(24, 12, 8, init=init)
    expected = {k: v.clone() for k, v in compressor.state_dict().items()}
    loaded = torch.randn_like(compressor.conv.weight)
    with torch.no_grad():
        compressor.conv.weight.copy_(loaded)
        compressor.conv.bias.fill_(5.0)
        compressor.grid_sizes.fill_(0)
    compressor.conv.weight.loaded = True

    def copy_unless_loaded(tensor, value):
        if not getattr(tensor, "loaded", False):
            tensor.copy_(value)

    torch.manual_seed(0)
    compressor.reset_parameters(copy=copy_unless_loaded)
    assert torch.equal(compressor.conv.weight, loaded)  # skipped
    assert compressor.grid_sizes.tolist() == [24, 12]
    if init == "average":
        assert torch.equal(compressor.conv.bias, expected["conv.bias"])  # zeros
    else:
        assert not torch.equal(compressor.conv.bias, torch.full_like(compressor.conv.bias, 5.0))
    compressor.reset_parameters()  # the default copy overwrites everything
    if init == "average":
        for key, value in compressor.state_dict().items():
            assert torch.equal(value, expected[key]), key
    assert compressor.conv.weight.is_contiguous(memory_format=torch.channels_last)
