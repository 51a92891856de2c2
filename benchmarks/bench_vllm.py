"""What token compression buys a vLLM server: throughput and time to first token, with and without ToConv.

Serves the same model several ways with ``vllm serve`` (the vLLM venv, ``scripts/build_vllm_venv.sh``):
without compression (``none``: a plain llava-hf checkpoint, vLLM's own LLaVA or LLaVA-NeXT, every
tower token) and with each compressor (checkpoints converted with ``toconv-convert-to-hf``, served
through the plugin: ``24→12`` and ``24→8`` by default). All servers start together; the measurement
then runs round by round: for each concurrency level and image size, each variant in turn, so a
busy machine slows every variant alike. At concurrency c, c clients send streamed chat completions
back to back (a closed loop), each with its own image (no prefix or multimodal cache hit) and the
same question, and every answer is exactly ``--max-tokens`` long (``ignore_eos``). Per round:
requests/s over its wall time, and the median and 90th percentile of time to first token (TTFT,
request sent → first streamed token), after ``--warmup`` discarded requests per server. Each cell
runs ``--repeats`` times, and the table gives medians over them.

Each compressed variant's measured ratios (its throughput ÷ none's, none's TTFT ÷ its TTFT) stand
next to the sequence-length bound, none's prompt tokens ÷ its prompt tokens: what prefill would
gain if its cost were proportional to the sequence. CLIP, the HTTP and scheduling overheads and the
decode steps cost the same for every variant, so measured ratios stay below it.

    python -m benchmarks.bench_vllm --json vllm.json --markdown vllm.md           # LLaVA-1.5 stand-ins, CPU
    python -m benchmarks.bench_vllm --anyres --json a.json --markdown a.md        # LLaVA-1.6 stand-ins, 3 sizes
    python -m benchmarks.bench_vllm --anyres --baseline llava-v1.6-vicuna-7b-hf \\
        --compressed llava-v1.6-vicuna-7b-toconv12-hf llava-v1.6-vicuna-7b-toconv8-hf \\
        --concurrency 1 8 32 --requests 128                                       # real models
    python -m benchmarks.bench_vllm --baseline-url http://127.0.0.1:8002 --compressed-url http://127.0.0.1:8001

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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.arguments import image_size
from benchmarks.vllm_server import StreamTiming, VllmServer, image_message, served_model, timed_stream

logger = logging.getLogger(__name__)

SCHEMA = 2
BASELINE = "none"
QUESTION = "What is in the image?"
# (width, height) of the request images: LLaVA-1.5's square tower input, and for LLaVA-1.6 a wide, a
# tall and a square image (1,368 / 1,976 / 2,928 image tokens uncompressed, as scripts/anyres_token_counts.py).
SQUARE_SIZES = ((336, 336),)
ANYRES_SIZES = ((400, 300), (300, 700), (1000, 1000))


# ---- one round of load -------------------------------------------------------------------------


def request_body(model: str, image, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": image_message(QUESTION, [image]), "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}


def run_round(url: str, model: str, images: list, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """``len(images)`` requests from ``concurrency`` clients back to back; throughput and per-request timings."""
    bodies = [request_body(model, image, max_tokens) for image in images]  # encoded before the clock starts
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        timings: list[StreamTiming] = list(pool.map(lambda body: timed_stream(url, body), bodies))
    wall = time.perf_counter() - start
    ttft = sorted(t.ttft_s for t in timings)
    return {
        "concurrency": concurrency,
        "image_size": list(images[0].size),
        "requests": len(timings),
        "wall_s": wall,
        "requests_per_s": len(timings) / wall,  # one image per request: also images/s
        "output_tokens_per_s": sum(t.completion_tokens for t in timings) / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": ttft[min(len(ttft) - 1, round(0.9 * (len(ttft) - 1)))],
        "latency_median_s": statistics.median(t.latency_s for t in timings),
        "prompt_tokens": statistics.median(t.prompt_tokens for t in timings),
        "samples": [vars(t) for t in timings],
    }


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Warm-up (discarded), then for every concurrency level × image size, ``--repeats`` times each variant in turn."""
    variants = {name: {"url": url, "model": served_model(url), "vllm": server_version(url), "rounds": []}
                for name, url in urls.items()}
    warmup = make_request_images(args.warmup, args.image_sizes[0], seed=0)
    for variant in variants.values():
        for image in warmup:
            timed_stream(variant["url"], request_body(variant["model"], image, args.max_tokens))
    seed = 0
    for concurrency in args.concurrency:
        for size in args.image_sizes:
            for repeat in range(args.repeats):
                seed += 1
                images = make_request_images(args.requests, size, seed=seed)  # the same images for every variant
                for name, variant in variants.items():
                    logger.info("%s: concurrency %d, %d×%d images, repeat %d", name, concurrency, *size, repeat + 1)
                    measured = run_round(variant["url"], variant["model"], images, concurrency, args.max_tokens)
                    variant["rounds"].append({**measured, "repeat": repeat})
    return variants


def server_version(url: str) -> str | None:
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(f"{url}/version", timeout=10) as r:
        return json.load(r).get("version")
    return None


def make_request_images(n: int, size: tuple[int, int], seed: int) -> list:
    """``n`` distinct images of ``size`` (one per request, so that no request is served from a cache)."""
    from llava.standins import make_images

    return make_images(n, size=size, seed=seed)


# ---- servers and models ------------------------------------------------------------------------


def variant_name(checkpoint: Path) -> str:
    """``in→out`` from a converted checkpoint's config (``none`` without a compressor)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{checkpoint / 'config.json'}: cannot read the checkpoint's config ({err}).") from err
    if "compression_output_size" not in config:
        return BASELINE
    vision = config.get("vision_config", {})
    grid = config.get("compression_input_size") or vision.get("image_size", 0) // vision.get("patch_size", 1)
    return f"{grid}→{config['compression_output_size']}"


def resolve_models(args: argparse.Namespace, work_dir: Path) -> dict[str, Path]:
    """The checkpoints by variant: given (``--baseline``, ``--compressed``), or tiny stand-ins with the same weights."""
    if args.compressed and args.baseline:
        given = {BASELINE: Path(args.baseline)}
        for path in map(Path, args.compressed):
            name = variant_name(path)
            if name == BASELINE or name in given:
                raise SystemExit(f"--compressed {path}: its config says {name!r}, which another checkpoint already "
                                 f"is; give each compression level once, and the uncompressed model as --baseline.")
            given[name] = path
        return given
    if args.compressed or args.baseline:
        raise SystemExit("Give both --compressed and --baseline (the same model with and without compression), or neither.")
    from benchmarks.vllm_standins import build_serving_standins

    paths = build_serving_standins(work_dir, levels=tuple(args.levels), anyres=args.anyres)
    return {BASELINE if name == BASELINE else "24→" + name.removeprefix("24to"): path for name, path in paths.items()}


def given_urls(args: argparse.Namespace) -> dict[str, str] | None:
    """Running servers (``--baseline-url``, ``--compressed-url``), named by the model each serves; None if not given."""
    if not (args.baseline_url or args.compressed_url):
        return None
    if not (args.baseline_url and args.compressed_url):
        raise SystemExit("Give both --baseline-url and --compressed-url, or neither.")
    urls = {BASELINE: args.baseline_url}
    for url in args.compressed_url:
        urls[Path(served_model(url)).name or url] = url
    return urls


@contextlib.contextmanager
def serving(args: argparse.Namespace, work_dir: Path) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
    """The variants' URLs (given, or servers started together and stopped at the end) and how each was served."""
    urls = given_urls(args)
    if urls is not None:
        yield urls, {}
        return
    servers = {name: VllmServer(path, args=args.serve_args, log_path=work_dir / f"serve-{path.name}.log")
               for name, path in resolve_models(args, work_dir).items()}
    try:
        for server in servers.values():
            server.start()
        for name, server in servers.items():
            server.wait()
            logger.info("%s: %s up in %.0f s at %s", name, server.model, server.startup_seconds, server.url)
        yield ({name: server.url for name, server in servers.items()},
               {name: {"startup_s": s.startup_seconds, "serve_command": s.command} for name, s in servers.items()})
    finally:
        for server in servers.values():
            server.stop()


# ---- the report --------------------------------------------------------------------------------


def compare(variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency × image size and compressed variant: its ratios to none beside the sequence-length bound.

    Each ratio is the median over repeats of the ratio within a repeat (a variant's round and none's
    round ran one after the other, so a busy spell on the machine slows both); ``*_range`` is its spread.
    """
    baseline = variants[BASELINE]["rounds"]
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for name, variant in variants.items():
        if name == BASELINE:
            continue
        if len(variant["rounds"]) != len(baseline):
            raise ValueError(f"{name} has {len(variant['rounds'])} rounds, none {len(baseline)}: they must pair up")
        for base, comp in zip(baseline, variant["rounds"], strict=True):
            key = (base["concurrency"], tuple(base["image_size"]), name)
            groups.setdefault(key, []).append((base, comp))
    rows = [_compared(key, pairs) for key, pairs in groups.items()]
    return sorted(rows, key=lambda row: (row["concurrency"], row["image_size"][0] * row["image_size"][1]))


def _compared(key: tuple, pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
    concurrency, size, name = key
    median = statistics.median
    throughput = [comp["requests_per_s"] / base["requests_per_s"] for base, comp in pairs]
    ttft = [base["ttft_median_s"] / comp["ttft_median_s"] for base, comp in pairs]
    tokens = {"none": median(b["prompt_tokens"] for b, _ in pairs), "compressed": median(c["prompt_tokens"] for _, c in pairs)}
    return {
        "variant": name, "concurrency": concurrency, "image_size": list(size), "repeats": len(pairs),
        "prompt_tokens": tokens,
        "sequence_length_bound": tokens["none"] / tokens["compressed"],
        "requests_per_s": {"none": median(b["requests_per_s"] for b, _ in pairs),
                           "compressed": median(c["requests_per_s"] for _, c in pairs)},
        "throughput_ratio": median(throughput), "throughput_ratio_range": [min(throughput), max(throughput)],
        "ttft_median_s": {"none": median(b["ttft_median_s"] for b, _ in pairs),
                          "compressed": median(c["ttft_median_s"] for _, c in pairs)},
        "ttft_ratio": median(ttft), "ttft_ratio_range": [min(ttft), max(ttft)],
    }


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    vllm = next(iter(report["variants"].values())).get("vllm")
    lines = [
        (f"vLLM {vllm}, {report['environment']['machine']}; {settings['requests']} requests per round, "
         f"{settings['max_tokens']} output tokens each, one image per request; {settings['repeats']} rounds per "
         f"variant and cell, interleaved, medians (× in brackets: lowest–highest round); load average at the end "
         f"{report['environment']['load_average_end'][0]:.1f}."),
        "",
        ("| image (w×h) | concurrency | ToConv | prompt tokens (none → ToConv) | req/s none | req/s ToConv | "
         "throughput × | TTFT none (ms) | TTFT ToConv (ms) | TTFT × | sequence-length bound × |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(report["comparison"], key=lambda r: (r["image_size"][0] * r["image_size"][1], r["concurrency"])):
        tokens, rps, ttft = row["prompt_tokens"], row["requests_per_s"], row["ttft_median_s"]
        lines.append(
            f"| {row['image_size'][0]}×{row['image_size'][1]} | {row['concurrency']} | {row['variant']} | "
            f"{tokens['none']:.0f} → {tokens['compressed']:.0f} | {rps['none']:.2f} | {rps['compressed']:.2f} | "
            f"{_ratio(row, 'throughput_ratio')} | {1000 * ttft['none']:.0f} | {1000 * ttft['compressed']:.0f} | "
            f"{_ratio(row, 'ttft_ratio')} | {row['sequence_length_bound']:.2f} |"
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


def _ratio(row: dict[str, Any], key: str) -> str:
    low, high = row[f"{key}_range"]
    return f"{row[key]:.2f}" if row["repeats"] == 1 else f"{row[key]:.2f} ({low:.2f}–{high:.2f})"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--anyres", action="store_true",
                        help="LLaVA-1.6: stand-ins are LLaVA-1.6 (anyres), and the default image sizes "
                             + " ".join(f"{w}x{h}" for w, h in ANYRES_SIZES))
    parser.add_argument("--baseline", help="the model without compression (llava-hf format); default: a tiny stand-in")
    parser.add_argument("--compressed", nargs="+", help="the same model converted with each compressor (toconv-convert-to-hf)")
    parser.add_argument("--baseline-url", help="use this running server (no compression) instead of starting one")
    parser.add_argument("--compressed-url", nargs="+", help="use these running servers (compressed) instead")
    parser.add_argument("--levels", type=int, nargs="+", default=[12, 8],
                        help="stand-ins only: compressed grid sides (24→N; default 12 8: 144 and 64 tokens per tile)")
    parser.add_argument("--image-sizes", type=image_size, nargs="+",
                        help="request image sizes, WxH (default 336x336; with --anyres the three above)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients at once, per round")
    parser.add_argument("--requests", type=int, default=32, help="requests per round (each its own image)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per variant, concurrency and image size, interleaved across variants (medians)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (EOS ignored)")
    parser.add_argument("--warmup", type=int, default=4, help="discarded requests per server before measuring")
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                        help="extra `vllm serve` argument (repeat; e.g. --serve-arg=--max-num-seqs=64)")
    parser.add_argument("--work-dir", help="stand-ins and server logs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or min(args.requests, args.repeats, args.max_tokens) < 1 or args.warmup < 0:
        parser.error("--concurrency, --requests, --repeats and --max-tokens must be at least 1, --warmup at least 0")
    if not all(1 <= n < 24 for n in args.levels) or len(set(args.levels)) != len(args.levels):
        parser.error(f"--levels {' '.join(map(str, args.levels))}: each a different compressed side from 1 to 23 "
                     f"(the stand-ins' tower has a 24×24 grid)")
    args.image_sizes = args.image_sizes or list(ANYRES_SIZES if args.anyres else SQUARE_SIZES)
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
        urls, served = stack.enter_context(serving(args, work_dir))
        variants = measure(urls, args)
    for name, record in served.items():
        variants[name].update(record)
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
