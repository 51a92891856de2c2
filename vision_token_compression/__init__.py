"""ToConv token compression for CLIP vision towers. Independent of LLaVA."""

from .checkpoint import (
    CompressorMetadata,
    check_metadata,
    load_compressor,
    load_compressor_into,
    non_finite_tensors,
    read_metadata,
    save_compressor,
    warn_non_finite,
)
from .models import (
    GRID_SIZES_KEY,
    ConvGeometry,
    GridSizeMismatchError,
    PartialConv2d,
    TokenCompressor,
    choose_geometry,
    validate_grid_sizes,
)

__all__ = [
    "GRID_SIZES_KEY",
    "CompressorMetadata",
    "ConvGeometry",
    "GridSizeMismatchError",
    "PartialConv2d",
    "TokenCompressor",
    "check_metadata",
    "choose_geometry",
    "load_compressor",
    "load_compressor_into",
    "non_finite_tensors",
    "read_metadata",
    "save_compressor",
    "validate_grid_sizes",
    "warn_non_finite",
]
