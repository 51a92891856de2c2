"""Choosing the convolution that maps an input token grid onto an output grid."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, stride and padding of the compressing convolution (square in both axes)."""

    input_size: int
    output_size: int
    kernel_size: int
    stride: int
    padding: int

    @property
    def receptive_field(self) -> int:
        """Side of the input window one output token sees (one conv layer: the kernel)."""
        return self.kernel_size

    def window(self, index: int) -> tuple[int, int]:
        """Half-open input range ``[start, stop)`` of output row ``index``, clipped to the grid."""
        start = index * self.stride - self.padding
        return max(start, 0), min(start + self.kernel_size, self.input_size)


def validate_grid_sizes(input_size: int, output_size: int) -> None:
    """Raise ``ValueError`` unless ``1 <= output_size < input_size`` (both ints)."""
    for name, value in (("input_grid_size", input_size), ("output_grid_size", output_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if output_size < 1:
        raise ValueError(
            f"output_grid_size must be at least 1, got {output_size}; "
            f"pick an output grid such as 12 (144 tokens) or 8 (64 tokens)."
        )
    if output_size >= input_size:
        raise ValueError(
            f"output_grid_size ({output_size}) must be smaller than input_grid_size ({input_size}): "
            f"the compressor only reduces tokens. Use an output size below {input_size}, "
            f"or turn compression off (use_token_compression=False)."
        )


def _output_size(input_size: int, kernel: int, stride: int, padding: int) -> int:
    return (input_size + 2 * padding - kernel) // stride + 1


def choose_geometry(input_size: int, output_size: int) -> ConvGeometry:
    """Pick (kernel, stride, padding) mapping ``input_size`` onto exactly ``output_size``.

    Strides are tried from ceil(in/out) down to 1; for each, kernels from the stride up to the
    input size, odd kernels before even ones (a centred window); for each, paddings from 0 to
    (kernel - 1) // 2. The first candidate whose output is exactly ``output_size`` and whose
    windows cover every input row wins. Stride 1 with kernel in - out + 1 always qualifies, so a
    geometry exists for every 1 <= out < in.
    """
    validate_grid_sizes(input_size, output_size)
    for stride in range(math.ceil(input_size / output_size), 0, -1):
        kernels = list(range(stride, input_size + 1))
        for kernel in [k for k in kernels if k % 2] + [k for k in kernels if not k % 2]:
            for padding in range((kernel - 1) // 2 + 1):
                if _output_size(input_size, kernel, stride, padding) != output_size:
                    continue
                if stride * (output_size - 1) - padding + kernel < input_size:
                    continue  # the last window stops short of the last input row
                return ConvGeometry(input_size, output_size, kernel, stride, padding)
    raise AssertionError(f"no geometry for {input_size}->{output_size}; stride 1 should always fit")
