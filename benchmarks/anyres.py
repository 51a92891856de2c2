"""LLaVA-1.6 (anyres): image tokens and TTFT by stage per image size and compression level, through the fork's code.

One ``LlavaLlamaForCausalLM`` (random weights at the preset's shapes) with ``image_aspect_ratio="anyres"``,
``mm_patch_merge_type="spatial_unpad"``, LLaVA-1.6's ``image_grid_pinpoints`` and its ``image_newline``;
the images go through ``process_images`` (base image + crops, up to 5 tiles of 336×336) and the fork's
own ``prepare_inputs_labels_for_multimodal`` (tower on every tile, compressor per tile, projector,
unpadding, newline column, splicing into the prompt), then one LLM forward and a greedy first token.
So the token counts are the fork's: with 24→12 per tile, 348 / 508 / 744 for 400×300 / 300×700 /
1000×1000 against 1,368 / 1,976 / 2,928 uncompressed.

Compression levels: none, ToConv 24→12 and 24→8 per tile. A level is the fork's ``CLIPVisionTower``
built with those compression settings (same stand-in weights), swapped into the one model, so the
LLM, projector and ``image_newline`` are shared and only the tower's compressor differs.

The stages come from forward hooks on the tower, its compressor and the projector, synchronised on a
GPU: vision tower, compressor, projector, merge (the rest of ``prepare_inputs_labels_for_multimodal``:
text embeddings, unpadding, newlines, splicing), prefill, first-token sampling. Decode, peak memory
and the compressor microbenchmark are the LLaVA-1.5 presets' business and are not run here.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import nn

from benchmarks.memory import cache_bytes, count_bytes, expected_cache_bytes
from benchmarks.models import default_dtype, standin_dir
from benchmarks.pipeline_measures import separate_ttft_pass
from benchmarks.presets import OUTPUT_GRIDS, SELECT_LAYER, Anyres, Preset, RunSettings
from benchmarks.timing import summarize, synchronize, zero_stats
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from vision_token_compression.testing import build_clip_standin

ANYRES_TOWER = "openai/clip-vit-large-patch14-336"  # LLaVA-1.6's tower; the pinpoints are multiples of its 336
STAGES = ("vision_tower", "compressor", "projector", "merge", "prefill", "first_token_sampling")


class ImageInputs(NamedTuple):
    """One image size's batch, as the fork's ``prepare_inputs_labels_for_multimodal`` takes it."""

    input_ids: torch.Tensor  # (B, prompt_len + 1): text ids with one IMAGE_TOKEN_INDEX in the middle
    images: list[torch.Tensor]  # B × (tiles, 3, S, S): base image then crops row by row
    image_sizes: list[tuple[int, int]]  # B × (width, height)


def level_name(grid: int, output_grid: int | None) -> str:
    return "none" if output_grid is None else f"toconv-{grid}to{output_grid}"


def check_args(args: argparse.Namespace) -> None:
    """Refuse the LLaVA-1.5 options that mean nothing for an anyres preset."""
    if args.vision_tower != ANYRES_TOWER:
        raise SystemExit(f"Anyres presets use LLaVA-1.6's tower {ANYRES_TOWER} (its pinpoints are multiples of 336).")
    if args.variants:
        raise SystemExit("Anyres presets measure no compression, ToConv 24→12 and 24→8; --variants does not apply.")


def build_model(llm_fields: dict, tower_path: str, anyres: Anyres, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A random-weight LLaVA-1.6-shaped ``LlavaLlamaForCausalLM`` without compression, on ``device`` in ``dtype``."""
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_llama import LlavaConfig
    from llava.standins import VisionModelArgs

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):  # a 7B LLM is initialised on the GPU, in float16
        model = LlavaLlamaForCausalLM(LlavaConfig(**llm_fields))
    model_args = VisionModelArgs(vision_tower=tower_path, mm_vision_select_layer=SELECT_LAYER,
                                 mm_patch_merge_type=anyres.merge_type)
    model.get_model().initialize_vision_modules(model_args)
    config = model.config
    config.image_aspect_ratio = "anyres"
    config.image_grid_pinpoints = [list(p) for p in anyres.grid_pinpoints]
    config.mm_use_im_start_end = False
    config.tokenizer_padding_side = "right"
    config.tokenizer_model_max_length = llm_fields["max_position_embeddings"]
    return model.to(device=device, dtype=dtype).eval()


def build_towers(model: nn.Module, tower_path: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The model's own tower (no compression), then a ToConv tower per output grid, on the same weights."""
    base = model.get_vision_tower()
    grid = base.tower_grid_size
    towers = {level_name(grid, None): base}
    for out in OUTPUT_GRIDS:
        args = SimpleNamespace(mm_vision_select_layer=SELECT_LAYER, mm_vision_select_feature="patch",
                               use_token_compression=True, compression_output_size=out)
        towers[level_name(grid, out)] = CLIPVisionTower(tower_path, args).to(device=device, dtype=dtype).eval()
    return towers


def use_tower(model: nn.Module, tower: CLIPVisionTower) -> None:
    """Put ``tower`` in the model, its compression fields in the config (as a checkpoint of that level has)."""
    model.get_model().vision_tower = tower
    tower.record_compression(model.config)


def image_inputs(model: nn.Module, size: tuple[int, int], batch: int, prompt_len: int, device: torch.device,
                 dtype: torch.dtype, seed: int) -> ImageInputs:
    """A seeded image of ``size`` through ``process_images`` (anyres tiles), and a random prompt around it."""
    from llava.standins import make_images

    (image,) = make_images(1, size=size, seed=seed)
    processed = process_images([image], model.get_vision_tower().image_processor, model.config)
    pixels = processed[0].to(device=device, dtype=dtype)  # (tiles, 3, S, S)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=generator)
    half = prompt_len // 2
    marker = torch.full((batch, 1), IMAGE_TOKEN_INDEX)
    ids = torch.cat([text[:, :half], marker, text[:, half:]], dim=1).to(device)
    return ImageInputs(ids, [pixels] * batch, [tuple(size)] * batch)


class StageHooks:
    """Seconds spent in modules (summed over calls), from forward hooks synchronised around each call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timing(self, modules: dict[str, nn.Module | None]) -> Iterator[dict[str, float]]:
        self.seconds = {name: 0.0 for name in modules}
        handles = []
        for name, module in modules.items():
            if module is None:
                continue
            starts: list[float] = []

            def pre(_module, _inputs, starts=starts):
                synchronize(self.device)
                starts.append(time.perf_counter())

            def post(_module, _inputs, _output, name=name, starts=starts):
                synchronize(self.device)
                self.seconds[name] += time.perf_counter() - starts.pop()

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            yield self.seconds
        finally:
            for handle in handles:
                handle.remove()


def first_token(model: nn.Module, inputs: ImageInputs) -> torch.Tensor:
    """The fork's forward from ids and images to the greedy first token (one end-to-end TTFT)."""
    out = model(input_ids=inputs.input_ids, images=inputs.images, image_sizes=inputs.image_sizes,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(dim=-1, keepdim=True)


def staged(model: nn.Module, inputs: ImageInputs, hooks: StageHooks) -> tuple[dict[str, float], int, int, Any]:
    """One first token timed stage by stage: seconds per stage and TTFT, image tokens, sequence length, cache."""
    device, clock = hooks.device, time.perf_counter
    tower = model.get_vision_tower()
    modules = {"tower": tower, "compressor": tower.token_compressor, "projector": model.get_model().mm_projector}
    synchronize(device)
    start = clock()
    with hooks.timing(modules) as inner:
        _, positions, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            inputs.input_ids, None, None, None, None, inputs.images, inputs.image_sizes
        )
    synchronize(device)
    prepared = clock()
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    synchronize(device)
    filled = clock()
    out.logits[:, -1].argmax(dim=-1, keepdim=True)
    synchronize(device)
    end = clock()
    times = {
        "vision_tower": inner["tower"] - inner["compressor"],  # the compressor runs inside the tower's forward
        "compressor": inner["compressor"],
        "projector": inner["projector"],
        "merge": (prepared - start) - inner["tower"] - inner["projector"],
        "prefill": filled - prepared,
        "first_token_sampling": end - filled,
        "ttft": end - start,
    }
    seq_len = embeds.shape[1]
    image_tokens = seq_len - (inputs.input_ids.shape[1] - 1)  # the image token's place holds the image's tokens
    cache = getattr(out, "cache", None)
    return times, image_tokens, seq_len, cache if cache is not None else out.past_key_values


def measure(model: nn.Module, towers: dict[str, CLIPVisionTower], anyres: Anyres, settings: RunSettings,
            batch: int, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """One row per image size × level at one batch size; each round runs every size, its levels in rotated order."""
    grid = towers["none"].tower_grid_size
    inputs = {size: image_inputs(model, size, batch, settings.prompt_len, device, dtype, seed=i)
              for i, size in enumerate(anyres.image_sizes)}
    samples = {(size, name): {stage: [] for stage in (*STAGES, "ttft")} for size in inputs for name in towers}
    shape: dict[tuple, tuple[int, int, int]] = {}
    hooks = StageHooks(device)
    names = list(towers)
    for round_index in range(settings.warmup + settings.repeats):
        shift = round_index % len(names)  # rotate the levels' order: no level always runs first for its image
        for size, batch_inputs in inputs.items():
            for name in names[shift:] + names[:shift]:
                tower = towers[name]
                use_tower(model, tower)
                times, image_tokens, seq_len, cache = staged(model, batch_inputs, hooks)
                shape[size, name] = (image_tokens, seq_len, cache_bytes(cache))
                del cache
                if separate_ttft_pass(device):  # GPU: TTFT without the stage synchronisation
                    synchronize(device)
                    start = time.perf_counter()
                    first_token(model, batch_inputs)
                    synchronize(device)
                    times["ttft"] = time.perf_counter() - start
                if round_index >= settings.warmup:
                    for stage, seconds in times.items():
                        samples[size, name][stage].append(seconds)
        print(f"[bench] round {round_index + 1}/{settings.warmup + settings.repeats} done", file=sys.stderr)
    use_tower(model, towers["none"])
    rows = []
    for size, batch_inputs in inputs.items():
        cols, grid_rows = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints,
                                                      towers["none"].config.image_size)
        for name, tower in towers.items():
            image_tokens, seq_len, kv = shape[size, name]
            s = samples[size, name]
            rows.append({
                "batch_size": batch, "image_size": list(size), "tiles": batch_inputs.images[0].shape[0], "crops": [cols, grid_rows],
                "level": name, "grid": grid, "output_grid": tower.num_patches_per_side,
                "tokens_per_tile": tower.num_patches, "image_tokens": image_tokens,
                "prompt_len": settings.prompt_len, "seq_len": seq_len,
                **{f"{stage}_ms": summarize(s[stage]) for stage in STAGES},
                "compressor_ms": summarize(s["compressor"]) if tower.token_compressor is not None
                else zero_stats(len(s["compressor"])),
                "ttft_ms": summarize(s["ttft"]),
                "kv_cache_bytes": kv,
                "kv_cache_bytes_expected": expected_cache_bytes(model.config, batch, seq_len, dtype),
            })
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """TTFT and prefill speed-ups against no compression at the same image size and batch, next to the bound."""
    base = {(tuple(r["image_size"]), r["batch_size"]): r for r in rows if r["level"] == "none"}
    for r in rows:
        b = base[tuple(r["image_size"]), r["batch_size"]]
        ttft = b["ttft_ms"]["median"] / r["ttft_ms"]["median"]
        bound = b["seq_len"] / r["seq_len"]
        r["speedup"] = {
            "ttft": ttft, "prefill": b["prefill_ms"]["median"] / r["prefill_ms"]["median"],
            "ideal_bound": bound, "ttft_share_of_ideal": ttft / bound,
            "kv_cache_saving": 1 - r["kv_cache_bytes"] / b["kv_cache_bytes"],
        }


def run_anyres(args: argparse.Namespace, raw_argv: list[str], preset: Preset, settings: RunSettings,
               device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build the LLaVA-1.6-shaped model and a tower per level, measure every batch size, write the outputs."""
    from benchmarks.anyres_report import build_report, write_outputs
    from benchmarks.environment import environment, load_average
    from benchmarks.models import default_cache_dir
    from benchmarks.run import COMMAND

    check_args(args)
    anyres = preset.anyres
    cache_dir = args.cache_dir or default_cache_dir()
    started, load_start = time.perf_counter(), load_average()
    print(f"[bench] anyres preset {args.preset} on {device} ({dtype}); CLIP stand-ins in {cache_dir}", file=sys.stderr)
    tower_path = str(build_clip_standin(ANYRES_TOWER, standin_dir(cache_dir, ANYRES_TOWER, preset.clip_overrides),
                                        **preset.clip_overrides))
    model = build_model(preset.llm, tower_path, anyres, device, dtype)
    towers = build_towers(model, tower_path, device, dtype)
    rows = []
    with torch.inference_mode():
        for batch in settings.batch_sizes:
            print(f"[bench] batch {batch}: {len(anyres.image_sizes)} image sizes × {len(towers)} levels × "
                  f"{settings.warmup} + {settings.repeats} rounds", file=sys.stderr)
            rows += measure(model, towers, anyres, settings, batch, device, dtype)
    models = {"vision_tower_bytes": count_bytes(towers["none"].vision_tower),
              "projector_bytes": count_bytes(model.get_model().mm_projector),
              "llm_bytes": count_bytes(model) - count_bytes(towers["none"].vision_tower)
              - count_bytes(model.get_model().mm_projector)}
    report = build_report(" ".join([COMMAND, *raw_argv]), {**environment(device, dtype), "load_average_start": load_start},
                          args.preset, preset, settings, models, rows, device)
    report["wall_seconds"] = time.perf_counter() - started
    write_outputs(report, args.json, args.markdown)
    return report
