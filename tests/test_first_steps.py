"""A new user's first steps: what they see and where things load from (quick; random-weight stand-ins).

- stand-in checkpoints load from any working directory (their tower is stored by absolute path);
- switching compression on at load prints no transformers LOAD REPORT about the compressor's weights
  (the loader's own line says the average init is used), but a report about anything else stays.
"""

from __future__ import annotations

import json
import logging

import pytest
from safetensors.torch import load_file, save_file

from llava.model.builder import load_pretrained_model
from llava.model.load_report import quiet_compressor_report
from llava.standins import build_tiny_clip, build_tiny_llava


@pytest.fixture
def transformers_log():
    """What transformers logs at its default verbosity (warnings), as text; the suite otherwise keeps it quiet."""
    import transformers

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    yield records
    transformers.utils.logging.set_verbosity(verbosity)
    root.removeHandler(handler)


@pytest.fixture(scope="module")
def built_relative(tmp_path_factory):
    """A stand-in built the way docs/inference.md shows: relative paths, from the folder that holds them."""
    folder = tmp_path_factory.mktemp("first-steps")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        clip = build_tiny_clip("work/clip")
        build_tiny_llava("work/llava-tiny", clip)
    return folder / "work" / "llava-tiny"


def test_stand_in_loads_from_another_working_directory(built_relative, tmp_path, monkeypatch):
    config = json.loads((built_relative / "config.json").read_text())
    assert config["mm_vision_tower"] == str(built_relative.parent / "clip")  # absolute
    monkeypatch.chdir(tmp_path)
    _, model, _, _ = load_pretrained_model(str(built_relative), None, "llava-tiny", device="cpu")
    assert model.get_vision_tower().is_loaded


def test_switching_compression_on_prints_no_load_report(built_relative, transformers_log, caplog):
    with caplog.at_level(logging.INFO, logger="llava"):
        _, model, _, _ = load_pretrained_model(str(built_relative), None, "llava-tiny", device="cpu",
                                               use_token_compression=True, compression_output_size=12)
    assert model.get_vision_tower().num_patches == 144
    text = "\n".join(transformers_log)
    assert "LOAD REPORT" not in text and "newly initialized" not in text, text
    assert "switched on at load time" in caplog.text and "average init" in caplog.text


def test_a_report_about_other_weights_is_kept(built_relative, tmp_path, transformers_log):
    """A decoder weight missing as well as the compressor's: transformers' report is shown whole."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(built_relative, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(name for name in weights if name.endswith("mlp.down_proj.weight"))
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    load_pretrained_model(str(broken), None, "llava-tiny", device="cpu", use_token_compression=True,
                          compression_output_size=12)
    (report,) = [message for message in transformers_log if "LOAD REPORT" in message]
    assert "mlp.down_proj.weight" in report and "token_compressor.conv.weight" in report


def test_the_filter_is_removed_after_loading():
    loader = logging.getLogger("transformers.modeling_utils")
    before = list(loader.filters)
    with quiet_compressor_report():
        assert len(loader.filters) == len(before) + 1
    assert loader.filters == before


SAVE_A_MODEL = """
import sys
if sys.argv[1] == "with-library":
    import vision_token_compression  # noqa: F401
from transformers import CLIPVisionConfig, CLIPVisionModel
config = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                          image_size=28, patch_size=14)
CLIPVisionModel(config).save_pretrained(sys.argv[2])
print("saved")
"""


def test_saving_a_model_prints_no_deepspeed_cpu_notice(tmp_path):
    """transformers' save_pretrained imports DeepSpeed (through accelerate); its CPU notice stays off stdout."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed here, so there is no notice to keep quiet")
    outputs = {}
    for mode in ("without-library", "with-library"):
        result = subprocess.run([sys.executable, "-c", SAVE_A_MODEL, mode, str(tmp_path / mode)],
                                capture_output=True, text=True, timeout=300, check=True)
        outputs[mode] = result
    if "Setting accelerator to CPU" not in outputs["without-library"].stdout:
        pytest.skip("DeepSpeed found an accelerator here, so it prints no CPU notice")
    quiet = outputs["with-library"]
    assert quiet.stdout == "saved\n" and "Setting accelerator" not in quiet.stderr, quiet.stdout + quiet.stderr


def test_synthetic_images_command_runs_without_warnings(tmp_path):
    """``python -m vision_token_compression.testing.synthetic`` (docs/compressor_pretraining.md): no runpy warning."""
    import subprocess
    import sys

    from vision_token_compression.testing import make_structured_images  # the package still exports it

    assert callable(make_structured_images)
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "vision_token_compression.testing.synthetic",
         str(tmp_path / "images"), "--num", "2", "--size", "64", "48"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0 and "RuntimeWarning" not in result.stderr, result.stderr
    assert len(list((tmp_path / "images").iterdir())) == 2


@pytest.mark.slow
def test_cpu_training_walkthrough_in_the_docs_runs_as_written(tmp_path):
    """docs/training.md "Try it on a CPU": its commands, with work/ in a temporary folder, train both stages."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    docs = (repo / "docs" / "training.md").read_text()
    section = docs[docs.index("### Try it on a CPU"):docs.index("## Data")]
    (commands,) = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    commands = commands.replace("work/", f"{tmp_path}/work/").replace("'work'", f"'{tmp_path}/work'")
    env = {**os.environ, "DEVICE": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    work = tmp_path / "work"
    assert (work / "pretrain" / "mm_projector.bin").is_file()
    _, model, _, _ = load_pretrained_model(str(work / "llava-tiny-toconv12"), None, "llava-tiny", device="cpu")
    assert model.get_vision_tower().num_patches == 144
