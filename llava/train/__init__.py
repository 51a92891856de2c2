"""LLaVA training: arguments, data, trainer and the ``train`` entry point (``python -m llava.train.train``)."""
