"""Every benchmark at every compression level through ``scripts/v1_5/eval``, then one summary.

``bash scripts/v1_5/eval/suite.sh`` runs this module with the eval scripts' environment (``MODEL_PATH``,
``MODEL_BASE``, ``CKPT``, ``EVAL_DIR``, ``DEVICE``, ``EVAL_ARGS``, ``CONV_MODE``, ``TOKEN_COMPRESSOR``)
plus ``BENCHMARKS`` (script names; default: every benchmark whose data is under ``EVAL_DIR``) and
``LEVELS`` (default ``none 12 8``). Each benchmark × level is one run of ``<benchmark>.sh`` with
``COMPRESS_TO`` set to the level (unset for ``none``) and ``RESUME=1``, so answers already complete are
not generated again and a partial answers file is finished from where it stopped. The headline score
is read from what the benchmark's scorer printed, the image tokens per image from the answers'
sidecar (measured at the language model's input). A failed run is reported and the others go on.

Writes ``$EVAL_DIR/suite/$CKPT/``: ``summary.json``, ``summary.md``, ``summary.png``, ``settings.json``
(what the answers under ``$CKPT`` were made with) and ``logs/<benchmark>-<level>.{stdout,stderr}.txt``.
Exit status: 0 when every run succeeded, 1 when one failed, 2 on bad input (before any model loads).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llava.eval import image_tokens
from llava.eval.suite_benchmarks import BENCHMARKS, Benchmark, ScoreNotFoundError
from llava.eval.suite_report import NONE, add_relative_scores, average_row, write_summary

logger = logging.getLogger(__name__)

DEFAULT_LEVELS = "none 12 8"
REPO = Path(__file__).resolve().parents[2]
# Variables of the eval scripts that the suite sets per run, or that would send a run elsewhere.
PER_RUN = ("COMPRESS_TO", "TOKEN_COMPRESSOR", "RESUME", "SPLIT", "BENCH")


class SuiteInputError(ValueError):
    """A setting the suite refuses before anything runs."""


@dataclass
class Settings:
    """The suite's environment, read once."""

    model_path: str
    model_base: str | None
    ckpt: str
    eval_dir: Path
    conv_mode: str
    token_compressor: str | None
    levels: list[str]
    benchmarks: list[str] | None  # None: every benchmark with data
    scripts_dir: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return self.eval_dir / "suite" / self.ckpt

    def tag(self, level: str) -> str:
        """The answers' tag for a level, as common.sh builds it."""
        return self.ckpt if level == NONE else f"{self.ckpt}-toconv{level}"


# ---- Reading and checking the settings -----------------------------------------------------------


def parse_levels(text: str) -> list[str]:
    """``LEVELS``: ``none`` and grid sides (12 → 144 tokens, 8 → 64), in order, each once."""
    levels: list[str] = []
    for word in text.split():
        if word != NONE and not (word.isdigit() and int(word) >= 1):
            raise SuiteInputError(
                f"LEVELS has {word!r}: a level is 'none' (no compression) or an output grid side such as 12 "
                f"(144 image tokens) or 8 (64). Set for example LEVELS=\"{DEFAULT_LEVELS}\"."
            )
        level = word if word == NONE else str(int(word))
        if level in levels:
            logger.warning("LEVELS lists %s twice; running it once.", level)
            continue
        levels.append(level)
    if not levels:
        raise SuiteInputError(f"LEVELS is empty: leave it unset for {DEFAULT_LEVELS!r} or list levels.")
    if NONE not in levels:
        logger.warning("LEVELS has no 'none': the relative column stays empty. Add none (its answers are reused "
                       "when already complete).")
    return levels


def parse_benchmarks(text: str | None) -> list[str] | None:
    """``BENCHMARKS``: names of scripts in ``scripts/v1_5/eval``; None when unset (every benchmark with data)."""
    if text is None or not text.split():
        return None
    names = list(dict.fromkeys(text.replace(",", " ").split()))
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise SuiteInputError(
            f"BENCHMARKS has unknown benchmark(s) {', '.join(map(repr, unknown))}: the eval scripts are "
            f"{', '.join(BENCHMARKS)} (scripts/v1_5/eval/<name>.sh)."
        )
    return names


def read_settings(env: Mapping[str, str], scripts_dir: Path) -> Settings:
    """The suite's settings from the eval scripts' environment (their defaults, as common.sh sets them)."""
    model_path = env.get("MODEL_PATH") or "liuhaotian/llava-v1.5-13b"
    return Settings(
        model_path=model_path,
        model_base=env.get("MODEL_BASE") or None,
        ckpt=env.get("CKPT") or os.path.basename(model_path.rstrip("/")),
        eval_dir=Path(env.get("EVAL_DIR") or "./playground/data/eval"),
        conv_mode=env.get("CONV_MODE") or "vicuna_v1",
        token_compressor=env.get("TOKEN_COMPRESSOR") or None,
        levels=parse_levels(env.get("LEVELS") or DEFAULT_LEVELS),
        benchmarks=parse_benchmarks(env.get("BENCHMARKS")),
        scripts_dir=scripts_dir,
        env=dict(env),
    )


@dataclass(frozen=True)
class TowerGrid:
    """What the checkpoint's config says of its image tokens: the tower's grid, and a trained compression."""

    tower: str
    grid: int
    trained_output: int | None


def checkpoint_grid(model_path: str, model_base: str | None) -> TowerGrid:
    """The tower grid of a LLaVA checkpoint from its config files only (no weights are read)."""
    from llava.model.builder import read_config_dict
    from llava.model.multimodal_encoder.clip_encoder import load_tower_config, require_pretrained
    from vision_token_compression import CompressionSettings, grid_side
    from vision_token_compression.towers import tower_family

    try:
        if model_base:
            require_pretrained(model_base, "MODEL_BASE", "Set MODEL_BASE to the base LLM's folder or Hub name, or unset it.")
        config = read_config_dict(model_path)
    except (OSError, ValueError) as err:
        raise SuiteInputError(f"MODEL_PATH / MODEL_BASE: {err}") from err
    tower = config.get("mm_vision_tower")
    if not tower:
        raise SuiteInputError(
            f"MODEL_PATH={model_path!r} is not a LLaVA checkpoint: its config.json has no mm_vision_tower. Point "
            f"MODEL_PATH at a LLaVA checkpoint in upstream's format."
        )
    try:
        grid = grid_side(load_tower_config(tower, tower_family(tower)))
    except (OSError, ValueError) as err:
        raise SuiteInputError(f"MODEL_PATH={model_path!r}: {err}") from err
    trained = CompressionSettings.from_config(config, where=f"{model_path}/config.json: ")
    return TowerGrid(tower, grid, trained.output_size if trained.enabled else None)


def check_levels(levels: Sequence[str], info: TowerGrid, model_path: str) -> None:
    """Each numeric level fits the tower's grid (and a compression the checkpoint was trained with)."""
    from vision_token_compression import CompressionSettings, SettingNames

    names = SettingNames(output_size="level")
    for level in levels:
        if level == NONE:
            continue
        size = int(level)
        if info.trained_output is not None and size != info.trained_output:
            raise SuiteInputError(
                f"LEVELS has {level}, but {model_path} was trained with compression to {info.trained_output}×"
                f"{info.trained_output}; its compressor fits only that. Use LEVELS=\"none\" (the checkpoint as "
                f"trained) or evaluate the checkpoint it was made from."
            )
        try:
            CompressionSettings.check(True, None, size, grid=info.grid, tower=info.tower, names=names)
        except ValueError as err:
            raise SuiteInputError(f"LEVELS: {err} The tower {info.tower} has a {info.grid}×{info.grid} patch "
                                  f"grid; set LEVELS to none and sides below {info.grid}.") from err
    if info.trained_output is not None:
        logger.warning("%s was trained with compression (%d×%d): level none runs it as trained, so there is no "
                       "uncompressed run to compare with; the image-token column shows what it received.",
                       model_path, info.trained_output, info.trained_output)


def check_compressor(path: str | None, levels: Sequence[str], info: TowerGrid) -> None:
    """``TOKEN_COMPRESSOR`` exists and fits the tower's grid and every numeric level."""
    if path is None:
        return
    from vision_token_compression import read_metadata

    if not os.path.isfile(path):
        raise SuiteInputError(f"TOKEN_COMPRESSOR={path!r} is not a file: pass a compressor checkpoint (.safetensors).")
    try:
        meta = read_metadata(path)
    except (OSError, ValueError) as err:
        raise SuiteInputError(f"TOKEN_COMPRESSOR={path!r}: {err}") from err
    numeric = [level for level in levels if level != NONE]
    if meta.input_grid_size != info.grid or any(int(level) != meta.output_grid_size for level in numeric):
        raise SuiteInputError(
            f"TOKEN_COMPRESSOR={path!r} compresses {meta.input_grid_size}×{meta.input_grid_size} to "
            f"{meta.output_grid_size}×{meta.output_grid_size}, but the checkpoint's tower has a {info.grid}×{info.grid} "
            f"grid and LEVELS asks for {' '.join(numeric) or 'no compression'}. Run the suite once per "
            f"compressor with LEVELS=\"none {meta.output_grid_size}\" and a CKPT of its own."
        )


def plan(settings: Settings) -> tuple[list[Benchmark], list[dict[str, Any]]]:
    """The benchmarks to run, and those skipped (their missing data); named benchmarks must have their data."""
    if settings.benchmarks is not None:
        chosen = [BENCHMARKS[name] for name in settings.benchmarks]
        missing = {b.name: b.missing(settings.eval_dir) for b in chosen}
        absent = {name: paths for name, paths in missing.items() if paths}
        if absent:
            listed = "; ".join(f"{name}: {', '.join(map(str, paths))}" for name, paths in absent.items())
            raise SuiteInputError(
                f"BENCHMARKS names benchmark(s) whose data is not under EVAL_DIR={settings.eval_dir}: {listed}. Lay "
                f"the data out as docs/evaluation.md says, or leave them out of BENCHMARKS."
            )
        return chosen, []
    run, skipped = [], []
    for benchmark in BENCHMARKS.values():
        missing = benchmark.missing(settings.eval_dir)
        if missing:
            skipped.append({"benchmark": benchmark.name, "missing": [str(path) for path in missing]})
        else:
            run.append(benchmark)
    if not run:
        raise SuiteInputError(
            f"No benchmark data under EVAL_DIR={settings.eval_dir}: lay out LLaVA's eval.zip and each benchmark's "
            f"data there (docs/evaluation.md), or set EVAL_DIR."
        )
    return run, skipped


def answers_record(settings: Settings) -> dict[str, Any]:
    """What decides the answers under ``$CKPT``: a later run must not mix answers made otherwise."""
    def resolved(path: str | None) -> str | None:
        return None if path is None else (str(Path(path).resolve()) if os.path.exists(path) else path)

    return {"model_path": resolved(settings.model_path), "model_base": resolved(settings.model_base),
            "token_compressor": resolved(settings.token_compressor), "conv_mode": settings.conv_mode,
            "eval_args": settings.env.get("EVAL_ARGS", "")}


def check_answers_record(settings: Settings) -> None:
    """Refuse to resume answers under ``$CKPT`` that were made with another checkpoint, compressor or template."""
    path = settings.out_dir / "settings.json"
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    now = answers_record(settings)
    changed = [key for key in ("model_path", "model_base", "token_compressor", "conv_mode")
               if before.get(key) != now[key]]
    if changed:
        what = ", ".join(f"{key} {before.get(key)!r} → {now[key]!r}" for key in changed)
        raise SuiteInputError(
            f"The answers under CKPT={settings.ckpt} were made with other settings ({what}; recorded in {path}). "
            f"Resuming would mix them: set another CKPT, or move those answers and {path} away."
        )
    if before.get("eval_args") != now["eval_args"]:
        logger.warning("EVAL_ARGS changed since the answers under %s were made (%r → %r); complete answers are "
                       "kept as they are.", settings.ckpt, before.get("eval_args"), now["eval_args"])


def preflight(settings: Settings) -> tuple[list[Benchmark], list[dict[str, Any]]]:
    """Every check that needs no model: benchmarks, levels against the tower, compressor, data, earlier answers."""
    chosen, skipped = plan(settings)
    info = checkpoint_grid(settings.model_path, settings.model_base)
    check_levels(settings.levels, info, settings.model_path)
    check_compressor(settings.token_compressor, settings.levels, info)
    check_answers_record(settings)
    return chosen, skipped


# ---- Running and reading the results --------------------------------------------------------------


def run_env(settings: Settings, level: str) -> dict[str, str]:
    """The environment of one script run: the suite's, with the level's compression and ``RESUME=1``."""
    env = {key: value for key, value in settings.env.items() if key not in PER_RUN}
    env["RESUME"] = "1"
    env["CKPT"] = settings.ckpt
    env["EVAL_DIR"] = str(settings.eval_dir)
    if level != NONE:
        env["COMPRESS_TO"] = level
        if settings.token_compressor:
            env["TOKEN_COMPRESSOR"] = settings.token_compressor
    return env


def run_script(settings: Settings, benchmark: Benchmark, level: str) -> tuple[int, Path, Path]:
    """Run ``<benchmark>.sh`` at ``level``; (exit status, stdout log, stderr log)."""
    logs = settings.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / f"{benchmark.name}-{level}.stdout.txt", logs / f"{benchmark.name}-{level}.stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        status = subprocess.call(["bash", str(settings.scripts_dir / f"{benchmark.name}.sh")],
                                 env=run_env(settings, level), stdout=out, stderr=err)
    return status, stdout, stderr


def _last_lines(path: Path, n: int = 3) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " / ".join(lines[-n:])[-400:] or "(no output)"


def measured_tokens(benchmark: Benchmark, settings: Settings, level: str) -> dict[str, Any] | None:
    """Image tokens per image from the answers' sidecar; None when it is absent."""
    sidecar = Path(image_tokens.sidecar_path(benchmark.answers_file(settings.eval_dir, settings.tag(level))))
    if not sidecar.is_file():
        return None
    return image_tokens.summarise(image_tokens.read_sidecar(sidecar)).as_dict()


def result_row(settings: Settings, benchmark: Benchmark, level: str) -> dict[str, Any]:
    """Run one benchmark at one level and read its results into a summary row."""
    status, stdout, stderr = run_script(settings, benchmark, level)
    row: dict[str, Any] = {"benchmark": benchmark.name, "title": benchmark.title, "level": level,
                           "metric": benchmark.metric, "score": None, "status": "ok",
                           "log": str(stderr), "answers": str(benchmark.answers_file(settings.eval_dir,
                                                                                      settings.tag(level)))}
    if status != 0:
        row.update(status="failed", error=f"{benchmark.name}.sh exited with {status}: {_last_lines(stderr)}")
        return row
    try:
        row["image_tokens"] = measured_tokens(benchmark, settings, level)
        if benchmark.score is not None:
            row["score"] = benchmark.score(stdout.read_text())
    except ScoreNotFoundError as err:
        row.update(status="failed", error=str(err), log=str(stdout))
        return row
    except Exception as err:  # a broken sidecar or output fails this row only; the suite goes on
        logger.exception("Reading the results of %s at level %s failed", benchmark.name, level)
        row.update(status="failed", error=f"reading its results failed: {type(err).__name__}: {err}")
        return row
    submission = benchmark.submission_file(settings.eval_dir, settings.tag(level))
    if submission is not None:
        row["submission"] = str(submission)
    return row


def git_commit() -> str:
    """This checkout's commit (``+dirty`` with uncommitted changes), or why there is none."""
    try:
        # An installed copy (site-packages) may sit inside some other repository: only this checkout's own counts.
        if not (REPO / ".git").exists():
            raise OSError("not a checkout")
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"unknown (not a git checkout; toconv-llava {version('toconv-llava')})"
        except PackageNotFoundError:
            return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def compressor_label(settings: Settings) -> str:
    if settings.token_compressor:
        return f"`{settings.token_compressor}` (TOKEN_COMPRESSOR)"
    return "the checkpoint's own, or the window average where compression is switched on at load time"


def build_summary(settings: Settings, rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> dict[str, Any]:
    add_relative_scores(rows)
    return {
        "ckpt": settings.ckpt, "model_path": settings.model_path, "model_base": settings.model_base,
        "compressor": compressor_label(settings), "commit": git_commit(), "eval_dir": str(settings.eval_dir),
        "levels": settings.levels, "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows, "average": average_row(rows, settings.levels), "skipped": skipped,
        "failed": [f"{row['benchmark']}@{row['level']}" for row in rows if row["status"] == "failed"],
    }


def run_suite(settings: Settings) -> dict[str, Any]:
    """Check the settings, run every benchmark × level, write the summary; returns it."""
    from vision_token_compression import atomic_write_text

    chosen, skipped = preflight(settings)
    for item in skipped:
        logger.info("Skipping %s: no %s", item["benchmark"], item["missing"][0])
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.out_dir / "settings.json", json.dumps(answers_record(settings), indent=1) + "\n")
    rows = []
    for benchmark in chosen:
        for level in settings.levels:
            logger.info("%s at level %s ...", benchmark.name, level)
            row = result_row(settings, benchmark, level)
            logger.info("%s at level %s: %s", benchmark.name, level,
                        row.get("error") or f"{row['metric'] or 'submission'} {row.get('score', '')}")
            rows.append(row)
    summary = build_summary(settings, rows, skipped)
    for path in write_summary(summary, settings.out_dir):
        logger.info("Wrote %s", path)
    return summary


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """``suite.sh``'s entry: ``python -m llava.eval.suite SCRIPTS_DIR``; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="[suite] %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    scripts_dir = Path(argv[0]) if argv else REPO / "scripts" / "v1_5" / "eval"
    try:
        settings = read_settings(os.environ if env is None else env, scripts_dir)
        summary = run_suite(settings)
    except SuiteInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["failed"]:
        logger.error("Failed: %s (see summary.md for each error and its log).", ", ".join(summary["failed"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
