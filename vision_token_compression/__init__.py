"""ToConv token compression for ViT vision towers (CLIP, SigLIP): the library. Independent of LLaVA (never imports it).

Needs torch and safetensors only (``expand_to_square`` imports Pillow when called). A host such as
LLaVA's vision tower uses these names and nothing below them:

- the compressor: ``TokenCompressor`` (its ``reset_parameters``, ``check_grid_sizes``,
  ``accept_unrecorded_grid_sizes``, ``restore_weight_layout``, ``keep_weight_contiguous``),
  ``PartialConv2d``, ``choose_geometry`` / ``ConvGeometry`` / ``validate_grid_sizes``, and the
  grid-size record (``GRID_SIZES_KEY``, ``GridSizeMismatchError``);
- building and loading: ``build_compressor`` (for a tower's geometry, optionally from a checked
  checkpoint), ``load_compressor_into`` (a checked checkpoint into an existing compressor),
  ``load_compressor`` (from a checkpoint's own metadata), ``save_compressor``, ``read_metadata``,
  ``check_metadata``, ``CompressorMetadata``, ``non_finite_tensors`` / ``warn_non_finite``;
- the settings a host reads: ``CompressionSettings`` (fields, defaults, the one check; off means off),
  ``parse_bool_setting``, ``SettingNames``, ``DEFAULT_COMPRESSION_OUTPUT_SIZE``;
- the tower (``towers``): ``grid_side``, the families ``TowerFamily`` / ``CLIP`` / ``SIGLIP`` /
  ``tower_family`` / ``load_image_processor``, ``check_select_layer`` / ``check_select_feature`` /
  ``select_features`` / ``grid_tokens``, and ``EarlyExit`` (run only the layers a select layer needs);
- a host's weights (``weights``): ``load_compressor_tensors`` / ``check_compressor_tensors`` (a
  compressor's tensors found in a host's own files: grid-size record, names, shapes, non-finite
  values), ``check_weights_in_place`` (after a framework loaded them into the module itself),
  ``check_provenance`` (a converter's check of a compressor checkpoint against the model it goes
  into), ``compressor_shapes``, ``provenance_differences``;
- helpers shared with the trainer: ``tokens_to_grid`` / ``grid_to_tokens`` / ``window_mean``,
  ``expand_to_square``, and the atomic writes ``atomic_write`` / ``atomic_write_text`` /
  ``publish_file`` / ``publish_folder``, with a tool's marked staging folders ``make_staging_folder`` /
  ``publish_new_folder`` / ``remove_stale_staging``, and ``remove_stale_temporaries`` (what a killed
  writer left);
- a checkpoint's files (``checkpoint_files``), read with errors naming the file, its size and the fix
  (``CheckpointFileError``): ``read_safetensors_header`` / ``check_safetensors_file`` (a truncated
  file is refused from its header), ``load_safetensors``, ``open_safetensors``, ``checkpoint_safetensors`` /
  ``check_checkpoint_safetensors`` (a Hugging Face folder's weight files), ``index_shards``, ``read_json_object``;
- where a model is (``model_paths``): ``load_pretrained_config`` (a config by path or Hub id, "not found"
  naming it, never a Hub repo-id message for a path), ``require_pretrained``, ``not_found_error``, ``is_repo_id``.

The trainer and evaluator (``vision_token_compression.training``, commands ``toconv-train-compressor``
and ``toconv-eval-compressor``) and the test fixtures (``vision_token_compression.testing``) are
separate packages that this one never imports.
"""

from .atomic import (
    atomic_write,
    atomic_write_text,
    make_staging_folder,
    publish_file,
    publish_folder,
    publish_new_folder,
    remove_stale_staging,
    remove_stale_temporaries,
)
from .checkpoint import (
    CompressorMetadata,
    build_compressor,
    check_metadata,
    load_compressor,
    load_compressor_into,
    non_finite_tensors,
    provenance_differences,
    read_metadata,
    save_compressor,
    warn_non_finite,
)
from .checkpoint_files import (
    CheckpointFileError,
    check_checkpoint_safetensors,
    check_safetensors_file,
    checkpoint_safetensors,
    index_shards,
    load_safetensors,
    open_safetensors,
    read_json_object,
    read_safetensors_header,
)
from .grid import grid_to_tokens, tokens_to_grid, window_mean
from .images import expand_to_square
from .model_paths import is_repo_id, load_pretrained_config, not_found_error, require_pretrained
from .models import (
    GRID_SIZES_KEY,
    ConvGeometry,
    GridSizeMismatchError,
    PartialConv2d,
    TokenCompressor,
    choose_geometry,
    validate_grid_sizes,
)
from .notices import quiet_deepspeed_cpu_notice
from .settings import (
    DEFAULT_COMPRESSION_OUTPUT_SIZE,
    DEFAULT_USE_TOKEN_COMPRESSION,
    MODEL_ARG_NAMES,
    CompressionSettings,
    SettingNames,
    parse_bool_setting,
)
from .towers import (
    CLIP,
    SIGLIP,
    EarlyExit,
    TowerFamily,
    check_select_feature,
    check_select_layer,
    grid_side,
    grid_tokens,
    load_image_processor,
    select_features,
    tower_family,
)
from .weights import (
    check_compressor_tensors,
    check_provenance,
    check_weights_in_place,
    compressor_shapes,
    load_compressor_tensors,
)

quiet_deepspeed_cpu_notice()

__all__ = [
    "CLIP",
    "SIGLIP",
    "EarlyExit",
    "TowerFamily",
    "check_select_feature",
    "check_select_layer",
    "grid_tokens",
    "load_image_processor",
    "select_features",
    "tower_family",
    "DEFAULT_COMPRESSION_OUTPUT_SIZE",
    "DEFAULT_USE_TOKEN_COMPRESSION",
    "MODEL_ARG_NAMES",
    "CompressionSettings",
    "SettingNames",
    "parse_bool_setting",
    "GRID_SIZES_KEY",
    "CompressorMetadata",
    "ConvGeometry",
    "GridSizeMismatchError",
    "PartialConv2d",
    "TokenCompressor",
    "CheckpointFileError",
    "atomic_write",
    "atomic_write_text",
    "check_checkpoint_safetensors",
    "check_safetensors_file",
    "checkpoint_safetensors",
    "index_shards",
    "load_safetensors",
    "make_staging_folder",
    "open_safetensors",
    "publish_new_folder",
    "read_json_object",
    "read_safetensors_header",
    "remove_stale_staging",
    "remove_stale_temporaries",
    "build_compressor",
    "check_compressor_tensors",
    "check_metadata",
    "check_provenance",
    "check_weights_in_place",
    "choose_geometry",
    "compressor_shapes",
    "expand_to_square",
    "grid_side",
    "is_repo_id",
    "load_pretrained_config",
    "not_found_error",
    "require_pretrained",
    "grid_to_tokens",
    "load_compressor",
    "load_compressor_into",
    "load_compressor_tensors",
    "non_finite_tensors",
    "provenance_differences",
    "publish_file",
    "publish_folder",
    "read_metadata",
    "save_compressor",
    "tokens_to_grid",
    "validate_grid_sizes",
    "warn_non_finite",
    "window_mean",
]
