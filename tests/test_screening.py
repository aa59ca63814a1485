"""Screening: the paired test's decisions, and a search that stops clearly worse candidates early."""

import itertools

import pytest
from optuna.trial import TrialState
from test_search import SPEC

from evomerge.evaluate import EvalResult
from evomerge.run import Attr, RunFolder, structured_attr
from evomerge.scores import weighted_mean
from evomerge.screening import P_THRESHOLD, Screen, significantly_worse
from evomerge.search import Search, prepare_run
from evomerge.spec import SearchSpec


def exact_signed_rank_p(diffs: list[float]) -> float:
    """P(W+ <= observed) over all 2^n sign flips (distinct nonzero |d|): the one-sided exact p-value."""
    ranks = {d: r for r, d in enumerate(sorted(diffs, key=abs), start=1)}
    observed = sum(ranks[d] for d in diffs if d > 0)
    rank_values = list(ranks.values())
    hits = sum(sum(r for r, s in zip(rank_values, signs, strict=True) if s) <= observed
               for signs in itertools.product([False, True], repeat=len(diffs)))
    return hits / 2 ** len(diffs)


@pytest.mark.parametrize("diffs", [
    [-1, -2, -3, -4, -5, -6, 7, -8, -9, -10],  # clearly worse
    [-1, 2, -3, 4, -5, -6, 7, -8, -9, -10],  # worse on average, near the threshold
    [-1, 2, -3, 4, -5, 6, 7, -8, -9, -10],  # worse on average, not significantly
])
def test_decision_matches_exact_signed_rank_test(diffs):
    best = [20.0] * len(diffs)
    candidate = [20.0 + d for d in diffs]
    assert significantly_worse(candidate, best) == (exact_signed_rank_p(diffs) < P_THRESHOLD)


def test_equal_or_better_is_never_pruned():
    best = [1.0, 0.0, 1.0, 1.0, 0.0] * 8
    assert not significantly_worse(best, best)
    assert not significantly_worse([1.0] * 40, best)
    assert significantly_worse([0.0] * 40, best)


def test_screen_keeps_the_best_full_trial():
    screen = Screen({"a": [0, 1], "b": [5]}, {"a": 1.0, "b": 3.0})
    assert not screen.prunes([0.0, 0.0, 0.0])  # nothing to compare with yet
    screen.record(0.5, [0.1, 0.2, 0.3])
    screen.record(0.4, [0.0, 0.0, 0.0])
    assert screen.best_value == 0.5 and screen.best == [0.1, 0.2, 0.3]


def test_screen_vector_sums_to_the_weighted_score():
    weights = {"a": 1.0, "b": 3.0}
    screen = Screen({"a": [0, 1, 2], "b": [5]}, weights)
    result = EvalResult({}, {"a": {0: 1.0, 1: 0.0, 2: 1.0, 7: 0.0}, "b": {5: 0.0}}, weights)
    assert screen.vector(result) == pytest.approx([0.25 / 3, 0.0, 0.25 / 3, 0.0])
    assert sum(screen.vector(result)) == pytest.approx(weighted_mean({"a": 2 / 3, "b": 0.0}, weights))


def test_search_screens_out_a_worse_parent_with_one_write_per_trial(tmp_path):
    spec = SearchSpec.model_validate(SPEC)  # 15 screening examples of 40 per task, demo_reverse weighted 2
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 2, force=False)
    search = Search(spec, run)
    search.run_budget(2)  # the uniform average (full: nothing to compare with), then demo:add alone
    average, add_alone = search.study.get_trials(states=(TrialState.COMPLETE,))
    assert add_alone.user_attrs["baseline"] == "demo:add alone"
    assert (average.user_attrs["fidelity"], add_alone.user_attrs["fidelity"]) == ("full", "screen")
    assert add_alone.value < average.value
    assert len(structured_attr(add_alone, Attr.SCREEN)) == 30 and not add_alone.intermediate_values
    weighted = sum(structured_attr(add_alone, Attr.SCREEN))
    assert weighted == pytest.approx(add_alone.value)  # the weighted screen vector sums to the screen score

    resumed = Search(spec, run, executor=search.executor)
    assert resumed.screen.best_value == pytest.approx(average.value)
    assert resumed.screen.best == structured_attr(average, Attr.SCREEN)
