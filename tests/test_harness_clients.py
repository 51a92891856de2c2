"""lmms-eval's and VLMEvalKit's LLaVA clients, run against our fork on stand-in checkpoints.

Each client below replays the calls its harness makes, in the same order and with the same
arguments, as read from their sources (lmms-eval ``lmms_eval/models/simple/llava.py``, class
``Llava``; VLMEvalKit ``vlmeval/vlm/llava/llava.py``, class ``LLaVA``). The one change: where they
hard-code CUDA (``.cuda()``, ``device="cuda:0"``), the CPU is used. The checkpoints are random-weight
stand-ins (tiny Llama, CLIP with the real 24×24 patch grid), so answers are noise; what is checked
is that the calls run, that compression reaches the model, and that batching changes nothing.
"""

from __future__ import annotations

import logging
from argparse import Namespace

import pytest
import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import KeywordsStoppingCriteria, get_model_name_from_path, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.standins import make_images

CPU = torch.device("cpu")  # the harnesses' "cuda" / "cuda:0"


class LmmsEvalLlava:
    """lmms-eval's ``Llava`` model, single process with ``device_map="auto"``."""

    def __init__(self, pretrained: str, batch_size: int = 1, conv_template: str = "vicuna_v1") -> None:
        llava_model_args = {"multimodal": True, "attn_implementation": "sdpa"}
        model_name = get_model_name_from_path(pretrained)
        try:
            loaded = load_pretrained_model(pretrained, None, model_name, device_map="auto", **llava_model_args)
        except TypeError:
            # lmms-eval's fallback for LLaVA versions without the multimodal argument.
            llava_model_args.pop("multimodal", None)
            loaded = load_pretrained_model(pretrained, None, model_name, device_map="auto", **llava_model_args)
        self.tokenizer, self.model, self.image_processor, self.max_length = loaded
        self.config = self.model.config
        self.model.eval()
        self.model.tie_weights()
        self.batch_size = batch_size
        self.conv_template = conv_template
        self.device = CPU

    def _images(self, visuals):
        images = process_images(visuals, self.image_processor, self.config)
        if isinstance(images, list):
            return [image.to(dtype=torch.float16, device=self.device) for image in images]
        return images.to(dtype=torch.float16, device=self.device)

    def _prompt(self, context: str, n_images: int, answer: str | None = None):
        if n_images and DEFAULT_IMAGE_TOKEN not in context:
            context = " ".join([DEFAULT_IMAGE_TOKEN] * n_images) + "\n" + context
        conv = conv_templates[self.conv_template].copy()
        conv.append_message(conv.roles[0], context)
        conv.append_message(conv.roles[1], None)
        if answer is None:
            return conv.get_prompt()
        context_prompt = conv.get_prompt()
        conv.messages[1][1] = answer
        return context_prompt, conv.get_prompt()

    def _pad(self, input_ids: list[torch.Tensor], padding_value: int) -> torch.Tensor:
        left = self.tokenizer.padding_side == "left"
        if left:
            input_ids = [torch.flip(ids, [0]) for ids in input_ids]
        padded = torch.nn.utils.rnn.pad_sequence(input_ids, batch_first=True, padding_value=padding_value)
        return torch.flip(padded, [1]) if left else padded

    def generate_until(self, requests: list[tuple[str, list]], max_new_tokens: int = 6) -> list[str]:
        """``requests``: (context, visuals) pairs, answered ``batch_size`` at a time."""
        answers = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            visuals = [image for _, images in chunk for image in images]
            image_tensor = self._images(visuals) if visuals else None
            prompts = [self._prompt(context, len(images) if image_tensor is not None else 0) for context, images in chunk]
            ids = [tokenizer_image_token(p, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt") for p in prompts]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            input_ids = self._pad(ids, pad).to(self.device)
            attention_masks = input_ids.ne(pad).to(self.device)
            cont = self.model.generate(
                input_ids, attention_mask=attention_masks, pad_token_id=pad, images=image_tensor,
                image_sizes=[v.size for v in visuals], do_sample=False, temperature=0, top_p=None, num_beams=1,
                max_new_tokens=max_new_tokens, use_cache=True,
            )
            answers.extend(self.tokenizer.batch_decode(cont, skip_special_tokens=True))
        return answers

    def loglikelihood_forward(self, context: str, continuation: str, visuals: list):
        """One ``loglikelihood`` request: returns (loss, greedy match, model outputs, full input ids)."""
        image_sizes = [[v.size[0], v.size[1]] for v in visuals]
        image = self._images(visuals)
        context_prompt, full_prompt = self._prompt(context, len(visuals), continuation)
        context_ids = tokenizer_image_token(context_prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        input_ids = tokenizer_image_token(full_prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        context_ids, input_ids = context_ids.unsqueeze(0), input_ids.unsqueeze(0)
        labels = input_ids.clone()
        labels[0, :context_ids.shape[1]] = -100
        with torch.inference_mode():
            outputs = self.model(input_ids=input_ids, labels=labels, images=image, use_cache=True,
                                 image_sizes=image_sizes)
        greedy = outputs["logits"].argmax(dim=-1)[:, context_ids.shape[1]:input_ids.shape[1]]
        match = bool((greedy == input_ids[:, context_ids.shape[1]:]).all())
        return float(outputs["loss"].item()), match, outputs, input_ids


class VLMEvalKitLLaVA:
    """VLMEvalKit's ``LLaVA`` model (llava_v1.5 prompt, ``</s>`` stop string)."""

    system_prompt = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    )
    stop_str = "</s>"

    def __init__(self, model_path: str, **kwargs) -> None:
        self.tokenizer, self.model, self.image_processor, self.context_len = load_pretrained_model(
            model_path=model_path, model_base=None, model_name=get_model_name_from_path(model_path), device_map="cpu",
        )
        self.model = self.model.to(CPU)  # VLMEvalKit: self.model.cuda()
        self.kwargs = dict(do_sample=False, temperature=0, max_new_tokens=2048, top_p=None, num_beams=1, use_cache=True)
        self.kwargs.update(kwargs)

    @staticmethod
    def concat_tilist(message: list[dict]) -> tuple[str, list]:
        text, images = "", []
        for item in message:
            if item["type"] == "text":
                text += item["value"]
            else:
                text += " <image> "
                images.append(item["value"])
        return text, images

    def _answer(self, prompt: str, images: list) -> str:
        image_tensor = None
        if images:
            image_tensor = process_images(images, self.image_processor, Namespace(image_aspect_ratio="pad"))
            image_tensor = image_tensor.to(CPU, dtype=torch.float16)
        input_ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        stopping = KeywordsStoppingCriteria([self.stop_str], self.tokenizer, input_ids)
        with torch.inference_mode():
            output_ids = self.model.generate(input_ids, images=image_tensor, stopping_criteria=[stopping], **self.kwargs)
        return self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()

    def generate_inner(self, message: list[dict]) -> str:
        content, images = self.concat_tilist(message)
        return self._answer(self.system_prompt + "USER: " + content + " ASSISTANT: ", images)

    def chat_inner(self, message: list[dict]) -> str:
        prompt, images = self.system_prompt, []
        for utter in message:
            prompt += "USER: " if utter["role"] == "user" else "ASSISTANT: "
            content, more = self.concat_tilist(utter["content"])
            prompt += content
            images.extend(more)
            prompt += " " if utter["role"] == "user" else self.stop_str
        return self._answer(prompt + "ASSISTANT: ", images)


class ProjectorTokens:
    """Records how many tokens per image reach the LLM (the projector's output length)."""

    def __init__(self, model) -> None:
        self.counts: list[int] = []
        self._handle = model.get_model().mm_projector.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        self.counts.extend([output.shape[1]] * output.shape[0])

    def close(self) -> None:
        self._handle.remove()


# Trained without compression, trained with 24→12, and the 24→12 variant written by toconv-compress-llava
# from the first: the harnesses know nothing of compression, the checkpoint carries it.
CHECKPOINTS = [("tiny_llava", 576), ("tiny_llava_compressed", 144), ("tiny_llava_variant", 144)]


@pytest.fixture(scope="module")
def tiny_llava_variant(tiny_llava, tmp_path_factory):
    from llava.model.compress_checkpoint import compress_checkpoint

    return compress_checkpoint(tiny_llava, tmp_path_factory.mktemp("variant") / "llava-v1.5-tiny-toconv12", 12)


@pytest.fixture(scope="module")
def images():
    return make_images(4, size=[(400, 300), (300, 420), (336, 336), (500, 500)], seed=5)


@pytest.mark.parametrize("fixture, tokens", CHECKPOINTS)
def test_lmms_eval_generates_batched_as_one_at_a_time(request, fixture, tokens, images, caplog):
    path = str(request.getfixturevalue(fixture))
    with caplog.at_level(logging.INFO, logger="llava.model.builder"):
        client = LmmsEvalLlava(path, batch_size=3)
    assert client.model.device.type == "cpu" and client.model.dtype == torch.float32
    requests = [
        ("What is in the image?", [images[0]]),
        ("Describe the image in detail. What color is the shape?", [images[1]]),
        ("How many shapes are there?", [images[2]]),
    ]
    counter = ProjectorTokens(client.model)
    batched = client.generate_until(requests)
    counter.close()
    assert counter.counts == [tokens] * 3
    client.batch_size = 1
    single = client.generate_until(requests)
    assert batched == single
    assert all(isinstance(answer, str) for answer in batched)


@pytest.mark.parametrize("fixture, tokens", CHECKPOINTS)
def test_lmms_eval_loglikelihood_sees_the_image_tokens(request, fixture, tokens, images):
    client = LmmsEvalLlava(str(request.getfixturevalue(fixture)))
    loss, match, outputs, input_ids = client.loglikelihood_forward("Is there a circle?", "Yes.", [images[3]])
    text_tokens = input_ids.shape[1] - 1  # the image token is replaced by the image's embeddings
    assert outputs["logits"].shape[1] == text_tokens + tokens
    assert outputs["logits"].dtype == torch.float32
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    assert isinstance(match, bool)


@pytest.mark.parametrize("fixture, tokens", CHECKPOINTS)
def test_vlmevalkit_single_interleaved_and_multi_turn(request, fixture, tokens, images):
    client = VLMEvalKitLLaVA(str(request.getfixturevalue(fixture)), max_new_tokens=6)
    counter = ProjectorTokens(client.model)
    single = client.generate_inner([{"type": "image", "value": images[0]},
                                    {"type": "text", "value": "What is in the image?"}])
    interleaved = client.generate_inner([
        {"type": "text", "value": "Compare"}, {"type": "image", "value": images[1]},
        {"type": "text", "value": "with"}, {"type": "image", "value": images[2]},
    ])
    chat = client.chat_inner([
        {"role": "user", "content": [{"type": "image", "value": images[3]}, {"type": "text", "value": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "value": "How many shapes are there?"}]},
    ])
    counter.close()
    assert counter.counts == [tokens] * 4
    assert all(isinstance(answer, str) for answer in (single, interleaved, chat))


def _first_image_embeddings(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_images(pixels)


def test_pixels_in_any_float_dtype_reach_the_model_in_its_own(tiny_llava_compressed, images):
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_llava_compressed), None, "llava-v1.5-tiny",
                                                           device="cpu")
    pixels = process_images(images[:2], processor, model.config)
    reference = _first_image_embeddings(model, pixels)
    assert reference.shape == (2, 144, model.config.hidden_size) and reference.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = _first_image_embeddings(model, pixels.to(dtype))
        assert out.dtype == torch.float32
        expected = _first_image_embeddings(model, pixels.to(dtype).float())
        torch.testing.assert_close(out, expected)


def test_torch_dtype_and_attn_implementation_are_honoured(tiny_llava_compressed, images):
    _, model, processor, _ = load_pretrained_model(
        str(tiny_llava_compressed), None, "llava-v1.5-tiny", torch_dtype=torch.bfloat16, attn_implementation="eager",
    )
    assert model.dtype == torch.bfloat16
    assert model.get_vision_tower().dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    out = _first_image_embeddings(model, process_images(images[:1], processor, model.config).half())
    assert out.dtype == torch.bfloat16 and out.shape[1] == 144


def test_placement_follows_upstream_rules(tiny_llava, caplog):
    with caplog.at_level(logging.INFO, logger="llava.model.builder"):
        _, model, _, _ = load_pretrained_model(str(tiny_llava), None, "llava-v1.5-tiny")
    assert model.device.type == "cpu" and model.get_vision_tower().device.type == "cpu"
    assert model.dtype == torch.float32
    _, pinned, _, _ = load_pretrained_model(str(tiny_llava), None, "llava-v1.5-tiny", device_map="cuda:0", device="cpu")
    assert pinned.device.type == "cpu"
    with pytest.raises(TypeError, match="multimodal"):
        load_pretrained_model(str(tiny_llava), None, "llava-v1.5-tiny", multimodal=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_gpu_placement_without_cuda_is_a_clear_error(tiny_llava):
    with pytest.raises(ValueError, match=r"device_map='cuda:0'.*CUDA is not available.*device_map='auto'"):
        load_pretrained_model(str(tiny_llava), None, "llava-v1.5-tiny", device_map="cuda:0")
    with pytest.raises(ValueError, match=r"device='cuda:1'.*CUDA is not available"):
        load_pretrained_model(str(tiny_llava), None, "llava-v1.5-tiny", device="cuda:1")
