"""Checks through ``vllm.LLM``, run by the vLLM venv's python (tests/test_vllm_plugin.py starts it).

    python tests/vllm_llm_checks.py SPEC.json OUT.json

SPEC holds ``batch`` (a converted checkpoint: 8 image prompts in one ``generate`` call), ``images``
(8 PNG files), ``prompt`` (text with one ``<image>``), ``refused`` (checkpoints that must fail
at load) and ``processors`` (checkpoints whose HF processor vLLM's multimodal processing uses: its
class and its image processor's class go to OUT, without starting an engine). The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the test) so
that a load error arrives here as the exception vLLM raised, message and all. OUT gets, for the
batch, each prompt's length and output tokens, and for each refused checkpoint the error's type and
message (or that it loaded).
"""

from __future__ import annotations

import gc
import json
import sys
import traceback

# As benchmarks/vllm_server.py's CPU_SERVE_ARGS (this file runs in the vLLM venv, apart from the checkout's imports).
ENGINE_ARGS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 2048, "limit_mm_per_prompt": {"image": 1},
               "kv_cache_memory_bytes": 256 * 2**20}


def run_batch(spec: dict) -> list[dict]:
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(spec["batch"], **ENGINE_ARGS)
    images = [Image.open(path).convert("RGB") for path in spec["images"]]
    prompts = [{"prompt": spec["prompt"], "multi_modal_data": {"image": image}} for image in images]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    del llm
    gc.collect()
    return [
        {"prompt_tokens": len(out.prompt_token_ids), "token_ids": list(out.outputs[0].token_ids),
         "text": out.outputs[0].text}
        for out in outputs
    ]


def try_load(path: str) -> dict:
    from vllm import LLM

    try:
        llm = LLM(path, **ENGINE_ARGS)
    except Exception as err:  # noqa: BLE001 (the test reads what was raised)
        causes = []
        while err is not None:
            causes.append({"type": type(err).__name__, "message": str(err)})
            err = err.__cause__ or err.__context__
        return {"loaded": False, "errors": causes, "traceback": traceback.format_exc()[-4000:]}
    del llm
    gc.collect()
    return {"loaded": True}


def hf_processors(paths: dict[str, str]) -> dict[str, list[str]]:
    """For each checkpoint, [the HF processor class, its image processor class] that vLLM's processing uses."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what vLLM does before it reads a config
    found = {}
    for name, path in paths.items():
        processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=path, dtype="float32")).info.get_hf_processor()
        found[name] = [type(processor).__name__, type(processor.image_processor).__name__]
    return found


def main(argv: list[str]) -> None:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = {"processors": hf_processors(spec["processors"])}
    result["refused"] = {name: try_load(path) for name, path in spec["refused"].items()}
    result["batch"] = run_batch(spec)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":  # vLLM starts processes of its own: the guard is required
    main(sys.argv[1:])
