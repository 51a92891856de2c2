"""``llava.model.compress_checkpoint``: a compressed variant that upstream-style loading evaluates compressed.

Every variant is loaded the way lmms-eval, VLMEvalKit and upstream's scripts load a model,
``load_pretrained_model(path, model_base, name, device=...)`` without any compression argument, and
its image embeddings are compared with the source loaded with compression switched on at load time
(the average init, or the same ``token_compressor_path``). The LLM's weights must only be linked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava.model import compress_checkpoint as cc
from llava.model.builder import load_pretrained_model
from llava.model.compress_checkpoint import compress_checkpoint, main
from llava.standins import make_images

NAME = "llava-v1.5-tiny"
HIDDEN = 32  # tiny CLIP width (conftest.TINY_HIDDEN)
# float32 weight + bias of the 24→12 / 24→8 conv, and the int64 (input, output) grid sizes
COMPRESSOR_BYTES = (HIDDEN * HIDDEN * 3 * 3 + HIDDEN) * 4 + 2 * 8
# The weights and the grid sizes they were made for (a loader refuses them for another geometry).
COMPRESSOR_KEYS = {"model.vision_tower.token_compressor.conv.weight", "model.vision_tower.token_compressor.conv.bias",
                   "model.vision_tower.token_compressor.grid_sizes"}
SLACK = 64 * 1024


# ---- helpers -------------------------------------------------------------------------------------


def embed(path, base=None, **kwargs) -> tuple[int, torch.Tensor, set[str]]:
    """(num_patches, image embeddings of two fixed images, state dict keys) of a checkpoint loaded upstream-style."""
    _, model, processor, _ = load_pretrained_model(str(path), None if base is None else str(base), NAME,
                                                   device="cpu", **kwargs)
    pixels = processor(images=make_images(2, seed=3), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeddings = model.encode_images(pixels.to(model.dtype))
    return model.get_vision_tower().num_patches, embeddings, set(model.state_dict())


def copy_files(src: Path, dst: Path, names) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def own_files(src: Path, dst: Path) -> dict[str, int]:
    """Output files that are neither symlinks nor hardlinks of a source file: name → bytes."""
    source_inodes = {os.stat(p).st_ino for p in src.iterdir() if p.is_file()}
    return {p.name: p.stat().st_size for p in dst.iterdir()
            if not p.is_symlink() and p.stat().st_ino not in source_inodes}


def assert_linked_not_copied(src: Path, dst: Path, weight_files, written, link: str = "symlink") -> int:
    """Each source weight file appears in ``dst`` only as a link; ``dst``'s own files are ``written``, small."""
    for name in weight_files:
        source = src / name
        if link == "symlink":
            views = [p for p in dst.iterdir() if p.is_symlink() and Path(os.readlink(p)) == source.absolute()]
        else:
            views = [p for p in dst.iterdir() if not p.is_symlink() and p.stat().st_ino == source.stat().st_ino]
        assert views, f"{name} is not linked into {dst}"
    own = own_files(src, dst)
    assert set(own) == set(written), own
    total = sum(own.values())
    assert total < COMPRESSOR_BYTES + SLACK, own
    return total


def weight_bytes(folder: Path, names) -> int:
    return sum((folder / n).stat().st_size for n in names)


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def perturbed_compressor(tmp_path_factory, tiny_tower_336) -> Path:
    """A 24→12 compressor checkpoint fitted to the tiny tower, with weights far from the average init."""
    from vision_token_compression import TokenCompressor, save_compressor

    torch.manual_seed(7)
    compressor = TokenCompressor(24, 12, HIDDEN)
    with torch.no_grad():
        for param in compressor.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return save_compressor(compressor, tmp_path_factory.mktemp("compressor") / "token_compressor.safetensors",
                           vision_tower=str(tiny_tower_336), select_layer=-2, select_feature="patch")


@pytest.fixture(scope="module")
def reference(tiny_llava, perturbed_compressor) -> dict[str, torch.Tensor]:
    """Embeddings of ``tiny_llava`` with compression switched on at load time: average init and perturbed."""
    def switched_on(**kwargs):
        return embed(tiny_llava, use_token_compression=True, compression_output_size=12, **kwargs)[1]

    return {"average": switched_on(), "perturbed": switched_on(token_compressor_path=str(perturbed_compressor))}


@pytest.fixture(scope="module")
def tokenizer_files() -> list[str]:
    """The stand-in checkpoint's files besides config and weights."""
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


# ---- full checkpoints ------------------------------------------------------------------------------


def test_single_safetensors_loads_compressed_upstream_style(tmp_path, tiny_llava, reference):
    dst = compress_checkpoint(tiny_llava, tmp_path / "out", 12)

    assert not (dst / "model.safetensors").exists()  # it would be loaded alone, the index ignored
    config = config_of(dst)
    source_config = config_of(tiny_llava)
    assert {k: config[k] for k in ("use_token_compression", "compression_input_size", "compression_output_size")} \
        == {"use_token_compression": True, "compression_input_size": 24, "compression_output_size": 12}
    assert {k: v for k, v in config.items() if not k.startswith(("use_token_", "compression_"))} == \
        {k: v for k, v in source_config.items() if not k.startswith(("use_token_", "compression_"))}
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert {k for k, f in index["weight_map"].items() if f == "model-token_compressor.safetensors"} == COMPRESSOR_KEYS
    assert set(load_file(dst / "model-token_compressor.safetensors")) == COMPRESSOR_KEYS

    num_patches, embeddings, keys = embed(dst)
    assert num_patches == 144 and embeddings.shape[1] == 144
    assert COMPRESSOR_KEYS <= keys
    torch.testing.assert_close(embeddings, reference["average"])

    own = assert_linked_not_copied(
        tiny_llava, dst, ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"],
        {"config.json", "model.safetensors.index.json", "model-token_compressor.safetensors"},
    )
    assert own < weight_bytes(tiny_llava, ["model.safetensors"]) / 10


def test_token_compressor_path_with_hardlinks_through_the_cli(tmp_path, tiny_llava, reference, perturbed_compressor):
    dst = tmp_path / "out"
    main(["--model-path", str(tiny_llava), "--save-path", str(dst), "--compression-output-size", "12",
          "--token-compressor-path", str(perturbed_compressor), "--link", "hardlink"])

    num_patches, embeddings, _ = embed(dst)
    assert num_patches == 144
    torch.testing.assert_close(embeddings, reference["perturbed"])
    assert not torch.allclose(embeddings, reference["average"])
    assert_linked_not_copied(
        tiny_llava, dst, ["model.safetensors", "tokenizer.json"],
        {"config.json", "model.safetensors.index.json", "model-token_compressor.safetensors"}, link="hardlink",
    )
    assert not any(p.is_symlink() for p in dst.iterdir())


def test_sharded_safetensors_source(tmp_path, tiny_llava, tiny_tower_336, tokenizer_files):
    from transformers import AutoTokenizer

    from llava.standins import create_tiny_llava

    src = tmp_path / "llava-v1.5-tiny-sharded"
    create_tiny_llava(tiny_tower_336, AutoTokenizer.from_pretrained(tiny_llava), seed=2).save_pretrained(
        src, max_shard_size="200KB")
    copy_files(tiny_llava, src, tokenizer_files)
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) > 1

    dst = compress_checkpoint(src, tmp_path / "out", 12)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    source_index = json.loads((src / "model.safetensors.index.json").read_text())
    assert {k: v for k, v in index["weight_map"].items() if k not in COMPRESSOR_KEYS} == source_index["weight_map"]
    assert index["metadata"]["total_size"] == source_index["metadata"]["total_size"] + COMPRESSOR_BYTES

    num_patches, embeddings, _ = embed(dst)
    _, expected, _ = embed(src, use_token_compression=True, compression_output_size=12)
    assert num_patches == 144
    torch.testing.assert_close(embeddings, expected)
    assert_linked_not_copied(src, dst, shards,
                             {"config.json", "model.safetensors.index.json", "model-token_compressor.safetensors"})


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_pytorch_bin_source(tmp_path, tiny_llava, tokenizer_files, layout, perturbed_compressor, reference):
    """Upstream's released LLaVA-1.5 layout: ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json``.

    transformers 5's ``save_pretrained`` writes only safetensors (``safe_serialization=False`` is
    ignored), so the ``.bin`` files are written with ``torch.save`` as transformers 4 did.
    """
    src = copy_files(tiny_llava, tmp_path / "llava-v1.5-tiny-bin", ["config.json", *tokenizer_files])
    state = load_file(tiny_llava / "model.safetensors")
    if layout == "single":
        torch.save(state, src / "pytorch_model.bin")
        weight_files = ["pytorch_model.bin"]
    else:
        keys = sorted(state)
        weight_files = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        parts = {weight_files[0]: keys[: len(keys) // 2], weight_files[1]: keys[len(keys) // 2:]}
        for name, part in parts.items():
            torch.save({k: state[k] for k in part}, src / name)
        weight_map = {k: name for name, part in parts.items() for k in part}
        total = sum(t.numel() * t.element_size() for t in state.values())
        (src / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    dst = compress_checkpoint(src, tmp_path / "out", token_compressor_path=perturbed_compressor)
    assert config_of(dst)["compression_output_size"] == 12  # taken from the compressor checkpoint
    index = json.loads((dst / "pytorch_model.bin.index.json").read_text())
    assert {k for k, f in index["weight_map"].items() if f == "pytorch_model-token_compressor.bin"} == COMPRESSOR_KEYS
    assert set(torch.load(dst / "pytorch_model-token_compressor.bin", weights_only=True)) == COMPRESSOR_KEYS
    assert not (dst / "pytorch_model.bin").exists()

    num_patches, embeddings, _ = embed(dst)
    assert num_patches == 144
    torch.testing.assert_close(embeddings, reference["perturbed"])
    assert_linked_not_copied(src, dst, weight_files,
                             {"config.json", "pytorch_model.bin.index.json", "pytorch_model-token_compressor.bin"})


def test_24_to_8_from_a_hub_id_in_the_local_cache(tmp_path, tiny_llava):
    """A Hub id resolves through the local HF cache (no download); 24→8 gives 64 image tokens."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--toconv--llava-v1.5-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_llava.iterdir():  # a snapshot's files are symlinks (to blobs)
        (snapshot / file.name).symlink_to(file)

    dst = compress_checkpoint("toconv/llava-v1.5-tiny", tmp_path / "out", 8, cache_dir=str(tmp_path / "hub"))
    num_patches, embeddings, _ = embed(dst)
    _, expected, _ = embed(tiny_llava, use_token_compression=True, compression_output_size=8)
    assert num_patches == 64 and embeddings.shape[1] == 64
    torch.testing.assert_close(embeddings, expected)
    target = Path(os.readlink(dst / "model-00001-of-00001.safetensors"))
    assert target.parent.name == commit and target.resolve() == (tiny_llava / "model.safetensors").resolve()

    with pytest.raises(FileNotFoundError, match="toconv/not-cached is not a local folder and is not in the Hugging"):
        compress_checkpoint("toconv/not-cached", tmp_path / "out2", 12, cache_dir=str(tmp_path / "hub"))
    assert not (tmp_path / "out2").exists()


# ---- projector-only and LoRA checkpoints -----------------------------------------------------------


def test_projector_only_source(tmp_path, tiny_llava, perturbed_compressor):
    """``mm_projector.bin`` + config, loaded on ``model_base``: a new mm_projector.bin holds the compressor too."""
    src = copy_files(tiny_llava, tmp_path / "llava-v1.5-tiny-pretrain", ["config.json"])
    torch.manual_seed(4)
    projector = {k: torch.randn_like(v) for k, v in load_file(tiny_llava / "model.safetensors").items()
                 if "mm_projector" in k}
    torch.save(projector, src / "mm_projector.bin")
    (src / "trainer_state.json").write_text("{}")

    dst = compress_checkpoint(src, tmp_path / "out", 12, token_compressor_path=perturbed_compressor)
    saved = torch.load(dst / "mm_projector.bin", weights_only=True)
    assert set(saved) == set(projector) | COMPRESSOR_KEYS
    assert all(torch.equal(saved[k], v) for k, v in projector.items())
    assert (dst / "trainer_state.json").is_symlink()

    num_patches, embeddings, _ = embed(dst, base=tiny_llava)
    _, expected, _ = embed(src, base=tiny_llava, use_token_compression=True, compression_output_size=12,
                           token_compressor_path=str(perturbed_compressor))
    assert num_patches == 144
    torch.testing.assert_close(embeddings, expected)
    own = own_files(src, dst)
    assert set(own) == {"config.json", "mm_projector.bin", "token_compressor.safetensors"}


def test_lora_source(tmp_path, tiny_llava, tiny_tower_336, perturbed_compressor):
    """LoRA (``adapter_config.json`` + ``non_lora_trainables.bin``): adapter linked, compressor under PEFT names."""
    peft = pytest.importorskip("peft")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llava.standins import create_tiny_llava

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava)
    model = create_tiny_llava(tiny_tower_336, tokenizer, seed=5)
    base_dir, src = tmp_path / "base", tmp_path / "llava-v1.5-tiny-lora"
    base = LlamaForCausalLM(LlamaConfig(**{k: getattr(model.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "bos_token_id", "eos_token_id", "pad_token_id")}))
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    non_lora = {k: v.detach().clone() for k, v in lora.named_parameters() if "mm_projector" in k}
    lora.save_pretrained(src)
    model.config.save_pretrained(src)
    torch.save(non_lora, src / "non_lora_trainables.bin")

    dst = compress_checkpoint(src, tmp_path / "out", 12, token_compressor_path=perturbed_compressor)
    saved = torch.load(dst / "non_lora_trainables.bin", weights_only=True)
    assert set(saved) - set(non_lora) == {"base_model.model." + k for k in COMPRESSOR_KEYS}
    assert (dst / "adapter_config.json").is_symlink() and (dst / "adapter_model.safetensors").is_symlink()

    num_patches, embeddings, _ = embed(dst, base=base_dir)
    _, expected, _ = embed(src, base=base_dir, use_token_compression=True, compression_output_size=12,
                           token_compressor_path=str(perturbed_compressor))
    assert num_patches == 144
    torch.testing.assert_close(embeddings, expected)


# ---- refusals: each says why, and nothing is written -------------------------------------------------


def assert_nothing_written(parent: Path) -> None:
    """Neither the output folder nor a temporary one is left in ``parent``."""
    assert list(parent.iterdir()) == []


def test_refuses_an_already_compressed_source(tmp_path, tiny_llava_compressed):
    with pytest.raises(ValueError, match=r"already compressed.*compression_input_size=24, compression_output_size=12"):
        compress_checkpoint(tiny_llava_compressed, tmp_path / "out", 8)
    assert_nothing_written(tmp_path)


def test_refuses_a_non_empty_output_folder(tmp_path, tiny_llava):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{out} exists and is not empty"):
        compress_checkpoint(tiny_llava, out, 12)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    out.joinpath("notes.txt").unlink()  # an existing empty folder is fine
    assert compress_checkpoint(tiny_llava, out, 12) == out and (out / "config.json").is_file()


@pytest.mark.parametrize("size", [0, 24, 30])
def test_refuses_an_output_size_outside_the_grid(tmp_path, tiny_llava, size):
    with pytest.raises(ValueError, match=rf"compression_output_size={size} is out of range.*use 1\.\.23"):
        compress_checkpoint(tiny_llava, tmp_path / "out", size)
    assert_nothing_written(tmp_path)


def test_refuses_a_source_that_is_not_llava(tmp_path, tiny_llava):
    src = copy_files(tiny_llava, tmp_path / "src" / "llama", ["config.json"])
    config = config_of(src)
    del config["mm_vision_tower"]
    (src / "config.json").write_text(json.dumps(config))
    (tmp_path / "dst").mkdir()
    with pytest.raises(ValueError, match="not a LLaVA checkpoint: its config.json has no mm_vision_tower"):
        compress_checkpoint(src, tmp_path / "dst" / "out", 12)
    assert_nothing_written(tmp_path / "dst")


def test_refuses_a_vision_tower_it_cannot_find_and_takes_a_local_copy(tmp_path, tiny_llava, tiny_tower_336):
    src = copy_files(tiny_llava, tmp_path / "src" / "llava", [p.name for p in tiny_llava.iterdir()])
    config = config_of(src)
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (src / "config.json").write_text(json.dumps(config))
    (tmp_path / "dst").mkdir()
    empty_cache = tmp_path / "empty-hub-cache"
    with pytest.raises(FileNotFoundError, match=r"mm_vision_tower\) 'openai/clip-vit-large-patch14-336' not found.*--vision-tower"):
        compress_checkpoint(src, tmp_path / "dst" / "out", 12, cache_dir=str(empty_cache))
    assert_nothing_written(tmp_path / "dst")

    dst = compress_checkpoint(src, tmp_path / "dst" / "out", 12, vision_tower=str(tiny_tower_336),
                              cache_dir=str(empty_cache))
    assert config_of(dst)["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert config_of(dst)["compression_input_size"] == 24


@pytest.mark.parametrize("mismatch, match", [
    ({"output": 8}, r"output_grid_size: checkpoint 8 vs expected 12"),
    ({"hidden": 64}, r"hidden_dim: checkpoint 64 vs expected 32"),
    ({"vision_tower": "openai/clip-vit-base-patch16"}, r"vision_tower: checkpoint 'openai/clip-vit-base-patch16'"),
    ({"select_layer": -1}, r"select_layer: checkpoint -1 vs -2"),
])
def test_refuses_a_compressor_checkpoint_that_does_not_fit(tmp_path, tiny_llava, tiny_tower_336, mismatch, match):
    from vision_token_compression import TokenCompressor, save_compressor

    compressor = TokenCompressor(24, mismatch.get("output", 12), mismatch.get("hidden", HIDDEN))
    path = save_compressor(compressor, tmp_path / "ckpt" / "c.safetensors",
                           vision_tower=mismatch.get("vision_tower", str(tiny_tower_336)),
                           select_layer=mismatch.get("select_layer", -2), select_feature="patch")
    (tmp_path / "dst").mkdir()
    with pytest.raises(ValueError, match=match):
        compress_checkpoint(tiny_llava, tmp_path / "dst" / "out", 12, token_compressor_path=path)
    assert_nothing_written(tmp_path / "dst")


def test_a_failure_while_writing_leaves_nothing(tmp_path, tiny_llava, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(cc, "publish_new_folder", fail)
    with pytest.raises(OSError, match="disk full"):
        compress_checkpoint(tiny_llava, tmp_path / "out", 12)
    assert_nothing_written(tmp_path)


def test_cli_reports_a_refusal_without_a_traceback(tmp_path, tiny_llava_compressed):
    with pytest.raises(SystemExit, match="already compressed"):
        main(["--model-path", str(tiny_llava_compressed), "--save-path", str(tmp_path / "out")])
    assert_nothing_written(tmp_path)
