"""The LLaVA fork with compression end to end, on tiny stand-ins (Llama hidden 64, CLIP 24×24 grid, hidden 32).

Covers: config fields and weights surviving save/load, image token counts for pad and anyres with
spatial_unpad, switching compression on at load time (average init or a given compressor),
projector-only and adapter loading, generation with the KV cache, left-padded batches and training.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import left_pad_input_ids, process_images, tokenizer_image_token
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from llava.standins import (
    VisionModelArgs,
    build_tiny_llava,
    build_tokenizer,
    create_tiny_llava,
    make_images,
    tiny_language_config,
)

COMPRESSION_FIELDS = ("use_token_compression", "compression_input_size", "compression_output_size")
ANYRES_SIZES = [(400, 300), (200, 500), (336, 336)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def plain_path(tmp_path_factory, tiny_tower_336, tokenizer_dir):
    """A tiny LLaVA trained (built) without compression."""
    return build_tiny_llava(tmp_path_factory.mktemp("llava-nocomp"), tiny_tower_336, tokenizer_path=tokenizer_dir)


def load(path, **kwargs):
    return load_pretrained_model(str(path), None, "llava-tiny", device="cpu", **kwargs)


def prompt_ids(tokenizer, question: str, n_images: int = 1) -> torch.Tensor:
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" * n_images + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


def image_positions(model, input_ids, images, image_sizes=None) -> torch.Tensor:
    """Per row, how many positions of the LLM's input hold image embeddings (labels IGNORE_INDEX there)."""
    labels = input_ids.clone()
    mask = torch.ones_like(input_ids)
    _, _, attention, _, embeds, new_labels = model.prepare_inputs_labels_for_multimodal(
        input_ids, None, mask, None, labels, images, image_sizes
    )
    assert embeds.shape[:2] == new_labels.shape == attention.shape
    return ((new_labels == IGNORE_INDEX) & attention.bool()).sum(dim=1)


def window_mean(tokens: torch.Tensor, side: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Mean of the valid tokens in each window, computed with avg_pool2d (independent of the compressor)."""
    grid = tokens.unflatten(1, (side, side)).permute(0, 3, 1, 2)  # (B, C, H, W)
    pooled = F.avg_pool2d(grid, kernel, stride, padding, count_include_pad=False)
    return pooled.flatten(2).transpose(1, 2)


# ---- save / load -----------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_compressor_projector_and_config(tmp_path, tiny_tower_336, tokenizer):
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12)
    config = model.config
    assert (config.use_token_compression, config.compression_input_size, config.compression_output_size) == (True, 24, 12)
    # Give the compressor weights no init could reproduce, so a silent re-init cannot pass.
    compressor = model.get_vision_tower().token_compressor
    with torch.no_grad():
        compressor.conv.weight.normal_()
        compressor.conv.bias.normal_()
    saved = {k: v.clone() for k, v in model.state_dict().items() if "token_compressor" in k or "mm_projector" in k}
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    _, loaded, image_processor, context_len = load(tmp_path)
    state = loaded.state_dict()
    assert set(saved) == {k for k in state if "token_compressor" in k or "mm_projector" in k}
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    for field in COMPRESSION_FIELDS:
        assert getattr(loaded.config, field) == getattr(config, field), field
    assert loaded.config.mm_vision_tower == str(tiny_tower_336)
    assert loaded.config.mm_hidden_size == 32 and loaded.config.mm_projector_type == "mlp2x_gelu"
    tower = loaded.get_vision_tower()
    assert tower.is_loaded and tower.num_patches == 144
    # The compressor reads a channels-last grid; its weight must be laid out the same after loading.
    assert tower.token_compressor.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert image_processor is tower.image_processor
    assert context_len == 2048


@pytest.mark.parametrize("output_size, tokens", [(None, 576), (12, 144), (8, 64)])
def test_pad_images_give_num_patches_embeddings(tiny_tower_336, tokenizer, output_size, tokens):
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=output_size).eval()
    assert model.get_vision_tower().num_patches == tokens
    images = make_images(2, size=[(500, 300), (200, 400)], seed=1)
    pixels = process_images(images, model.get_vision_tower().image_processor, model.config)
    assert pixels.shape == (2, 3, 336, 336)
    ids, mask = left_pad_input_ids([prompt_ids(tokenizer, "What is this?"), prompt_ids(tokenizer, "Two?", 2)],
                                   tokenizer.pad_token_id)
    pixels = torch.cat([pixels, pixels[:1]])  # the second prompt holds two images
    labels = ids.clone()
    _, _, attention, _, embeds, new_labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, pixels, padding_side="right"
    )
    text_tokens = (mask.bool() & (ids != IMAGE_TOKEN_INDEX)).sum(dim=1)
    assert (new_labels == IGNORE_INDEX).logical_and(attention.bool()).sum(dim=1).tolist() == [tokens, 2 * tokens]
    assert attention.sum(dim=1).tolist() == (text_tokens + torch.tensor([tokens, 2 * tokens])).tolist()
    # The image positions hold exactly the projected tower features of that image.
    expected = model.encode_images(pixels[:1])[0]
    first = (ids[0, mask[0].bool()] == IMAGE_TOKEN_INDEX).nonzero()[0, 0]
    torch.testing.assert_close(embeds[0, first:first + tokens], expected)


# Hand-computed for the default pinpoints (336×672, 672×336, 672×672):
# 400×300 → 2×1 crops; 200×500 → 1×2; 336×336 → 1×2. Tokens = base + unpadded grid rows × (cols + 1).
@pytest.mark.parametrize("output_size, expected", [
    (12, [144 + 12 * 17, 144 + 24 * 11, 144 + 12 * 13]),
    (8, [64 + 8 * 11, 64 + 16 * 7, 64 + 8 * 9]),
    (None, [576 + 24 * 33, 576 + 48 * 21, 576 + 24 * 25]),
])
def test_anyres_spatial_unpad_counts_on_the_compressed_grid(tiny_tower_336, tokenizer, output_size, expected):
    model = create_tiny_llava(
        tiny_tower_336, tokenizer, compression_output_size=output_size,
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
    ).eval()
    images = make_images(3, size=ANYRES_SIZES, seed=2)
    pixels = process_images(images, model.get_vision_tower().image_processor, model.config)
    assert pixels.shape == (3, 3, 3, 336, 336)  # base image + 2 crops each
    ids = torch.stack([prompt_ids(tokenizer, "Describe.")] * 3)
    counts = image_positions(model, ids, pixels, [im.size for im in images])
    assert counts.tolist() == expected
    if output_size == 12:
        # The 400×300 image's unpadded grid is 12 rows × 16 columns, each row ended by image_newline.
        features = model.image_embeddings(pixels, [im.size for im in images])[0]
        grid = features[144:].view(12, 17, -1)
        newline = model.get_model().image_newline
        torch.testing.assert_close(grid[:, -1], newline.expand(12, -1))
        assert not torch.allclose(grid[:, 0], newline.expand(12, -1))


def test_anyres_spatial_without_unpad_keeps_every_crop(tiny_tower_336, tokenizer):
    model = create_tiny_llava(
        tiny_tower_336, tokenizer, compression_output_size=12, image_aspect_ratio="anyres", mm_patch_merge_type="spatial",
    ).eval()
    images = make_images(2, size=[(400, 300), (700, 700)], seed=3)
    pixels = process_images(images, model.get_vision_tower().image_processor, model.config)
    assert [p.shape[0] for p in pixels] == [3, 5]  # a list: crop counts differ
    features = model.image_embeddings(pixels, [im.size for im in images])
    assert [f.shape[0] for f in features] == [3 * 144, 5 * 144]


# ---- compression switched on at load time ----------------------------------------------------


@pytest.mark.parametrize("output_size, geometry", [(12, (3, 2, 1)), (8, (3, 3, 0))])
def test_switching_compression_on_at_load_time_gives_the_window_mean(plain_path, tokenizer, output_size, geometry):
    _, model, processor, _ = load(plain_path, use_token_compression=True, compression_output_size=output_size)
    tower = model.get_vision_tower()
    compressor = tower.token_compressor
    assert compressor is not None and (compressor.kernel_size, compressor.stride, compressor.padding) == geometry
    assert model.config.use_token_compression is True
    assert model.config.compression_output_size == output_size and model.config.compression_input_size == 24
    kernel = geometry[0]
    eye = torch.eye(32)[:, :, None, None].expand(-1, -1, kernel, kernel) / kernel**2
    assert torch.equal(compressor.conv.weight, eye) and torch.equal(compressor.conv.bias, torch.zeros(32))
    tokens = torch.randn(2, 576, 32)
    torch.testing.assert_close(compressor(tokens), window_mean(tokens, 24, *geometry))

    images = make_images(1, size=(300, 200), seed=4)
    pixels = process_images(images, processor, model.config)
    assert image_positions(model, prompt_ids(tokenizer, "What?")[None], pixels).tolist() == [output_size**2]


def test_from_pretrained_initialises_a_missing_compressor_to_the_average(plain_path):
    """Not only load_pretrained_model: plain from_pretrained must not leave HF's random conv init."""
    from llava.model import LlavaConfig

    config = LlavaConfig.from_pretrained(plain_path)
    config.use_token_compression, config.compression_output_size = True, 12
    model, info = LlavaLlamaForCausalLM.from_pretrained(plain_path, config=config, output_loading_info=True)
    assert any("token_compressor" in key for key in info["missing_keys"])
    compressor = model.get_vision_tower().token_compressor
    eye = torch.eye(32)[:, :, None, None].expand(-1, -1, 3, 3) / 9
    assert torch.equal(compressor.conv.weight, eye) and torch.equal(compressor.conv.bias, torch.zeros(32))


def test_switching_on_with_a_compressor_checkpoint_loads_it(plain_path, tmp_path):
    from vision_token_compression import TokenCompressor, save_compressor

    trained = TokenCompressor(24, 12, 32, init="random")
    path = save_compressor(trained, tmp_path / "compressor.safetensors", vision_tower="openai/clip-vit-large-patch14-336")
    _, model, _, _ = load(plain_path, use_token_compression=True, token_compressor_path=str(path))
    loaded = model.get_vision_tower().token_compressor
    assert torch.equal(loaded.conv.weight, trained.conv.weight) and torch.equal(loaded.conv.bias, trained.conv.bias)


def test_plain_checkpoint_loads_uncompressed_by_default(plain_path):
    _, model, _, _ = load(plain_path)
    assert model.get_vision_tower().token_compressor is None and model.get_vision_tower().num_patches == 576
    assert model.config.use_token_compression is False


def test_load_time_compression_arguments_are_checked(tmp_path, plain_path, tiny_tower_336, tokenizer, caplog):
    _, model, _, _ = load(plain_path, compression_output_size=8)  # off (the checkpoint's): ignored, with a warning
    assert model.get_vision_tower().num_patches == 576
    assert "compression_output_size=8 is ignored" in caplog.text
    with pytest.raises(ValueError, match="compression_output_size=30 is out of range"):
        load(plain_path, use_token_compression=True, compression_output_size=30)
    compressed = build_tiny_llava(tmp_path / "c12", tiny_tower_336, compression_output_size=12,
                                  tokenizer_path=plain_path)
    with pytest.raises(ValueError, match="compression_output_size=12"):
        load(compressed, use_token_compression=True, compression_output_size=8)


# ---- projector-only checkpoints and adapters -------------------------------------------------


def _trained_adapter(model) -> dict[str, torch.Tensor]:
    """The projector and compressor under their full names, as issue 4's pretraining saves them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mm_projector" in name or "token_compressor" in name:
                param.normal_()
    return {k: v.clone() for k, v in model.state_dict().items() if "mm_projector" in k or "token_compressor" in k}


def test_projector_only_checkpoint_with_model_base(tmp_path, tiny_tower_336, tokenizer):
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12)
    adapter = _trained_adapter(model)
    projector_dir = tmp_path / "projector"
    model.config.save_pretrained(projector_dir)
    torch.save(adapter, projector_dir / "mm_projector.bin")
    base_dir = tmp_path / "base"
    torch.manual_seed(5)
    base_config = LlamaConfig(**{k: getattr(model.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "bos_token_id", "eos_token_id", "pad_token_id")})
    base = LlamaForCausalLM(base_config)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    _, loaded, _, _ = load_pretrained_model(str(projector_dir), str(base_dir), "llava-tiny-pretrain", device="cpu")
    state = loaded.state_dict()
    for key, value in adapter.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], base.state_dict()["model.layers.0.mlp.up_proj.weight"])

    # Compression switched off as asked: the projector loads, the compressor weights are left out.
    _, plain, _, _ = load_pretrained_model(str(projector_dir), str(base_dir), "llava-tiny-pretrain", device="cpu",
                                           use_token_compression=False)
    assert plain.get_vision_tower().token_compressor is None and plain.get_vision_tower().num_patches == 576
    plain_state = plain.state_dict()
    for key, value in adapter.items():
        assert ("token_compressor" in key) != (key in plain_state), key
        if key in plain_state:
            assert torch.equal(plain_state[key], value), key


def test_lora_checkpoint_with_model_base(tmp_path, tiny_tower_336, tokenizer):
    peft = pytest.importorskip("peft")
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12)
    base_dir, lora_dir = tmp_path / "base", tmp_path / "lora"
    llm_keys = [k for k in model.state_dict() if "vision_tower" not in k and "mm_projector" not in k]
    base = LlamaForCausalLM(LlamaConfig(**{k: getattr(model.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "bos_token_id", "eos_token_id", "pad_token_id")}))
    base.load_state_dict({k: model.state_dict()[k] for k in llm_keys})
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()
    non_lora = {k: v.detach().clone().normal_() for k, v in lora.named_parameters()
                if "mm_projector" in k or "token_compressor" in k}
    lora.save_pretrained(lora_dir)
    model.config.save_pretrained(lora_dir)
    torch.save(non_lora, lora_dir / "non_lora_trainables.bin")
    merged_q = lora.merge_and_unload().state_dict()["model.layers.1.self_attn.q_proj.weight"]

    with pytest.raises(ValueError, match="model_base"):
        load_pretrained_model(str(lora_dir), None, "llava-tiny-lora", device="cpu")
    _, loaded, _, _ = load_pretrained_model(str(lora_dir), str(base_dir), "llava-tiny-lora", device="cpu")
    state = loaded.state_dict()
    torch.testing.assert_close(state["model.layers.1.self_attn.q_proj.weight"], merged_q)
    for key, value in non_lora.items():
        assert torch.equal(state[key.removeprefix("base_model.model.")], value), key

    # Without the projector in non_lora_trainables.bin it would stay randomly initialised: an error.
    torch.save({k: v for k, v in non_lora.items() if "mm_projector" not in k}, lora_dir / "non_lora_trainables.bin")
    with pytest.raises(ValueError, match="No weights for the projector"):
        load_pretrained_model(str(lora_dir), str(base_dir), "llava-tiny-lora", device="cpu")


def test_initialize_vision_modules_after_lora_trains_projector_and_compressor(tiny_tower_336, tokenizer):
    """Stage 2 with LoRA from a LLaVA checkpoint: peft froze the existing projector and compressor."""
    peft = pytest.importorskip("peft")
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = VisionModelArgs(vision_tower=str(tiny_tower_336), use_token_compression=True, compression_output_size=12)
    lora.get_model().initialize_vision_modules(args)
    tower = lora.get_vision_tower()
    assert all(p.requires_grad for p in lora.get_model().mm_projector.parameters())
    assert all(p.requires_grad for p in tower.token_compressor.parameters())
    assert not any(p.requires_grad for n, p in tower.vision_tower.named_parameters() if "lora_" not in n)


def test_initialize_vision_modules_loads_projector_and_compressor_from_the_adapter(tmp_path, tiny_tower_336, tokenizer):
    source = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12)
    adapter = _trained_adapter(source)
    torch.save(adapter, tmp_path / "mm_projector.bin")

    def fresh_llm():
        return LlavaLlamaForCausalLM(tiny_language_config(vocab_size=len(tokenizer)))

    args = VisionModelArgs(vision_tower=str(tiny_tower_336), use_token_compression=True, compression_output_size=12,
                           pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.bin"))
    model = fresh_llm()
    model.get_model().initialize_vision_modules(args)
    state = model.state_dict()
    for key, value in adapter.items():
        assert torch.equal(state[key], value), key

    args.use_token_compression = False
    with pytest.raises(ValueError, match="use_token_compression=True"):
        fresh_llm().get_model().initialize_vision_modules(args)


# ---- generation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anyres_model(tiny_tower_336, tokenizer):
    return create_tiny_llava(
        tiny_tower_336, tokenizer, compression_output_size=12, image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad", seed=7,
    ).eval()


def test_generate_with_kv_cache_matches_greedy_decoding_without_cache(anyres_model, tokenizer):
    model = anyres_model
    images = make_images(1, size=(400, 300), seed=5)
    pixels = process_images(images, model.get_vision_tower().image_processor, model.config)
    ids = prompt_ids(tokenizer, "What is in the image?")[None]
    out = model.generate(ids, images=pixels, image_sizes=[images[0].size], do_sample=False, max_new_tokens=6,
                         use_cache=True, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, 6)  # only the new tokens: generation runs from inputs_embeds

    *_, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels, [images[0].size])
    tokens = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(inputs_embeds=embeds, use_cache=False).logits[:, -1]
            token = logits.argmax(dim=-1)
            tokens.append(int(token))
            embeds = torch.cat([embeds, model.get_model().embed_tokens(token)[:, None]], dim=1)
    assert out[0].tolist() == tokens


def test_left_padded_batch_matches_one_prompt_at_a_time(anyres_model, tokenizer):
    model = anyres_model
    images = make_images(3, size=[(400, 300), (700, 700), (200, 500)], seed=6)
    sizes = [im.size for im in images]
    pixels = process_images(images, model.get_vision_tower().image_processor, model.config)
    assert isinstance(pixels, list)  # 3, 5 and 3 crops: rows of very different lengths
    questions = ["What is in the image?", "Describe the image in detail please.", "Color?"]
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    kwargs = dict(do_sample=False, max_new_tokens=5, use_cache=True, pad_token_id=tokenizer.pad_token_id)

    singles = [model.generate(p[None], images=[x], image_sizes=[s], **kwargs)[0].tolist()
               for p, x, s in zip(prompts, pixels, sizes)]
    ids, mask = left_pad_input_ids(prompts, tokenizer.pad_token_id)
    batched = model.generate(ids, attention_mask=mask, images=pixels, image_sizes=sizes, **kwargs)
    assert batched.tolist() == singles

    # The next-token logits agree too, not just their argmax.
    with torch.no_grad():
        _, positions, attention, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, None, pixels, sizes, padding_side="left"
        )
        assert positions is not None and (attention == 0).any()
        batch_logits = model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits[:, -1]
        for row, (p, x, s) in enumerate(zip(prompts, pixels, sizes)):
            single = model(p[None], images=[x], image_sizes=[s]).logits[0, -1]
            torch.testing.assert_close(batch_logits[row], single, atol=1e-5, rtol=1e-4)


def test_mistral_variant_loads_and_generates(tmp_path, tiny_tower_336, tokenizer_dir, tokenizer):
    path = build_tiny_llava(tmp_path / "mistral", tiny_tower_336, tokenizer_path=tokenizer_dir,
                            language_model="mistral", compression_output_size=8)
    _, model, processor, _ = load(path)
    assert type(model).__name__ == "LlavaMistralForCausalLM" and model.get_vision_tower().num_patches == 64
    pixels = process_images(make_images(1), processor, model.config)
    out = model.generate(prompt_ids(tokenizer, "What?")[None], images=pixels, image_sizes=[(336, 336)],
                         do_sample=False, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, 3)


# ---- training ---------------------------------------------------------------------------------


def test_training_forward_masks_images_and_reaches_the_compressor(tiny_tower_336, tokenizer):
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12).train()
    images = make_images(2, seed=8)
    pixels = process_images(images, model.get_vision_tower().image_processor, model.config)
    ids, mask = left_pad_input_ids([prompt_ids(tokenizer, "What?"), prompt_ids(tokenizer, "Describe it.")],
                                   tokenizer.pad_token_id)
    ids, mask = ids.flip(1), mask.flip(1)  # right padding, as the training collator pads
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    out = model(ids, attention_mask=mask, labels=labels, images=pixels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    tower = model.get_vision_tower()
    assert tower.token_compressor.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.get_model().mm_projector.parameters())
    assert all(p.grad is None for p in tower.vision_tower.parameters())  # CLIP stays frozen

    model.config.tokenizer_model_max_length = 100
    *_, embeds, new_labels = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, pixels)
    assert embeds.shape[1] == 100 and new_labels.shape == (2, 100)


def test_image_count_mismatch_is_an_error(tiny_tower_336, tokenizer):
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12).eval()
    pixels = process_images(make_images(3), model.get_vision_tower().image_processor, model.config)
    with pytest.raises(ValueError, match="1 image tokens in 1 rows, but 3 images"):
        model.prepare_inputs_labels_for_multimodal(prompt_ids(tokenizer, "What?")[None], None, None, None, None, pixels)


def test_unfrozen_tower_weights_load_from_the_checkpoint(tmp_path, tiny_tower_336, tokenizer):
    model = create_tiny_llava(tiny_tower_336, tokenizer, compression_output_size=12)
    embedding = model.get_vision_tower().vision_tower.embeddings.patch_embedding.weight
    with torch.no_grad():
        embedding.add_(1.0)  # as if the tower had been fine-tuned
    model.config.unfreeze_mm_vision_tower = True
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded, _, _ = load(tmp_path)
    assert torch.equal(loaded.get_vision_tower().vision_tower.embeddings.patch_embedding.weight, embedding)
