"""The contract between the search and whatever runs its jobs: a Job (a recipe to merge and the documents
to score it on), its Outcome, and the Executor that hands jobs to workers and gives back whichever finishes
first; the search loop is written once against it. ``InProcessExecutor`` runs one worker
(``evomerge.worker.Worker``, a live model) in the driver; the Ray executor (``evomerge.ray_executor``) runs one
per GPU or CPU slot. No torch here: the driver's side of the seam."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from evomerge.evaluate import EvalResult
    from evomerge.racing import Rung
    from evomerge.recipes import RecipeForm

Fidelity = Literal["full", "screen"]


@dataclass(frozen=True)
class Job:
    """One job for a worker: merge ``recipe``, score it on ``doc_ids`` of ``role`` (None: every document of
    the role). With ``rungs`` (a race, nested prefixes of ``doc_ids``: ``evomerge.racing``), score each rung's
    subset in turn and stop at the first where the paired test prunes."""

    recipe: RecipeForm
    role: str = "search"
    doc_ids: dict[str, list[int]] | None = None
    rungs: tuple[Rung, ...] = ()


@dataclass
class Outcome:
    """A finished job: the scores (None when it failed, with ``error`` saying why) and where time went."""

    result: EvalResult | None
    fidelity: Fidelity
    rung_vectors: list[list[float]] | None  # the weighted answers on each rung scored (Rung.vector)
    merge_s: float
    eval_s: float
    worker: str
    error: str | None = None
    worker_lost: bool = False  # failed because its worker process died, not because of the candidate


class Executor(Protocol):
    """The contract between the search and whatever runs candidates.

    ``submit`` hands over a job under a key the caller chooses (a trial number) and returns at once;
    ``wait_any`` blocks until some submitted job is done and returns its key and Outcome, in whatever order
    jobs finish. A job that fails (raises, NaN, out of memory, its worker died) comes back as an Outcome
    with ``error`` set, never as an exception. ``slots`` is how many jobs may be in flight at once (0: no
    worker left); ``can_submit`` says whether a job handed over now starts without waiting for a worker to
    come back (a restarting one); ``busy`` is how many jobs are in flight, and callers keep it below
    ``slots``. ``workers`` is (workers with a job, workers alive), for the progress display; ``inputs`` says
    where the workers keep the models they merge from (a line per kind of worker)."""

    name: str
    inputs: str

    def slots(self) -> int: ...

    def can_submit(self) -> bool: ...

    def busy(self) -> int: ...

    def workers(self) -> tuple[int, int]: ...

    def doc_ids(self, task: str, role: str) -> list[int]: ...

    def submit(self, key: int, candidate: Job) -> None: ...

    def wait_any(self) -> tuple[int, Outcome]: ...

    def close(self) -> None: ...


def has_room(executor: Executor) -> bool:
    """Whether to hand over another job now: a free slot, on a worker that is up (waiting for a restarting
    one only when nothing else is in flight, so finished results are never left waiting)."""
    return executor.busy() < executor.slots() and (executor.can_submit() or not executor.busy())


def run_all(executor: Executor, jobs: dict[int, Job], retries: int = 2,
            waiting: Callable[[], AbstractContextManager[None]] = nullcontext) -> dict[int, Outcome]:
    """Run a batch of jobs with every slot busy; a job whose worker died runs again (``retries`` times at
    most). Returns the outcomes by key (fewer when no worker is left). ``waiting`` wraps each wait (where
    Ctrl-C may stop it: ``CtrlC.waiting``)."""
    queue = list(jobs.items())
    tries = dict.fromkeys(jobs, 0)
    done: dict[int, Outcome] = {}
    while queue or executor.busy():
        while queue and has_room(executor):
            executor.submit(*queue.pop(0))
        if not executor.busy():
            break
        with waiting():
            key, outcome = executor.wait_any()
        if outcome.worker_lost and tries[key] < retries:
            tries[key] += 1
            queue.append((key, jobs[key]))
            continue
        done[key] = outcome
    return done


class JobRunner(Protocol):
    """What an executor in this process needs of a worker (``evomerge.worker.Worker``): its name, where it keeps
    its inputs, a task's documents of a role, and ``run``, which does one job and returns its Outcome (a failure
    as an Outcome with ``error``, never an exception)."""

    name: str

    def inputs(self) -> str: ...

    def doc_ids(self, task: str, role: str) -> list[int]: ...

    def run(self, job: Job) -> Outcome: ...


class InProcessExecutor:
    """Runs one worker in this process, one job at a time (``wait_any`` does the work)."""

    def __init__(self, worker: JobRunner) -> None:
        self.worker = worker
        self.name = worker.name
        self.inputs = worker.inputs()
        self._pending: list[tuple[int, Job]] = []

    def slots(self) -> int:
        return 1

    def busy(self) -> int:
        return len(self._pending)

    def can_submit(self) -> bool:
        return not self._pending

    def workers(self) -> tuple[int, int]:
        return len(self._pending), 1

    def doc_ids(self, task: str, role: str) -> list[int]:
        return self.worker.doc_ids(task, role)

    def submit(self, key: int, candidate: Job) -> None:
        if self._pending:
            raise RuntimeError("the in-process executor runs one job at a time")
        self._pending.append((key, candidate))

    def wait_any(self) -> tuple[int, Outcome]:
        key, candidate = self._pending[0]
        try:
            return key, self.worker.run(candidate)
        finally:
            self._pending.clear()

    def close(self) -> None:
        self._pending.clear()


