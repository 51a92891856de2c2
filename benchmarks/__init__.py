"""What token compression buys in a LLaVA-1.5-shaped pipeline, and per image size in LLaVA-1.6 (anyres), measured side by side.

The entry point is ``benchmarks.bench_compression`` (``python benchmarks/bench_compression.py`` or
``python -m benchmarks.bench_compression``); see docs/benchmarks.md.
"""
