"""Screening: the paired test's decisions, and a search that stops clearly worse candidates early."""

import itertools
import random
import subprocess
import sys

import pytest
import yaml
from helpers import CLI_ENV, SPEC, in_process, sigkill_at
from optuna.trial import TrialState

from evomerge.evaluate import EvalResult
from evomerge.launch import prepare_run
from evomerge.racing import P_THRESHOLD, Rung, rung_vectors, significantly_worse
from evomerge.run import Attr, RunFolder, counted, structured_attr
from evomerge.scores import weighted_mean
from evomerge.search import Search
from evomerge.spec import SearchSpec
from evomerge.subsets import FirstDocuments


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
    screen = Rung({"a": [0, 1], "b": [5]}, FirstDocuments({"a": [0, 1], "b": [5]}), {"a": 1.0, "b": 3.0})
    assert not screen.prunes([0.0, 0.0, 0.0])  # nothing to compare with yet
    screen.record(0.5, [0.1, 0.2, 0.3])
    screen.record(0.4, [0.0, 0.0, 0.0])
    assert screen.best_value == 0.5 and screen.best == [0.1, 0.2, 0.3]


def test_screen_vector_sums_to_the_weighted_score():
    weights = {"a": 1.0, "b": 3.0}
    screen = Rung({"a": [0, 1, 2], "b": [5]}, FirstDocuments({"a": [0, 1, 2, 7], "b": [5]}), weights)
    result = EvalResult({}, {"a": {0: 1.0, 1: 0.0, 2: 1.0, 7: 0.0}, "b": {5: 0.0}}, weights)
    assert screen.vector(result) == pytest.approx([0.25 / 3, 0.0, 0.25 / 3, 0.0])
    assert sum(screen.vector(result)) == pytest.approx(weighted_mean({"a": 2 / 3, "b": 0.0}, weights))


@pytest.mark.slow
def test_search_screens_out_a_worse_parent_with_one_write_per_trial(tmp_path):
    spec = SearchSpec.model_validate(SPEC)  # 15 screening examples of 40 per task, demo_reverse weighted 2
    run = RunFolder(tmp_path / "run")
    prepare_run(spec, run, 2, force=False)
    search = Search(spec, run, in_process(spec))
    search.run_budget(2)  # the uniform average (full: nothing to compare with), then demo:add alone
    average, add_alone = search.study.get_trials(states=(TrialState.COMPLETE,))
    assert add_alone.user_attrs["baseline"] == "demo:add alone"
    assert (average.user_attrs["fidelity"], add_alone.user_attrs["fidelity"]) == ("full", "screen")
    assert add_alone.value < average.value
    assert len(structured_attr(add_alone, Attr.SCREEN)) == 30 and not add_alone.intermediate_values
    weighted = sum(structured_attr(add_alone, Attr.SCREEN))
    assert weighted == pytest.approx(add_alone.value)  # the weighted screen vector sums to the screen score

    resumed = Search(spec, run, executor=search.executor)
    assert resumed.rungs[0].best_value == pytest.approx(average.value)
    assert resumed.rungs[0].best == structured_attr(average, Attr.SCREEN)



# ---- racing: several rungs, the paired test at each ---------------------------------------------------------

WEIGHTS = {"a": 1.0, "b": 3.0}
RUNGS = [20, 60]
SIZE = 200  # search documents per task


def synthetic_answers(accuracy: float, rng: random.Random, difficulty: list[float]) -> dict[str, list[float]]:
    """Right (1) or wrong (0) per document: a document of difficulty d is right with chance accuracy - d."""
    return {t: [float(rng.random() < accuracy - d) for d in difficulty] for t in WEIGHTS}


def race_outcome(screens, answers: dict[str, list[float]]):
    """run_race (the worker's loop) on a scorer that looks the answers up."""
    from evomerge.executors import Job
    from evomerge.racing import run_race
    from evomerge.recipes import Recipe

    def score(recipe, role, ids):
        examples = {t: {d: answers[t][d] for d in v} for t, v in ids.items()}
        return EvalResult({t: sum(e.values()) / len(e) for t, e in examples.items()}, examples, WEIGHTS), 0.0, 0.0

    recipe = Recipe(merge_method="linear", models=[{"model": "demo:add"}])
    return run_race(Job(recipe, "search", {t: list(range(SIZE)) for t in WEIGHTS}, screens), score, "s")


def by_hand(answers: dict[str, list[float]], incumbent: dict[str, list[float]]) -> tuple[str, int]:
    """The race decided independently: at each rung, each task's share over the rung's size weighs its
    per-document differences; the rung prunes where significantly_worse says so."""
    shares = {t: w / sum(WEIGHTS.values()) for t, w in WEIGHTS.items()}
    for k, size in enumerate(RUNGS):
        mine = [shares[t] / size * answers[t][d] for t in WEIGHTS for d in range(size)]
        theirs = [shares[t] / size * incumbent[t][d] for t in WEIGHTS for d in range(size)]
        if significantly_worse(mine, theirs):
            return "screen", k + 1
    return "full", len(RUNGS)


def test_race_decisions_and_examples_scored_match_an_independent_computation():
    from evomerge.racing import race

    rng = random.Random(0)
    difficulty = [rng.uniform(-0.3, 0.3) for _ in range(SIZE)]
    incumbent = synthetic_answers(0.6, rng, difficulty)
    screens = race(FirstDocuments({t: list(range(SIZE)) for t in WEIGHTS}), RUNGS, WEIGHTS)
    first = race_outcome(screens, incumbent)  # nothing to compare with: scored in full
    assert first.fidelity == "full" and len(first.result.examples["a"]) == SIZE
    for screen, vector in zip(screens, first.rung_vectors, strict=True):
        screen.record(first.result.score, vector)
    seen = set()
    for accuracy in [0.3, 0.45, 0.5, 0.55, 0.6, 0.7] * 5:
        answers = synthetic_answers(accuracy, rng, difficulty)
        outcome = race_outcome(screens, answers)
        fidelity, rungs = by_hand(answers, incumbent)
        assert (outcome.fidelity, len(outcome.rung_vectors)) == (fidelity, rungs)
        scored = RUNGS[rungs - 1] if fidelity == "screen" else SIZE
        assert all(len(v) == scored for v in outcome.result.examples.values())
        assert sum(outcome.rung_vectors[-1]) == pytest.approx(
            EvalResult({t: sum(answers[t][:RUNGS[rungs - 1]]) / RUNGS[rungs - 1] for t in WEIGHTS}, {}, WEIGHTS).score)
        seen.add((fidelity, rungs))
    assert seen == {("screen", 1), ("screen", 2), ("full", 2)}  # pruned at each rung, and kept


@pytest.mark.parametrize("gap,bound", [(0.0, 2 * P_THRESHOLD), (0.05, P_THRESHOLD)])
def test_race_keeps_an_equal_or_better_candidate_with_the_stated_probability(gap, bound):
    """With a paired test at level 0.1 at each of 2 rungs, a candidate as good as the incumbent is dropped with
    probability at most 2 x 0.1 (a union bound), a better one less often; a much worse one rarely survives.
    Measured over 300 synthetic races each (answers that share document difficulty, as real models' do)."""
    from evomerge.racing import race

    rng = random.Random(1)
    dropped = worse_kept = 0
    for _ in range(300):
        difficulty = [rng.uniform(-0.3, 0.3) for _ in range(SIZE)]
        incumbent = synthetic_answers(0.6, rng, difficulty)
        screens = race(FirstDocuments({t: list(range(SIZE)) for t in WEIGHTS}), RUNGS, WEIGHTS)
        for screen, size in zip(screens, RUNGS, strict=True):
            screen.record(0.6, [w / 4 / size * incumbent[t][d] for t, w in WEIGHTS.items() for d in range(size)])
        dropped += race_outcome(screens, synthetic_answers(0.6 + gap, rng, difficulty)).fidelity == "screen"
        worse_kept += race_outcome(screens, synthetic_answers(0.4, rng, difficulty)).fidelity == "full"
    assert dropped / 300 <= bound
    assert worse_kept / 300 <= 0.05


@pytest.mark.slow
def test_racing_search_stores_each_rung_and_resumes_its_state_after_sigkill(tmp_path):
    """A racing search (rungs 8 and 20 of 40 documents per task) killed with SIGKILL after its 5th trial line,
    then resumed to the end: each trial holds its rungs' answers, a pruned one scored only its rungs, and a
    resumed search's reference on every rung is the best full trial's (as the killed process held it)."""
    racing = {**SPEC, "evaluation": {**SPEC["evaluation"], "screen_examples": [8, 20]}}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(racing))
    run = RunFolder(tmp_path / "run")
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(spec_path), "--budget", "14", "--run", str(run.root)]
    assert sigkill_at(cmd, lambda _: len(run.log_rows()) >= 5)
    spec = SearchSpec.model_validate(racing)
    killed = Search(spec, run, in_process(spec))
    full = [t for t in killed.study.get_trials() if t.user_attrs.get(Attr.FIDELITY) == "full"]
    best = max(full, key=lambda t: t.value)
    for screen, vector in zip(killed.rungs, rung_vectors(best), strict=True):
        assert (screen.best_value, screen.best) == (best.value, vector)
    killed.executor.close()
    done = subprocess.run([*cmd[:4], "--resume", str(run.root)], capture_output=True, text=True, env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [t for t in Search(spec, run, in_process(spec)).study.get_trials() if counted(t)]
    assert len(trials) == 14
    for t in trials:
        vectors = rung_vectors(t)
        assert [len(v) for v in vectors] == [16, 40][:len(vectors)]  # two tasks: 8, then 20 documents each
        expected = {"full": 80, "screen": [16, 40][len(vectors) - 1]}[t.user_attrs[Attr.FIDELITY]]
        assert t.user_attrs[Attr.EXAMPLES] == expected
        if t.user_attrs[Attr.FIDELITY] == "full":
            assert len(vectors) == 2
