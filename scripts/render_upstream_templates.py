"""Render every conversation template over a fixed set of dialogues and print the prompts as JSON.

Run by upstream LLaVA's python, it renders upstream's templates (``llava-torch==1.2.2.post1`` in the
venv that ``scripts/check_upstream_dropin.sh`` builds); ``tests/test_conversation_upstream.py``
runs it that way and renders the same dialogues with our ``llava.conversation`` in-process:

    cd /tmp/toconv-upstream-venv && env -u PYTHONPATH bin/python /path/to/scripts/render_upstream_templates.py

Run it from outside this repository with ``PYTHONPATH`` unset, so our ``llava/`` cannot shadow
upstream's; the script refuses a ``llava`` package found inside this repository. It loads upstream's
``llava/conversation.py`` by path, which needs only PIL (importing the ``llava`` package would load
torch and transformers for nothing).

Output: ``{template: {dialogue_id: prompt}}``, where a prompt the template cannot render is
``{"error": "<exception type>"}``. ``--all`` prints ``{"about", "prompts", "fields", "views"}``: also
each template's fields and what ``get_images()``, ``to_gradio_chatbot()`` and ``dict()`` return
(images as their decoded size and mode, since base64 bytes depend on the PIL version).
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Image sizes as (width, height). WIDE and TALL exceed process_image's max_len (1344), so
# get_images() shrinks them; they are thin because the views encode them for every template.
SMALL = (12, 8)
WIDE = (1350, 24)
TALL = (24, 1350)
COLOUR = (200, 30, 30)

Turn = tuple[int, Any]  # (role index: 0 user / 1 assistant, message or image spec)


def image(text: str, size: tuple[int, int] = SMALL, mode: str = "Default") -> tuple[str, str, tuple[int, int], str]:
    """Spec of an image turn; ``build`` turns it into ``(text, PIL image, image_process_mode)``."""
    return ("image", text, size, mode)


Q1, A1 = "What is the capital of France?", "Paris."
Q2, A2 = "And of Italy?", "Rome."
Q3 = "Which of the two is larger?"

# Dialogue id -> turns. Each is appended to a fresh copy of every template, then rendered.
DIALOGUES: dict[str, list[Turn]] = {
    "empty": [],
    "text_open": [(0, Q1), (1, None)],
    "text_answered": [(0, Q1), (1, A1)],
    "text_user_only": [(0, Q1)],
    "image_start_open": [(0, image("<image>\nWhat is in the picture?")), (1, None)],
    "image_end_open": [(0, image("Describe the picture.\n<image>", mode="Pad")), (1, None)],
    "image_middle_open": [(0, image("  What is <image> shown here?  ", mode="Crop")), (1, None)],
    "image_absent_open": [(0, image("What colour is it?", mode="Resize")), (1, None)],
    "image_only_open": [(0, image("<image>")), (1, None)],
    "image_answered": [(0, image("<image>\nWhat is it?")), (1, "A red rectangle.")],
    "text_3_rounds_open": [(0, Q1), (1, A1), (0, Q2), (1, A2), (0, Q3), (1, None)],
    "text_2_rounds_answered": [(0, Q1), (1, A1), (0, Q2), (1, A2)],
    "text_empty_answer": [(0, Q1), (1, ""), (0, Q2), (1, None)],
    "text_assistant_first": [(1, "Hello."), (0, Q1), (1, None)],
    "text_open_first": [(0, None), (1, None)],
    "image_3_rounds_open": [
        (0, image("<image>\nWhat is it?", SMALL, "Pad")), (1, A1), (0, Q2), (1, A2), (0, Q3), (1, None),
    ],
    "image_2_rounds_answered": [(0, image("What is it?\n<image>")), (1, A1), (0, Q2), (1, A2)],
    "image_in_second_round": [(0, Q1), (1, A1), (0, image("<image>\nAnd this one?", WIDE)), (1, None)],
    "image_without_text_in_second_round": [(0, Q1), (1, A1), (0, image("")), (1, None)],
    "two_images": [(0, image("<image>\nFirst.")), (1, A1), (0, image("<image>\nSecond.", TALL)), (1, None)],
}
# Dialogues whose get_images() / to_gradio_chatbot() / dict() are compared too.
VIEW_DIALOGUES = (
    "text_2_rounds_answered", "image_start_open", "image_end_open", "image_absent_open", "image_answered",
    "image_3_rounds_open", "image_in_second_round", "two_images",
)


def make_image(size: tuple[int, int]) -> Image.Image:
    """A plain RGB image of ``size`` (width, height)."""
    return Image.new("RGB", size, COLOUR)


def build(template: Any, turns: list[Turn]) -> Any:
    """A copy of ``template`` with ``turns`` appended."""
    conv = template.copy()
    for role, message in turns:
        if isinstance(message, tuple):
            _, text, size, mode = message
            message = (text, make_image(size), mode)
        conv.append_message(conv.roles[role], message)
    return conv


def outcome(render: Callable[..., Any], *args: Any) -> Any:
    """``render(*args)``, or ``{"error": <exception type>}`` when it raises."""
    try:
        return render(*args)
    except Exception as err:  # the comparison records which dialogues fail, not the messages
        return {"error": type(err).__name__}


def lmms_eval_prompts(conversation: ModuleType, name: str) -> dict[str, Any]:
    """lmms-eval's llava loglikelihood pattern: the context prompt, then one with the continuation set."""
    conv = conversation.conv_templates[name].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is in the picture?")
    conv.append_message(conv.roles[1], None)
    context = outcome(conv.get_prompt)
    conv.messages[1][1] = "A red rectangle."
    return {"lmms_eval_context": context, "lmms_eval_continuation": outcome(conv.get_prompt)}


def prompt_of(template: Any, turns: list[Turn]) -> str:
    """The prompt of ``turns`` under ``template``."""
    return build(template, turns).get_prompt()


def render_prompts(conversation: ModuleType) -> dict[str, dict[str, Any]]:
    """``{template: {dialogue_id: prompt}}`` for every template of ``conversation``."""
    prompts = {}
    for name, template in conversation.conv_templates.items():
        rendered = {"template_itself": outcome(template.get_prompt)}
        for dialogue, turns in DIALOGUES.items():
            rendered[dialogue] = outcome(prompt_of, template, turns)
        rendered.update(lmms_eval_prompts(conversation, name))
        prompts[name] = rendered
    return prompts


def fields(conv: Any) -> dict[str, Any]:
    """A conversation's dataclass fields, JSON-friendly (the container type of messages kept)."""
    return {
        "system": conv.system,
        "roles": list(conv.roles),
        "roles_type": type(conv.roles).__name__,
        "messages": [list(m) for m in conv.messages],
        "messages_type": type(conv.messages).__name__,
        "offset": conv.offset,
        "sep_style": conv.sep_style.name,
        "sep": conv.sep,
        "sep2": conv.sep2,
        "version": conv.version,
        "skip_next": conv.skip_next,
    }


def render_fields(conversation: ModuleType) -> dict[str, Any]:
    """Fields of every template and of its copy, the separator styles, and ``default_conversation``."""
    default = conversation.default_conversation
    return {
        "templates": {name: fields(t) for name, t in conversation.conv_templates.items()},
        "copies": {name: fields(t.copy()) for name, t in conversation.conv_templates.items()},
        "separator_styles": {style.name: style.value for style in conversation.SeparatorStyle},
        "conversation_fields": list(conversation.Conversation.__dataclass_fields__),
        "default_conversation": {
            "fields": fields(default),
            "is_template": [name for name, t in conversation.conv_templates.items() if t is default],
            "prompt": outcome(prompt_of, default, [(0, Q1), (1, None)]),
        },
    }


def describe_image(image: Any) -> Any:
    """A PIL image, or a base64 string of one, as ``[format, width, height, mode, corner pixel]``."""
    if isinstance(image, str):
        image = Image.open(BytesIO(base64.b64decode(image)))
        image.load()
    corner = image.getpixel((0, 0)) if image.format in (None, "PNG") else None  # JPEG is lossy
    return [image.format, *image.size, image.mode, list(corner) if corner is not None else None]


_IMG_TAG = re.compile(r'<img src="data:image/jpeg;base64,([^"]*)"')


def describe_images(conv: Any, return_pil: bool) -> list[Any]:
    """``conv.get_images(return_pil)``, each image described by ``describe_image``."""
    return [describe_image(i) for i in conv.get_images(return_pil=return_pil)]


def describe_chatbot(conv: Any) -> list[list[Any]]:
    """``conv.to_gradio_chatbot()`` with each inlined JPEG replaced by its decoded size and mode."""

    def replace(match: re.Match) -> str:
        return f'<img src="{describe_image(match.group(1))}"'

    return [[_IMG_TAG.sub(replace, m) if isinstance(m, str) else m for m in pair] for pair in conv.to_gradio_chatbot()]


def as_json(render: Callable[[], Any]) -> Any:
    """``render()`` after a round trip through JSON (tuples become lists, as a JSON log has them)."""
    return json.loads(json.dumps(render()))


def render_views(conversation: ModuleType) -> dict[str, dict[str, Any]]:
    """What get_images() (PIL and base64), to_gradio_chatbot() and dict() return, per template and dialogue."""
    views = {}
    for name, template in conversation.conv_templates.items():
        per_dialogue = {}
        for dialogue in VIEW_DIALOGUES:
            conv = build(template, DIALOGUES[dialogue])
            per_dialogue[dialogue] = {
                "images_pil": outcome(describe_images, conv, True),
                "images_base64": outcome(describe_images, conv, False),
                "gradio_chatbot": outcome(describe_chatbot, conv),
                "dict": outcome(as_json, conv.dict),
            }
        views[name] = per_dialogue
    return views


def load_upstream_conversation() -> ModuleType:
    """Upstream's ``llava/conversation.py`` from the installed ``llava`` package, loaded by path."""
    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("No llava package here: run this with the python of the upstream LLaVA venv.")
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    if package.is_relative_to(REPO):
        raise SystemExit(
            f"The llava package found is this repository's ({package}), not upstream's: run from outside the "
            f"repository (e.g. cd into the venv) with PYTHONPATH unset."
        )
    module_spec = importlib.util.spec_from_file_location("upstream_llava_conversation", package / "conversation.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up here
    module_spec.loader.exec_module(module)
    return module


def about(conversation: ModuleType) -> dict[str, Any]:
    """Where the rendered templates come from."""
    try:
        release = importlib.metadata.version("llava-torch")
    except importlib.metadata.PackageNotFoundError:
        release = None
    return {"file": conversation.__file__, "llava-torch": release, "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also template fields and get_images/gradio/dict views")
    args = parser.parse_args(argv)
    conversation = load_upstream_conversation()
    if args.all:
        out = {
            "about": about(conversation),
            "prompts": render_prompts(conversation),
            "fields": render_fields(conversation),
            "views": render_views(conversation),
        }
    else:
        out = render_prompts(conversation)
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
