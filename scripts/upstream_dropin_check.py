"""Drop-in check: this project's clip_encoder.py and vision_token_compression inside upstream LLaVA.

Runs in a throwaway virtualenv that holds upstream LLaVA 1.2.2.post1 (the PyPI package
``llava-torch``) on transformers 4.37.2, whose ``llava/model/multimodal_encoder/clip_encoder.py``
has been replaced by ours and which has our ``vision_token_compression`` package beside it.
``scripts/check_upstream_dropin.sh`` builds that environment and runs this script; the script
imports nothing from this repository's ``llava/``: every ``llava`` name is upstream's.

It builds a random-weight stand-in of CLIP ViT-L/14-336 (real width and grid, few layers) and a
tiny Llama LLaVA through upstream's ``initialize_vision_modules``, then checks, per setting:

- the tower reports the compressed grid (``num_patches``, ``num_patches_per_side``);
- upstream's ``prepare_inputs_labels_for_multimodal`` puts exactly that many image embeddings into
  the LLM input (text tokens - 1 + num_patches);
- a forward and backward pass gives a finite loss and a gradient that reaches the compressor,
  while CLIP stays frozen;
- with compression off our tower returns exactly what upstream's own tower returns, and with the
  untrained (average-init) compressor the 24→12 / 24→8 features are window means of upstream's;
- upstream's anyres + spatial_unpad path (LLaVA-1.6) merges compressed crops;
- ``save_pretrained`` / ``from_pretrained`` restores the compressor weights.

Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import tempfile
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

STANDIN_OF = "openai/clip-vit-large-patch14-336"
STANDIN_LAYERS = 2  # of the real tower's 24; mm_vision_select_layer=-2 then picks layer 1's output
PROMPT_IDS = [1, 10, 11, 12]  # text before the image
PROMPT_IDS_AFTER = [13, 14, 15, 16, 17]  # text after the image
ANYRES_PINPOINTS = "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]"


@dataclass
class ModelArgs:
    """The fields of upstream's ``ModelArguments`` that ``initialize_vision_modules`` reads, plus ours."""

    vision_tower: str
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_projector_type: str = "mlp2x_gelu"
    mm_patch_merge_type: str = "flat"
    pretrain_mm_mlp_adapter: str | None = None
    use_token_compression: bool = False
    compression_input_size: int | None = None
    compression_output_size: int | None = None


@dataclass(frozen=True)
class Case:
    name: str
    use_token_compression: bool
    output_size: int | None
    expected_patches: int


CASES = [
    Case("off", False, None, 576),
    Case("24to12", True, 12, 144),
    Case("24to8", True, 8, 64),
]


class CheckFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def explain_llava_import_failure() -> str:
    """Upstream's llava/model/__init__.py swallows import errors; import the modules it hides."""
    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        return "the package 'llava' is not installed in this environment"
    root = Path(next(iter(spec.submodule_search_locations)))
    for name in list(sys.modules):
        if name == "llava" or name.startswith("llava."):
            del sys.modules[name]
    # Empty parent packages, so the submodules import without the __init__ files that hide errors.
    for name, path in (("llava", root), ("llava.model", root / "model")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    for name in ("llava.model.language_model.llava_llama", "llava.model.language_model.llava_mpt",
                 "llava.model.language_model.llava_mistral"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any failure here is the one upstream hid
            return f"importing {name} fails:\n{traceback.format_exc()}"
    return "the language-model modules import on their own; the failure is elsewhere in llava/__init__.py"


def import_upstream():
    """Upstream's classes, and the clip_encoder module that must now be ours."""
    try:
        import llava
        from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images
        from llava.model import LlavaLlamaForCausalLM
        from llava.model.language_model.llava_llama import LlavaConfig
        from llava.model.multimodal_encoder import clip_encoder
    except ImportError as err:
        raise CheckFailed(f"upstream llava does not import ({err}); {explain_llava_import_failure()}") from err
    check(
        hasattr(clip_encoder.CLIPVisionTower, "compress"),
        f"{clip_encoder.__file__} is upstream's clip_encoder.py, not ours: copy ours over it first "
        f"(scripts/check_upstream_dropin.sh does).",
    )
    return types.SimpleNamespace(
        llava=llava, IGNORE_INDEX=IGNORE_INDEX, IMAGE_TOKEN_INDEX=IMAGE_TOKEN_INDEX,
        process_images=process_images, LlavaLlamaForCausalLM=LlavaLlamaForCausalLM, LlavaConfig=LlavaConfig,
        clip_encoder=clip_encoder,
    )


def upstream_original_tower_class():
    """Upstream's own CLIPVisionTower, kept beside ours by the setup script, or None."""
    try:
        module = importlib.import_module("llava.model.multimodal_encoder.clip_encoder_upstream")
    except ImportError:
        return None
    return module.CLIPVisionTower


def tiny_llava(up, model_args: ModelArgs, **config_fields):
    """A 2-layer, 64-wide Llama LLaVA with its vision modules set up by upstream's code."""
    torch.manual_seed(0)
    config = up.LlavaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, **config_fields,
    )
    model = up.LlavaLlamaForCausalLM(config)
    model.get_model().initialize_vision_modules(model_args)
    return model.eval()


def prompt(up) -> torch.Tensor:
    return torch.tensor([PROMPT_IDS + [up.IMAGE_TOKEN_INDEX] + PROMPT_IDS_AFTER])


def sample_image(size: tuple[int, int]):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())  # (H, W, 3) uint8: RGB


def compressor_of(model) -> torch.nn.Module | None:
    return model.get_vision_tower().token_compressor


def run_case(up, standin: Path, case: Case, report: list[str]) -> None:
    args = ModelArgs(
        vision_tower=str(standin),
        use_token_compression=case.use_token_compression,
        compression_input_size=24 if case.use_token_compression else None,
        compression_output_size=case.output_size,
    )
    model = tiny_llava(up, args)
    tower = model.get_vision_tower()
    check(isinstance(tower, up.clip_encoder.CLIPVisionTower), f"[{case.name}] tower is {type(tower)}, not ours")
    check(tower.num_patches == case.expected_patches,
          f"[{case.name}] tower.num_patches = {tower.num_patches}, expected {case.expected_patches}")
    side = int(case.expected_patches**0.5)
    check(tower.num_patches_per_side == side,
          f"[{case.name}] tower.num_patches_per_side = {tower.num_patches_per_side}, expected {side}")
    check(tower.hidden_size == 1024, f"[{case.name}] tower.hidden_size = {tower.hidden_size}, expected 1024")
    check((compressor_of(model) is not None) == case.use_token_compression,
          f"[{case.name}] token_compressor is {compressor_of(model)!r}")

    images = up.process_images([sample_image((336, 336))], tower.image_processor, model.config)  # (1, 3, 336, 336)
    input_ids = prompt(up)
    labels = input_ids.clone()
    labels[input_ids == up.IMAGE_TOKEN_INDEX] = up.IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)

    _, _, _, _, inputs_embeds, new_labels = model.prepare_inputs_labels_for_multimodal(
        input_ids, None, attention_mask, None, labels, images,
    )
    expected_len = input_ids.shape[1] - 1 + case.expected_patches
    check(tuple(inputs_embeds.shape) == (1, expected_len, model.config.hidden_size),
          f"[{case.name}] inputs_embeds {tuple(inputs_embeds.shape)}, expected (1, {expected_len}, "
          f"{model.config.hidden_size}) = text tokens {input_ids.shape[1]} - 1 + {case.expected_patches} image")
    n_image = int((new_labels == up.IGNORE_INDEX).sum())
    check(n_image == case.expected_patches,
          f"[{case.name}] {n_image} image positions in the labels, expected {case.expected_patches}")

    model.train()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images)
    check(bool(torch.isfinite(out.loss)), f"[{case.name}] loss is {out.loss}")
    out.loss.backward()
    clip_grads = [p.grad for p in tower.vision_tower.parameters() if p.grad is not None]
    check(not clip_grads, f"[{case.name}] {len(clip_grads)} CLIP parameters got gradients; CLIP must stay frozen")
    projector_grad = model.get_model().mm_projector[0].weight.grad
    check(projector_grad is not None and projector_grad.abs().sum() > 0, f"[{case.name}] no gradient at the projector")
    grad_note = "no compressor"
    if case.use_token_compression:
        grads = {name: p.grad for name, p in compressor_of(model).named_parameters()}
        missing = [name for name, grad in grads.items() if grad is None or not bool(grad.abs().sum() > 0)]
        check(not missing, f"[{case.name}] no gradient reached compressor parameters {missing}")
        check(all(bool(torch.isfinite(g).all()) for g in grads.values()), f"[{case.name}] non-finite compressor grads")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        grad_note = f"compressor grad norm {norm.item():.3g}"
    report.append(
        f"  {case.name:7s} num_patches={tower.num_patches:<4d} inputs_embeds={tuple(inputs_embeds.shape)} "
        f"(= {input_ids.shape[1]} - 1 + {case.expected_patches})  loss={out.loss.item():.4f}  {grad_note}"
    )


def run_cases(up, standin: Path, report: list[str]) -> None:
    for case in CASES:
        run_case(up, standin, case, report)


def run_equivalence(up, standin: Path, report: list[str]) -> None:
    """Our tower against upstream's: identical with compression off, window means with it on."""
    upstream_cls = upstream_original_tower_class()
    if upstream_cls is None:
        report.append("  skipped: upstream's original clip_encoder.py was not kept as clip_encoder_upstream.py")
        return
    images = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    reference = upstream_cls(str(standin), ModelArgs(vision_tower=str(standin)))(images)  # (B, 576, C)
    grid = reference.transpose(1, 2).unflatten(2, (24, 24))  # (B, C, 24, 24)
    expectations = {
        "off": reference,
        # The average init makes each token the mean of the valid tokens in its window.
        "24to12": F.avg_pool2d(grid, 3, stride=2, padding=1, count_include_pad=False).flatten(2).transpose(1, 2),
        "24to8": F.avg_pool2d(grid, 3, stride=3).flatten(2).transpose(1, 2),
    }
    for case in CASES:
        args = ModelArgs(
            vision_tower=str(standin), use_token_compression=case.use_token_compression,
            compression_output_size=case.output_size,
        )
        ours = up.clip_encoder.CLIPVisionTower(str(standin), args)
        with torch.no_grad():
            got = ours(images)
        want = expectations[case.name]
        check(got.shape == want.shape, f"[{case.name}] our tower gives {tuple(got.shape)}, expected {tuple(want.shape)}")
        diff = (got - want).abs().max().item()
        tolerance = 0.0 if case.name == "off" else 1e-4
        check(diff <= tolerance, f"[{case.name}] our tower differs from upstream's by {diff:.3g} (tolerance {tolerance})")
        how = "identical to upstream's tower" if case.name == "off" else "window means of upstream's features"
        report.append(f"  {case.name:7s} {tuple(got.shape)} {how} (max |diff| {diff:.2g})")


def run_anyres(up, standin: Path, report: list[str]) -> None:
    """LLaVA-1.6 anyres + spatial_unpad in upstream's llava_arch, on the compressed 12×12 grid."""
    args = ModelArgs(
        vision_tower=str(standin), mm_patch_merge_type="spatial_unpad",
        use_token_compression=True, compression_input_size=24, compression_output_size=12,
    )
    model = tiny_llava(up, args, image_aspect_ratio="anyres", image_grid_pinpoints=ANYRES_PINPOINTS)
    image = sample_image((672, 672))
    images = up.process_images([image], model.get_vision_tower().image_processor, model.config)  # (1, 5, 3, 336, 336)
    check(tuple(images.shape) == (1, 5, 3, 336, 336), f"[anyres] processed images {tuple(images.shape)}")
    input_ids = prompt(up)
    with torch.no_grad():
        _, _, _, _, inputs_embeds, _ = model.prepare_inputs_labels_for_multimodal(
            input_ids, None, None, None, None, images, image_sizes=[image.size],
        )
    # Base image 12×12, plus the 2×2 crops as a 24×24 grid (square: nothing unpadded) with a newline column.
    expected_image = 12 * 12 + 24 * (24 + 1)
    expected_len = input_ids.shape[1] - 1 + expected_image
    check(inputs_embeds.shape[1] == expected_len,
          f"[anyres] inputs_embeds has {inputs_embeds.shape[1]} positions, expected {expected_len} "
          f"(= {input_ids.shape[1]} - 1 + 144 base + 24×25 crops)")
    report.append(f"  anyres  672×672 image, 2×2 crops, spatial_unpad: inputs_embeds={tuple(inputs_embeds.shape)} "
                  f"(= {input_ids.shape[1]} - 1 + 144 + 24×25)")


def run_roundtrip(up, standin: Path, work_dir: Path, report: list[str]) -> None:
    """A saved LLaVA whose config carries the compression fields reloads its compressor weights."""
    args = ModelArgs(
        vision_tower=str(standin), use_token_compression=True, compression_input_size=24, compression_output_size=12,
    )
    model = tiny_llava(up, args)
    # Upstream's initialize_vision_modules does not record our fields; a fork that wants reloadable
    # checkpoints has the tower write them into the config (this project's llava/ does).
    model.get_vision_tower().record_compression(model.config)
    with torch.no_grad():
        for p in compressor_of(model).parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained" weights, unlike a fresh average init
    save_dir = work_dir / "tiny-llava-24to12"
    model.save_pretrained(save_dir)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused CLIP weights are checked below instead
    try:
        reloaded, info = up.LlavaLlamaForCausalLM.from_pretrained(save_dir, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    check(not info["missing_keys"], f"[roundtrip] from_pretrained left weights unloaded: {info['missing_keys']}")
    # The tower is built with delay_load, so CLIP's saved copy goes unused: load_model() reads it from its path.
    stray = [k for k in info["unexpected_keys"] if not k.startswith("model.vision_tower.vision_tower.")]
    check(not stray, f"[roundtrip] from_pretrained found no place for {stray}")
    compressor = compressor_of(reloaded)
    check(compressor is not None, "[roundtrip] the reloaded model has no token compressor")
    saved = compressor_of(model).state_dict()
    for name, tensor in compressor.state_dict().items():
        check(torch.equal(tensor, saved[name]), f"[roundtrip] compressor {name} was not restored by from_pretrained")
    tower = reloaded.get_vision_tower()
    tower.load_model()
    check(tower.token_compressor is compressor, "[roundtrip] load_model() replaced the restored compressor")
    images = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    input_ids = prompt(up)
    with torch.no_grad():
        before = model.eval().prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, images)[4]
        after = reloaded.eval().prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, images)[4]
    diff = (before - after).abs().max().item()
    check(diff == 0.0, f"[roundtrip] reloaded model's LLM input differs by {diff:.3g}")
    report.append(f"  save_pretrained → from_pretrained restores the compressor; LLM input identical {tuple(after.shape)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the stand-in tower and a saved tiny LLaVA go (default: a temporary directory)")
    parser.add_argument("--verbose", action="store_true", help="show the towers' and compressors' log lines")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if opts.verbose:
        for name in ("llava", "vision_token_compression"):
            logging.getLogger(name).setLevel(logging.INFO)

    print(f"Upstream drop-in check: python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="toconv-dropin-") as tmp:
        work_dir = opts.work_dir or Path(tmp)
        try:
            up = import_upstream()
            from vision_token_compression.testing import build_clip_standin

            dist = importlib.metadata.distribution("llava-torch")
            installed = Path(dist.locate_file("llava/__init__.py")).resolve()
            check(Path(up.llava.__file__).resolve() == installed,
                  f"'llava' was imported from {up.llava.__file__}, not from the llava-torch package ({installed}); "
                  f"run this script from outside the repository's root, without PYTHONPATH")
            print(f"  upstream llava: llava-torch {dist.version} at {installed.parent}")
            print(f"  clip_encoder:   {up.clip_encoder.__file__} (this project's)")
            standin = build_clip_standin(STANDIN_OF, work_dir / "clip-standin", num_hidden_layers=STANDIN_LAYERS)
            print(f"  vision tower:   stand-in for {STANDIN_OF} with RANDOM weights (real config: 336 px, "
                  f"patch 14, width 1024; {STANDIN_LAYERS} of 24 layers) at {standin}; outputs mean nothing, "
                  f"shapes are real")
            print("  language model: tiny random Llama (hidden 64, 2 layers, vocab 128), mm_projector mlp2x_gelu")
        except Exception as err:  # noqa: BLE001 - report and fail
            print(f"FAIL setup: {err}" if isinstance(err, CheckFailed) else f"FAIL setup:\n{traceback.format_exc()}")
            print("upstream-dropin: 0 passed, 1 failed")
            return 1
        steps = [
            ("LLaVA-1.5 path: tower, LLM input, forward/backward", lambda r: run_cases(up, standin, r)),
            ("our tower vs upstream's tower", lambda r: run_equivalence(up, standin, r)),
            ("LLaVA-1.6 anyres", lambda r: run_anyres(up, standin, r)),
            ("checkpoint round trip", lambda r: run_roundtrip(up, standin, work_dir, r)),
        ]
        for title, step in steps:
            report: list[str] = []
            try:
                step(report)
                status = "ok"
            except Exception as err:  # noqa: BLE001 - every failure is reported, then the exit status says it
                failures += 1
                status = "FAIL"
                report.append(f"  {err}" if isinstance(err, CheckFailed) else traceback.format_exc())
            print(f"[{status}] {title}")
            print("\n".join(report))
    if failures:
        print(f"Upstream drop-in check FAILED: {failures} of {len(steps)} steps")
    else:
        print("Upstream drop-in check passed: 576 → 144 and 64 image tokens in upstream LLaVA")
    print(f"upstream-dropin: {len(steps) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
