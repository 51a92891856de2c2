"""ToConv token compression for CLIP vision towers. Independent of LLaVA."""

from .checkpoint import (
    CompressorMetadata,
    check_metadata,
    load_compressor,
    load_compressor_into,
    read_metadata,
    save_compressor,
)
from .models import ConvGeometry, PartialConv2d, TokenCompressor, choose_geometry, validate_grid_sizes

__all__ = [
    "CompressorMetadata",
    "ConvGeometry",
    "PartialConv2d",
    "TokenCompressor",
    "check_metadata",
    "choose_geometry",
    "load_compressor",
    "load_compressor_into",
    "read_metadata",
    "save_compressor",
    "validate_grid_sizes",
]
