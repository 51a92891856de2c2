from .geometry import ConvGeometry, choose_geometry, validate_grid_sizes
from .partial_conv import PartialConv2d
from .token_compressor import GRID_SIZES_KEY, GridSizeMismatchError, TokenCompressor

__all__ = [
    "GRID_SIZES_KEY",
    "ConvGeometry",
    "GridSizeMismatchError",
    "PartialConv2d",
    "TokenCompressor",
    "choose_geometry",
    "validate_grid_sizes",
]
