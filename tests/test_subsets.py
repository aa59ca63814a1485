"""Search subsets: an informative subset drawn from strata of the reference models' answers, its shares against
the stratified estimator computed by hand, its variance against the first documents, and a search that
chooses it once, scores by it and keeps it exact across SIGKILL and resume."""

import json
import random
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from helpers import CLI_ENV, SPEC, in_process, sigkill_at

from evomerge.evaluate import EvalResult
from evomerge.executors import Job
from evomerge.recipes import parse_recipe
from evomerge.run import Attr, RunFolder, counted, examples_scored, structured_attr
from evomerge.search import Search
from evomerge.spec import SearchSpec
from evomerge.subsets import AnswerStrata, FirstDocuments


def results(answers: list[dict[int, float]], task: str = "t",
            evidence: list[dict[int, float]] | None = None) -> list[EvalResult]:
    return [EvalResult({}, {task: a}, {task: 1.0}, evidence={task: e} if e else {})
            for a, e in zip(answers, evidence or [None] * len(answers), strict=True)]


def stratified_estimate(subset: AnswerStrata, task: str, per_doc: dict[int, float]) -> float:
    """The textbook stratified estimator: each stratum drawn from weighs its documents' mean by its pool mass,
    the masses of the strata drawn from rescaled to sum to 1."""
    by_stratum: dict[str, list[float]] = {}
    for d, value in per_doc.items():
        by_stratum.setdefault(subset.strata[task][d], []).append(value)
    total = sum(subset.mass[task][k] for k in by_stratum)
    return sum(subset.mass[task][k] / total * sum(v) / len(v) for k, v in by_stratum.items())


def test_strata_order_prefixes_and_shares_by_hand():
    """40 pool documents; three reference models answer 24 of them 1/0/0, 12 of them 1/1/0 and 4 of them
    0/0/0 (pool masses 0.6, 0.3, 0.1). Every prefix draws from the strata in proportion (the first 10: 6, 3
    and 1), each stratum in pool order; the shares are the stratified estimator's."""
    pool = {"t": list(range(100, 140))}
    pattern = {d: "100" if d < 124 else "110" if d < 136 else "000" for d in pool["t"]}
    refs = results([{d: float(p[i]) for d, p in pattern.items()} for i in range(3)])
    subset = AnswerStrata.from_answers(pool, refs, size=20)
    order = subset.doc_ids["t"]
    assert len(order) == 20 and set(order) <= set(pool["t"])
    assert subset.mass["t"] == pytest.approx({":100": 0.6, ":110": 0.3, ":000": 0.1})
    assert Counter(pattern[d] for d in order[:10]) == {"100": 6, "110": 3, "000": 1}
    for k in range(1, 21):
        drawn = Counter(pattern[d] for d in order[:k])
        assert all(abs(drawn[p] - k * m) < 1 for p, m in (("100", 0.6), ("110", 0.3), ("000", 0.1)))
    for p in ("100", "110", "000"):
        own = [d for d in order if pattern[d] == p]
        assert own == sorted(own) == [d for d in pool["t"] if pattern[d] == p][:len(own)]
    rng = random.Random(0)
    candidate = {d: float(rng.random() < 0.6) for d in pool["t"]}
    for k in (3, 5, 10, 20):  # the 3- and 5-document prefixes lack the 0/0/0 stratum: its mass is left out
        ids = order[:k]
        shares = subset.shares(refs[0], "t", ids)
        assert sum(shares.values()) == pytest.approx(1.0)
        per_doc = {d: candidate[d] for d in ids}
        weighed = subset.weigh(EvalResult({"t": 0.0}, {"t": per_doc}, {"t": 1.0}))
        assert weighed.scores["t"] == pytest.approx(stratified_estimate(subset, "t", per_doc))
    assert subset.shares(refs[0], "t", order[:10])[order[0]] == pytest.approx(0.6 / 6)


def test_strata_of_a_group_keep_its_tasks_shares():
    """In a group that weighs its two tasks equally (one with 6 pool documents, one with 2), strata are formed
    within each task, and their masses are the tasks' equal parts."""
    strata = {"g": {d: "a" if d < 6 else "b" for d in range(8)}}
    answers = [EvalResult({}, {"g": {d: float(d % 2) for d in range(8)}}, {"g": 1.0}, strata)]
    subset = AnswerStrata.from_answers({"g": list(range(8))}, answers, size=4)
    assert subset.mass["g"] == pytest.approx({"a:0": 0.25, "a:1": 0.25, "b:0": 0.25, "b:1": 0.25})
    assert Counter(subset.strata["g"].values()) == {"a:0": 1, "a:1": 1, "b:0": 1, "b:1": 1}


def test_within_a_stratum_every_prefix_spans_the_references_surety():
    """A stratum of 16 documents whose mean evidence ranks them 0..15: its first k documents (k = 1, 2, 4, 8)
    fall one in each of k equal bands of that ranking; without evidence the pool order stays."""
    pool = {"t": list(range(16))}
    surety = [(7 * d) % 16 for d in range(16)]  # a permutation: document d is the surety[d]-th least sure
    refs = results([dict.fromkeys(range(16), 1.0)] * 2, evidence=[{d: float(surety[d]) for d in range(16)}] * 2)
    order = AnswerStrata.from_answers(pool, refs, size=16).doc_ids["t"]
    for k in (1, 2, 4, 8):
        assert sorted(surety[d] * k // 16 for d in order[:k]) == list(range(k))
    plain = AnswerStrata.from_answers(pool, results([dict.fromkeys(range(16), 1.0)] * 2), size=16)
    assert plain.doc_ids["t"] == list(range(16))


def synthetic_world(rng: random.Random) -> tuple[list[int], list[float]]:
    return [rng.randrange(3) for _ in range(500)], [rng.random() for _ in range(500)]


@pytest.mark.parametrize(("with_evidence", "flip", "bound"), [(False, 0.0, 0.75), (True, 0.0, 0.5),
                                                             (True, 0.1, 0.9)])
def test_strata_estimate_the_pool_score_closer_than_the_first_documents(with_evidence, flip, bound):
    """Synthetic world with the demo's shape: 500 pool documents of three skills and a difficulty in [0, 1];
    expert i answers its own skill's documents below difficulty 0.9, the average any document below 0.5, and
    each one's log-probability of the answer falls with the difficulty (evidence); candidates are right where
    the difficulty is below their per-skill ability, with ``flip`` of their answers flipped at random. Over 300
    candidates, the mean absolute error of 100 answer-stratified documents' weighted score against the pool's
    score, and that of the first 100 documents' plain mean, measured: answers alone 0.0191 vs 0.0280 (ratio
    0.68), with evidence 0.0126 vs 0.0280 (0.45); with 10% of answers flipped (noise no subset can foresee)
    0.0247 vs 0.0305 (0.81)."""
    rng = random.Random(7)
    skill, difficulty = synthetic_world(rng)
    pool = {"t": list(range(500))}
    experts = [{d: float(skill[d] == i and difficulty[d] < 0.9) for d in range(500)} for i in range(3)]
    average = {d: float(difficulty[d] < 0.5) for d in range(500)}
    evidence = [{d: -3 * difficulty[d] + rng.gauss(0, 0.3) for d in range(500)} for _ in range(4)]
    subset = AnswerStrata.from_answers(pool, results([*experts, average], evidence=evidence if with_evidence
                                                     else None), size=100)
    first = FirstDocuments({"t": list(range(100))})
    errors = {"strata": [], "first": []}
    for _ in range(300):
        ability = [rng.uniform(0.2, 0.95) for _ in range(3)]
        answers = {d: float((difficulty[d] < ability[skill[d]]) != (rng.random() < flip)) for d in range(500)}
        truth = sum(answers.values()) / 500
        for name, chosen in (("strata", subset), ("first", first)):
            per_doc = {d: answers[d] for d in chosen.doc_ids["t"]}
            plain = EvalResult({"t": sum(per_doc.values()) / len(per_doc)}, {"t": per_doc}, {"t": 1.0})
            errors[name].append(abs(chosen.weigh(plain).scores["t"] - truth))
    strata_error, first_error = (sum(e) / len(e) for e in (errors["strata"], errors["first"]))
    print(f"evidence {with_evidence}, flip {flip}: {strata_error:.4f} vs {first_error:.4f} "
          f"({strata_error / first_error:.2f})")
    assert strata_error < bound * first_error, (strata_error, first_error)


ANSWERS = {**SPEC, "evaluation": {**SPEC["evaluation"], "search_examples": 16, "screen_examples": 6,
                                  "subset": "answers", "subset_pool": 40}}


@pytest.mark.slow
def test_search_on_answer_strata_by_hand_and_across_sigkill(tmp_path):
    """A search with ``subset: answers`` killed with SIGKILL once the process holds the run's lock (the subset
    may not be chosen yet), then after the third trial line, then resumed to the end. The references (each
    parent, the average) answered the 40-document pool once (their examples counted once), and the stored
    subset is what their answers give, recomputed here from the references scored independently; every trial
    was scored on that subset, a full trial's scores being the stratified estimator of its answers and a
    screened trial's value its screen vector's sum."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(ANSWERS))
    run = RunFolder(tmp_path / "run")
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(spec_path), "--budget", "10", "--run", str(run.root)]
    assert sigkill_at(cmd, lambda proc: run.lock_file.exists() and run.lock_file.read_text().strip() == str(proc.pid))
    assert sigkill_at(cmd, lambda _: len(run.log_rows()) >= 3)
    chosen = run.load_study().user_attrs[Attr.SUBSET]
    done = subprocess.run([*cmd[:4], "--resume", str(run.root)], capture_output=True, text=True, env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    study = run.load_study()
    assert study.user_attrs[Attr.SUBSET] == chosen and study.user_attrs[Attr.SUBSET_EXAMPLES] == 3 * 2 * 40
    trials = [t for t in study.get_trials() if counted(t)]
    assert len(trials) == 10
    assert json.loads(run.summary.read_text())["examples_scored"] == examples_scored(study) == \
        240 + sum(t.user_attrs[Attr.EXAMPLES] for t in trials)

    spec = SearchSpec.model_validate(ANSWERS)
    search = Search(spec, run, in_process(spec))
    worker = search.executor.worker
    pool = {t: worker.doc_ids(t, "search")[:40] for t in ("demo_add", "demo_reverse")}
    refs = [worker.run(Job(r, "search", pool)).result for r in search.reference_recipes().values()]
    expected = AnswerStrata.from_answers(pool, refs, 16)
    assert json.loads(chosen) == json.loads(json.dumps(expected.to_json()))
    for t in trials:
        assert t.user_attrs[Attr.EXAMPLES] == {"full": 32, "screen": 12}[t.user_attrs[Attr.FIDELITY]]
        if t.user_attrs[Attr.FIDELITY] == "screen":
            assert t.value == pytest.approx(sum(structured_attr(t, Attr.SCREEN)))
            continue
        answers = worker.run(Job(parse_recipe(structured_attr(t, Attr.RECIPE)), "search",
                                 expected.doc_ids)).result
        by_hand = {task: stratified_estimate(expected, task, answers.examples[task]) for task in pool}
        assert t.user_attrs[Attr.SCORES] == pytest.approx(by_hand)
        assert t.value == pytest.approx((by_hand["demo_add"] + 2 * by_hand["demo_reverse"]) / 3)
