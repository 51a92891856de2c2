"""ToConv token compressor: one partial convolution from an input token grid to a smaller one."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..grid import grid_to_tokens, tokens_to_grid
from .geometry import ConvGeometry, choose_geometry
from .partial_conv import PartialConv2d

logger = logging.getLogger(__name__)

InitMode = Literal["average", "random"]

# State-dict key of the (input, output) grid sizes a compressor's weights were trained for.
GRID_SIZES_KEY = "grid_sizes"


class GridSizeMismatchError(ValueError):
    """Weights trained for one pair of grid sizes were offered to a compressor of another.

    24→12 (k3, s2, p1) and 24→8 (k3, s3, p0) have kernels of the same shape, so nothing else in
    a state dict tells such weights apart.
    """


def _as_pair(recorded: torch.Tensor | Sequence[int]) -> tuple[int, int] | None:
    """``(input, output)`` from a recorded grid-size tensor or pair; None when it holds no values (meta)."""
    if isinstance(recorded, torch.Tensor):
        if recorded.is_meta:
            return None
        values = recorded.detach().reshape(-1).tolist()
    else:
        values = list(recorded)
    if len(values) != 2:
        raise GridSizeMismatchError(
            f"A token compressor's {GRID_SIZES_KEY} record holds (input, output) grid sizes, got {values}."
        )
    return int(values[0]), int(values[1])


class TokenCompressor(nn.Module):
    """Compress (B, in², C) patch tokens to (B, out², C) with one C→C partial convolution.

    Kernel, stride and padding follow from the two grid sizes (see ``choose_geometry``).
    With ``init="average"`` every output token is exactly the mean of the valid input tokens in
    its window, so an untrained compressor already hands a LLaVA projector in-distribution
    features. Nothing follows the convolution (no norm, activation or position embedding): any
    of them would break that property.

    The grid sizes travel with the weights as an int64 buffer, ``grid_sizes = [in, out]``: any
    ``load_state_dict`` refuses weights recorded for other sizes (``GridSizeMismatchError``), the
    first forward after a loader that bypasses it checks the record once (``check_grid_sizes`` is
    the public check), and weights saved before the record existed still load, logged once
    (``accept_unrecorded_grid_sizes``).

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
        self._channels_last_weight = True
        self.restore_weight_layout()
        # The grid sizes travel with the weights (state dict, checkpoints, LLaVA's weight files), so
        # weights trained for another geometry are refused at load even when the kernels have the
        # same shape. Integer: dtype casts (.half(), from_pretrained(dtype=...)) leave it alone.
        self.register_buffer(GRID_SIZES_KEY, torch.tensor([input_grid_size, output_grid_size], dtype=torch.int64))
        self._checked_record: torch.Tensor | None = self.grid_sizes  # the record forward last verified
        self._unrecorded_logged = False
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
    def reset_parameters(self, copy: Callable[[torch.Tensor, torch.Tensor], Any] = torch.Tensor.copy_) -> None:
        """Re-apply the constructor's init (``average`` or ``random``) and the grid-size record, in place.

        Args:
            copy: Writes each initial value into its tensor as ``copy(tensor, value)``; the default
                overwrites every tensor. A host's loader can pass one that skips the tensors it has
                loaded (transformers' ``initialization.copy_``), so that only what a checkpoint
                lacked is initialised.
        """
        for tensor, value in self._initial_values():
            copy(tensor, value)

    def _initial_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(tensor, initial value)`` for the grid-size record, the conv weight and its bias."""
        weight, bias = self.conv.weight, self.conv.bias
        record = torch.tensor([self.input_grid_size, self.output_grid_size], device=self.grid_sizes.device)
        weight_value = torch.zeros_like(weight, memory_format=torch.contiguous_format)  # (C, C, k, k)
        if self.init == "random":  # what nn.Conv2d.reset_parameters draws, in the same order
            nn.init.kaiming_uniform_(weight_value, a=math.sqrt(5))
        else:  # each output channel the mean of its own input channel over the window
            channels = torch.arange(self.hidden_dim, device=weight.device)
            weight_value[channels, channels] = 1.0 / (self.kernel_size**2)
        values = [(self.grid_sizes, record), (weight, weight_value)]
        if bias is not None:
            bias_value = torch.zeros_like(bias)
            if self.init == "random":
                bound = 1 / math.sqrt(self.hidden_dim * self.kernel_size**2)  # 1 / sqrt(fan_in)
                nn.init.uniform_(bias_value, -bound, bound)
            values.append((bias, bias_value))
        return values

    # -- the weight layout: a speed-up only ---------------------------------------------------
    # forward hands the conv a channels-last view of the tokens (no copy). A weight in the same
    # layout spares oneDNN converting the whole C×C×k×k weight on every call: 35 vs 54 ms per
    # forward at CLIP ViT-L/14-336's shape, 24→12, one CPU thread (docs/benchmarks.md). The outputs
    # are the same in either layout, and state dicts are always contiguous (PartialConv2d).

    def restore_weight_layout(self) -> None:
        """Lay the conv weight out as forward reads it (channels-last), unless ``keep_weight_contiguous`` was called.

        Construction, ``load_state_dict``, ``.to()`` and dtype casts keep the layout; a loader that
        materialises the weights itself (transformers' ``from_pretrained``) does not: a host calls
        this once after such a loader.
        """
        if self._channels_last_weight:
            self.conv.to(memory_format=torch.channels_last)

    def keep_weight_contiguous(self) -> None:
        """Hold the conv weight contiguous from now on, for a host that needs that layout.

        DeepSpeed views parameters as bytes (its broadcast under ZeRO-2, its partitioning under
        ZeRO-3), which fails on a channels-last weight. Costs the per-call conversion above.
        """
        self._channels_last_weight = False
        self.conv.to(memory_format=torch.contiguous_format)

    # -- the grid-size record ------------------------------------------------------------------

    @torch.no_grad()
    def reset_grid_sizes(self) -> None:
        """Write this compressor's own ``(input, output)`` grid sizes into its ``grid_sizes`` record."""
        self.grid_sizes.copy_(torch.tensor([self.input_grid_size, self.output_grid_size]))

    def check_grid_sizes(
        self, recorded: torch.Tensor | Sequence[int] | None = None, *, source: str | None = None,
    ) -> None:
        """Raise ``GridSizeMismatchError`` unless ``recorded`` names this compressor's grid sizes.

        Args:
            recorded: ``(input, output)`` grid sizes that weights were trained for, as a tensor
                (a state dict's ``grid_sizes``) or a pair; default: this module's own record, e.g.
                after a loader that bypasses ``load_state_dict`` replaced it.
            source: Where the weights come from (a file or folder), named in the error.
        """
        pair = _as_pair(self.grid_sizes if recorded is None else recorded)
        if pair is None or pair == (self.input_grid_size, self.output_grid_size):
            return
        (rin, rout), (gin, gout) = pair, (self.input_grid_size, self.output_grid_size)
        where = f" from {source}" if source else ""
        raise GridSizeMismatchError(
            f"Token compressor weights{where} were trained for {rin}→{rout} ({rin}×{rin} → {rout}×{rout}, "
            f"{rout * rout} tokens), but this compressor is {gin}→{gout} ({gout * gout} tokens): weights of one "
            f"geometry do not fit another, even where the kernels have the same shape. Set "
            f"compression_input_size={rin} and compression_output_size={rout} to use these weights (e.g. undo "
            f"an edit of compression_output_size in the checkpoint's config.json), or load weights trained for "
            f"{gin}→{gout}."
        )

    def accept_unrecorded_grid_sizes(self, source: str | None = None) -> None:
        """Accept weights saved without grid sizes (before they were recorded): keep this compressor's own.

        Their geometry cannot be checked, which is logged once per compressor: a warning naming
        ``source`` when a loader gives it, INFO from a bare ``load_state_dict`` (which cannot tell a
        user's old file from, e.g., a trainer reloading its own parameters). They are never refused.
        """
        self.reset_grid_sizes()
        if not self._unrecorded_logged:
            self._unrecorded_logged = True
            where = f"from {source} " if source else ""
            logger.log(
                logging.WARNING if source else logging.INFO,
                "Token compressor [%s]: the weights loaded %scarry no grid sizes (saved before they were "
                "recorded), so it cannot be checked that they were trained for %d→%d; assuming they were. "
                "Re-save them to record the grid sizes.", self.name, where, self.input_grid_size,
                self.output_grid_size,
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Every torch-level load (load_state_dict, transformers 4.x from_pretrained, LLaVA's
        # load_mm_adapter and non_lora_trainables.bin) passes here before the conv's weights load.
        key = prefix + GRID_SIZES_KEY
        recorded = key in state_dict
        if recorded:
            self.check_grid_sizes(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not recorded and key in missing_keys and any(k.startswith(prefix) for k in state_dict):
            # Weights without the record (saved before it existed): load them, say so once.
            missing_keys.remove(key)
            self.accept_unrecorded_grid_sizes()

    def _check_record_once(self) -> None:
        # Loaders that bypass load_state_dict (accelerate's meta-device loading in upstream LLaVA's
        # from_pretrained) replace the buffer: verify each new record once, at its first forward.
        record = self.grid_sizes
        if record is not self._checked_record:
            self.check_grid_sizes()
            self._checked_record = record

    # -- forward -------------------------------------------------------------------------------

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
        self._check_record_once()
        self._check_input(x)
        grid = tokens_to_grid(x, self.input_grid_size)  # (B, C, H, W), a channels-last view, no copy
        out = self.conv(grid)  # (B, C, h, w)
        return grid_to_tokens(out)  # (B, h*w, C)

    def extra_repr(self) -> str:
        return f"{self.name}, hidden_dim={self.hidden_dim}, init={self.init!r}"
