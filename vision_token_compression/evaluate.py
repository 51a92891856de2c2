"""``python -m vision_token_compression.evaluate``: compare compressor checkpoints on held-out images.

The evaluator lives in ``vision_token_compression.training.evaluate``; this module is its command only.
"""

from vision_token_compression.training.evaluate import main

if __name__ == "__main__":
    main()
