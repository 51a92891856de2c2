"""What a model worker measures of one generation: prompt length at the decoder, first token, tokens/s."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, TextIteratorStreamer


@dataclass
class Job:
    """What one generation measured; written by its generate thread, read by the streaming response."""

    started: float
    queue_s: float
    text_tokens: int
    prompt_tokens: int | None = None  # the sequence the language model received (images spliced in)
    first_token_at: float | None = None
    last_token_at: float | None = None
    output_tokens: int = 0
    error: BaseException | None = None

    def stats(self, finished: bool) -> dict[str, Any]:
        """The chunk fields of ``protocol.AnswerStats`` plus ``finished``."""
        ttft = None if self.first_token_at is None else round(self.first_token_at - self.started, 4)
        speed = None
        if self.output_tokens > 1 and self.last_token_at and self.last_token_at > self.first_token_at:
            speed = round((self.output_tokens - 1) / (self.last_token_at - self.first_token_at), 2)
        image_tokens = None if self.prompt_tokens is None else self.prompt_tokens - self.text_tokens
        return {"image_tokens": image_tokens, "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "ttft_s": ttft, "tokens_per_s": speed, "queue_s": round(self.queue_s, 4), "finished": finished}


class PromptLengthProbe:
    """Records, for each generating thread, the length of the first sequence the language model receives.

    A forward pre-hook on the decoder reads ``inputs_embeds`` (images already spliced in) on the
    first step of ``generate``; threads are told apart so concurrent requests do not mix.
    """

    def __init__(self, decoder: torch.nn.Module) -> None:
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def attach(self, job: Job) -> None:
        """Record into ``job`` what the calling thread's next ``generate`` feeds the decoder."""
        with self._lock:
            self._jobs[threading.get_ident()] = job

    def detach(self) -> None:
        with self._lock:
            self._jobs.pop(threading.get_ident(), None)

    def _hook(self, module, args, kwargs) -> None:
        with self._lock:
            job = self._jobs.get(threading.get_ident())
        if job is None or job.prompt_tokens is not None:
            return
        sequence = kwargs.get("inputs_embeds")
        if sequence is None:
            sequence = kwargs.get("input_ids", args[0] if args else None)
        if sequence is not None:
            job.prompt_tokens = int(sequence.shape[1])


class TimedStreamer(TextIteratorStreamer):
    """``TextIteratorStreamer`` that also counts new tokens and times the first and the latest."""

    def __init__(self, tokenizer, job: Job) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job = job

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            now = time.perf_counter()
            if self.job.first_token_at is None:
                self.job.first_token_at = now
            self.job.last_token_at = now
            self.job.output_tokens += int(value.numel())
        super().put(value)


class CancelCriteria(StoppingCriteria):
    """Stops generation once ``event`` is set (client gone, stop string seen)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
