"""Upstream LLaVA's path for ``python -m llava.eval.convert_gqa_for_eval``.

Flags and files are documented in that module.
"""

from llava.eval.convert_gqa_for_eval import main

if __name__ == "__main__":
    main()
