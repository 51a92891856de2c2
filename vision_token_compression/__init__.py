"""ToConv token compression for CLIP vision towers. Independent of LLaVA."""

from .atomic import atomic_write, atomic_write_text, publish_file, publish_folder
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
from .grid import grid_to_tokens, tokens_to_grid, window_mean
from .images import expand_to_square
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
    "atomic_write",
    "atomic_write_text",
    "check_metadata",
    "choose_geometry",
    "expand_to_square",
    "grid_to_tokens",
    "load_compressor",
    "load_compressor_into",
    "non_finite_tensors",
    "publish_file",
    "publish_folder",
    "read_metadata",
    "save_compressor",
    "tokens_to_grid",
    "validate_grid_sizes",
    "warn_non_finite",
    "window_mean",
]
