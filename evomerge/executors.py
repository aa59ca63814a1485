"""Running candidates. A Worker owns one live model on one device: it loads the base and the task vectors
once, then per candidate merges in place and evaluates (screen first, the rest only if promising). An
Executor hands candidates to workers and gives back whichever finishes first; the search loop is written
once against that contract. ``InProcessExecutor`` runs one worker in the driver; the Ray executor
(``evomerge.ray_executor``) runs one per GPU or CPU slot."""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from evomerge.dataflow import LivePath
from evomerge.errors import SpecError
from evomerge.evaluate import EvalResult, Evaluator
from evomerge.merge import DTYPES, LiveMerger
from evomerge.recipes import RecipeForm
from evomerge.refs import resolve_model_path
from evomerge.screening import Screen
from evomerge.spec import SearchSpec

Fidelity = Literal["full", "screen"]


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def include_paths(spec: SearchSpec) -> list[str]:
    """Task folders of a spec, ``demo`` standing for the built-in demo tasks."""
    from evomerge.demo import TASKS_DIR

    return [str(TASKS_DIR) if p == "demo" else p for p in spec.evaluation.include_paths]


@dataclass(frozen=True)
class Candidate:
    """One job for a worker: merge ``recipe``, score it on ``doc_ids`` of ``role`` (None: every document of
    the role). With ``screens`` (the rungs of a race, nested prefixes of ``doc_ids``), score each rung's
    subset in turn and stop at the first where the paired test prunes."""

    recipe: RecipeForm
    role: str = "search"
    doc_ids: dict[str, list[int]] | None = None
    screens: tuple[Screen, ...] = ()


@dataclass
class Outcome:
    """A finished job: the scores (None when it failed, with ``error`` saying why) and where time went."""

    result: EvalResult | None
    fidelity: Fidelity
    rung_vectors: list[list[float]] | None  # the weighted answers on each rung scored (Screen.vector)
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

    def submit(self, key: int, candidate: Candidate) -> None: ...

    def wait_any(self) -> tuple[int, Outcome]: ...

    def close(self) -> None: ...


def has_room(executor: Executor) -> bool:
    """Whether to hand over another job now: a free slot, on a worker that is up (waiting for a restarting
    one only when nothing else is in flight, so finished results are never left waiting)."""
    return executor.busy() < executor.slots() and (executor.can_submit() or not executor.busy())


def run_all(executor: Executor, jobs: dict[int, Candidate], retries: int = 2,
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


Scorer = Callable[[RecipeForm, str, "dict[str, Sequence[int]] | None"], tuple[EvalResult, float, float]]


def screen_then_rest(job: Candidate, score: Scorer, worker: str) -> Outcome:
    """A job on a scorer (recipe, role, doc ids -> result, merge s, eval s): with screens, each rung's new
    documents in turn, stopping at the first rung where the paired test prunes, then the rest of the
    documents; without, all at once."""
    if not job.screens:
        result, merge_s, eval_s = score(job.recipe, job.role, job.doc_ids)
        return Outcome(result, "full", None, merge_s, eval_s, worker)
    result, merge_s, eval_s, vectors = None, 0.0, 0.0, []
    done = dict.fromkeys(job.screens[0].doc_ids, 0)
    for screen in job.screens:
        new = {t: ids[done[t]:] for t, ids in screen.doc_ids.items()}
        if any(new.values()):
            part, part_merge_s, part_eval_s = score(job.recipe, job.role, new)
            result = part if result is None else result.merged(part)
            merge_s, eval_s = merge_s + part_merge_s, eval_s + part_eval_s
        done = {t: len(ids) for t, ids in screen.doc_ids.items()}
        vectors.append(screen.vector(result))
        if screen.prunes(vectors[-1]):
            return Outcome(result, "screen", vectors, merge_s, eval_s, worker)
    rest = {t: ids[done[t]:] for t, ids in (job.doc_ids or {}).items()}
    if any(rest.values()):
        part, part_merge_s, part_eval_s = score(job.recipe, job.role, rest)
        result, merge_s, eval_s = result.merged(part), merge_s + part_merge_s, eval_s + part_eval_s
    return Outcome(result, "full", vectors, merge_s, eval_s, worker)


class Worker:
    """One live model: merge a recipe into it in place, then score it on chosen documents."""

    def __init__(self, spec: SearchSpec, threads: int | None = None, label: str = "in-process",
                 spread: bool = False) -> None:
        """``spread``: place the model over every visible GPU (a model too large for one), else on one device.
        The inputs are placed by ``spec.inputs_on`` once the model is loaded (refused here when they cannot fit)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(spec.device)
        self.name = f"{label}:{self.device}:pid{os.getpid()}"
        base = resolve_model_path(spec.base_model)
        if spread:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[spec.dtype], device_map="auto")
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[spec.dtype]).to(self.device)
        self.model = model.eval()
        tokenizer = AutoTokenizer.from_pretrained(base)
        self.spec = spec
        dataflow = spec.space.kind == "dataflow"
        # a data-flow worker merges weights only for the hold-out check's references: built then, not before
        self._merger: LiveMerger | None = None
        if not dataflow and self.merger.vocab is not None:  # candidates speak the merged vocabulary
            tokenizer = self.merger.vocab.tokenizer
        self.paths = LivePath(self.model, [spec.base_model, *spec.models], spec.inputs_on) if dataflow else None
        self.evaluator = Evaluator(self.model, tokenizer, spec.evaluation.tasks, include_paths(spec),
                                   batch_size=spec.evaluation.batch_size)
        gc.collect()
        gc.freeze()  # the model, tasks and cached requests live as long as the worker: keep them out of GC scans

    def doc_ids(self, task: str, role: str) -> list[int]:
        return self.evaluator.doc_ids(task, role)

    def inputs(self) -> str:
        """Where this worker keeps its inputs (one line)."""
        return (self.paths or self.merger).inputs.describe()

    def _score(self, recipe: RecipeForm, role: str, doc_ids: dict[str, Sequence[int]] | None) -> tuple[EvalResult,
                                                                                                   float, float]:
        start = time.perf_counter()
        self._apply(recipe)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        merged = time.perf_counter()
        result = self.evaluator.evaluate(role, doc_ids)
        nan = [t for t, s in result.scores.items() if not math.isfinite(s)]
        if nan:
            raise FloatingPointError(f"task {nan[0]} scored {result.scores[nan[0]]}")
        return result, merged - start, time.perf_counter() - merged

    def _apply(self, recipe: RecipeForm) -> None:
        """Build ``recipe`` in the live model with its engine; a weight merge first puts back the model's own
        blocks where a layer path replaced them."""
        if recipe.engine == "weights":
            if self.paths is not None:
                self.paths.restore()
            self.merger.apply(recipe)
        elif self.paths is None:
            raise SpecError("a layer path needs a worker built for a data-flow search (space.kind: dataflow)")
        else:
            self.paths.apply(recipe)

    @property
    def merger(self) -> LiveMerger:
        if self._merger is None:
            self._merger = LiveMerger(self.model, self.spec.base_model, self.spec.models,
                                      tokenizer_source=self.spec.tokenizer_source, inputs_on=self.spec.inputs_on)
        return self._merger

    def run(self, job: Candidate) -> Outcome:
        """Do one job; any failure (an exception, NaN scores, device out of memory) is returned, not raised,
        after freeing what it held, so the worker carries on with the next candidate."""
        try:
            return screen_then_rest(job, self._score, self.name)
        except Exception as err:  # noqa: BLE001 — a candidate's failure is data for the search, not a crash
            error = f"{type(err).__name__}: {err}"[:500]
            del err
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return Outcome(None, "full", None, 0.0, 0.0, self.name, error=error)


class InProcessExecutor:
    """Runs one worker in this process, one job at a time (``wait_any`` does the work)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.name = worker.name
        self.inputs = worker.inputs()
        self._pending: list[tuple[int, Candidate]] = []

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

    def submit(self, key: int, candidate: Candidate) -> None:
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


def check_device(requested: str) -> None:
    """A device this machine has, checked before compute (the in-process executor's device)."""
    try:
        device = torch.device(requested) if requested != "auto" else None
    except RuntimeError as err:
        raise SpecError(f"device {requested!r} is not a device name ({err})") from None
    if device is None or device.type == "cpu":
        return
    if device.type != "cuda":
        raise SpecError(f"device {requested!r}: only cpu, cuda, cuda:N and auto are supported")
    count = torch.cuda.device_count()
    if count == 0 or (device.index is not None and device.index >= count):
        raise SpecError(f"device {requested!r} is not available here ({count} CUDA device(s) visible)")
