"""Upstream LLaVA's path for ``python -m llava.eval.convert_vqav2_for_submission``.

Flags and files are documented in that module.
"""

from llava.eval.convert_vqav2_for_submission import main

if __name__ == "__main__":
    main()
