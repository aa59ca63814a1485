"""Multi-fidelity screening: score a candidate on a small subset first and stop there when a paired test
says it is worse than the best full-fidelity trial on the same examples. Racing (successive screens) is
several such subsets, nested prefixes of the search documents (rungs, e.g. 25, then 100, then all 500),
with the test at each: a candidate goes on to the next rung only while it is not significantly worse there.

The test is a one-sided Wilcoxon signed-rank test on per-example differences (the candidate and the best
trial answered the same questions), as Optuna's ``WilcoxonPruner`` does; it runs here, on vectors kept
in memory and stored as one user attribute per trial, instead of one ``trial.report`` (a storage write)
per example, which cost more than evaluating the candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import optuna

from evomerge.evaluate import EvalResult
from evomerge.run import Attr, structured_attr
from evomerge.scores import task_shares
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


class Screen:
    """One rung: the screening subset of each task (a prefix of the search subset's documents) and the best
    full-fidelity trial's answers on it.

    ``rung`` is its place in a race (0: the first subset, kept in a trial's ``screen`` attribute; k >= 1 in
    the k-th entry of its ``rungs`` attribute), which a resumed run reads back."""

    def __init__(self, doc_ids: dict[str, Sequence[int]], subset: SearchSubset, weights: dict[str, float],
                 trials: Iterable[optuna.trial.FrozenTrial] = (), rung: int = 0) -> None:
        self.doc_ids = doc_ids
        self.subset = subset
        self._shares = task_shares(weights)
        self.best_value: float | None = None
        self.best: list[float] | None = None
        for trial in trials:  # a resumed run: the best so far among its full-fidelity trials
            if trial.user_attrs.get(Attr.FIDELITY) == "full" and Attr.SCREEN in trial.user_attrs:
                vectors = rung_vectors(trial)
                if rung < len(vectors):
                    self.record(trial.value, vectors[rung])

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


def race(subset: SearchSubset, rungs: Sequence[int], weights: dict[str, float],
         trials: Iterable[optuna.trial.FrozenTrial] = ()) -> tuple[Screen, ...]:
    """One screen per rung size (each task's first ``size`` documents of the subset), in order."""
    finished = list(trials)
    return tuple(Screen({n: list(ids[:size]) for n, ids in subset.doc_ids.items()}, subset, weights, finished,
                        rung=k) for k, size in enumerate(rungs))
