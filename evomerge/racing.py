"""Racing: score a candidate on nested subsets of its search documents (rungs: each task's first 25, then 100,
then all 500 documents, say), and stop at the first rung where a paired test says it is worse than the best
full-fidelity trial on the same examples. One screen is a race of one rung. Everything a race is lives here:
its rungs (``make_race``), the test (``significantly_worse``), a worker running a job through them
(``run_race``), and what a finished job leaves in its trial for a resumed run to read back (``record_race``).

The test is a one-sided Wilcoxon signed-rank test on per-example differences (the candidate and the best
trial answered the same questions), as Optuna's ``WilcoxonPruner`` does; it runs here, on vectors kept
in memory and stored as one user attribute per trial, instead of one ``trial.report`` (a storage write)
per example, which cost more than evaluating the candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import optuna

from evomerge.evaluate import EvalResult
from evomerge.executors import Job, Outcome
from evomerge.recipes import RecipeForm
from evomerge.run import Attr, as_text, structured_attr
from evomerge.scores import task_shares
from evomerge.spec import EvaluationSpec
from evomerge.subsets import SearchSubset

P_THRESHOLD = 0.1


def significantly_worse(candidate: Sequence[float], best: Sequence[float], p_threshold: float = P_THRESHOLD) -> bool:
    """Whether ``candidate`` is worse than ``best`` on the same examples at level ``p_threshold``.
    Ties (zero differences) are split between the signs, so equal answers weigh against pruning."""
    from scipy.stats import wilcoxon  # scipy.stats takes seconds to import: only a race that screens needs it

    diffs = [c - b for c, b in zip(candidate, best, strict=True)]
    if sum(diffs) >= 0:
        return False
    return float(wilcoxon(diffs, alternative="less", zero_method="zsplit").pvalue) < p_threshold


class Rung:
    """One rung of a race: each task's documents scored by then (a prefix of the search subset's) and the best
    full-fidelity trial's answers on them.

    ``place`` is its place in the race (0: the first rung, kept in a trial's ``screen`` attribute; k >= 1 in
    the k-th entry of its ``rungs`` attribute), which a resumed run reads back."""

    def __init__(self, doc_ids: dict[str, Sequence[int]], subset: SearchSubset, weights: dict[str, float],
                 trials: Iterable[optuna.trial.FrozenTrial] = (), place: int = 0) -> None:
        self.doc_ids = doc_ids
        self.subset = subset
        self._shares = task_shares(weights)
        self.best_value: float | None = None
        self.best: list[float] | None = None
        for trial in trials:  # a resumed run: the best so far among its full-fidelity trials
            if trial.user_attrs.get(Attr.FIDELITY) == "full" and Attr.SCREEN in trial.user_attrs:
                vectors = rung_vectors(trial)
                if place < len(vectors):
                    self.record(trial.value, vectors[place])

    def vector(self, result: EvalResult) -> list[float]:
        """Per-example scores in a fixed order, each weighted so that their sum is the weighted score."""
        return [self._shares[t] * share * result.examples[t][d] for t, ids in self.doc_ids.items()
                for d, share in self.subset.shares(result, t, ids).items()]

    def prunes(self, vector: Sequence[float]) -> bool:
        return self.best is not None and significantly_worse(vector, self.best)

    def record(self, value: float, vector: Sequence[float]) -> None:
        """Note a full-fidelity trial; it becomes the reference when it beats the best so far."""
        if self.best_value is None or value > self.best_value:
            self.best_value, self.best = value, list(vector)


def rung_vectors(trial: optuna.trial.FrozenTrial) -> list[list[float]]:
    """A trial's weighted answers on each rung it was scored on (first rung first)."""
    rest = structured_attr(trial, Attr.RUNGS) if Attr.RUNGS in trial.user_attrs else []
    return [structured_attr(trial, Attr.SCREEN), *rest]


def race(subset: SearchSubset, sizes: Sequence[int], weights: dict[str, float],
         trials: Iterable[optuna.trial.FrozenTrial] = ()) -> tuple[Rung, ...]:
    """One rung per size (each task's first ``size`` documents of the subset), in order; ``trials``: a resumed
    run's, whose best full-fidelity answers each rung starts from."""
    finished = list(trials)
    return tuple(Rung({n: list(ids[:size]) for n, ids in subset.doc_ids.items()}, subset, weights, finished,
                      place=k) for k, size in enumerate(sizes))


def make_race(evaluation: EvaluationSpec, subset: SearchSubset | None,
              trials: Iterable[optuna.trial.FrozenTrial]) -> tuple[Rung, ...]:
    """A search's race: its ``rungs`` over the search subset when it screens (``screen_examples``, a weighted
    objective: a Pareto front has no single best to compare with); none before the subset is chosen."""
    if evaluation.screen_examples is None or evaluation.objective != "weighted" or subset is None:
        return ()
    return race(subset, evaluation.rungs, evaluation.weights, trials)


Scorer = Callable[[RecipeForm, str, "dict[str, Sequence[int]] | None"], tuple[EvalResult, float, float]]


def run_race(job: Job, score: Scorer, worker: str) -> Outcome:
    """A job on a scorer (recipe, role, doc ids -> result, merge s, eval s): with rungs, each rung's new
    documents in turn, stopping at the first rung where the paired test prunes, then the rest of the
    documents; without, all at once."""
    if not job.rungs:
        result, merge_s, eval_s = score(job.recipe, job.role, job.doc_ids)
        return Outcome(result, "full", None, merge_s, eval_s, worker)
    result, merge_s, eval_s, vectors = None, 0.0, 0.0, []
    done = dict.fromkeys(job.rungs[0].doc_ids, 0)
    for rung in job.rungs:
        new = {t: ids[done[t]:] for t, ids in rung.doc_ids.items()}
        if any(new.values()):
            part, part_merge_s, part_eval_s = score(job.recipe, job.role, new)
            result = part if result is None else result.merged(part)
            merge_s, eval_s = merge_s + part_merge_s, eval_s + part_eval_s
        done = {t: len(ids) for t, ids in rung.doc_ids.items()}
        vectors.append(rung.vector(result))
        if rung.prunes(vectors[-1]):
            return Outcome(result, "screen", vectors, merge_s, eval_s, worker)
    rest = {t: ids[done[t]:] for t, ids in (job.doc_ids or {}).items()}
    if any(rest.values()):
        part, part_merge_s, part_eval_s = score(job.recipe, job.role, rest)
        result, merge_s, eval_s = result.merged(part), merge_s + part_merge_s, eval_s + part_eval_s
    return Outcome(result, "full", vectors, merge_s, eval_s, worker)


def record_race(trial: optuna.Trial, rungs: Sequence[Rung], outcome: Outcome, score: float) -> None:
    """The driver's side of a finished job: its answers on each rung into ``trial`` (for a resumed run), and,
    when it ran the whole race, into the rungs, as the best so far where it beats it."""
    if not outcome.rung_vectors:
        return
    trial.set_user_attr(Attr.SCREEN, as_text(outcome.rung_vectors[0]))
    if len(outcome.rung_vectors) > 1:
        trial.set_user_attr(Attr.RUNGS, as_text(outcome.rung_vectors[1:]))
    if outcome.fidelity == "full":
        for rung, vector in zip(rungs, outcome.rung_vectors, strict=True):
            rung.record(score, vector)
