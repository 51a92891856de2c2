"""Conversation templates: how a dialogue becomes the prompt a LLaVA checkpoint was trained on.

Template names, fields, prompt strings and the rendering of every template are upstream LLaVA's
(``llava-torch==1.2.2.post1``, whose ``conversation.py`` equals upstream's git HEAD), so ``--conv-mode``
values of existing scripts and evaluation harnesses keep working and a checkpoint sees exactly the
prompt it was trained with. ``tests/test_conversation_upstream.py`` compares the two live.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
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


# A message is text, an image turn ``(text, PIL image, image_process_mode)``, or None for the turn
# the model is to write.
Message = Any

# What "mmtag" templates show in place of the image, as a first user turn the assistant acknowledges.
MMTAG_IMAGE_TURN = "<Image><image></Image>"
MMTAG_IMAGE_REPLY = "Received."


def _turn_text(message: Message) -> str | None:
    """The text a turn puts in the prompt, or None for an open turn (``None`` or empty text).

    An image turn counts as written even when its text is empty, as upstream renders it.
    """
    if not message:
        return None
    return message[0] if isinstance(message, tuple) else message


@dataclasses.dataclass
class Conversation:
    """A dialogue plus the template that renders it.

    Args:
        system: System prompt placed before the first turn.
        roles: Names of the (user, assistant) roles as they appear in the prompt.
        messages: ``[role, message]`` pairs; ``message`` None marks the turn to be generated. The
            shared templates in ``conv_templates`` hold a tuple, so they cannot be extended by
            mistake; ``copy()`` gives a list of ``[role, message]`` lists to extend.
        offset: Number of leading few-shot messages that are not part of the user's dialogue.
        sep_style: Layout of the prompt.
        sep: Separator after each turn (after user turns for ``TWO`` and ``PLAIN``).
        sep2: Separator after assistant turns (``TWO``, ``PLAIN``, ``LLAMA_2``).
        version: Template family, e.g. ``"v1"``, ``"llama_v2"``, ``"mpt"``; a version containing
            ``"mmtag"`` shows the image as an ``<Image><image></Image>`` turn of its own.
        skip_next: Used by the web UI to skip a turn; ``copy()`` resets it.
    """

    system: str
    roles: Sequence[str]
    messages: Sequence[Sequence[Message]]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    # ------------------------------------------------------------------------------------------
    # Prompt
    # ------------------------------------------------------------------------------------------

    def get_prompt(self) -> str:
        """The prompt string; it ends with the role of the turn to generate when that turn is None."""
        turns = [(role, _turn_text(message)) for role, message in self._messages_with_image_token()]
        if self.sep_style == SeparatorStyle.SINGLE:
            return self._render_single(turns)
        if self.sep_style == SeparatorStyle.TWO:
            return self._render_two(turns)
        if self.sep_style == SeparatorStyle.MPT:
            return self._render_mpt(turns)
        if self.sep_style == SeparatorStyle.LLAMA_2:
            return self._render_llama_2(turns)
        if self.sep_style == SeparatorStyle.PLAIN:
            return self._render_plain(turns)
        raise ValueError(f"Unsupported separator style {self.sep_style!r} in conversation template {self.version!r}.")

    def _messages_with_image_token(self) -> list[tuple[str, Message]]:
        """Messages as the prompt shows them: an image in the first message becomes the image token.

        The token moves to the front of that message's text, wherever the user put it; "mmtag"
        versions instead open with an ``<Image><image></Image>`` / ``Received.`` exchange. Only the
        first message is looked at: an image turn after it keeps its text as written.
        """
        messages = [(role, message) for role, message in self.messages]
        if not messages or not isinstance(messages[0][1], tuple):
            return messages
        role, (text, *_) = messages[0]
        text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if "mmtag" in self.version:
            image_turns = [(self.roles[0], MMTAG_IMAGE_TURN), (self.roles[1], MMTAG_IMAGE_REPLY)]
            return [*image_turns, (role, text), *messages[1:]]
        return [(role, f"{DEFAULT_IMAGE_TOKEN}\n{text}"), *messages[1:]]

    def _separator_after(self, index: int) -> str:
        """``sep`` after an even-numbered (user) turn, ``sep2`` after an odd-numbered (assistant) one."""
        sep = self.sep if index % 2 == 0 else self.sep2
        if sep is None:
            # Upstream fails here too (a TypeError joining str and None), e.g. for "plain".
            raise ValueError(
                f"This {self.sep_style.name} conversation (version {self.version!r}) has no sep2, so it cannot "
                f"render the completed assistant turn {index}; end the dialogue with an open (None) turn."
            )
        return sep

    def _render_single(self, turns: list[tuple[str, str | None]]) -> str:
        out = self.system + self.sep
        for role, text in turns:
            out += f"{role}:" if text is None else f"{role}: {text}{self.sep}"
        return out

    def _render_two(self, turns: list[tuple[str, str | None]]) -> str:
        out = self.system + self.sep
        for i, (role, text) in enumerate(turns):
            out += f"{role}:" if text is None else f"{role}: {text}{self._separator_after(i)}"
        return out

    def _render_mpt(self, turns: list[tuple[str, str | None]]) -> str:
        out = self.system + self.sep
        for role, text in turns:
            out += role if text is None else f"{role}{text}{self.sep}"
        return out

    def _render_llama_2(self, turns: list[tuple[str, str | None]]) -> str:
        if turns and (turns[0][1] is None or turns[0][0] != self.roles[0]):
            role, text = turns[0]
            raise ValueError(
                f"A {self.version!r} conversation must open with a written turn from {self.roles[0]!r}, "
                f"got {role!r} with {text!r}."
            )
        out = ""
        for i, (_, text) in enumerate(turns):
            if text is None:
                continue
            if i == 0 and self.system:
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            if i % 2 == 0:
                out += f"{self.sep}[INST] {text} [/INST]"
            else:
                out += f" {text} {self._separator_after(i)}"
        # The leading separator (BOS text) comes from the tokenizer, not the string.
        return out.removeprefix(self.sep)

    def _render_plain(self, turns: list[tuple[str, str | None]]) -> str:
        out = self.system
        for i, (_, text) in enumerate(turns):
            if text is not None:
                out += text + self._separator_after(i)
        return out

    def append_message(self, role: str, message: Message) -> None:
        """Add a turn; pass ``None`` as ``message`` for the turn the model should write."""
        if isinstance(self.messages, tuple):
            # AttributeError, as upstream's templates (tuples too) fail here, with the fix named.
            raise AttributeError(
                "This conversation's messages are a tuple (a shared template); append to a copy instead: "
                "conv_templates[name].copy()."
            )
        self.messages.append([role, message])

    # ------------------------------------------------------------------------------------------
    # Images and the web UI
    # ------------------------------------------------------------------------------------------

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

    def _dialogue(self) -> list[tuple[int, Message]]:
        """``(index, message)`` of the user's dialogue: messages after the few-shot ``offset``."""
        return [(i, message) for i, (_, message) in enumerate(self.messages[self.offset:])]

    def get_images(self, return_pil: bool = False) -> list[Image.Image | str]:
        """Images of user turns after the few-shot examples, in order."""
        return [
            self.process_image(message[1], message[2], return_pil=return_pil)
            for i, message in self._dialogue()
            if i % 2 == 0 and isinstance(message, tuple)
        ]

    def to_gradio_chatbot(self) -> list[list[str | None]]:
        """``[user, assistant]`` pairs for a Gradio chatbot, images inlined as base64 ``<img>`` tags."""
        pairs: list[list[str | None]] = []
        for i, message in self._dialogue():
            if i % 2 == 1:
                pairs[-1][-1] = message
                continue
            if isinstance(message, tuple):
                text, image, _ = message
                encoded = self.process_image(image, "Default", return_pil=False, image_format="JPEG")
                tag = f'<img src="data:image/jpeg;base64,{encoded}" alt="user upload image" />'
                message = tag + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            pairs.append([message, None])
        return pairs

    # ------------------------------------------------------------------------------------------
    # Copies and serialisation
    # ------------------------------------------------------------------------------------------

    def copy(self) -> Conversation:
        """A copy with its own list of ``[role, message]`` lists, free to extend; ``skip_next`` is reset."""
        return dataclasses.replace(
            self, messages=[[role, message] for role, message in self.messages], skip_next=False
        )

    def dict(self) -> dict[str, Any]:
        """JSON-friendly form: template fields and messages, image turns reduced to their text.

        Upstream reduces image turns only when ``get_images()`` finds one (and returns its own
        message list otherwise); here the messages are always a fresh list with every image turn
        reduced, which gives the same result for every dialogue whose images sit in user turns.
        """
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, m[0] if isinstance(m, tuple) else m] for role, m in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


# System prompts. They are the checkpoints' trained interface, so they stay exactly as upstream has
# them, oddities included (noted where they occur).
_SYSTEM_CURIOUS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SYSTEM_CURIOUS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# Note: no space between "language." and "The visual content".
_SYSTEM_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
# Meta's default Llama-2-chat system prompt, which LLaVA's llama_2 template uses (two spaces after "safe.").
_SYSTEM_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_SYSTEM_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# The one-shot example exchange the v0 (Vicuna v0) template opens every dialogue with (offset=2).
_VICUNA_V0_EXAMPLE = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    (
        "Assistant",
        (
            "Renewable energy sources are those that can be replenished naturally in a relatively short amount of "
            "time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other "
            "hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key "
            "differences between renewable and non-renewable energy sources:\n"
            "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy "
            "sources are finite and will eventually run out.\n"
            "2. Environmental impact: Renewable energy sources have a much lower environmental impact than "
            "non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, and other "
            "negative effects.\n"
            "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have "
            "lower operational costs than non-renewable sources.\n"
            "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
            "locations than non-renewable sources.\n"
            "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
            "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
            "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
            "non-renewable sources are not, and their depletion can lead to economic and social instability.\n"
        ),
    ),
)

conv_vicuna_v0 = Conversation(
    system=_SYSTEM_CURIOUS_HUMAN,
    roles=("Human", "Assistant"),
    messages=_VICUNA_V0_EXAMPLE,
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_vicuna_v1 = Conversation(
    system=_SYSTEM_CURIOUS_USER,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llama_2 = Conversation(
    system=_SYSTEM_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)
conv_llava_llama_2 = dataclasses.replace(conv_llama_2, system=_SYSTEM_LLAVA_LLAMA_2)
conv_mpt = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)
# Projector pretraining. No sep2 (upstream's): it renders one open user turn, not an answered one.
conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)
conv_llava_v0 = Conversation(
    system=_SYSTEM_CURIOUS_HUMAN,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_llava_v0_mmtag = Conversation(
    system=_SYSTEM_MMTAG,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)
conv_llava_v1 = Conversation(
    system=_SYSTEM_CURIOUS_HUMAN,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llava_v1_mmtag = Conversation(
    system=_SYSTEM_MMTAG,
    roles=("USER", "ASSISTANT"),
    messages=(),
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
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)
conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=(),
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
