"""A model worker's admission: ``limit`` generation slots and a bounded FIFO queue in front of them."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


class QueueFull(RuntimeError):
    """Every slot and every queue place is taken."""


@dataclass(eq=False)
class Ticket:
    """One request's place: waiting, then granted a slot, then released."""

    granted: bool = False
    released: bool = False
    in_generation: bool = False  # a generate thread holds the slot and releases it when it ends
    arrived: float = field(default_factory=time.perf_counter)


class AdmissionGate:
    """``limit`` generation slots and a FIFO queue of at most ``max_queued`` waiting requests.

    Args:
        limit: Requests generating at once (``--limit-model-concurrency``).
        max_queued: Requests allowed to wait for a slot; more are refused with ``QueueFull``.
    """

    def __init__(self, limit: int, max_queued: int) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self._running = 0
        self._waiting: deque[Ticket] = deque()
        self._cond = threading.Condition()

    def enter(self) -> Ticket:
        """A ticket holding a slot, or waiting in the queue; ``QueueFull`` when the queue is full too."""
        ticket = Ticket()
        with self._cond:
            if self._running < self.limit and not self._waiting:
                self._running += 1
                ticket.granted = True
            elif len(self._waiting) >= self.max_queued:
                raise QueueFull(
                    f"The worker is busy: {self._running} requests are generating (--limit-model-concurrency "
                    f"{self.limit}) and {len(self._waiting)} are waiting (--max-queued-requests {self.max_queued}). "
                    f"Retry in a moment, or start the worker with a larger --max-queued-requests."
                )
            else:
                self._waiting.append(ticket)
        return ticket

    def wait(self, ticket: Ticket, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``ticket``'s slot; True once it holds one."""
        with self._cond:
            return self._cond.wait_for(lambda: ticket.granted, timeout)

    def position(self, ticket: Ticket) -> int:
        """1 for the next request to get a slot; 0 once ``ticket`` holds one (or left the queue)."""
        with self._cond:
            return self._waiting.index(ticket) + 1 if ticket in self._waiting else 0

    def release(self, ticket: Ticket) -> None:
        """Give back ``ticket``'s slot, or its place in the queue; calling it again does nothing."""
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            if ticket.granted:
                self._running -= 1
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            while self._running < self.limit and self._waiting:
                self._waiting.popleft().granted = True
                self._running += 1
            self._cond.notify_all()

    @property
    def queue_length(self) -> int:
        """Requests generating plus requests waiting (upstream's ``queue_length``)."""
        with self._cond:
            return self._running + len(self._waiting)
