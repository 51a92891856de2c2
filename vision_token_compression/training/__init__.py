"""Compressor pretraining and evaluation: the application built on the ``vision_token_compression`` library.

Fits ``TokenCompressor`` weights to a frozen CLIP tower's features and compares checkpoints with the
untrained alternatives. The library never imports this package; it needs what the library does not
(transformers, Pillow, numpy, tqdm). One job per module:

- ``config``: ``TrainConfig``, the command line's parser, the checks against the tower; ``validation``: value checks
- ``distributed``: the process group; ``precision``: autocast and loss scaling; ``optim``: learning rates, schedule
- ``run_state``: checkpoints and resume; ``run_log``: log records, meters, the loss curve
- ``trainer``: what one run holds and one optimizer step; ``loop``: the epochs; ``cli``: ``main(argv)``
- ``data``, ``features``, ``feature_cache``: images, frozen CLIP features, their on-disk cache
- ``losses``, ``plotting``, ``projector``, ``evaluate``

Commands: ``toconv-train-compressor`` / ``python -m vision_token_compression.train`` (also under
torchrun) and ``toconv-eval-compressor`` / ``python -m vision_token_compression.evaluate``.
"""
