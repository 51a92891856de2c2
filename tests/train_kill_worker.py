"""Fork server for the kill tests: imports the trainer once, then runs each training in a forked child.

Starting ``python -m llava.train.train`` costs ~15 s of imports on a shared 2-core machine; forking a
process that has already imported it costs milliseconds, and the child still runs the CLI's
``main(argv)`` in a process of its own that SIGKILL ends like any other.

Protocol, one JSON object per line. The test writes::

    {"argv": [...], "log": PATH, "events": PATH, "kill_at_event": K or null, "kill_after_s": T or null}

and the worker answers, once the child has ended::

    {"exit": CODE or null, "signal": SIGNUM or null, "seconds": WALL}

In the child, every call that writes or moves a checkpoint file is an *event*, appended to the
``events`` file as ``<index> <kind> <file name> @<seconds since the start>`` before it runs:
``torch.save``, safetensors' ``save_file``, ``TrainerState.save_to_json``,
``PreTrainedConfig.to_json_file``, ``os.replace``, ``os.rename`` and ``shutil.rmtree``;
``save-begin`` / ``save-end`` lines bracket each checkpoint and the final save. With
``kill_at_event`` K the child kills itself with SIGKILL inside event K, as a kill would land
there: a writer first writes half of its bytes to the target, a deletion first deletes half of the
folder, a rename does not happen. With ``kill_after_s`` the worker sends
SIGKILL to the child T seconds after starting it, wherever it is.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import signal
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.trainer_callback import TrainerState  # noqa: E402

import llava.train.train as train_module  # noqa: E402
from llava.train.llava_trainer import LLaVATrainer  # noqa: E402


class Events:
    """Numbers the child's write events and kills the child inside event ``kill_at``."""

    def __init__(self, path: str, kill_at: int | None, start: float) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.count = 0
        self.kill_at = kill_at
        self.start = start

    def mark(self, text: str) -> None:
        os.write(self.fd, f"- {text} @{time.monotonic() - self.start:.3f}\n".encode())

    def event(self, kind: str, target) -> bool:
        """Log the event; True if the child must die inside it."""
        self.count += 1
        name = os.path.basename(os.fspath(target)) if isinstance(target, (str, os.PathLike)) else type(target).__name__
        die = self.count == self.kill_at
        elapsed = time.monotonic() - self.start
        os.write(self.fd, f"{self.count} {kind} {name}{' KILL' if die else ''} @{elapsed:.3f}\n".encode())
        return die


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half(target, data: bytes) -> None:
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
    else:
        target.write(data[: len(data) // 2])
        target.flush()
    _die()


def _replace_everywhere(original, wrapper) -> None:
    """Rebind ``original`` to ``wrapper`` wherever a loaded module holds it (``from x import f`` included)."""
    for module in list(sys.modules.values()):
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for name, value in items:
            if value is original:
                try:
                    setattr(module, name, wrapper)
                except (AttributeError, TypeError):
                    pass


def instrument(events: Events) -> None:
    torch_save = torch.save

    @functools.wraps(torch_save)
    def save(obj, f, *args, **kwargs):
        if events.event("torch.save", f):
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            _write_half(f, buffer.getvalue())
        return torch_save(obj, f, *args, **kwargs)

    _replace_everywhere(torch_save, save)

    save_file = safetensors.torch.save_file

    @functools.wraps(save_file)
    def save_safetensors(tensors, filename, metadata=None):
        if events.event("save_file", filename):
            _write_half(filename, safetensors.torch.save(tensors, metadata=metadata))
        return save_file(tensors, filename, metadata=metadata)

    _replace_everywhere(save_file, save_safetensors)

    save_to_json = TrainerState.save_to_json

    def state_to_json(self, json_path):
        if events.event("trainer_state", json_path):
            _write_half(json_path, (json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n").encode())
        return save_to_json(self, json_path)

    TrainerState.save_to_json = state_to_json

    to_json_file = transformers.PreTrainedConfig.to_json_file

    def config_to_json(self, json_file_path, use_diff=True):
        if events.event("config", json_file_path):
            _write_half(json_file_path, self.to_json_string(use_diff=use_diff).encode())
        return to_json_file(self, json_file_path, use_diff=use_diff)

    transformers.PreTrainedConfig.to_json_file = config_to_json

    for name in ("replace", "rename"):
        move = getattr(os, name)

        def moved(src, dst, *args, _move=move, _name=name, **kwargs):
            if events.event(f"os.{_name}", dst):
                _die()
            return _move(src, dst, *args, **kwargs)

        setattr(os, name, moved)

    rmtree = shutil.rmtree

    def remove(path, *args, **kwargs):
        if events.event("rmtree", path):
            files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
            for file in files[: (len(files) + 1) // 2]:
                os.unlink(file)
            _die()
        return rmtree(path, *args, **kwargs)

    shutil.rmtree = remove

    save_checkpoint = LLaVATrainer._save_checkpoint

    def bracketed_checkpoint(self, model, trial):
        events.mark(f"save-begin checkpoint-{self.state.global_step}")
        save_checkpoint(self, model, trial)
        events.mark("save-end")

    LLaVATrainer._save_checkpoint = bracketed_checkpoint

    save_trained_model = train_module.save_trained_model

    def bracketed_final(*args, **kwargs):
        events.mark("save-begin final")
        save_trained_model(*args, **kwargs)
        events.mark("save-end")

    train_module.save_trained_model = bracketed_final


def run_child(request: dict, start: float) -> None:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(1)
    instrument(Events(request["events"], request.get("kill_at_event"), start))
    code = 0
    try:
        train_module.main(request["argv"])
    except BaseException:  # report any failure through the exit code; the log has the traceback
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            run_child(request, start)
        deadline = None if request.get("kill_after_s") is None else start + request["kill_after_s"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = None
            time.sleep(0.005)
        reply = {
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "seconds": time.monotonic() - start,
        }
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
