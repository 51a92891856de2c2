from .geometry import ConvGeometry, choose_geometry, validate_grid_sizes
from .partial_conv import PartialConv2d
from .token_compressor import TokenCompressor

__all__ = ["ConvGeometry", "PartialConv2d", "TokenCompressor", "choose_geometry", "validate_grid_sizes"]
