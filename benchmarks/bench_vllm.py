"""What token compression buys a vLLM server: throughput and time to first token, with and without ToConv.

Serves the same model twice with ``vllm serve`` (the vLLM venv, ``scripts/build_vllm_venv.sh``):
the converted checkpoint with its compressor (out² image tokens, through the plugin) and the same
weights without it (a plain llava-hf checkpoint, vLLM's own LLaVA, 576 image tokens). At each
concurrency level c, c clients send streamed chat completions back to back (a closed loop), each
with its own image (no prefix or multimodal cache hit) and the same question, and every answer is
exactly ``--max-tokens`` long (``ignore_eos``). Per level: requests/s and images/s over the level's
wall time, and the median and 90th percentile of time to first token (TTFT, request sent → first
streamed text), after ``--warmup`` discarded requests per server.

The comparison puts each measured ratio (compressed ÷ baseline throughput, baseline ÷ compressed
TTFT) next to the sequence-length bound, baseline prompt tokens ÷ compressed prompt tokens: what
prefill would gain if its cost were proportional to the sequence. CLIP, the HTTP and scheduling
overheads and the decode steps cost the same for both, so measured ratios stay below it.

    python -m benchmarks.bench_vllm --json vllm.json --markdown vllm.md           # tiny stand-ins, CPU
    python -m benchmarks.bench_vllm --compressed llava-v1.5-7b-toconv12-hf \\
        --baseline llava-1.5-7b-hf --concurrency 1 8 32 --requests 128             # real models
    python -m benchmarks.bench_vllm --compressed-url http://127.0.0.1:8001 --baseline-url http://127.0.0.1:8002

Runs in any venv (the client is the standard library; building stand-ins needs this project's
dependencies). Writes JSON (settings, environment, every sample) and a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.vllm_server import StreamTiming, VllmServer, image_message, served_model, timed_stream

logger = logging.getLogger(__name__)

SCHEMA = 1
VARIANTS = ("baseline", "compressed")
QUESTION = "What is in the image?"


# ---- one level of load -------------------------------------------------------------------------


def request_body(model: str, image, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": image_message(QUESTION, [image]), "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}


def run_level(url: str, model: str, images: list, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """``len(images)`` requests from ``concurrency`` clients back to back; throughput and per-request timings."""
    bodies = [request_body(model, image, max_tokens) for image in images]  # encoded before the clock starts
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        timings: list[StreamTiming] = list(pool.map(lambda body: timed_stream(url, body), bodies))
    wall = time.perf_counter() - start
    ttft = sorted(t.ttft_s for t in timings)
    return {
        "concurrency": concurrency,
        "requests": len(timings),
        "wall_s": wall,
        "requests_per_s": len(timings) / wall,
        "images_per_s": len(timings) / wall,  # one image per request
        "output_tokens_per_s": sum(t.completion_tokens for t in timings) / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": ttft[min(len(ttft) - 1, round(0.9 * (len(ttft) - 1)))],
        "latency_median_s": statistics.median(t.latency_s for t in timings),
        "prompt_tokens": statistics.median(t.prompt_tokens for t in timings),
        "samples": [vars(t) for t in timings],
    }


def measure(url: str, images: list, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up (discarded), then every concurrency level against one server, each request with an unseen image."""
    model = served_model(url)
    warmup, images = images[: args.warmup], images[args.warmup:]
    for image in warmup:
        timed_stream(url, request_body(model, image, args.max_tokens))
    levels = []
    for i, concurrency in enumerate(args.concurrency):
        level_images = images[i * args.requests:(i + 1) * args.requests]
        levels.append(run_level(url, model, level_images, concurrency, args.max_tokens))
    return {"url": url, "model": model, "vllm": server_version(url), "levels": levels}


def server_version(url: str) -> str | None:
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(f"{url}/version", timeout=10) as r:
        return json.load(r).get("version")
    return None


# ---- servers and models ------------------------------------------------------------------------


def resolve_models(args: argparse.Namespace, work_dir: Path) -> dict[str, Path]:
    """The two checkpoints: given, or tiny stand-ins with the same weights (``build_serving_standins``)."""
    if args.compressed and args.baseline:
        return {"compressed": Path(args.compressed), "baseline": Path(args.baseline)}
    if args.compressed or args.baseline:
        raise SystemExit("Give both --compressed and --baseline (the same model with and without compression), or neither.")
    from benchmarks.vllm_standins import build_serving_standins

    paths = build_serving_standins(work_dir)
    return {"compressed": paths["compressed"], "baseline": paths["baseline"]}


def run_variant(name: str, args: argparse.Namespace, images: list, work_dir: Path) -> dict[str, Any]:
    """Measure one variant: on its running server (``--NAME-url``), or on a server started for it."""
    url = getattr(args, f"{name}_url")
    if url:
        return measure(url, images, args)
    model = resolve_models(args, work_dir)[name]  # stand-ins are built once and reused
    server = VllmServer(model, args=args.serve_args, log_path=work_dir / f"serve-{name}.log")
    with server:
        logger.info("%s: %s up in %.0f s at %s", name, model, server.startup_seconds, server.url)
        result = measure(server.url, images, args)
    return {**result, "startup_s": server.startup_seconds, "serve_command": server.command}


def make_request_images(n: int, size: int) -> list:
    """``n`` distinct square images (one per request, so that no request is served from a cache)."""
    from llava.standins import make_images

    return make_images(n, size=(size, size), seed=1234)


# ---- the report --------------------------------------------------------------------------------


def compare(variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency level: compressed vs baseline, each ratio beside the sequence-length bound."""
    rows = []
    for base, comp in zip(variants["baseline"]["levels"], variants["compressed"]["levels"], strict=True):
        rows.append({
            "concurrency": base["concurrency"],
            "prompt_tokens": {"baseline": base["prompt_tokens"], "compressed": comp["prompt_tokens"]},
            "sequence_length_bound": base["prompt_tokens"] / comp["prompt_tokens"],
            "requests_per_s": {"baseline": base["requests_per_s"], "compressed": comp["requests_per_s"]},
            "throughput_ratio": comp["requests_per_s"] / base["requests_per_s"],
            "ttft_median_s": {"baseline": base["ttft_median_s"], "compressed": comp["ttft_median_s"]},
            "ttft_ratio": base["ttft_median_s"] / comp["ttft_median_s"],
        })
    return rows


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        (f"vLLM {report['variants']['compressed'].get('vllm')}, {report['environment']['machine']}; "
         f"{settings['requests']} requests per level, {settings['max_tokens']} output tokens each, "
         f"one {settings['image_size']}×{settings['image_size']} image per request."),
        "",
        ("| concurrency | prompt tokens (none → ToConv) | req/s none | req/s ToConv | throughput × | "
         "TTFT none (ms) | TTFT ToConv (ms) | TTFT × | sequence-length bound × |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["comparison"]:
        tokens, rps, ttft = row["prompt_tokens"], row["requests_per_s"], row["ttft_median_s"]
        lines.append(
            f"| {row['concurrency']} | {tokens['baseline']:.0f} → {tokens['compressed']:.0f} | "
            f"{rps['baseline']:.2f} | {rps['compressed']:.2f} | {row['throughput_ratio']:.2f} | "
            f"{1000 * ttft['baseline']:.0f} | {1000 * ttft['compressed']:.0f} | {row['ttft_ratio']:.2f} | "
            f"{row['sequence_length_bound']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    machine = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                machine = line.split(":", 1)[1].strip()
                break
    return {
        "machine": f"{machine} ({os.cpu_count()} logical CPUs)", "python": platform.python_version(),
        "platform": platform.platform(), "load_average_end": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---- the command line --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--compressed", help="converted checkpoint (toconv-convert-to-hf); default: a tiny stand-in")
    parser.add_argument("--baseline", help="the same model without compression (llava-hf format)")
    parser.add_argument("--compressed-url", help="use this running server instead of starting one")
    parser.add_argument("--baseline-url", help="use this running server instead of starting one")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients at once, per level")
    parser.add_argument("--requests", type=int, default=32, help="requests per level (each its own image)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (EOS ignored)")
    parser.add_argument("--warmup", type=int, default=4, help="discarded requests per server before measuring")
    parser.add_argument("--image-size", type=int, default=336, help="side of the square request images")
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                        help="extra `vllm serve` argument (repeat; e.g. --serve-arg=--max-num-seqs=64)")
    parser.add_argument("--work-dir", help="stand-ins and server logs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1 or args.warmup < 0 or args.max_tokens < 1:
        parser.error("--concurrency, --requests and --max-tokens must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written as JSON and markdown."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work_dir = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-vllm-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        images = make_request_images(args.warmup + args.requests * len(args.concurrency), args.image_size)
        variants = {name: run_variant(name, args, images, work_dir) for name in VARIANTS}
    report = {
        "schema": SCHEMA,
        "command": "python -m benchmarks.bench_vllm " + " ".join(raw_argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "verbose")},
        "environment": environment(),
        "variants": variants,
        "comparison": compare(variants),
        "wall_seconds": time.perf_counter() - started,
    }
    table = markdown(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
