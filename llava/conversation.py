"""Conversation templates: how a dialogue becomes the prompt a LLaVA checkpoint was trained on.

Template names, fields and prompt layouts follow upstream LLaVA 1.2.x, so ``--conv-mode`` values
of existing scripts keep working and a checkpoint sees exactly the prompt format it was trained with.
"""

from __future__ import annotations

import base64
import dataclasses
from enum import Enum, auto
from io import BytesIO
from typing import Any

from PIL import Image

from .constants import DEFAULT_IMAGE_TOKEN


class SeparatorStyle(Enum):
    """How turns are joined into one prompt string."""

    SINGLE = auto()  # "{system}{sep}{role}: {msg}{sep}..."
    TWO = auto()  # like SINGLE, but user turns end with sep and assistant turns with sep2
    MPT = auto()  # "{system}{sep}{role}{msg}{sep}..." (ChatML: roles carry their own markup)
    PLAIN = auto()  # messages only, no roles or system prompt (projector pretraining)
    LLAMA_2 = auto()  # "[INST] <<SYS>>...<</SYS>> msg [/INST] answer </s><s>[INST] ..."


# A message is either text or (text, image, image_process_mode).
Message = Any


@dataclasses.dataclass
class Conversation:
    """A dialogue plus the template that renders it.

    Args:
        system: System prompt placed before the first turn.
        roles: Names of the (user, assistant) roles as they appear in the prompt.
        messages: ``[role, message]`` pairs; ``message`` None marks the turn to be generated.
        offset: Number of leading few-shot messages that are not part of the user's dialogue.
        sep_style: Layout of the prompt.
        sep: Separator after each turn (after user turns for ``TWO``).
        sep2: Separator after assistant turns (``TWO``, ``LLAMA_2``).
        version: Template family, e.g. ``"v1"``, ``"llama_v2"``, ``"mpt"``, ``"plain"``; a
            version containing ``"mmtag"`` wraps the image as ``<Image><image></Image>``.
        skip_next: Used by the web UI to skip a turn.
    """

    system: str
    roles: tuple[str, str] | list[str]
    messages: list[list[Message]]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def _messages_with_image_token(self) -> list[list[Message]]:
        """Messages with the image placeholder moved to the front of the first (image) turn."""
        messages = [list(m) for m in self.messages]
        if not messages or not isinstance(messages[0][1], tuple):
            return messages
        role, (text, *_) = messages[0]
        text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if "mmtag" in self.version:
            messages[0] = [role, text]
            messages.insert(0, [self.roles[1], "Received."])
            messages.insert(0, [self.roles[0], "<Image><image></Image>"])
        else:
            messages[0] = [role, f"{DEFAULT_IMAGE_TOKEN}\n{text}"]
        return messages

    def get_prompt(self) -> str:
        """The prompt string; it ends with the role of the turn to generate when that turn is None."""
        messages = self._messages_with_image_token()
        texts = [(role, m[0] if isinstance(m, tuple) else m) for role, m in messages]
        style = self.sep_style
        if style == SeparatorStyle.SINGLE:
            out = self.system + self.sep
            for role, text in texts:
                out += f"{role}: {text}{self.sep}" if text else f"{role}:"
            return out
        if style == SeparatorStyle.TWO:
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, text) in enumerate(texts):
                out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
            return out
        if style == SeparatorStyle.MPT:
            out = self.system + self.sep
            for role, text in texts:
                out += f"{role}{text}{self.sep}" if text else role
            return out
        if style == SeparatorStyle.LLAMA_2:
            return self._llama_2_prompt(texts)
        if style == SeparatorStyle.PLAIN:
            seps = (self.sep, self.sep2)
            out = self.system
            for i, (_, text) in enumerate(texts):
                if text:
                    out += text + (seps[i % 2] or "")
            return out
        raise ValueError(f"Unsupported separator style {style!r} in conversation template {self.version!r}.")

    def _llama_2_prompt(self, texts: list[tuple[str, str | None]]) -> str:
        if texts and not texts[0][1]:
            raise ValueError("A llama_2 style conversation must start with a non-empty user message.")
        out = ""
        for i, (role, text) in enumerate(texts):
            if i % 2 == 0 and role != self.roles[0]:
                raise ValueError(f"Turn {i} must be from {self.roles[0]!r}, got {role!r}: turns must alternate.")
            if not text:
                continue
            if i == 0 and self.system:
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            if i % 2 == 0:
                out += f"{self.sep}[INST] {text} [/INST]"
            else:
                out += f" {text} {self.sep2}"
        # The leading separator (BOS text) comes from the tokenizer, not the string.
        return out[len(self.sep):] if self.sep and out.startswith(self.sep) else out

    def append_message(self, role: str, message: Message) -> None:
        """Add a turn; pass ``None`` as ``message`` for the turn the model should write."""
        self.messages.append([role, message])

    def process_image(
        self,
        image: Image.Image,
        image_process_mode: str,
        return_pil: bool = False,
        image_format: str = "PNG",
        max_len: int = 1344,
        min_len: int = 672,
    ) -> Image.Image | str:
        """Prepare an image for display or transport: ``Pad``, ``Default``/``Crop`` or ``Resize``.

        The result fits the web UI's size limits; it is a PIL image or a base64 string.
        """
        if image_process_mode == "Pad":
            from .mm_utils import expand2square

            image = expand2square(image, (122, 116, 104))
        elif image_process_mode == "Resize":
            image = image.resize((336, 336))
        elif image_process_mode not in ("Default", "Crop"):
            raise ValueError(f"Invalid image_process_mode {image_process_mode!r}; use Pad, Default, Crop or Resize.")
        if max(image.size) > max_len:
            width, height = image.size
            aspect = max(width, height) / min(width, height)
            short_side = int(min(max_len / aspect, min_len, min(width, height)))
            long_side = int(short_side * aspect)
            image = image.resize((long_side, short_side) if width >= height else (short_side, long_side))
        if return_pil:
            return image
        buffer = BytesIO()
        image.save(buffer, format=image_format)
        return base64.b64encode(buffer.getvalue()).decode()

    def get_images(self, return_pil: bool = False) -> list[Image.Image | str]:
        """Images attached to user turns, in order."""
        images = []
        for i, (_, message) in enumerate(self.messages[self.offset:]):
            if i % 2 == 0 and isinstance(message, tuple):
                _, image, mode = message
                images.append(self.process_image(image, mode, return_pil=return_pil))
        return images

    def to_gradio_chatbot(self) -> list[list[str | None]]:
        """``[user, assistant]`` pairs for a Gradio chatbot, images inlined as base64 ``<img>`` tags."""
        pairs: list[list[str | None]] = []
        for i, (_, message) in enumerate(self.messages[self.offset:]):
            if i % 2 == 0:
                if isinstance(message, tuple):
                    text, image, mode = message
                    encoded = self.process_image(image, "Default", return_pil=False, image_format="JPEG")
                    tag = f'<img src="data:image/jpeg;base64,{encoded}" alt="user upload image" />'
                    message = tag + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
                pairs.append([message, None])
            else:
                pairs[-1][-1] = message
        return pairs

    def copy(self) -> Conversation:
        """An independent copy whose message list can be extended freely."""
        return dataclasses.replace(self, roles=tuple(self.roles), messages=[list(m) for m in self.messages])

    def dict(self) -> dict[str, Any]:
        """JSON-friendly form; image messages keep their text only."""
        messages = [[role, m[0] if isinstance(m, tuple) else m] for role, m in self.messages]
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": messages,
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language. "
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
# Meta's default Llama-2-chat system prompt, which LLaVA's llama_2 template uses.
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

conv_vicuna_v0 = Conversation(
    system=_VICUNA_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_vicuna_v1 = Conversation(
    system=_VICUNA_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llama_2 = Conversation(
    system=_LLAMA_2_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)
conv_llava_llama_2 = dataclasses.replace(conv_llama_2, system=_LLAVA_LLAMA_2_SYSTEM, messages=[])
conv_mpt = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)
conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
    version="plain",
)
conv_llava_v0 = Conversation(
    system=_LLAVA_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_llava_v0_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)
conv_llava_v1 = Conversation(
    system=_LLAVA_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llava_v1_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("USER", "ASSISTANT"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)
conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)
conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

default_conversation = conv_vicuna_v1
conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the template ``name``; unknown names list the known ones."""
    if name not in conv_templates:
        raise KeyError(f"Unknown conversation template {name!r}; known: {', '.join(sorted(conv_templates))}.")
    return conv_templates[name].copy()
