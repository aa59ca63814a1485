"""The search: an Optuna study driven by asynchronous ask/tell, resumable from its storage, then a hold-out
re-check of the best candidates.

Up to one candidate per executor slot is in flight; a freed slot gets the next ``ask`` at once and results
are told in whatever order they arrive. Budget = finished candidate evaluations (full or screened); a
failed one is retried a bounded number of times and does not count; a duplicate of an evaluated (or
in-flight) recipe reuses its score and does not count. A killed driver leaves its in-flight trials RUNNING
in the study; the next start marks them failed and queues them again, as Ctrl-C does at once.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import optuna
from optuna.trial import TrialState

from evomerge.errors import SearchError, SpecError
from evomerge.evaluate import EvalResult
from evomerge.events import Progress
from evomerge.executors import Executor, Job, Outcome, has_room, run_all
from evomerge.files import atomic_write_text
from evomerge.interrupt import CtrlC
from evomerge.racing import make_race, record_race
from evomerge.recipes import Recipe, RecipeForm
from evomerge.run import (
    Attr,
    RunFolder,
    as_text,
    counted,
    examples_scored,
    stored_recipe,
)
from evomerge.samplers import open_study
from evomerge.scores import task_shares, weighted_mean
from evomerge.space import make_space
from evomerge.spec import SearchSpec
from evomerge.subsets import AnswerStrata, FirstDocuments, SearchSubset

K = TypeVar("K")  # the key of a batch of jobs
MAX_RETRIES = 2
MAX_FAILURES_IN_ROW = 5
MAX_DUPLICATES_IN_ROW = 50


def _requeue(study: optuna.Study, trial: optuna.trial.BaseTrial, **attrs: Any) -> None:
    """Queue a trial's parameters again (its baseline label kept) with ``attrs`` added."""
    if trial.params:
        keep = {k: v for k, v in trial.user_attrs.items() if k == Attr.BASELINE}
        study.enqueue_trial(trial.params, user_attrs={**keep, **attrs})


def recover_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by an interrupted search (killed, or stopped by an exception; one search per run
    at a time, so they are all its own): mark them failed and queue their parameters again, a bounded
    number of times (a candidate that kills the driver must not be run again on every resume)."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        retry = t.user_attrs.get(Attr.RETRY, 0)
        if retry < MAX_RETRIES:
            _requeue(study, t, **{Attr.RERUN_OF: t.number, Attr.RETRY: retry + 1})
    return len(stale)


def _objective(spec: SearchSpec, result: EvalResult) -> list[float]:
    if spec.evaluation.objective == "pareto":
        return [result.scores[t.name] for t in spec.evaluation.tasks]
    return [result.score]


@dataclass
class _Flight:
    """A candidate handed to the executor and not yet told."""

    trial: optuna.Trial
    recipe: RecipeForm
    key: str
    start: float


class Search:
    """One run folder's search: ask, sample, submit (screen, then the rest, in one worker call), tell, log."""

    def __init__(self, spec: SearchSpec, run: RunFolder, executor: Executor, ctrl_c: CtrlC | None = None) -> None:
        """Opens the study of a prepared run (``prepare_run``) and reads nothing else: the space is laid out by
        the base's layout recorded in the run folder, and the models live in ``executor``'s workers."""
        self.spec = spec
        self.ctrl_c = ctrl_c or CtrlC()  # not installed: Python's own Ctrl-C handling
        self.run = run
        layout = run.read_layout()
        if layout is None:
            raise SpecError(f"{run.root} has no {run.layout_file.name}: prepare the run first (prepare_run)")
        self.space = make_space(spec, layout)
        self.executor = executor
        self.study = open_study(spec, run, self.space, self.executor.slots())
        # None until the reference models have answered the pool (``subset: answers``, a new run)
        self.subset: SearchSubset | None = self._stored_subset()
        self.rungs = make_race(self.spec.evaluation, self.subset, self.study.get_trials(deepcopy=False))
        self._seen: dict[str, tuple[int, list[float], str]] = {}  # recipe hash -> (trial, values, fidelity)
        self._flight: dict[int, _Flight] = {}
        self._waiting: dict[str, list[optuna.Trial]] = {}  # duplicates of in-flight recipes, by recipe hash
        self._failures = 0

    # ------------------------------------------------------------------ the loop

    def pool(self, size: int | None) -> dict[str, list[int]]:
        """The first ``size`` search documents of each task (None: all), in the order a search takes them."""
        return {t.name: self.executor.doc_ids(t.name, "search")[:size] for t in self.spec.evaluation.tasks}

    def _stored_subset(self) -> SearchSubset | None:
        """The search subset: the first documents, or an answer-stratified one this study chose before."""
        ev = self.spec.evaluation
        if ev.subset == "first":
            return FirstDocuments(self.pool(ev.search_examples))
        stored = self.study.user_attrs.get(Attr.SUBSET)
        return AnswerStrata.from_json(json.loads(stored)) if stored else None

    def choose_subset(self) -> None:
        """``subset: answers`` on a new run: the reference models answer the pool, the strata give the subset,
        stored in the study (with the examples it cost) before any candidate is scored."""
        if self.subset is not None:
            return
        ev = self.spec.evaluation
        pool = self.pool(ev.subset_pool)
        answers = self.reference_answers(pool)
        subset = AnswerStrata.from_answers(pool, answers, ev.search_examples)
        self.study.set_user_attr(Attr.SUBSET, as_text(subset.to_json()))
        self.study.set_user_attr(Attr.SUBSET_EXAMPLES, sum(map(_examples, answers)))
        self.subset = subset
        self.rungs = make_race(self.spec.evaluation, self.subset, self.study.get_trials(deepcopy=False))

    def reference_answers(self, pool: dict[str, list[int]]) -> list[EvalResult]:
        """Each reference model's answers on the ``pool`` search documents (what an answer subset is drawn by)."""
        jobs = {label: Job(r, "search", pool) for label, r in self.reference_recipes().items()}
        return list(self._score_all(jobs, "the reference models' answers on the subset's pool").values())

    def seed_baselines(self) -> None:
        if not self.study.get_trials(deepcopy=False):
            for label, params in self.space.baselines():
                self.study.enqueue_trial(params, user_attrs={Attr.BASELINE: label}, skip_if_exists=True)

    def finished(self) -> int:
        return sum(counted(t) for t in self.study.get_trials(deepcopy=False))

    def best(self) -> float | None:
        """Best value among full-fidelity evaluations (single objective), from the in-memory record: the
        progress display asks after every trial, so no storage query."""
        return max((values[0] for _, values, fidelity in self._seen.values() if fidelity == "full"
                    and len(values) == 1), default=None)

    def run_budget(self, budget: int, on_progress: Callable[[Progress], None] | None = None,
                   max_examples: int | None = None) -> None:
        """Evaluate until ``budget`` trials are counted, or, with ``max_examples``, until the trials have scored
        that many examples (no new candidate starts then; those in flight finish). On any exception (Ctrl-C
        included) the candidates in flight are marked failed and queued again, so a resumed search re-runs
        them."""
        recover_interrupted(self.study)
        self.choose_subset()
        self.seed_baselines()
        trials = self.study.get_trials(deepcopy=False)
        self._seen = {t.user_attrs[Attr.RECIPE_HASH]: (t.number, t.values, t.user_attrs.get(Attr.FIDELITY))
                      for t in trials if counted(t) and Attr.RECIPE_HASH in t.user_attrs}
        done, scored = self.finished(), examples_scored(self.study)
        capped = False
        try:
            while True:
                capped = max_examples is not None and scored >= max_examples
                self._dispatch(0 if capped else budget - done)
                if on_progress:
                    on_progress(Progress(done, budget, self.best(), *self.executor.workers()))
                if not self._flight:
                    break
                with self.ctrl_c.waiting():
                    number, outcome = self.executor.wait_any()
                done += self._receive(self._flight.pop(number), outcome)
                scored += _examples(outcome.result) if outcome.error is None and outcome.result else 0
        except BaseException:
            self._abandon_flight()
            raise
        if done < budget and not capped:
            raise SearchError(f"no worker left ({done} of {budget} trials finished); resume when workers are back")

    def _dispatch(self, remaining: int) -> None:
        """Fill free slots with new candidates, at most ``remaining`` in flight."""
        duplicates = 0
        while len(self._flight) < remaining and has_room(self.executor):
            trial = self.study.ask()
            recipe = self.space.sample(trial)
            key = recipe.identity()
            trial.set_user_attr(Attr.RECIPE_HASH, key)
            in_flight = any(f.key == key for f in self._flight.values())
            if key in self._seen or in_flight:
                duplicates += 1
                if duplicates >= MAX_DUPLICATES_IN_ROW:
                    self.study.tell(trial, state=TrialState.FAIL)
                    raise SearchError(f"{duplicates} duplicate recipes in a row: the space looks exhausted")
                if in_flight:
                    self._waiting.setdefault(key, []).append(trial)
                else:
                    self._tell_duplicate(trial, key)
                continue
            duplicates = 0
            trial.set_user_attr(Attr.RECIPE, as_text(recipe.model_dump(mode="json", exclude_defaults=True)))
            self._flight[trial.number] = _Flight(trial, recipe, key, time.perf_counter())
            self.executor.submit(trial.number, Job(recipe, "search", self.subset.doc_ids, self.rungs))

    def _tell_duplicate(self, trial: optuna.Trial, key: str) -> None:
        number, values, fidelity = self._seen[key]
        trial.set_user_attr(Attr.DUPLICATE_OF, number)
        trial.set_user_attr(Attr.FIDELITY, fidelity)
        self.study.tell(trial, values)

    def _receive(self, flight: _Flight, outcome: Outcome) -> int:
        """Tell one finished candidate (and its waiting duplicates); returns how many trials it counts."""
        trial, seconds = flight.trial, time.perf_counter() - flight.start
        waiting = self._waiting.pop(flight.key, [])
        if outcome.error is not None or outcome.result is None:
            self._failures += 1
            trial.set_user_attr(Attr.ERROR, outcome.error)
            self.study.tell(trial, state=TrialState.FAIL)
            for dup in waiting:
                self.study.tell(dup, state=TrialState.FAIL)
            retry = trial.user_attrs.get(Attr.RETRY, 0)
            if retry < MAX_RETRIES:
                _requeue(self.study, trial, **{Attr.RETRY: retry + 1})
            self._log(trial.number, "fail", None, flight.recipe, seconds, worker=outcome.worker, error=outcome.error)
            if self._failures >= MAX_FAILURES_IN_ROW:
                raise SearchError(f"{self._failures} candidate evaluations failed in a row; last error: "
                                  f"{outcome.error}")
            return 0
        self._failures = 0
        result = self.subset.weigh(outcome.result)
        values = _objective(self.spec, result)
        examples = _examples(result)
        trial.set_user_attr(Attr.FIDELITY, outcome.fidelity)
        trial.set_user_attr(Attr.SCORES, result.scores)
        trial.set_user_attr(Attr.EXAMPLES, examples)
        record_race(trial, self.rungs, outcome, result.score)
        self.study.tell(trial, values)
        self._seen[flight.key] = (trial.number, values, outcome.fidelity)
        for dup in waiting:
            self._tell_duplicate(dup, flight.key)
        self._log(trial.number, outcome.fidelity, result, flight.recipe, seconds, worker=outcome.worker,
                  merge_s=outcome.merge_s, eval_s=outcome.eval_s, examples=examples,
                  baseline=trial.user_attrs.get(Attr.BASELINE))
        return 1

    def _abandon_flight(self) -> None:
        """Mark every in-flight candidate failed ("interrupted") and queue it again; then the same for any
        other trial this search left RUNNING (asked but not yet submitted, duplicates waiting)."""
        for flight in self._flight.values():
            try:
                flight.trial.set_user_attr(Attr.ERROR, "interrupted")
            except RuntimeError:  # already told when the interruption came
                continue
        recover_interrupted(self.study)
        self._flight.clear()
        self._waiting.clear()

    def _log(self, number: int, state: str, result: EvalResult | None, recipe: RecipeForm, seconds: float,
             **extra: Any) -> None:
        """Append one JSON line per trial (a line cut by a kill is skipped by readers)."""
        row = {"trial": number, "state": state, "score": result.score if result else None,
               "scores": result.scores if result else None, "seconds": round(seconds, 4),
               "recipe": recipe.model_dump(mode="json", exclude_defaults=True),
               **{k: v for k, v in extra.items() if v is not None}}
        with self.run.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ the hold-out re-check

    def candidates(self) -> list[optuna.trial.FrozenTrial]:
        """The top-k full-fidelity trials (the Pareto front, ranked by weighted score, for pareto)."""
        full = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get(Attr.FIDELITY) == "full" and Attr.DUPLICATE_OF not in t.user_attrs]
        if self.spec.evaluation.objective == "pareto":
            front = {t.number for t in self.study.best_trials}
            full = [t for t in full if t.number in front]
        return sorted(full, key=lambda t: weighted_mean(t.user_attrs[Attr.SCORES], self.spec.evaluation.weights),
                      reverse=True)[: self.spec.evaluation.top_k]

    def reference_recipes(self) -> dict[str, Recipe]:
        """What the winner is compared with: each parent alone and their uniform average. With a
        ``tokenizer_source`` each is a task arithmetic of all the models on the base (a parent: weight 1, the
        others 0; equal up to float rounding), so that it has the searched vocabulary: a union depends on the
        models merged and starts from the base only when the merge reads it."""
        spec = self.spec
        if spec.tokenizer_source is None:
            refs = {f"parent {m}": Recipe(merge_method="linear", models=[{"model": m}], dtype=spec.dtype)
                    for m in spec.models}
            refs["uniform average"] = Recipe(merge_method="linear", models=[{"model": m} for m in spec.models],
                                             dtype=spec.dtype)
            return refs

        def arithmetic(weights: list[float]) -> Recipe:
            return Recipe(merge_method="task_arithmetic", base_model=spec.base_model, dtype=spec.dtype,
                          tokenizer_source=spec.tokenizer_source,
                          models=[{"model": m, "parameters": {"weight": w}} for m, w in zip(spec.models, weights,
                                                                                             strict=True)])

        refs = {f"parent {m}": arithmetic([float(o == m) for o in spec.models]) for m in spec.models}
        refs["uniform average"] = arithmetic([1 / len(spec.models)] * len(spec.models))
        return refs

    def _score_all(self, jobs: dict[K, Job], what: str = "the hold-out re-check") -> dict[K, EvalResult]:
        """Run jobs spread over the workers; their results under the jobs' keys (in the jobs' order), or
        SearchError naming ``what`` failed."""
        keys = list(jobs)
        outcomes = run_all(self.executor, {i: jobs[key] for i, key in enumerate(keys)}, waiting=self.ctrl_c.waiting)
        failed = [o.error for o in outcomes.values() if o.result is None]
        if failed or len(outcomes) < len(jobs):
            raise SearchError(f"{what} failed: {failed[0] if failed else 'no worker left'}")
        return {key: outcomes[i].result for i, key in enumerate(keys)}

    def finalize(self) -> dict[str, Any]:
        """Re-score the top-k on validation, pick the winner there, report test scores and margins."""
        candidates = self.candidates()
        if not candidates:
            raise SearchError("no trial finished at full fidelity; nothing to choose from")
        refs = self.reference_recipes()
        jobs: dict[tuple[str | int, str], Job] = {(t.number, "validation"): Job(_recipe_of(t), "validation")
                                                        for t in candidates}
        jobs |= {(label, role): Job(r, role) for label, r in refs.items() for role in ("validation", "test")}
        first = self._score_all(jobs)  # keyed (trial number or reference label, role)
        validation = {t.number: first[t.number, "validation"] for t in candidates}
        winner = max(candidates, key=lambda t: validation[t.number].score)
        winner_test = self._score_all({"test": Job(_recipe_of(winner), "test")})["test"]
        winner_label = f"winner (trial {winner.number})"
        scored = {winner_label: (validation[winner.number], winner_test)}
        scored |= {label: (first[label, "validation"], first[label, "test"]) for label in refs}
        rows = {label: {"validation": val.score, "test": test.score, "validation_tasks": val.scores,
                        "test_tasks": test.scores} for label, (val, test) in scored.items()}
        summary = {
            "winner_trial": winner.number,
            "winner_recipe": _recipe_of(winner).model_dump(mode="json", exclude_defaults=True),
            "search_score": winner.user_attrs[Attr.SCORES],
            "candidates_validation": {str(n): r.score for n, r in validation.items()},
            "table": rows,
            "margin_vs_uniform_average": paired_margin(winner_test, scored["uniform average"][1]),
            "finished_trials": self.finished(),
            "examples_scored": examples_scored(self.study),
        }
        atomic_write_text(self.run.summary, json.dumps(summary, indent=2))
        return summary


def _examples(result: EvalResult) -> int:
    return sum(len(v) for v in result.examples.values())


def _recipe_of(trial: optuna.trial.FrozenTrial) -> RecipeForm:
    return stored_recipe(trial.user_attrs[Attr.RECIPE], f"trial {trial.number}")


def paired_margin(a: EvalResult, b: EvalResult) -> dict[str, float]:
    """Weighted mean per-example difference a - b with a 95% normal interval (paired, same documents)."""
    diffs: list[float] = []
    weights: list[float] = []
    shares = task_shares(a.weights)
    for task, per_doc in a.examples.items():
        for doc, weight in a.example_weights(task, per_doc).items():
            diffs.append(per_doc[doc] - b.examples[task][doc])
            weights.append(shares[task] * weight)
    mean = sum(w * d for w, d in zip(weights, diffs, strict=True))
    variance = sum(w * w * (d - mean) ** 2 for w, d in zip(weights, diffs, strict=True)) * len(diffs) / max(
        1, len(diffs) - 1)
    half = 1.96 * math.sqrt(variance)
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}
