"""ToConv token compressor: one partial convolution from an input token grid to a smaller one."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from .geometry import ConvGeometry, choose_geometry
from .partial_conv import PartialConv2d

logger = logging.getLogger(__name__)

InitMode = Literal["average", "random"]


class TokenCompressor(nn.Module):
    """Compress (B, in², C) patch tokens to (B, out², C) with one C→C partial convolution.

    Kernel, stride and padding follow from the two grid sizes (see ``choose_geometry``).
    With ``init="average"`` every output token is exactly the mean of the valid input tokens in
    its window, so an untrained compressor already hands a LLaVA projector in-distribution
    features. Nothing follows the convolution (no norm, activation or position embedding): any
    of them would break that property.

    Args:
        input_grid_size: Side of the input token grid (24 for CLIP ViT-L/14-336).
        output_grid_size: Side of the output grid, ``1 <= output_grid_size < input_grid_size``.
        hidden_dim: Channels of each token (1024 for CLIP ViT-L).
        init: ``"average"`` (window mean) or ``"random"`` (PyTorch's conv init).
        bias: Whether the convolution has a bias.
    """

    def __init__(
        self,
        input_grid_size: int,
        output_grid_size: int,
        hidden_dim: int,
        init: InitMode = "average",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if init not in ("average", "random"):
            raise ValueError(f"init must be 'average' or 'random', got {init!r}.")
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}.")
        self.geometry: ConvGeometry = choose_geometry(input_grid_size, output_grid_size)
        self.input_grid_size = input_grid_size
        self.output_grid_size = output_grid_size
        self.hidden_dim = hidden_dim
        self.init = init
        g = self.geometry
        self.conv = PartialConv2d(hidden_dim, hidden_dim, g.kernel_size, g.stride, g.padding, bias=bias)
        # Tokens arrive as a channels-last grid view (see forward); a weight in the same layout
        # spares the convolution a conversion of the whole C×C×k×k weight on every call.
        self.conv.to(memory_format=torch.channels_last)
        self.reset_parameters()
        logger.info(
            "TokenCompressor [%s]: %d×%d → %d×%d\n  Architecture: PartialConv(k=%d, s=%d, p=%d)\n"
            "  Theoretical RF: %d×%d",
            self.name, input_grid_size, input_grid_size, output_grid_size, output_grid_size,
            g.kernel_size, g.stride, g.padding, g.receptive_field, g.receptive_field,
        )

    @property
    def name(self) -> str:
        return f"{self.input_grid_size}to{self.output_grid_size}"

    @property
    def kernel_size(self) -> int:
        return self.geometry.kernel_size

    @property
    def stride(self) -> int:
        return self.geometry.stride

    @property
    def padding(self) -> int:
        return self.geometry.padding

    @property
    def receptive_field(self) -> int:
        return self.geometry.receptive_field

    @property
    def num_input_tokens(self) -> int:
        return self.input_grid_size**2

    @property
    def num_output_tokens(self) -> int:
        return self.output_grid_size**2

    @property
    def dtype(self) -> torch.dtype:
        return self.conv.weight.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-apply the constructor's init (``average`` or ``random``) in place."""
        if self.init == "random":
            self.conv.reset_parameters()
            return
        weight = self.conv.weight  # (C, C, k, k)
        weight.zero_()
        channels = torch.arange(self.hidden_dim, device=weight.device)
        weight[channels, channels] = 1.0 / (self.kernel_size**2)
        if self.conv.bias is not None:
            self.conv.bias.zero_()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(
                f"TokenCompressor [{self.name}] expects tokens shaped (batch, {self.num_input_tokens}, "
                f"{self.hidden_dim}), got a {x.dim()}-D tensor of shape {tuple(x.shape)}."
            )
        _, num_tokens, channels = x.shape
        if num_tokens != self.num_input_tokens:
            raise ValueError(
                f"TokenCompressor [{self.name}] expects {self.num_input_tokens} tokens "
                f"({self.input_grid_size}×{self.input_grid_size}), got {num_tokens}. Drop the CLS token "
                f"before compressing, or build the compressor with input_grid_size equal to the "
                f"tower's patch grid."
            )
        if channels != self.hidden_dim:
            raise ValueError(
                f"TokenCompressor [{self.name}] was built for hidden_dim={self.hidden_dim}, "
                f"got tokens with {channels} channels."
            )
        if x.dtype != self.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"TokenCompressor [{self.name}] holds {self.dtype} weights but got {x.dtype} tokens; "
                f"cast one to the other, e.g. compressor.to({x.dtype}) or tokens.to({self.dtype})."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in², C) tokens → (B, out², C) tokens."""
        self._check_input(x)
        side = self.input_grid_size
        # A view, not a copy: (B, H, W, C) permuted is a channels-last (B, C, H, W) grid.
        grid = x.unflatten(1, (side, side)).permute(0, 3, 1, 2)  # (B, C, H, W)
        out = self.conv(grid)  # (B, C, h, w)
        return out.flatten(2).transpose(1, 2)  # (B, h*w, C)

    def extra_repr(self) -> str:
        return f"{self.name}, hidden_dim={self.hidden_dim}, init={self.init!r}"
