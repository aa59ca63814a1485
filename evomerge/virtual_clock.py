"""A cluster of W workers replayed on one: for benchmarks and tests of the asynchronous search, not for users.

Every job is merged and scored for real by one worker in this process, but it finishes at a simulated time: the
moment a simulated worker took it (the clock when it was submitted) plus a duration drawn from a candidate-time
model (``CandidateTime``), and ``wait_any`` hands back the job that finishes first in simulated time. A search at
8, 64 or 256 workers then sees the very order of results such a cluster would give it, with the real fitness.
The duration follows what the job did (a candidate stopped at a race's first rung finishes early), so each job
is run when it is submitted; its outcome waits, unseen, until the clock reaches its finish.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, replace
from typing import Protocol

from evomerge.executors import Job, JobRunner, Outcome


class CandidateTime(Protocol):
    """A candidate's simulated duration in seconds, from its outcome (what it scored), drawn with ``rng``."""

    def __call__(self, outcome: Outcome, rng: random.Random) -> float: ...


@dataclass(frozen=True)
class PerExample:
    """``merge_s`` + ``example_s`` per example scored, times log-normal noise of spread ``sigma`` (GPU workers
    differ and so do documents); a failed job costs its merge. Defaults: a 1B model on one GPU, 500 examples
    in about 40 s."""

    merge_s: float = 2.0
    example_s: float = 0.076
    sigma: float = 0.2

    def __call__(self, outcome: Outcome, rng: random.Random) -> float:
        examples = 0 if outcome.result is None else sum(map(len, outcome.result.examples.values()))
        return (self.merge_s + self.example_s * examples) * math.exp(rng.gauss(0.0, self.sigma))


class VirtualClockExecutor:
    """``workers`` simulated workers over one real ``worker``; ``now`` is the simulated time in seconds (the
    finish of the last job handed back). Each job's outcome names the simulated worker that ran it
    (``virtual-I``), and its merge and evaluation times are the simulated ones, in proportion to the real."""

    def __init__(self, worker: JobRunner, workers: int, duration: CandidateTime = PerExample(), seed: int = 0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.worker = worker
        self.name = f"virtual clock ({workers} workers over {worker.name})"
        self.inputs = worker.inputs()
        self.now = 0.0
        self._workers = workers
        self._duration = duration
        self._rng = random.Random(seed)
        self._free = list(range(workers))  # simulated workers without a job, as a heap: the lowest takes the next
        self._running: list[tuple[float, int, int, int, Outcome]] = []  # (finish, order, key, worker, outcome)
        self._submitted = 0

    def slots(self) -> int:
        return self._workers

    def busy(self) -> int:
        return len(self._running)

    def can_submit(self) -> bool:
        return bool(self._free)

    def workers(self) -> tuple[int, int]:
        return len(self._running), self._workers

    def doc_ids(self, task: str, role: str) -> list[int]:
        return self.worker.doc_ids(task, role)

    def submit(self, key: int, job: Job) -> None:
        if not self._free:
            raise RuntimeError(f"all {self._workers} simulated workers have a job")
        slot = heapq.heappop(self._free)
        outcome = self.worker.run(job)
        seconds = self._duration(outcome, self._rng)
        real = outcome.merge_s + outcome.eval_s
        merge_s = seconds * outcome.merge_s / real if real > 0 else 0.0
        outcome = replace(outcome, worker=f"virtual-{slot}", merge_s=merge_s, eval_s=seconds - merge_s)
        heapq.heappush(self._running, (self.now + seconds, self._submitted, key, slot, outcome))
        self._submitted += 1

    def wait_any(self) -> tuple[int, Outcome]:
        """The job that finishes first in simulated time (the one submitted first on a tie); the clock moves there."""
        if not self._running:
            raise RuntimeError("no job in flight")
        finish, _, key, slot, outcome = heapq.heappop(self._running)
        self.now = finish
        heapq.heappush(self._free, slot)
        return key, outcome

    def close(self) -> None:
        self._running.clear()
        self._free = list(range(self._workers))
