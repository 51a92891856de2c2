"""Every conversation template renders upstream LLaVA's prompts (``llava-torch==1.2.2.post1``), compared live.

``scripts/render_upstream_templates.py`` renders a fixed set of dialogues; run by the python of the
upstream venv that ``scripts/check_upstream_dropin.sh`` builds (``$TOCONV_UPSTREAM_VENV``, default
``/tmp/toconv-upstream-venv``) it gives upstream's prompts, and here the same functions render ours.
Without that venv the comparison is skipped, except under CI (``$CI`` set), where ``.ci/run`` builds
it before pytest and a missing venv is a failure. The tests at the end need no upstream.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llava import conversation
from llava.conversation import conv_templates, get_conv_template
from prerequisites import skip_or_fail_under_ci

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "render_upstream_templates.py"
UPSTREAM_VENV = Path(os.environ.get("TOCONV_UPSTREAM_VENV", "/tmp/toconv-upstream-venv"))
UPSTREAM_RELEASE = "1.2.2.post1"
# Upstream's template names (an interface fact: --conv-mode values and harness configs use them).
UPSTREAM_NAMES = (
    "default", "v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct", "chatml_direct", "mistral_direct",
    "plain", "v0_plain", "llava_v0", "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt",
)


@pytest.fixture(scope="module")
def renderer():
    """The render script as a module (it is a script, not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("render_upstream_templates", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def upstream() -> dict[str, Any]:
    """Upstream's prompts, fields and views, rendered by the upstream venv's python."""
    python = UPSTREAM_VENV / "bin" / "python"
    if not python.exists():
        reason = (
            f"upstream LLaVA venv not found ({python} is missing); build it with "
            f"`bash scripts/check_upstream_dropin.sh` or point TOCONV_UPSTREAM_VENV at one"
        )
        skip_or_fail_under_ci(reason, "CI builds it in .ci/run before pytest, so the comparison must run there.")
    # From inside the venv and without PYTHONPATH, so this repository's llava/ cannot shadow upstream's.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), str(SCRIPT), "--all"], cwd=UPSTREAM_VENV, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{SCRIPT.name} failed under {python}:\n{result.stderr}"
    out = json.loads(result.stdout)
    assert out["about"]["llava-torch"] == UPSTREAM_RELEASE, (
        f"{UPSTREAM_VENV} holds llava-torch {out['about']['llava-torch']}, not {UPSTREAM_RELEASE} that CI compares "
        f"against; rebuild it with TOCONV_UPSTREAM_FRESH=1 bash scripts/check_upstream_dropin.sh."
    )
    assert not Path(out["about"]["file"]).resolve().is_relative_to(ROOT)
    return out


@pytest.fixture(scope="module")
def ours(renderer) -> dict[str, Any]:
    """Our prompts, fields and views from the same dialogues, as JSON would carry them."""
    rendered = {
        "prompts": renderer.render_prompts(conversation),
        "fields": renderer.render_fields(conversation),
        "views": renderer.render_views(conversation),
    }
    return json.loads(json.dumps(rendered))


def is_error(outcome: Any) -> bool:
    return isinstance(outcome, dict) and set(outcome) == {"error"}


def mismatches(upstream: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Dialogue ids whose outcome differs; where upstream raises, ours must raise too (any exception).

    Ours raises ValueError with a message that says what to do where upstream fails by accident
    (TypeError joining a None separator, AssertionError): the type may differ, the outcome may not.
    """
    assert set(ours) == set(upstream), f"dialogues differ: {sorted(set(ours) ^ set(upstream))}"
    bad = []
    for dialogue, theirs in upstream.items():
        mine = ours[dialogue]
        if is_error(theirs) and is_error(mine):
            continue
        if mine != theirs:
            bad.append(f"{dialogue}:\n  upstream {theirs!r}\n  ours     {mine!r}")
    return bad


# ----------------------------------------------------------------------------------------------
# Against upstream, live
# ----------------------------------------------------------------------------------------------


def test_same_template_names_as_upstream(upstream, ours):
    assert list(upstream["prompts"]) == list(conv_templates) == list(UPSTREAM_NAMES)
    assert list(ours["prompts"]) == list(conv_templates)


@pytest.mark.parametrize("name", UPSTREAM_NAMES)
def test_prompts_match_upstream(upstream, ours, name):
    bad = mismatches(upstream["prompts"][name], ours["prompts"][name])
    assert not bad, f"template {name!r} renders {len(bad)} dialogue(s) differently:\n" + "\n".join(bad)


def test_upstream_comparison_covers_every_dialogue_kind(upstream, renderer):
    """The comparison is not vacuous: many dialogues per template, and most of them render."""
    prompts = upstream["prompts"]
    compared = sum(len(dialogues) for dialogues in prompts.values())
    rendered = sum(not is_error(p) for dialogues in prompts.values() for p in dialogues.values())
    assert compared == len(UPSTREAM_NAMES) * (len(renderer.DIALOGUES) + 3) >= 16 * 20
    assert rendered >= compared * 0.85
    assert "Received." in prompts["v1_mmtag"]["image_start_open"]
    assert prompts["v1"]["image_end_open"].endswith("USER: <image>\nDescribe the picture. ASSISTANT:")


@pytest.mark.parametrize("kind", ["templates", "copies"])
def test_template_fields_match_upstream(upstream, ours, kind):
    for name in UPSTREAM_NAMES:
        assert ours["fields"][kind][name] == upstream["fields"][kind][name], f"{kind}[{name!r}]"


def test_conversation_class_matches_upstream(upstream, ours):
    for key in ("conversation_fields", "separator_styles", "default_conversation"):
        assert ours["fields"][key] == upstream["fields"][key], key


@pytest.mark.parametrize("name", UPSTREAM_NAMES)
def test_images_chatbot_and_dict_match_upstream(upstream, ours, name):
    """get_images() (PIL and base64), to_gradio_chatbot() and dict(), images compared by decoded size."""
    for dialogue, theirs in upstream["views"][name].items():
        assert ours["views"][name][dialogue] == theirs, f"{name!r} / {dialogue!r}"


# ----------------------------------------------------------------------------------------------
# Properties that need no upstream
# ----------------------------------------------------------------------------------------------


def small_image() -> Image.Image:
    return Image.new("RGB", (6, 4), (1, 2, 3))


def test_every_template_is_rendered_by_the_script(renderer):
    assert tuple(conv_templates) == UPSTREAM_NAMES
    prompts = renderer.render_prompts(conversation)
    assert set(prompts) == set(conv_templates)
    assert all(set(p) == set(renderer.DIALOGUES) | {"template_itself", "lmms_eval_context", "lmms_eval_continuation"}
               for p in prompts.values())


@pytest.mark.parametrize("name", UPSTREAM_NAMES)
def test_copies_are_independent(name):
    template = conv_templates[name]
    before = template.get_prompt()
    conv = template.copy()
    other = template.copy()
    conv.append_message(conv.roles[0], "hello")
    conv.skip_next = True
    assert len(conv.messages) == len(template.messages) + 1 and len(other.messages) == len(template.messages)
    assert template.get_prompt() == before and isinstance(template.messages, tuple)
    assert conv.copy().skip_next is False and conv.copy().messages == conv.messages
    with pytest.raises(AttributeError, match=r"copy\(\)"):
        template.append_message(template.roles[0], "hello")


def test_v0_opens_with_its_example_exchange():
    conv = get_conv_template("v0")
    assert conv.offset == 2 and [role for role, _ in conv.messages] == ["Human", "Assistant"]
    conv.append_message(conv.roles[0], ("What is it?<image>", small_image(), "Default"))
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    assert prompt.startswith("A chat between a curious human") and "###Human: What are the key differences" in prompt
    # Only the first message is looked at for an image, and here that is the example: text as written.
    assert prompt.endswith("###Human: What is it?<image>###Assistant:")
    assert len(conv.get_images()) == 1 and conv.to_gradio_chatbot()[0][1] is None


def test_image_token_goes_first_or_into_an_mmtag_turn():
    def prompt(name: str, text: str) -> str:
        conv = get_conv_template(name)
        conv.append_message(conv.roles[0], (text, small_image(), "Default"))
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    for text in ("<image>\nWhat?", "What?\n<image>", "What?"):
        assert prompt("llava_v1", text).endswith(" USER: <image>\nWhat? ASSISTANT:")
        mmtag = " USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What? ASSISTANT:"
        assert prompt("v1_mmtag", text).endswith(mmtag)
    assert prompt("plain", "What?\n<image>") == "<image>\nWhat?\n"


def test_plain_cannot_render_an_answered_turn():
    conv = get_conv_template("plain")
    conv.append_message(conv.roles[0], "<image>")
    conv.append_message(conv.roles[1], "A caption.")
    with pytest.raises(ValueError, match="no sep2"):
        conv.get_prompt()


def test_llama_2_must_open_with_a_user_turn():
    conv = get_conv_template("llava_llama_2")
    conv.append_message(conv.roles[1], "Hello.")
    with pytest.raises(ValueError, match="must open with a written turn from 'USER'"):
        conv.get_prompt()
    assert conv_templates["llama_2"].get_prompt() == ""


def test_dict_reduces_image_turns_to_text():
    conv = get_conv_template("llava_v1")
    conv.append_message(conv.roles[0], ("<image>\nWhat?", small_image(), "Pad"))
    conv.append_message(conv.roles[1], "A dot.")
    out = conv.dict()
    assert out["messages"] == [["USER", "<image>\nWhat?"], ["ASSISTANT", "A dot."]]
    assert json.loads(json.dumps(out))["roles"] == ["USER", "ASSISTANT"]
    assert [image.size for image in conv.get_images(return_pil=True)] == [(6, 6)]
