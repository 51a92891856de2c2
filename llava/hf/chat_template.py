"""A Jinja chat template that renders a chat as one of LLaVA's conversation templates does.

Written into converted checkpoints, so that ``processor.apply_chat_template`` gives the prompt the
model was trained on (LLaVA-1.5: ``llava_v1``) character for character, the tokenizer's BOS in
front. llava-hf's own template has no system prompt; upstream LLaVA-1.5 was trained with one.
Tokenise the rendered text without special tokens (``add_special_tokens=False``), or it gets a
second BOS.
"""

from __future__ import annotations

import json

from ..conversation import SeparatorStyle, conv_templates

DEFAULT_CONV_MODE = "llava_v1"

# "{system}{sep}USER: <image>\n{text}{sep}ASSISTANT: {answer}{sep2}USER: ...{sep}ASSISTANT:"
# The image of the first user turn goes in front of its text, as Conversation.get_prompt puts it.
# The prompt starts with the tokenizer's BOS, as LLaVA-1.5 was trained: serving engines (vLLM's chat
# endpoint) tokenise a rendered chat without adding special tokens.
_TWO_STYLE = (
    "{{- bos_token -}}"
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else SYSTEM -%}"
    "{%- set system = system if system is string else system | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}"
    "{{- system + SEP -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- (USER if message['role'] == 'user' else ASSISTANT) + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- IMAGE + '\\n' -}}{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') "
    "| trim -}}"
    "{%- endif -%}"
    "{{- SEP if message['role'] == 'user' else SEP2 -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ASSISTANT + ':' -}}{%- endif -%}"
)


def chat_template(conv_mode: str = DEFAULT_CONV_MODE, image_token: str = "<image>") -> str:
    """The Jinja template of ``conv_templates[conv_mode]``, for "TWO"-style templates (``llava_v1``, ``vicuna_v1``)."""
    if conv_mode not in conv_templates:
        raise ValueError(f"Unknown conversation template {conv_mode!r}; known: {', '.join(sorted(conv_templates))}.")
    conv = conv_templates[conv_mode]
    if conv.sep_style != SeparatorStyle.TWO or "mmtag" in conv.version:
        two_style = sorted(name for name, c in conv_templates.items()
                           if c.sep_style == SeparatorStyle.TWO and "mmtag" not in c.version)
        raise ValueError(
            f"Conversation template {conv_mode!r} ({conv.sep_style.name} style) has no chat template here; the "
            f"converter writes one for {', '.join(two_style)} (LLaVA-1.5 uses llava_v1). Pass one of those as "
            f"--conv-mode, or --conv-mode none to write none."
        )
    constants = {
        "SYSTEM": conv.system, "SEP": conv.sep, "SEP2": conv.sep2, "USER": conv.roles[0], "ASSISTANT": conv.roles[1],
        "IMAGE": image_token,
    }
    header = "".join(f"{{%- set {name} = {json.dumps(value)} -%}}" for name, value in constants.items())
    return header + _TWO_STYLE
