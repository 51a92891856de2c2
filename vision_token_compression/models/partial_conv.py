"""Partial convolution (Liu et al., 2018) for token grids.

A window that hangs over the border (or over holes given by a mask) is rescaled by
``kernel_area / valid_inputs``, so padding never dilutes a window: with average weights each
output is the plain mean of the valid inputs it sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _valid_counts(size: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Valid (non-padding) inputs under each window along one axis."""
    out = (size + 2 * padding - kernel) // stride + 1
    starts = torch.arange(out) * stride - padding
    return (starts + kernel).clamp(max=size) - starts.clamp(min=0)


class PartialConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose windows are renormalised by the share of valid inputs they cover.

    Without a mask only the zero padding is invalid, so the renormalisation map depends on the
    input size alone: it is computed once per (size, device, dtype) and cached, never by a mask
    convolution in the forward pass. With a mask (holes in the grid), the valid count comes from
    a convolution of the mask, as in the paper. Dilation must be 1.

    Args:
        in_channels: Channels of the input grid.
        out_channels: Channels of the output grid.
        kernel_size: Side of the square kernel.
        stride: Stride in both axes.
        padding: Zero padding in both axes.
        bias: Whether to add a learned bias.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
            device=device, dtype=dtype,
        )
        # (H, W, device, dtype) -> renormalisation map (1, 1, H_out, W_out), or None when all ones.
        self._renorm_cache: dict[tuple, torch.Tensor | None] = {}

    def renorm_map(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """``kernel_area / valid_count`` for each output position of an unmasked input, or None if all 1."""
        key = (height, width, device, dtype)
        if key not in self._renorm_cache:
            (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
            rows = _valid_counts(height, kh, sh, ph)
            cols = _valid_counts(width, kw, sw, pw)
            valid = rows[:, None] * cols[None, :]  # (H_out, W_out)
            if bool((valid == kh * kw).all()):
                self._renorm_cache[key] = None
            else:
                ratio = (kh * kw) / valid.to(torch.float64)
                self._renorm_cache[key] = ratio.to(device=device, dtype=dtype)[None, None]
        return self._renorm_cache[key]

    def _apply(self, fn, recurse=True):
        # Moving or casting the module makes cached maps stale.
        self._renorm_cache.clear()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The weight may be kept channels-last for speed (see TokenCompressor); savers such as
        # safetensors (and transformers 4.x's save_pretrained) accept only contiguous tensors.
        key = prefix + "weight"
        if not keep_vars and key in destination and not destination[key].is_contiguous():
            destination[key] = destination[key].contiguous()

    def output_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Mask of output positions whose window saw at least one valid input, shape (B, 1, H', W')."""
        return (self._mask_count(mask) > 0).to(mask.dtype)

    def _mask_count(self, mask: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(1, 1, *self.kernel_size, device=mask.device, dtype=mask.dtype)
        with torch.no_grad():
            return F.conv2d(mask, ones, stride=self.stride, padding=self.padding)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Convolve ``x`` (B, C, H, W); ``mask`` (B or 1, 1, H, W) marks valid inputs with 1."""
        if self.dilation != (1, 1) or self.padding_mode != "zeros":
            raise ValueError(
                f"PartialConv2d supports dilation 1 and zero padding only, got dilation={self.dilation}, "
                f"padding_mode={self.padding_mode!r}."
            )
        if mask is None:
            ratio = self.renorm_map(x.shape[-2], x.shape[-1], x.device, x.dtype)
            if ratio is None:
                return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
            out = F.conv2d(x, self.weight, None, self.stride, self.padding, 1, self.groups)  # (B, C', H', W')
            # In place: the conv backward needs its input and weight, not its output.
            out.mul_(ratio)
            if self.bias is not None:
                out.add_(self.bias.view(1, -1, 1, 1))
            return out

        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"mask must have shape (B, 1, {x.shape[-2]}, {x.shape[-1]}) to match the input "
                f"{tuple(x.shape)}, got {tuple(mask.shape)}."
            )
        mask = mask.to(x.dtype)
        count = self._mask_count(mask)  # (B, 1, H', W')
        seen = count > 0
        kernel_area = self.kernel_size[0] * self.kernel_size[1]
        ratio = torch.where(seen, kernel_area / count.clamp(min=1), torch.zeros_like(count))
        out = F.conv2d(x * mask, self.weight, None, self.stride, self.padding, 1, self.groups) * ratio
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out * seen.to(out.dtype)
