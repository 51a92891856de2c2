"""``python -m vision_token_compression.train``: compressor pretraining (also under torchrun).

The trainer lives in ``vision_token_compression.training``; this module is its command only, so
that ``import vision_token_compression`` never loads it.
"""

from vision_token_compression.training.cli import main

if __name__ == "__main__":
    main()
