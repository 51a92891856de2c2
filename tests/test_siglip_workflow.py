"""A SigLIP-tower LLaVA through the whole workflow, compressed 27→14 (issue 17, part 3).

Stage 1 (projector + compressor) and stage 2 (full fine-tune) with ``llava.train.train``, saved,
loaded by ``load_pretrained_model``, answered by ``run_llava`` and by ``model_vqa_loader``'s loop,
and switched on at load time on a checkpoint trained without compression. The tower is a random
SigLIP so400m-384 stand-in with its real 27×27 patch grid (no CLS token) shrunk to 32 channels; the
language model the training workspace's tiny Llama.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from llava.eval import model_vqa_loader, run_llava
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.siglip_encoder import SigLipVisionTower
from llava.standins import build_tiny_llava, build_tiny_siglip, write_question_file
from train_workspace import losses, stage1_flags, stage2_flags
from vision_token_compression import read_metadata


@pytest.fixture(scope="module")
def siglip(ws):
    return build_tiny_siglip(ws.root / "siglip-so400m-patch14-384-standin")


def _on_siglip(flags: list[str], tower) -> list[str]:
    """The training workspace's flags with the SigLIP tower and its 27→14 compression instead of CLIP's 24→12."""
    swap = {"--vision_tower": str(tower), "--compression_input_size": "27", "--compression_output_size": "14"}
    out = list(flags)
    for i, flag in enumerate(flags[:-1]):
        if flag in swap:
            out[i + 1] = swap[flag]
    return out


@pytest.fixture(scope="module")
def trained(ws, siglip):
    """Stage 1 then stage 2 on the SigLIP tower, 27→14; the stage-2 checkpoint folder."""
    from llava.train.train import train

    pretrain = ws.root / "llava-siglip-tiny-toconv14-pretrain"
    trainer = train(argv=_on_siglip(stage1_flags(ws, pretrain), siglip))
    assert all(math.isfinite(v) for v in losses(trainer.state.log_history))
    out = ws.root / "llava-siglip-tiny-toconv14"
    trainer = train(argv=_on_siglip(stage2_flags(ws, pretrain / "mm_projector.bin", out), siglip))
    assert len(losses(trainer.state.log_history)) == 3
    return pretrain, out


def test_stage1_writes_a_27to14_compressor_fitted_to_the_siglip_tower(trained, siglip):
    pretrain, _ = trained
    meta = read_metadata(pretrain / "token_compressor.safetensors")
    assert (meta.input_grid_size, meta.output_grid_size, meta.hidden_dim) == (27, 14, 32)
    assert meta.vision_tower == str(siglip) and meta.select_layer == -2 and meta.select_feature == "patch"
    saved = torch.load(pretrain / "mm_projector.bin", weights_only=True)
    assert saved["model.vision_tower.token_compressor.conv.weight"].shape == (32, 32, 3, 3)


def test_stage2_checkpoint_loads_and_answers_with_196_image_tokens(trained, ws, image_tokens, tmp_path):
    _, out = trained
    _, model, processor, _ = load_pretrained_model(str(out), None, out.name, device="cpu")
    tower = model.get_vision_tower()
    assert isinstance(tower, SigLipVisionTower) and tower.num_patches == 196
    assert json.loads((out / "config.json").read_text())["compression_output_size"] == 14
    image = ws.images / ws.names[0]
    answer = run_llava.main(["--model-path", str(out), "--image-file", str(image), "--query", "What is it?",
                             "--temperature", "0", "--max_new_tokens", "4", "--device", "cpu"])
    assert isinstance(answer, str) and image_tokens == [196]

    questions = write_question_file(tmp_path / "questions.jsonl", ws.names[:2])
    answers = tmp_path / "answers.jsonl"
    model_vqa_loader.main(["--model-path", str(out), "--question-file", str(questions), "--image-folder",
                           str(ws.images), "--answers-file", str(answers), "--temperature", "0",
                           "--max_new_tokens", "4", "--device", "cpu", "--conv-mode", "vicuna_v1"])
    assert len(answers.read_text().splitlines()) == 2 and image_tokens[1:] == [196, 196]


def test_uncompressed_siglip_checkpoint_switched_on_at_load_time(ws, siglip, image_tokens, tmp_path):
    plain = build_tiny_llava(tmp_path / "llava-siglip-tiny", siglip, tokenizer_path=ws.llm)
    image = ws.images / ws.names[0]
    for flags, expected in (([], 729), (["--use-token-compression", "--compression-output-size", "9"], 81)):
        run_llava.main(["--model-path", str(plain), "--image-file", str(image), "--query", "What is it?",
                        "--temperature", "0", "--max_new_tokens", "2", "--device", "cpu", *flags])
        assert image_tokens[-1] == expected
