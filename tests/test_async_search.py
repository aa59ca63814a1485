"""The asynchronous search loop against the executor contract, with a model-free executor whose jobs finish
out of order and sometimes fail; and a real worker turning failures into failed outcomes."""

import math
import random

import pytest
from helpers import SPEC
from optuna.trial import TrialState

from evomerge.async_cmaes import AsyncCmaEsSampler
from evomerge.errors import SearchError
from evomerge.evaluate import EvalResult
from evomerge.executors import InProcessExecutor, Job, Outcome, run_all
from evomerge.launch import prepare_run
from evomerge.racing import run_race
from evomerge.recipes import Recipe
from evomerge.run import Attr, RunFolder, counted, structured_attr
from evomerge.search import Search
from evomerge.spec import SearchSpec
from evomerge.worker import Worker


class ShuffledExecutor:
    """Holds up to ``slots`` jobs and finishes a random one of them on each ``wait_any``, through the workers'
    own screen-then-rest logic; a recipe's quality is a fixed function of its weights and a document is
    answered right when its difficulty is below that quality; jobs whose key is in ``fail`` come back
    failed."""

    def __init__(self, slots: int, seed: int = 0, fail: set[int] = frozenset(), die_after: int | None = None):
        self.name = "shuffled"
        self._slots = slots
        self._rng = random.Random(seed)
        self._jobs: dict[int, Job] = {}
        self.fail = set(fail)
        self.die_after = die_after
        self.finished = 0
        self.max_busy = 0

    def slots(self) -> int:
        return 0 if self.die_after is not None and self.finished >= self.die_after else self._slots

    def busy(self) -> int:
        return len(self._jobs)

    def can_submit(self) -> bool:
        return len(self._jobs) < self.slots()

    def workers(self) -> tuple[int, int]:
        return len(self._jobs), self.slots()

    def doc_ids(self, task: str, role: str) -> list[int]:
        return list(range(60))

    def submit(self, key: int, candidate: Job) -> None:
        assert key not in self._jobs and len(self._jobs) < self._slots
        self._jobs[key] = candidate
        self.max_busy = max(self.max_busy, len(self._jobs))

    def _score(self, recipe: Recipe, role: str, doc_ids: dict | None) -> tuple[EvalResult, float, float]:
        weights = [e.parameters["weight"] for e in recipe.models]
        flat = [v.value if hasattr(v, "value") else v for w in weights for v in (w if isinstance(w, list) else [w])]
        quality = 1.0 - 2 * sum((x - 0.6) ** 2 for x in flat) / len(flat)
        ids = doc_ids or {t: self.doc_ids(t, role) for t in ("demo_add", "demo_reverse")}
        examples = {t: {d: float((d * 0.618034 + len(t)) % 1 < quality) for d in docs} for t, docs in ids.items()}
        scores = {t: sum(v.values()) / len(v) for t, v in examples.items()}
        return EvalResult(scores, examples, {"demo_add": 1.0, "demo_reverse": 2.0}), 0.0, 0.0

    def wait_any(self) -> tuple[int, Outcome]:
        key = self._rng.choice(sorted(self._jobs))
        job = self._jobs.pop(key)
        self.finished += 1
        if key in self.fail:
            return key, Outcome(None, "full", None, 0.0, 0.0, "shuffled", error="RuntimeError: planted")
        return key, run_race(job, self._score, "shuffled")

    def close(self) -> None:
        self._jobs.clear()


def no_screen_spec(**changes) -> SearchSpec:
    evaluation = {**SPEC["evaluation"], "screen_examples": None}
    return SearchSpec.model_validate({**SPEC, "evaluation": evaluation, **changes})


@pytest.mark.slow
def test_out_of_order_results_count_exactly_the_budget(tmp_path):
    spec = no_screen_spec()
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 12, force=False)
    executor = ShuffledExecutor(slots=3, fail={4, 9})
    search = Search(spec, run, executor)
    search.run_budget(12)
    trials = search.study.get_trials()
    assert sum(counted(t) for t in trials) == 12
    assert executor.max_busy == 3 and executor.busy() == 0
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [4, 9] and all(t.user_attrs[Attr.ERROR] for t in failed)
    for bad in failed:  # each failed candidate was queued again with the same parameters
        retries = [t for t in trials if t.params == bad.params and t.number != bad.number]
        assert retries and retries[0].user_attrs[Attr.RETRY] == 1 and retries[0].state == TrialState.COMPLETE
    log = [row["trial"] for row in run.log_rows()]
    assert sorted(log) == sorted({*log}) and len(log) == 14  # one line per finished or failed trial
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_screening_reference_follows_results_in_any_order(tmp_path):
    spec = SearchSpec.model_validate(SPEC)  # 15 screening examples of 40 per task
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 30, force=False)
    search = Search(spec, run, ShuffledExecutor(slots=3, seed=2))
    search.run_budget(30)
    trials = [t for t in search.study.get_trials() if counted(t)]
    full = [t for t in trials if t.user_attrs[Attr.FIDELITY] == "full"]
    screened = [t for t in trials if t.user_attrs[Attr.FIDELITY] == "screen"]
    assert len(trials) == 30 and full and screened
    assert all(len(structured_attr(t, Attr.SCREEN)) == 30 and t.user_attrs[Attr.EXAMPLES] == 30 for t in screened)
    assert all(t.user_attrs[Attr.EXAMPLES] == 80 for t in full)
    best = max(full, key=lambda t: t.value)  # the reference is the best full trial, whatever the arrival order
    (screen,) = search.rungs
    assert screen.best_value == best.value and screen.best == structured_attr(best, Attr.SCREEN)
    resumed = Search(spec, run, ShuffledExecutor(slots=3))
    (screen,) = resumed.rungs
    assert screen.best_value == best.value and screen.best == structured_attr(best, Attr.SCREEN)


def test_duplicate_of_a_candidate_in_flight_waits_for_it(tmp_path):
    spec = no_screen_spec(space={**SPEC["space"], "granularity": "global"})
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 4, force=False)
    search = Search(spec, run, ShuffledExecutor(slots=4, seed=1))
    same = {"weight[m0][all]": 0.3, "weight[m1][all]": 0.9}
    search.study.enqueue_trial(same)
    search.study.enqueue_trial(same)
    search.run_budget(4)
    trials = search.study.get_trials()
    first, second = trials[0], trials[1]
    assert second.user_attrs[Attr.DUPLICATE_OF] == first.number and second.values == first.values
    assert sum(counted(t) for t in trials) == 4 and len(trials) == 5


def test_failures_in_a_row_stop_the_search_and_requeue_what_was_in_flight(tmp_path):
    spec = no_screen_spec()
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 20, force=False)
    search = Search(spec, run, ShuffledExecutor(slots=2, fail=set(range(100))))
    with pytest.raises(SearchError, match="5 candidate evaluations failed in a row"):
        search.run_budget(20)
    trials = search.study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.user_attrs.get(Attr.ERROR) == "interrupted"]
    assert len(interrupted) == 1  # the other slot's candidate, failed and queued to run again
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert any(t.user_attrs.get(Attr.RERUN_OF) == interrupted[0].number for t in queued)


def test_search_stops_when_no_worker_is_left(tmp_path):
    spec = no_screen_spec()
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 10, force=False)
    with pytest.raises(SearchError, match="no worker left"):
        Search(spec, run, ShuffledExecutor(slots=2, die_after=3)).run_budget(10)


def test_cmaes_population_follows_the_space_not_the_workers(tmp_path):
    """``cmaes`` learns from late trials, so its generation need not hold every candidate in flight;
    Optuna's generation-bound CMA-ES (``cmaes-generations``) still gets a population of at least the workers."""
    spec = no_screen_spec()
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 1, force=False)
    default = 4 + math.floor(3 * math.log(4))
    for slots in (1, 16):
        sampler = Search(spec, run, ShuffledExecutor(slots=slots)).study.sampler
        assert isinstance(sampler, AsyncCmaEsSampler) and sampler.popsize == default
    generations = spec.model_copy(update={"sampler": "cmaes-generations"})
    assert Search(generations, run, ShuffledExecutor(slots=16)).study.sampler._popsize == 16
    assert Search(generations, run, ShuffledExecutor(slots=1)).study.sampler._popsize == default


@pytest.fixture(scope="module")
def worker():
    return Worker(SearchSpec.model_validate(SPEC))


@pytest.mark.slow
def test_worker_returns_failures_instead_of_raising(worker, monkeypatch):
    good = Recipe(merge_method="linear", models=[{"model": "demo:add"}, {"model": "demo:reverse"}])
    ids = {"demo_add": [0, 1, 2], "demo_reverse": [0, 1]}
    ok = worker.run(Job(good, "search", ids))
    assert ok.error is None and set(ok.result.examples["demo_add"]) == {0, 1, 2}

    foreign = Recipe(merge_method="linear", models=[{"model": "demo:add"}, {"model": "demo:sort"}])
    failed = worker.run(Job(foreign, "search", ids))
    assert failed.result is None and "SpecError" in failed.error and "demo:sort" in failed.error

    real = worker.evaluator.evaluate

    def nan_scores(role, doc_ids=None):
        result = real(role, doc_ids)
        result.scores["demo_add"] = float("nan")
        return result

    monkeypatch.setattr(worker.evaluator, "evaluate", nan_scores)
    nan = worker.run(Job(good, "search", ids))
    assert nan.result is None and "demo_add scored nan" in nan.error

    def out_of_memory(role, doc_ids=None):
        raise __import__("torch").OutOfMemoryError("CUDA out of memory (planted)")

    monkeypatch.setattr(worker.evaluator, "evaluate", out_of_memory)
    oom = worker.run(Job(good, "search", ids))
    assert oom.result is None and "OutOfMemoryError" in oom.error
    monkeypatch.setattr(worker.evaluator, "evaluate", real)
    again = worker.run(Job(good, "search", ids))  # the worker carries on
    assert again.result.scores == ok.result.scores


def test_run_all_spreads_a_batch_and_keeps_keys(worker):
    executor = InProcessExecutor(worker)
    recipes = [Recipe(merge_method="linear", models=[{"model": m}]) for m in ("demo:add", "demo:reverse")]
    jobs = {7: Job(recipes[0], "validation", {"demo_add": [0, 1], "demo_reverse": [0]}),
            3: Job(recipes[1], "validation", {"demo_add": [0], "demo_reverse": [1, 2]})}
    outcomes = run_all(executor, jobs)
    assert set(outcomes) == {7, 3}
    assert set(outcomes[3].result.examples["demo_reverse"]) == {1, 2}
