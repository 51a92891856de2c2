"""``ToConvLlavaConfig``: transformers' ``LlavaConfig`` plus the two grid sizes of the ToConv compressor."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

from vision_token_compression import DEFAULT_COMPRESSION_OUTPUT_SIZE, CompressionSettings, grid_side

from .native import RegisteredNatively

MODEL_TYPE = "toconv_llava"


@strict
class ToConvLlavaConfig(RegisteredNatively, LlavaConfig):
    """A LLaVA-1.5 config (``llava-hf`` layout) whose CLIP patch grid is compressed before the projector.

    Every ``LlavaConfig`` field keeps its meaning; ``image_seq_length`` is the compressed count.

    Args:
        compression_input_size: Side of CLIP's patch grid (24 for ViT-L/14-336); None: read from
            ``vision_config`` (``image_size // patch_size``). Given, it must equal that grid.
        compression_output_size: Side of the compressed grid, ``1 <= out < in``: 12 gives 144
            image tokens, 8 gives 64.
        image_seq_length: Image tokens per image; None: ``compression_output_size ** 2``. Given, it
            must equal that.
    """

    model_type = MODEL_TYPE

    compression_input_size: int | None = None
    compression_output_size: int = DEFAULT_COMPRESSION_OUTPUT_SIZE
    image_seq_length: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_compression()

    @property
    def tower_grid_size(self) -> int:
        """Side of the vision tower's own patch grid (24 for CLIP ViT-L/14-336)."""
        return grid_side(self.vision_config)

    def _check_compression(self) -> None:
        check_compression_fields(self, "ToConvLlavaConfig")
        tokens = self.compression_output_size**2
        if self.image_seq_length is None:
            self.image_seq_length = tokens
        elif self.image_seq_length != tokens:
            raise ValueError(
                f"image_seq_length={self.image_seq_length} contradicts compression_output_size="
                f"{self.compression_output_size} ({tokens} image tokens). Set image_seq_length to {tokens}, or "
                f"drop it from config.json."
            )


def check_compression_fields(config, name: str) -> None:
    """The compression fields of a ToConv config (LLaVA-1.5's or LLaVA-NeXT's), by the library's one check.

    Fills in ``compression_input_size`` (the tower's grid) when absent; refuses sizes that do not fit the
    tower, and a feature selection the compressor cannot take (CLS kept, several layers).
    """
    vision = config.vision_config
    grid = grid_side(vision)
    settings = CompressionSettings.check(
        True, config.compression_input_size, config.compression_output_size, grid=grid,
        tower=f"the vision tower (image_size {vision.image_size} / patch_size {vision.patch_size})",
        where=f"{name} (config.json): ",
    ).resolved(grid)
    config.compression_input_size = settings.input_size
    if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"The ToConv compressor takes the {grid}×{grid} patch tokens of one CLIP layer, so it needs "
            f"vision_feature_select_strategy='default' (no CLS token) and one int vision_feature_layer; got "
            f"{config.vision_feature_select_strategy!r} and {config.vision_feature_layer!r}."
        )
