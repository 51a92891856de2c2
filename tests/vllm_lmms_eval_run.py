"""Runs lmms-eval's ``vllm`` model (its command line) in the vLLM venv, recording what reaches ``vllm.LLM``.

``python vllm_lmms_eval_run.py SPEC OUT``: SPEC is a JSON file with ``model_args``, ``tasks``,
``include_path``, ``output_path`` and ``batch_size``. ``vllm.LLM.chat`` is wrapped to record, per
request, the prompt's token ids and the sampling parameters' ``max_tokens``; OUT gets them.
Started by tests/test_lmms_eval_vllm.py.
"""

from __future__ import annotations

import json
import sys


def main(spec_path: str, out_path: str) -> None:
    import vllm

    spec = json.loads(open(spec_path).read())
    seen = {"prompt_token_ids": [], "max_tokens": [], "texts": []}
    chat = vllm.LLM.chat

    def recording_chat(self, messages, sampling_params=None, *args, **kwargs):
        outputs = chat(self, messages, sampling_params, *args, **kwargs)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(outputs)
        seen["prompt_token_ids"] += [list(output.prompt_token_ids) for output in outputs]
        seen["max_tokens"] += [p.max_tokens for p in params]
        seen["texts"] += [output.outputs[0].text for output in outputs]
        return outputs

    vllm.LLM.chat = recording_chat
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = ["lmms_eval", "--model", "vllm", "--model_args", spec["model_args"], "--tasks", spec["tasks"],
                "--include_path", spec["include_path"], "--batch_size", str(spec["batch_size"]),
                "--output_path", spec["output_path"], "--log_samples"]
    cli_evaluate()
    with open(out_path, "w") as out:
        json.dump(seen, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
